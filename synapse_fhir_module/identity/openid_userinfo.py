"""Whose OpenID token is this? Asked of this homeserver itself.

``/openid/request_token`` (client-server API) gives a user a short-lived OpenID token; an
identity service learns whose it is from the issuing homeserver's federation endpoint
``GET /_matrix/federation/v1/openid/userinfo?access_token=…`` → ``{"sub": "@alice:…"}``.
Synapse's module API has no call for it, so the module asks over HTTP — only ever its
own homeserver, at ``identity.lookup_homeserver_url`` (default: ``public_baseurl``): the
``matrix_server_name`` a client sends is compared, never contacted.

The listener there must serve Synapse's ``openid`` (or ``federation``) resource.
"""

from __future__ import annotations

import json
import logging
from urllib.parse import urlencode

from synapse_fhir_module.http_exchange import Unreachable, exchange, http_client

logger = logging.getLogger(__name__)

USERINFO_PATH = "/_matrix/federation/v1/openid/userinfo"
TIMEOUT_SECONDS = 10.0
MAX_ANSWER_BYTES = 64 * 1024


class HomeserverUnavailable(Exception):
    """The homeserver could not say whose token it is (unreachable, or it answered
    something other than yes or no)."""


class OpenIdUserInfo:
    def __init__(self, homeserver_url: str, *, timeout: float = TIMEOUT_SECONDS) -> None:
        self._url = homeserver_url.rstrip("/") + USERINFO_PATH
        self._timeout = timeout
        self._http = http_client()

    @property
    def url(self) -> str:
        return self._url

    async def user_id_of(self, access_token: str) -> str | None:
        """The user the homeserver issued ``access_token`` to; None when it does not know
        the token (unknown or expired)."""
        status, body = await self._get(f"{self._url}?{urlencode({'access_token': access_token})}")
        if status == 401:
            return None
        if status != 200:
            # (The URL has the token in it: name the endpoint only.)
            logger.warning(
                "OpenID userinfo at %s answered HTTP %d: does that listener serve the "
                "'openid' resource?",
                self._url,
                status,
            )
            raise HomeserverUnavailable(f"HTTP {status}")
        subject = _subject(body)
        if subject is None:
            raise HomeserverUnavailable("an answer without a user id")
        return subject

    async def _get(self, url: str) -> tuple[int, bytes]:
        # (One deadline for the whole exchange: a stuck listener must not hold the client.)
        try:
            return await exchange(self._http, "GET", url, timeout=self._timeout)
        except Unreachable as e:
            logger.warning("OpenID userinfo at %s not reachable: %s", self._url, e.reason)
            raise HomeserverUnavailable(e.reason) from e


def _subject(body: bytes) -> str | None:
    if len(body) > MAX_ANSWER_BYTES:
        return None
    try:
        content = json.loads(body.decode("utf-8"))
    except ValueError:
        return None
    subject = content.get("sub") if isinstance(content, dict) else None
    if not isinstance(subject, str) or not subject.startswith("@") or ":" not in subject:
        return None
    return subject
