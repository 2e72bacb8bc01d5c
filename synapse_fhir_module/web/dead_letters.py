"""Admin endpoints for the outbox's dead letters: see why FHIR refused a message, and send
it again once the cause is fixed (e.g. the sender was given a FHIR person).

- ``GET /_synapse/client/fhir/outbox/dead?limit=N`` → ``{"dead": [{event_id, room_id,
  enqueued_ts, attempts, reason}]}``, oldest first.
- ``POST /_synapse/client/fhir/outbox/dead/retry`` with ``{"event_ids": [...]}`` (or ``{}``
  for all) → ``{"requeued": n}``.

Server admins only: the reasons name rooms and events, and FHIR's own reason can quote
what a message held (until the message is redacted: then only the HTTP status stays, see
``recording.amendments``).

The operator console serves the same two resources under its own API
(``web.admin.console``): one implementation, two addresses.
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
from synapse_fhir_module.web.admin.access import require_admin
from synapse_fhir_module.web.admin.limits import parse_limit

DEAD_LETTERS_PATH = "/_synapse/client/fhir/outbox/dead"
RETRY_PATH = "/_synapse/client/fhir/outbox/dead/retry"
DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


class DeadLettersResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi) -> None:
        super().__init__()
        self._api = api

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        await require_admin(self._api, request)
        limit = parse_limit(request.args, default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
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
        await require_admin(self._api, request)
        body = parse_json_object_from_request(request)
        event_ids = _event_ids(body)
        requeued = await self._api.run_db_interaction(
            "fhir_outbox_requeue", outbox_store.requeue_dead, event_ids, self._now_ms()
        )
        self._wake()
        return 200, {"requeued": requeued}


def _event_ids(body: dict[str, Any]) -> list[str] | None:
    if "event_ids" not in body:
        return None
    event_ids = body["event_ids"]
    if not isinstance(event_ids, list) or not all(isinstance(e, str) for e in event_ids):
        raise SynapseError(400, "event_ids must be a list of event ids", Codes.INVALID_PARAM)
    return event_ids
