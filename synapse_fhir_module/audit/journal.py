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
from typing import Any

from prometheus_client import Counter, Gauge
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
MAX_RECENT = 10_000
# Refusals of one user noted per minute at most (``audit.max_refusals_per_minute``), and
# of all remote users together REMOTE_FACTOR times that (remote servers mint users at
# will). What goes beyond is not lost without a trace: at the end of the minute one
# summary row per user says how many of their refusals were not journaled one by one.
REFUSAL_WINDOW_MS = 60_000
REMOTE_FACTOR = 10
SUMMARY_REASON = "refusals_suppressed"
# Users with a summary owed, at most; beyond, their counts go to one row naming nobody.
MAX_SUMMARISED_USERS = 10_000
# What a journal field may hold: Matrix ids and references are ASCII, at most 255 bytes
# (the spec's bound); a received event can carry anything, so longer values are cut and
# control characters (NUL, which PostgreSQL refuses, among them) replaced.
MAX_FIELD = 255
_CONTROL = dict.fromkeys([*range(0x20), 0x7F], "?")

SUPPRESSED = Counter(
    "synapse_fhir_audit_suppressed",
    "Refusals not journaled one by one (beyond audit.max_refusals_per_minute; summarised)",
)
DROPPED = Counter(
    "synapse_fhir_audit_dropped",
    "Decisions lost: beyond MAX_PENDING while the database did not take them, or a row"
    " the database refused even alone",
)
UNWRITTEN = Gauge(
    "synapse_fhir_audit_unwritten",
    "Decisions noted in memory, not yet in the journal table (this instance)",
)


class AuditJournal:
    def __init__(
        self,
        api: ModuleApi,
        *,
        now_ms: Callable[[], int],
        max_refusals_per_minute: int | None = None,
        is_local: Callable[[str], bool] = lambda user_id: True,
    ) -> None:
        self._api = api
        self._now_ms = now_ms
        self._max_refusals = max_refusals_per_minute
        self._is_local = is_local
        # Whose refusals were noted this window, how many ("" counts all remote users'),
        # and whose were not (a summary row each at the window's end).
        self._refusals: dict[str, int] = {}
        self._suppressed_of: dict[str | None, int] = {}
        self._window_start = 0
        self._summary_scheduled = False
        self.suppressed = 0
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
        user_id, actor_id, room_id = _field(user_id), _field(actor_id), _field(room_id)
        care_team, request = _field(care_team), _field(request)
        reason, detail = _field(reason), _field(detail)
        key = (kind, outcome, user_id, actor_id, room_id, care_team, request, reason, detail)
        if now - self._recent.get(key, -SAME_DECISION_MS) < SAME_DECISION_MS:
            return
        if len(self._recent) > MAX_RECENT:
            # (Cleared, not filtered: filtering at every note of a flood would be quadratic,
            # on the event path. At worst one attempt is then noted twice.)
            self._recent.clear()
        self._recent[key] = now
        bounded = outcome is Outcome.REFUSED or (
            # (a remote server's refused entries each make the module ban that user)
            kind is DecisionKind.MEMBER_BANNED
            and user_id is not None
            and not self._is_local(user_id)
        )
        who = user_id if kind is DecisionKind.MEMBER_BANNED else actor_id or user_id
        if bounded and self._over_refusal_bound(who, now):
            self._suppress(who)
            return
        self._append(
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

    def _append(self, decision: Decision) -> None:
        if len(self._pending) >= MAX_PENDING:
            self.dropped += 1
            DROPPED.inc()
            if self.dropped == 1 or self.dropped % 1000 == 0:
                logger.warning(
                    "Dropped %d audit decisions: the database has not taken the last %d",
                    self.dropped,
                    len(self._pending),
                )
            return
        self._pending.append(decision)
        UNWRITTEN.set(len(self._pending))
        self._schedule(FLUSH_DELAY_MS)

    def _suppress(self, who: str | None) -> None:
        self.suppressed += 1
        SUPPRESSED.inc()
        if (
            who is not None
            and who not in self._suppressed_of
            and len(self._suppressed_of) >= MAX_SUMMARISED_USERS
            and not self._is_local(who)
        ):
            # Made-up remote users beyond the cap share one row; local users (bounded by
            # registration) always keep their own.
            who = None
        self._suppressed_of[who] = self._suppressed_of.get(who, 0) + 1
        if not self._summary_scheduled:
            self._summary_scheduled = True
            delay = max(0, self._window_start + REFUSAL_WINDOW_MS - self._now_ms())
            self._api.delayed_background_call(
                delay, self._summarise, desc="fhir_audit_refusal_summary"
            )

    async def _summarise(self) -> None:
        """One row per user whose refusals went beyond the bound: how many were not
        journaled one by one (``detail`` ``suppressed_<n>``)."""
        self._summary_scheduled = False
        owed, self._suppressed_of = self._suppressed_of, {}
        now = self._now_ms()
        for who, count in owed.items():
            self._append(
                Decision(
                    kind=DecisionKind.ACCESS_REFUSED,
                    outcome=Outcome.REFUSED,
                    recorded_ms=now,
                    user_id=who,
                    actor_id=who,
                    reason=SUMMARY_REASON,
                    detail=f"suppressed_{count}",
                )
            )

    def _over_refusal_bound(self, who: str | None, now: int) -> bool:
        """Whether ``who`` (the refused one) had their share of refusals this minute, or
        remote users all together theirs: a flood of refusals (one user's, or made-up
        remote users') fills neither the journal nor FHIR; each user's own share is
        journaled one by one whatever others do, and the rest is summarised."""
        if self._max_refusals is None or who is None:
            return False
        if now - self._window_start >= REFUSAL_WINDOW_MS:
            self._window_start, self._refusals = now, {}
        count = self._refusals.get(who, 0)
        if count >= self._max_refusals:
            return True
        if not self._is_local(who):
            remote = self._refusals.get("", 0)
            if remote >= self._max_refusals * REMOTE_FACTOR:
                return True
            self._refusals[""] = remote + 1
        self._refusals[who] = count + 1
        return False

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
            if not await self._one_by_one(batch):
                logger.warning(
                    "Could not journal %d audit decisions (%s); trying again",
                    len(batch),
                    type(e).__name__,
                )
                self._scheduled = True
                self._api.delayed_background_call(RETRY_MS, self._flush, desc="fhir_audit_journal")
                return
        del self._pending[: len(batch)]
        UNWRITTEN.set(len(self._pending))
        for listener in self._listeners:
            listener()
        self._schedule(0)

    async def _database_answers(self) -> bool:
        """Whether the database takes a trivial query (then rows it refused are at fault)."""
        try:
            await self._api.run_db_interaction("fhir_audit_probe", _select_one)
        except Exception:
            return False
        return True

    async def _one_by_one(self, batch: list[Decision]) -> bool:
        """After a batch failed: each decision alone. One the database refuses while
        others go in is dropped (counted; its id logged), so one bad row never holds up
        the journal, nor do rows it refuses all alike while it answers; False when none
        went in and it does not answer (the database away: the batch waits)."""
        refused = []
        for decision in batch:
            try:
                await self._api.run_db_interaction(
                    "fhir_audit_journal_one", journal_store.insert_decisions, [decision]
                )
            except Exception:
                refused.append(decision)
        if len(refused) == len(batch) and not await self._database_answers():
            return False
        for decision in refused:
            self.dropped += 1
            DROPPED.inc()
            logger.warning("The database refused audit decision %s; dropped", decision.audit_id)
        return True


def _select_one(txn: Any) -> None:
    txn.execute("SELECT 1")


def _field(value: str | None) -> str | None:
    if value is None:
        return None
    # (Lone surrogates, which JSON lets through, cannot be stored as UTF-8: replaced too.)
    text = str(value)[:MAX_FIELD].translate(_CONTROL)
    return text.encode("utf-8", "replace").decode("utf-8")
