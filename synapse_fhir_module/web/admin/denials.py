"""``GET …/admin/api/denials?limit=N``: the latest refusals the module decided, newest
first, from its audit journal (``audit.journal_store.recent_refusals``): the rule (reason
code), the room, the user, the time.

Nothing about the patient: no names, no message text; the journal holds none either.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from synapse.module_api import DirectServeJsonResource, ModuleApi, SynapseRequest

from synapse_fhir_module.audit.journal_store import JournalRow
from synapse_fhir_module.storage import Cursor
from synapse_fhir_module.web.admin.access import require_admin
from synapse_fhir_module.web.admin.limits import parse_limit

DEFAULT_LIMIT = 50
MAX_LIMIT = 500


# (cursor, limit) → the latest refusals, newest first.
RecentRefusals = Callable[[Cursor, int], Sequence[JournalRow]]


def refusal_json(row: JournalRow) -> dict[str, Any]:
    """The fields the console shows (a journal row may carry more: none of it goes out)."""
    return {
        "ts": row.recorded_ms,
        "kind": row.kind,
        # What was attempted (join, invite, send...): a short code, never content.
        "action": row.decision.detail,
        "rule": row.reason,
        "room_id": row.room_id,
        "user_id": row.user_id,
        "actor_id": row.actor_id,
    }


class DenialsResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi, recent_refusals: RecentRefusals) -> None:
        super().__init__()
        self._api = api
        self._recent_refusals = recent_refusals

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        await require_admin(self._api, request)
        limit = parse_limit(request.args, default=DEFAULT_LIMIT, maximum=MAX_LIMIT)
        rows = await self._api.run_db_interaction(
            "fhir_admin_refusals", self._recent_refusals, limit
        )
        return 200, {"denials": [refusal_json(row) for row in rows]}
