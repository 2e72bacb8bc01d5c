"""``/_synapse/client/fhir/notify``: FHIR tells the module what changed (design.md: endpoints).

Two forms reach this one resource:

- the HAPI shim's ``POST /notify`` with ``{"resourceType", "id", "versionId", "action"}``;
- a HAPI rest-hook Subscription whose endpoint is ``/notify``:
  ``PUT /notify/<type>/<id>`` for a create or an update (the resource as body, and, unless
  the Subscription strips version ids, ``If-Match: W/"<version>"``) and ``DELETE
  /notify/<type>/<id>`` for a delete (only with HAPI's ``subscription-send-delete-messages``
  channel extension). ``/_history/<version>`` after the id is accepted too. This form is
  answered with an ``OperationOutcome``, since HAPI's client reads the answer as FHIR.
  (A Subscription without payload POSTs an empty body that names no resource: refused
  as malformed, and HAPI does not look at the answer.)

Notify, then pull: a notification names a resource and nothing else. A PUT body is never
read as data (whoever holds the secret could claim anything in it); the module re-reads
the resource from FHIR. Parsing ends in a :class:`Notification` handed synchronously to
``on_notification``, which must only schedule work: the answer (202) never waits for it.
"""

from __future__ import annotations

import hmac
import json
import logging
import re
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from enum import Enum
from typing import Any

import attr
from synapse.module_api import DirectServeJsonResource, SynapseRequest
from synapse.module_api.errors import Codes, SynapseError

from synapse_fhir_module.fhir.conventions import FHIR_ID, RESOURCE_TYPE
from synapse_fhir_module.sync.subscriptions import NOTIFY_PATH
from synapse_fhir_module.web.metrics import NOTIFY_REJECTED

logger = logging.getLogger(__name__)

MAX_BODY_BYTES = 64 * 1024

# The resource types the module acts on; a notification about any other type is
# answered 202 and dropped, so a FHIR server may notify about more than we need.
HANDLED_RESOURCE_TYPES = frozenset(
    {
        "CareTeam",
        "CommunicationRequest",
        "Communication",
        "Patient",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
    }
)

_VERSION = re.compile(r"[0-9]{1,18}")
# HAPI's rest-hook client sends the delivered version as a weak ETag.
_IF_MATCH_VERSION = re.compile(r'(?:W/)?"([0-9]{1,18})"')
# The rejection metric's reason, by status (401 tells a missing header from a wrong secret).
_REJECTION_REASONS = {
    400: "malformed",
    404: "not_found",
    405: "method_not_allowed",
    413: "too_large",
}


class Action(str, Enum):
    CREATE = "create"
    UPDATE = "update"
    DELETE = "delete"


@attr.s(frozen=True, auto_attribs=True)
class Notification:
    """``resource_type``/``id`` changed; ``version_id`` is the version FHIR stored, when known."""

    resource_type: str
    id: str
    version_id: int | None
    action: Action

    @property
    def reference(self) -> str:
        return f"{self.resource_type}/{self.id}"


class NotifyResource(DirectServeJsonResource):
    """Authenticates, bounds and parses a notification, hands it on, answers 202."""

    # Twisted stops its path walk here, so ``/notify/CareTeam/12`` reaches this resource
    # too (with ``request.postpath`` = the segments after ``/notify``).
    isLeaf = True  # noqa: N815 (Twisted's name)

    def __init__(self, secret: str | None, on_notification: Callable[[Notification], None]) -> None:
        super().__init__()
        # None: no secret configured, every call is refused.
        self._secret = secret.encode("utf-8") if secret else None
        if self._secret is None:
            logger.info("webhook.secret is not set: %s refuses every notification", NOTIFY_PATH)
        self._on_notification = on_notification

    async def _async_render_POST(self, request: SynapseRequest) -> tuple[int, dict]:
        with _counting_rejections():
            if _segments(request):
                raise _method_not_allowed("POST", "/notify/<type>/<id>")
            self._authenticate(request)
            handled = self._hand_on(_parse_shim_body(_read_body(request)))
            return 202, {"status": "accepted" if handled else "ignored"}

    async def _async_render_PUT(self, request: SynapseRequest) -> tuple[int, dict]:
        with _counting_rejections():
            return self._subscription_form(request, Action.UPDATE)

    async def _async_render_DELETE(self, request: SynapseRequest) -> tuple[int, dict]:
        with _counting_rejections():
            return self._subscription_form(request, Action.DELETE)

    def _subscription_form(self, request: SynapseRequest, action: Action) -> tuple[int, dict]:
        """``PUT|DELETE /notify/<type>/<id>[/_history/<version>]``; the body only counts
        towards the size limit. A PUT is a create or an update: HAPI sends both alike."""
        segments = _segments(request)
        if not segments:
            raise _method_not_allowed(request.method.decode("ascii"), "/notify")
        if len(segments) not in (2, 4) or (len(segments) == 4 and segments[2] != "_history"):
            raise SynapseError(
                404,
                "Expected /notify/<resource type>/<id>, optionally followed by /_history/<version>",
                Codes.UNRECOGNIZED,
            )
        self._authenticate(request)
        _read_body(request)  # size-checked, then ignored: the body is never trusted
        resource_type = _resource_type(segments[0])
        resource_id = _resource_id(segments[1])
        if len(segments) == 4:
            version_id: int | None = _version(segments[3], "the /_history/ version")
        else:
            version_id = _if_match_version(request)
        handled = self._hand_on(Notification(resource_type, resource_id, version_id, action))
        # HAPI's rest-hook client parses a 2xx answer's body as a FHIR resource and retries
        # the delivery when it is not one (HAPI-1359), so this form answers in FHIR.
        return 202, _operation_outcome("accepted" if handled else "ignored: type not handled")

    def _authenticate(self, request: SynapseRequest) -> None:
        """``Authorization: Bearer <webhook.secret>``, compared in constant time."""
        values = request.requestHeaders.getRawHeaders(b"Authorization") or []
        token: bytes | None = None
        if len(values) == 1:
            scheme, _, credentials = values[0].strip().partition(b" ")
            if scheme.lower() == b"bearer":
                token = credentials.strip()
        if token is None:
            raise SynapseError(
                401,
                "Notifications need an 'Authorization: Bearer <webhook secret>' header",
                Codes.MISSING_TOKEN,
            )
        if self._secret is None or not hmac.compare_digest(token, self._secret):
            raise SynapseError(401, "Wrong webhook secret", Codes.UNKNOWN_TOKEN)

    def _hand_on(self, notification: Notification) -> bool:
        """Passes a notification about a handled type on; False if it was ignored."""
        if notification.resource_type not in HANDLED_RESOURCE_TYPES:
            logger.debug("Ignoring notification about %s", notification.resource_type)
            return False
        logger.debug("Notification: %s %s", notification.action.value, notification.reference)
        self._on_notification(notification)
        return True


@contextmanager
def _counting_rejections() -> Iterator[None]:
    """Every refusal is counted once, by reason (``synapse_fhir_notify_rejected``)."""
    try:
        yield
    except SynapseError as e:
        NOTIFY_REJECTED.labels(reason=_rejection_reason(e)).inc()
        raise


def _rejection_reason(error: SynapseError) -> str:
    if error.code == 401:
        return "missing_secret" if error.errcode == Codes.MISSING_TOKEN else "wrong_secret"
    return _REJECTION_REASONS.get(error.code, "other")


def _operation_outcome(diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": diagnostics}],
    }


def _segments(request: SynapseRequest) -> list[str]:
    """The path after ``/notify`` (percent-decoded by Twisted), a trailing ``/`` ignored."""
    segments = [s.decode("utf-8", "replace") for s in request.postpath or []]
    if segments and segments[-1] == "":
        segments.pop()
    # An encoded "/" or a dot segment: a proxy that routes on the decoded, dot-resolved path
    # saw another path than this one. Refused before the secret is looked at.
    if any("/" in s or s in (".", "..") for s in segments):
        raise _invalid("Encoded '/' or dot segments in the notify path")
    return segments


def _read_body(request: SynapseRequest) -> bytes:
    """At most MAX_BODY_BYTES of the body; 413 beyond that.

    Twisted has buffered the body (in a temporary file when large) before a resource
    runs; what is declared too long is refused without reading it, and no more than the
    limit (plus one byte, to notice more) is ever read into memory.
    """
    declared = request.requestHeaders.getRawHeaders(b"Content-Length") or []
    if any(_too_long(value) for value in declared):
        raise _too_large()
    if request.content is None:
        return b""
    request.content.seek(0)
    body: bytes = request.content.read(MAX_BODY_BYTES + 1)
    if len(body) > MAX_BODY_BYTES:
        raise _too_large()
    return body


def _too_long(content_length: bytes) -> bool:
    try:
        return int(content_length) > MAX_BODY_BYTES
    except ValueError:
        return False  # Twisted refuses such a request before it gets here


def _too_large() -> SynapseError:
    return SynapseError(
        413, f"A notification body may not exceed {MAX_BODY_BYTES} bytes", Codes.TOO_LARGE
    )


def _method_not_allowed(method: str, path: str) -> SynapseError:
    return SynapseError(
        405,
        f"{method} is not allowed on {path}: POST /notify (the shim's form), "
        "PUT|DELETE /notify/<resource type>/<id> (a rest-hook Subscription)",
        Codes.UNRECOGNIZED,
    )


def _parse_shim_body(body: bytes) -> Notification:
    """``{"resourceType", "id", "versionId", "action"}``; other keys are ignored."""
    try:
        content = json.loads(body.decode("utf-8"), parse_constant=_reject_constant)
    except (ValueError, RecursionError) as e:  # also UnicodeDecodeError, JSONDecodeError
        raise SynapseError(
            400,
            "Expected a JSON object "
            '{"resourceType", "id", "versionId", "action"}: ' + _json_problem(e),
            Codes.BAD_JSON,
        ) from None
    if not isinstance(content, Mapping):
        raise SynapseError(
            400,
            'Expected a JSON object {"resourceType", "id", "versionId", "action"}',
            Codes.BAD_JSON,
        )
    resource_type = _resource_type(_string_field(content, "resourceType"))
    resource_id = _resource_id(_string_field(content, "id"))
    version_id = _version_field(content.get("versionId"))
    action_name = _string_field(content, "action")
    try:
        action = Action(action_name)
    except ValueError:
        raise _invalid("'action' must be one of create, update, delete") from None
    return Notification(resource_type, resource_id, version_id, action)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _json_problem(error: ValueError | RecursionError) -> str:
    # The decoder's message names a position, never the body's content.
    if isinstance(error, UnicodeDecodeError):
        return "the body is not UTF-8"
    if isinstance(error, RecursionError):
        return "nested too deeply"
    return str(error) if isinstance(error, json.JSONDecodeError) else "not JSON"


def _string_field(content: Mapping[str, Any], key: str) -> str:
    value = content.get(key)
    if not isinstance(value, str):
        raise _invalid(f"'{key}' is required and must be a string")
    return value


def _resource_type(value: str) -> str:
    if not RESOURCE_TYPE.fullmatch(value):
        raise _invalid("The resource type must be a FHIR resource type name, e.g. CareTeam")
    return value


def _resource_id(value: str) -> str:
    if not FHIR_ID.fullmatch(value):
        raise _invalid("The id must be a FHIR id: 1-64 of A-Z, a-z, 0-9, '-' and '.'")
    return value


def _version_field(value: Any) -> int | None:
    """``versionId``: absent or null (not known), a string of digits (the contract's
    form), or a non-negative integer."""
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**18:
        return value
    if isinstance(value, str):
        return _version(value, "'versionId'")
    raise _invalid("'versionId' must be a string of digits or null")


def _version(value: str, what: str) -> int:
    if not _VERSION.fullmatch(value):
        raise _invalid(f"{what} must be a string of digits")
    return int(value)


def _if_match_version(request: SynapseRequest) -> int | None:
    """The version HAPI's rest-hook puts in ``If-Match``; a header is only a hint, so
    anything else there means "version not known"."""
    values = request.requestHeaders.getRawHeaders(b"If-Match") or []
    if len(values) != 1:
        return None
    match = _IF_MATCH_VERSION.fullmatch(values[0].decode("latin-1").strip())
    return int(match.group(1)) if match else None


def _invalid(message: str) -> SynapseError:
    return SynapseError(400, message, Codes.INVALID_PARAM)
