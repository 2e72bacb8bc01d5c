"""The console's page: one HTML file, one script, one style sheet, read from the package
once and served to anyone (they hold no data; every figure comes from the admin API, which
asks for a server admin's token).

Every answer forbids what the page never needs: scripts, styles and connections other than
its own origin's, inline code, frames around it, being cached, MIME sniffing, and a
Referer leaving it. Trusted Types make any HTML built from a string an error in the
browsers that enforce them: the script builds the page with DOM calls and ``textContent``.
"""

from __future__ import annotations

from importlib import resources

from twisted.web.resource import Resource
from twisted.web.server import Request

CONTENT_SECURITY_POLICY = "; ".join(
    [
        "default-src 'self'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self'",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        # (The login form is sent by the script; submitted by the browser it would put
        # the password in a URL: refused.)
        "form-action 'none'",
        "frame-ancestors 'none'",
        "require-trusted-types-for 'script'",
        "trusted-types 'none'",
    ]
)
SECURITY_HEADERS = {
    b"Content-Security-Policy": CONTENT_SECURITY_POLICY.encode("ascii"),
    b"X-Content-Type-Options": b"nosniff",
    b"Referrer-Policy": b"no-referrer",
    b"Cache-Control": b"no-store",
    b"X-Frame-Options": b"DENY",
    b"Cross-Origin-Opener-Policy": b"same-origin",
}
# File name → content type.
FILES = {
    "index.html": b"text/html; charset=utf-8",
    "console.js": b"text/javascript; charset=utf-8",
    "console.css": b"text/css; charset=utf-8",
}


def read_static(name: str) -> bytes:
    return (resources.files(__package__) / "static" / name).read_bytes()


def set_security_headers(request: Request) -> None:
    for header, value in SECURITY_HEADERS.items():
        request.setHeader(header, value)


class StaticFile(Resource):
    """One of the console's files (GET and HEAD only)."""

    isLeaf = True  # noqa: N815 (Twisted's name)

    def __init__(self, name: str) -> None:
        super().__init__()
        self._body = read_static(name)
        self._content_type = FILES[name]

    def render_GET(self, request: Request) -> bytes:
        set_security_headers(request)
        request.setHeader(b"Content-Type", self._content_type)
        return self._body

    def render_HEAD(self, request: Request) -> bytes:
        return self.render_GET(request)
