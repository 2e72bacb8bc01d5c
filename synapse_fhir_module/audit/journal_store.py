"""The audit journal (``synapse_fhir_audit_journal``, in Synapse's database): one row per
``Decision``, written in batches by ``journal.AuditJournal`` on whichever instance decided,
read by the operator console (recent refusals) and, with ``audit.enabled``, shipped to FHIR
as AuditEvents by the background instance (``shipped_ms`` set once FHIR has it).

Functions take a cursor (``run_db_interaction``); the SQL runs on SQLite and PostgreSQL.
"""

from __future__ import annotations

from collections.abc import Sequence

import attr

from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.storage import Cursor

TABLE = "synapse_fhir_audit_journal"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        audit_id TEXT NOT NULL PRIMARY KEY,
        recorded_ms BIGINT NOT NULL,
        kind TEXT NOT NULL,
        outcome TEXT NOT NULL,
        user_id TEXT,
        actor_id TEXT,
        room_id TEXT,
        care_team TEXT,
        request TEXT,
        reason TEXT,
        detail TEXT,
        shipped_ms BIGINT,
        attempts INTEGER NOT NULL DEFAULT 0,
        failure TEXT,
        refused_ms BIGINT
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TABLE}_recorded ON {TABLE} (recorded_ms)",
    # What is still to go to FHIR, oldest first (partial: shipped rows drop out of it).
    f"CREATE INDEX IF NOT EXISTS {TABLE}_unshipped ON {TABLE} (recorded_ms)"
    " WHERE shipped_ms IS NULL",
    # The rows FHIR refused, set aside (``refused_ms``: see mark_refused), for /health's
    # count and the retry (partial: only those rows are in it).
    f"CREATE INDEX IF NOT EXISTS {TABLE}_refused ON {TABLE} (refused_ms)"
    " WHERE refused_ms IS NOT NULL",
)

_DECISION_COLUMNS = (
    "audit_id",
    "recorded_ms",
    "kind",
    "outcome",
    "user_id",
    "actor_id",
    "room_id",
    "care_team",
    "request",
    "reason",
    "detail",
)


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class JournalRow:
    decision: Decision
    shipped_ms: int | None
    attempts: int
    failure: str | None

    # The fields the console shows, by name.
    @property
    def recorded_ms(self) -> int:
        return self.decision.recorded_ms

    @property
    def kind(self) -> str:
        return self.decision.kind.value

    @property
    def reason(self) -> str | None:
        return self.decision.reason

    @property
    def room_id(self) -> str | None:
        return self.decision.room_id

    @property
    def user_id(self) -> str | None:
        return self.decision.user_id

    @property
    def actor_id(self) -> str | None:
        return self.decision.actor_id


def create_tables(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def insert_decisions(txn: Cursor, decisions: Sequence[Decision]) -> None:
    """Journal ``decisions`` (one already there, from a flush retried after its commit was
    in doubt, is left as it is)."""
    placeholders = ", ".join("?" for _ in _DECISION_COLUMNS)
    for d in decisions:
        txn.execute(
            f"INSERT INTO {TABLE} ({', '.join(_DECISION_COLUMNS)}) VALUES ({placeholders})"
            " ON CONFLICT (audit_id) DO NOTHING",
            (
                d.audit_id,
                d.recorded_ms,
                d.kind.value,
                d.outcome.value,
                d.user_id,
                d.actor_id,
                d.room_id,
                d.care_team,
                d.request,
                d.reason,
                d.detail,
            ),
        )


_SELECT = f"SELECT {', '.join(_DECISION_COLUMNS)}, shipped_ms, attempts, failure FROM {TABLE}"


def recent_refusals(txn: Cursor, limit: int) -> list[JournalRow]:
    """The latest ``limit`` refusals (access refused, registrations refused), newest first."""
    txn.execute(
        f"{_SELECT} WHERE outcome = ? ORDER BY recorded_ms DESC, audit_id LIMIT ?",
        (Outcome.REFUSED.value, limit),
    )
    return [_row(r) for r in txn.fetchall()]


_WAITING = "shipped_ms IS NULL AND refused_ms IS NULL"


def every_row(txn: Cursor) -> list[JournalRow]:
    """The whole journal, oldest first (for tests and one-off inspection: unbounded)."""
    txn.execute(f"{_SELECT} ORDER BY recorded_ms, audit_id")
    return [_row(r) for r in txn.fetchall()]


def unshipped(txn: Cursor, limit: int) -> list[JournalRow]:
    """The oldest ``limit`` rows FHIR does not have yet (and has not refused for good)."""
    txn.execute(f"{_SELECT} WHERE {_WAITING} ORDER BY recorded_ms, audit_id LIMIT ?", (limit,))
    return [_row(r) for r in txn.fetchall()]


def count_unshipped(txn: Cursor) -> tuple[int, int | None]:
    """(how many rows FHIR does not have yet, the oldest one's ``recorded_ms``)."""
    txn.execute(f"SELECT COUNT(*), MIN(recorded_ms) FROM {TABLE} WHERE {_WAITING}")
    found = txn.fetchone()
    assert found is not None
    return int(found[0]), None if found[1] is None else int(found[1])


def count_refused(txn: Cursor) -> int:
    """Rows FHIR refused for good (their ``failure`` says why, without content)."""
    txn.execute(f"SELECT COUNT(*) FROM {TABLE} WHERE refused_ms IS NOT NULL")
    found = txn.fetchone()
    assert found is not None
    return int(found[0])


def mark_refused(txn: Cursor, audit_id: str, failure: str, refused_ms: int) -> None:
    """FHIR refused this row's AuditEvent: it leaves the queue (so it blocks no other),
    keeping why (``failure``: a status, never content), until ``retry_refused``."""
    txn.execute(
        f"UPDATE {TABLE} SET attempts = attempts + 1, failure = ?, refused_ms = ?"
        " WHERE audit_id = ?",
        (failure, refused_ms, audit_id),
    )


def retry_refused(txn: Cursor) -> int:
    """Put the rows FHIR refused back in the queue (after the cause was fixed)."""
    txn.execute(f"UPDATE {TABLE} SET refused_ms = NULL WHERE refused_ms IS NOT NULL")
    return int(txn.rowcount)


def prune(txn: Cursor, before_ms: int, keep_unshipped: bool, limit: int) -> int:
    """Delete up to ``limit`` rows recorded before ``before_ms`` (with ``keep_unshipped``:
    only those FHIR has; a row waiting, or set aside after a refusal, stays until FHIR has
    it); how many went."""
    waiting = " AND shipped_ms IS NOT NULL" if keep_unshipped else ""
    txn.execute(
        f"DELETE FROM {TABLE} WHERE audit_id IN (SELECT audit_id FROM {TABLE}"
        f" WHERE recorded_ms < ?{waiting} LIMIT ?)",
        (before_ms, limit),
    )
    return int(txn.rowcount)


def mark_shipped(txn: Cursor, audit_ids: Sequence[str], shipped_ms: int) -> None:
    for audit_id in audit_ids:
        txn.execute(
            f"UPDATE {TABLE} SET shipped_ms = ?, failure = NULL WHERE audit_id = ?",
            (shipped_ms, audit_id),
        )


def note_failure(txn: Cursor, audit_ids: Sequence[str], failure: str) -> None:
    """An attempt to ship these failed (``failure``: a short reason, no content)."""
    for audit_id in audit_ids:
        txn.execute(
            f"UPDATE {TABLE} SET attempts = attempts + 1, failure = ? WHERE audit_id = ?",
            (failure, audit_id),
        )


def _row(r: tuple) -> JournalRow:
    decision = Decision(
        audit_id=r[0],
        recorded_ms=int(r[1]),
        kind=DecisionKind(r[2]),
        outcome=Outcome(r[3]),
        user_id=r[4],
        actor_id=r[5],
        room_id=r[6],
        care_team=r[7],
        request=r[8],
        reason=r[9],
        detail=r[10],
    )
    return JournalRow(
        decision=decision,
        shipped_ms=None if r[11] is None else int(r[11]),
        attempts=int(r[12]),
        failure=r[13],
    )
