"""The Identity Service API v2, the lookup part, on Synapse's own listener
(``/_matrix/identity/v2``): what ma1sd or Sydent did for "invite by email", answered from
the care record (README, "Identity lookups").

- ``GET /_matrix/identity/v2`` → ``{}``; ``GET /terms`` → ``{"policies": {}}``: open.
- ``POST /account/register`` with an OpenID token this homeserver issued (it is asked
  whose token it is, ``openid_userinfo``) → ``{"token"}``, an identity-service token.
- With that token (``Authorization: Bearer`` or ``?access_token=``), only for a usable
  local account: ``GET /account``, ``POST /account/logout``, ``POST /terms``,
  ``GET /hash_details``, ``POST /lookup``.
- ``/store-invite``, ``/sign-ed25519``, ``/3pid/…``, ``/validate/…``: 403 ``M_FORBIDDEN``
  — no invitation or binding is kept here: members come from the FHIR care record.

Addresses, hashes and tokens are never logged.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import DirectServeJsonResource, ModuleApi, SynapseRequest
from synapse.module_api.errors import Codes, SynapseError

from synapse_fhir_module.identity.directory import AddressDirectory, LookupUnavailable
from synapse_fhir_module.identity.lookup import (
    ALGORITHMS,
    MAX_ADDRESSES,
    check_pepper,
    parse_lookup_request,
    parse_openid_token,
)
from synapse_fhir_module.identity.openid_userinfo import HomeserverUnavailable, OpenIdUserInfo
from synapse_fhir_module.identity.records import IdentityRecords
from synapse_fhir_module.identity.token_bucket import TokenBuckets

logger = logging.getLogger(__name__)

IDENTITY_PATH = "/_matrix/identity/v2"
# 1000 hashes of 43 characters need about 50 KiB; plain addresses a few times that.
MAX_BODY_BYTES = 512 * 1024

# Endpoints of a full identity server that keep invitations or bindings: refused.
REFUSED = frozenset({"store-invite", "sign-ed25519", "3pid", "validate", "bulk_lookup"})
REFUSAL = (
    "This identity service keeps no invitations or bindings: the members of care-team "
    "rooms come from the FHIR care record. Look the address up and invite the account "
    "found, or ask for the person to be added to the care team."
)
REFUSAL_REASON = "third_party_invite_forbidden"

# /account/register needs no token, and each call has the homeserver asked about an
# OpenID token: per client address, a burst of 20, then one a second. (A client registers
# once per token lifetime; many people behind one address still fit.)
REGISTER_BURST = 20
REGISTER_PER_SECOND = 1.0

Handler = Callable[[SynapseRequest], Awaitable[tuple[int, dict[str, Any]]]]


class IdentityServiceResource(DirectServeJsonResource):
    # Every path below /_matrix/identity/v2 reaches this resource (``request.postpath``).
    isLeaf = True  # noqa: N815 (Twisted's name)

    def __init__(
        self,
        api: ModuleApi,
        records: IdentityRecords,
        openid: OpenIdUserInfo,
        directory: AddressDirectory,
        buckets: TokenBuckets,
    ) -> None:
        super().__init__()
        self._api = api
        self._records = records
        self._openid = openid
        self._directory = directory
        self._buckets = buckets
        self._registrations = TokenBuckets(REGISTER_BURST, REGISTER_PER_SECOND)
        # A request may not ask for more than the bucket ever holds.
        self._max_addresses = min(MAX_ADDRESSES, int(buckets.capacity))
        self._routes: dict[tuple[str, ...], dict[str, Handler]] = {
            (): {"GET": self._status},
            ("account",): {"GET": self._account},
            ("account", "register"): {"POST": self._register},
            ("account", "logout"): {"POST": self._logout},
            ("terms",): {"GET": self._terms, "POST": self._accept_terms},
            ("hash_details",): {"GET": self._hash_details},
            ("lookup",): {"POST": self._lookup},
        }

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return await self._route(request, "GET")

    async def _async_render_POST(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return await self._route(request, "POST")

    async def _async_render_PUT(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return await self._route(request, "PUT")

    async def _async_render_DELETE(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return await self._route(request, "DELETE")

    async def _route(self, request: SynapseRequest, method: str) -> tuple[int, dict[str, Any]]:
        path = _segments(request)
        if path and path[0] in REFUSED:
            raise SynapseError(
                403,
                REFUSAL,
                Codes.FORBIDDEN,
                additional_fields={"org.synapse_fhir.reason": REFUSAL_REASON},
            )
        handlers = self._routes.get(path)
        if handlers is None:
            raise SynapseError(404, "Unknown identity service endpoint", Codes.UNRECOGNIZED)
        handler = handlers.get(method)
        if handler is None:
            raise SynapseError(
                405, f"{method} is not allowed here: {', '.join(handlers)}", Codes.UNRECOGNIZED
            )
        return await handler(request)

    async def _status(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return 200, {}

    async def _terms(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return 200, {"policies": {}}

    async def _accept_terms(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        await self._authenticate(request)
        body = _read_json_object(request)
        accepts = body.get("user_accepts")
        if not isinstance(accepts, list) or not all(isinstance(url, str) for url in accepts):
            raise SynapseError(400, "'user_accepts' must be a list of URLs", Codes.INVALID_PARAM)
        return 200, {}  # there are no policies to record acceptance of

    async def _register(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        _check_wait(self._registrations.take(request.get_client_ip_if_available(), 1))
        token = parse_openid_token(_read_json_object(request))
        if token.matrix_server_name != self._api.server_name:
            # Never asked: contacting a server a client names would let anyone make this
            # server send requests wherever they like.
            raise SynapseError(
                403,
                f"This identity service serves the users of {self._api.server_name} only",
                Codes.FORBIDDEN,
            )
        try:
            user_id = await self._openid.user_id_of(token.access_token)
        except HomeserverUnavailable:
            raise SynapseError(
                503, "Could not check the OpenID token with the homeserver; try again later"
            ) from None
        if user_id is None:
            raise SynapseError(401, "Unknown or expired OpenID token", Codes.UNAUTHORIZED)
        await self._check_account(user_id)
        return 200, {"token": await self._records.issue(user_id)}

    async def _account(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        return 200, {"user_id": await self._authenticate(request)}

    async def _logout(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        token = _access_token(request)
        if token is None or not await self._records.revoke(token):
            raise SynapseError(401, "Unrecognised identity service token", Codes.UNKNOWN_TOKEN)
        return 200, {}

    async def _hash_details(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        await self._authenticate(request)
        return 200, {"algorithms": list(ALGORITHMS), "lookup_pepper": await self._records.pepper()}

    async def _lookup(self, request: SynapseRequest) -> tuple[int, dict[str, Any]]:
        user_id = await self._authenticate(request)
        lookup = parse_lookup_request(_read_json_object(request), max_addresses=self._max_addresses)
        check_pepper(lookup, await self._records.pepper())
        _check_wait(self._buckets.take(user_id, max(1, len(lookup.addresses))))
        try:
            mappings = await self._directory.resolve(lookup)
        except LookupUnavailable:
            raise SynapseError(
                503, "The care record cannot be asked right now; try again later"
            ) from None
        logger.debug(
            "Identity lookup (%s): %d of %d found",
            lookup.algorithm,
            len(mappings),
            len(lookup.addresses),
        )
        return 200, {"mappings": mappings}

    async def _authenticate(self, request: SynapseRequest) -> str:
        """The user whose identity-service token the request carries."""
        token = _access_token(request)
        if token is None:
            raise SynapseError(
                401,
                "An identity service token is needed (Authorization: Bearer <token>, "
                "from POST /_matrix/identity/v2/account/register)",
                Codes.UNAUTHORIZED,
            )
        user_id = await self._records.user_of(token)
        if user_id is None:
            raise SynapseError(401, "Unknown or expired identity service token", Codes.UNAUTHORIZED)
        await self._check_account(user_id)
        return user_id

    async def _check_account(self, user_id: str) -> None:
        """Checked on every request: a token outlives a deactivation."""
        if not await usable_account(self._api, user_id):
            raise SynapseError(
                403, "This account may not use the identity service", Codes.FORBIDDEN
            )


async def usable_account(api: ModuleApi, user_id: str) -> bool:
    """An existing account of this homeserver, not deactivated, locked or a guest."""
    if not api.is_mine(user_id):
        return False
    info = await api.get_userinfo_by_id(user_id)
    return info is not None and not (info.is_deactivated or info.is_guest or info.locked)


def _check_wait(wait: float) -> None:
    """A token bucket's answer: 0 goes on, anything else is 429 with when to retry."""
    if wait > 0:
        raise SynapseError(
            429,
            "Too many requests; try again later",
            Codes.LIMIT_EXCEEDED,
            additional_fields={"retry_after_ms": math.ceil(wait * 1000)},
            headers={"Retry-After": str(math.ceil(wait))},
        )


def _segments(request: SynapseRequest) -> tuple[str, ...]:
    """The path after ``/_matrix/identity/v2``; a trailing ``/`` ignored."""
    segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
    while segments and segments[-1] == "":
        segments.pop()
    return tuple(segments)


def _access_token(request: SynapseRequest) -> str | None:
    """``Authorization: Bearer <token>``, else the ``access_token`` query parameter
    (Synapse's own identity-server client sends the latter to /hash_details)."""
    values = request.requestHeaders.getRawHeaders(b"Authorization") or []
    if len(values) == 1:
        scheme, _, credentials = values[0].strip().partition(b" ")
        if scheme.lower() == b"bearer" and credentials.strip():
            return credentials.strip().decode("utf-8", "replace")
    query = (request.args or {}).get(b"access_token") or []
    if len(query) == 1 and query[0]:
        return query[0].decode("utf-8", "replace")
    return None


def _read_json_object(request: SynapseRequest) -> dict[str, Any]:
    """The body as a JSON object, at most MAX_BODY_BYTES (413 beyond; 400 when not a
    JSON object)."""
    declared = request.requestHeaders.getRawHeaders(b"Content-Length") or []
    if any(_too_long(value) for value in declared):
        raise _too_large()
    body = b""
    if request.content is not None:
        request.content.seek(0)
        body = request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise _too_large()
    try:
        content = json.loads(body.decode("utf-8"))
    except (ValueError, RecursionError):  # also UnicodeDecodeError
        raise SynapseError(400, "The body must be a JSON object", Codes.NOT_JSON) from None
    if not isinstance(content, dict):
        raise SynapseError(400, "The body must be a JSON object", Codes.BAD_JSON)
    return content


def _too_long(content_length: bytes) -> bool:
    try:
        return int(content_length) > MAX_BODY_BYTES
    except ValueError:
        return False


def _too_large() -> SynapseError:
    return SynapseError(413, f"The body may not exceed {MAX_BODY_BYTES} bytes", Codes.TOO_LARGE)
