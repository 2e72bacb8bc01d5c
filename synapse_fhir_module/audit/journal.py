"""The audit journal as the deciding code sees it: ``note`` returns at once (never a wait on
the database where Synapse is answering someone); the decisions noted go to the journal
table in batches, a moment later, from a background call on the same instance.

What a crash loses: the decisions of the last ``FLUSH_DELAY_MS`` not yet written. Each is a
refusal, a registration or a change the module made; the change itself is in the room's
history either way, and a refusal changed nothing.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

from synapse.module_api import ModuleApi

from synapse_fhir_module.audit import journal_store
from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome

logger = logging.getLogger(__name__)

FLUSH_DELAY_MS = 200
RETRY_MS = 2_000
MAX_BATCH = 500
# Beyond this many unwritten decisions (the database unreachable for long, i.e. Synapse
# itself failing), further ones are counted and dropped rather than filling memory.
MAX_PENDING = 50_000
# The same decision noted again this soon is one decision: Synapse may ask two callbacks
# about one attempt (a spam check, then the event rule), and both refuse it.
SAME_DECISION_MS = 2_000


class AuditJournal:
    def __init__(self, api: ModuleApi, *, now_ms: Callable[[], int]) -> None:
        self._api = api
        self._now_ms = now_ms
        self._pending: list[Decision] = []
        self._recent: dict[tuple, int] = {}
        self._scheduled = False
        self._started = False
        self._listeners: list[Callable[[], None]] = []
        self.dropped = 0

    def add_listener(self, listener: Callable[[], None]) -> None:
        """``listener`` is called after each batch reaches the table (e.g. to ship it)."""
        self._listeners.append(listener)

    def note(
        self,
        kind: DecisionKind,
        outcome: Outcome,
        *,
        user_id: str | None = None,
        actor_id: str | None = None,
        room_id: str | None = None,
        care_team: str | None = None,
        request: str | None = None,
        reason: str | None = None,
        detail: str | None = None,
    ) -> None:
        now = self._now_ms()
        key = (kind, outcome, user_id, actor_id, room_id, care_team, request, reason, detail)
        if now - self._recent.get(key, -SAME_DECISION_MS) < SAME_DECISION_MS:
            return
        if len(self._recent) > 1000:
            self._recent = {k: t for k, t in self._recent.items() if now - t < SAME_DECISION_MS}
        self._recent[key] = now
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            return
        self._pending.append(
            Decision(
                kind=kind,
                outcome=outcome,
                recorded_ms=now,
                user_id=user_id,
                actor_id=actor_id,
                room_id=room_id,
                care_team=care_team,
                request=request,
                reason=reason,
                detail=detail,
            )
        )
        self._schedule(FLUSH_DELAY_MS)

    async def start(self) -> None:
        """Make sure the table exists, then write whatever was noted meanwhile."""
        await self._api.run_db_interaction("fhir_audit_tables", journal_store.create_tables)
        self._started = True
        self._schedule(0)

    @property
    def unwritten(self) -> int:
        return len(self._pending)

    def _schedule(self, delay_ms: int) -> None:
        if self._scheduled or not self._started or not self._pending:
            return
        self._scheduled = True
        self._api.delayed_background_call(delay_ms, self._flush, desc="fhir_audit_journal")

    async def _flush(self) -> None:
        self._scheduled = False
        batch = self._pending[:MAX_BATCH]
        if not batch:
            return
        try:
            await self._api.run_db_interaction(
                "fhir_audit_journal", journal_store.insert_decisions, batch
            )
        except Exception as e:
            logger.warning("Could not journal %d audit decisions (%s); trying again", len(batch), e)
            self._scheduled = True
            self._api.delayed_background_call(RETRY_MS, self._flush, desc="fhir_audit_journal")
            return
        del self._pending[: len(batch)]
        if self.dropped:
            logger.warning("Dropped %d audit decisions while the database lagged", self.dropped)
        for listener in self._listeners:
            listener()
        self._schedule(0)
