"""One HTTP exchange on treq, bounded by a single deadline for all of it.

The module's three HTTP clients (FHIR, the homeserver's OpenID userinfo, Synapse's
client API read back by the recorder) share this: a persistent connection pool, every
treq deferred wrapped in ``make_deferred_yieldable`` so Synapse's log contexts stay
correct, and one deadline for connect + headers + body, so a server that trickles its
answer cannot hold the caller longer than it allows.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, cast

import treq
from synapse.module_api import make_deferred_yieldable
from twisted.internet import reactor
from twisted.web.client import Agent, HTTPConnectionPool
from twisted.web.http_headers import Headers
from twisted.web.iweb import IAgent


class Unreachable(Exception):
    """No answer: refused, reset, DNS, TLS, or cut off by the deadline (``reason``)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


def http_client(max_per_host: int | None = None) -> treq.client.HTTPClient:
    """A treq client over its own persistent connection pool."""
    pool = HTTPConnectionPool(reactor, persistent=True)
    if max_per_host is not None:
        pool.maxPersistentPerHost = max_per_host
    return treq.client.HTTPClient(cast(IAgent, Agent(reactor, pool=pool)))


async def exchange(
    http: treq.client.HTTPClient,
    method: str,
    url: str,
    *,
    timeout: float,
    headers: Mapping[str, str] | None = None,
    data: bytes | None = None,
) -> tuple[int, bytes]:
    """``(status, body)``; ``Unreachable`` when nothing came back within ``timeout``."""
    twisted_headers = Headers({k: [v] for k, v in (headers or {}).items()})
    d = http.request(method, url, headers=twisted_headers, data=data)

    def read_body(response: Any) -> Any:
        return treq.content(response).addCallback(lambda body: (response.code, body))

    d.addCallback(read_body)
    deadline = reactor.callLater(timeout, d.cancel)
    try:
        return cast(tuple[int, bytes], await make_deferred_yieldable(d))
    except Exception as e:
        # Anything from below HTTP (Twisted has many names for these) may work next time.
        # Cancelling surfaces as CancelledError or as a ResponseNeverReceived around it.
        raise Unreachable("timed out" if not deadline.active() else type(e).__name__) from e
    finally:
        if deadline.active():
            deadline.cancel()
