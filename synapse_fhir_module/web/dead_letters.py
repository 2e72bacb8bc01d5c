"""Admin endpoints for the outbox's dead letters: see why FHIR refused a message, and send
it again once the cause is fixed (e.g. the sender was given a FHIR person).

- ``GET /_synapse/client/fhir/outbox/dead?limit=N`` → ``{"dead": [{event_id, room_id,
  enqueued_ts, attempts, reason}]}``, oldest first.
- ``POST /_synapse/client/fhir/outbox/dead/retry`` with ``{"event_ids": [...]}`` (or ``{}``
  for all) → ``{"requeued": n}``.

Server admins only: the reasons name rooms and events, and FHIR's own reason can quote
what a message held (until the message is redacted: then only the HTTP status stays, see
``recording.amendments``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from synapse.module_api import (
    DirectServeJsonResource,
    ModuleApi,
    SynapseRequest,
    parse_json_object_from_request,
)
from synapse.module_api.errors import Codes, SynapseError

from synapse_fhir_module.recording import outbox_store

DEAD_LETTERS_PATH = "/_synapse/client/fhir/outbox/dead"
RETRY_PATH = "/_synapse/client/fhir/outbox/dead/retry"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


async def _require_admin(api: ModuleApi, request: SynapseRequest) -> None:
    requester = await api.get_user_by_req(request)
    if not await api.is_user_admin(requester.user.to_string()):
        raise SynapseError(403, "Only server admins may see the FHIR outbox", Codes.FORBIDDEN)


class DeadLettersResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi) -> None:
        super().__init__()
        self._api = api

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        await _require_admin(self._api, request)
        limit = _limit(request)
        rows = await self._api.run_db_interaction(
            "fhir_outbox_dead_letters", outbox_store.dead_letters, limit
        )
        return 200, {
            "dead": [
                {
                    "event_id": row.event_id,
                    "room_id": row.room_id,
                    "enqueued_ts": row.enqueued_ms,
                    "attempts": row.attempts,
                    "reason": row.reason,
                }
                for row in rows
            ]
        }


class RetryDeadLettersResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi, now_ms: Callable[[], int], wake: Callable[[], None]):
        super().__init__()
        self._api = api
        self._now_ms = now_ms
        self._wake = wake

    async def _async_render_POST(self, request: SynapseRequest) -> tuple[int, dict]:
        await _require_admin(self._api, request)
        body = parse_json_object_from_request(request)
        event_ids = _event_ids(body)
        requeued = await self._api.run_db_interaction(
            "fhir_outbox_requeue", outbox_store.requeue_dead, event_ids, self._now_ms()
        )
        self._wake()
        return 200, {"requeued": requeued}


def _limit(request: SynapseRequest) -> int:
    raw = (request.args or {}).get(b"limit")
    if not raw:
        return DEFAULT_LIMIT
    try:
        limit = int(raw[0])
    except ValueError:
        limit = 0
    if not 1 <= limit <= MAX_LIMIT:
        raise SynapseError(400, f"limit must be 1-{MAX_LIMIT}", Codes.INVALID_PARAM)
    return limit


def _event_ids(body: dict[str, Any]) -> list[str] | None:
    if "event_ids" not in body:
        return None
    event_ids = body["event_ids"]
    if not isinstance(event_ids, list) or not all(isinstance(e, str) for e in event_ids):
        raise SynapseError(400, "event_ids must be a list of event ids", Codes.INVALID_PARAM)
    return event_ids
