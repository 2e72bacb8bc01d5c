"""The outbox table in Synapse's own database: the messages that cannot be written now.

Messages are read from Synapse's own event stream (``recording.message_log``); a row here is an
exception: a dead letter (FHIR or the mapping refused it for good, with the reason), or
one that must wait — an edit whose original is not in FHIR yet, and the room's later
messages behind it — plus rows an earlier version of the module left pending.

Each function takes a database cursor (Synapse's ``LoggingTransaction`` inside
``run_db_interaction``) and runs plain SQL that SQLite and PostgreSQL both accept
(Synapse rewrites ``?`` placeholders for PostgreSQL). Rows are keyed by event id, so
adding an event twice keeps one row; a pending row leaves the table once FHIR has it.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterable
from typing import Any

import attr

from synapse_fhir_module.storage import Cursor, columns

TABLE = "synapse_fhir_outbox"
PENDING = "pending"
DEAD = "dead"
MAX_ERROR_LENGTH = 1000
# A pending row's failures while FHIR answered (schema version 2; the recorder makes it
# a dead letter after enough of them). Kept here, so a restart does not reset it.
FAILED_ANSWERING = "failed_answering"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        event_id TEXT NOT NULL PRIMARY KEY,
        room_id TEXT NOT NULL,
        enqueued_ms BIGINT NOT NULL,
        event_json TEXT NOT NULL,
        state TEXT NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        next_attempt_ms BIGINT NOT NULL,
        last_error TEXT,
        failed_answering INTEGER NOT NULL DEFAULT 0
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TABLE}_due ON {TABLE} (state, next_attempt_ms)",
    f"CREATE INDEX IF NOT EXISTS {TABLE}_room ON {TABLE} (room_id, enqueued_ms)",
)


@attr.s(frozen=True, auto_attribs=True)
class OutboxRow:
    event_id: str
    room_id: str
    enqueued_ms: int
    event: dict[str, Any]
    attempts: int


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def add_failed_answering(txn: Cursor) -> None:
    """Schema version 2: the failures-while-FHIR-answered count, on the table. (An
    earlier release's code never names the column: its rows get the default.)"""
    create_schema(txn)  # (a database the outbox never started on gets it in its newest shape)
    if FAILED_ANSWERING not in columns(txn, TABLE):
        txn.execute(f"ALTER TABLE {TABLE} ADD COLUMN {FAILED_ANSWERING} INTEGER NOT NULL DEFAULT 0")


def enqueue(txn: Cursor, event: dict[str, Any], now_ms: int) -> bool:
    """Add an event; False when it was already there (a repeated callback or a retry)."""
    txn.execute(
        f"INSERT INTO {TABLE} (event_id, room_id, enqueued_ms, event_json, state, attempts,"
        f" next_attempt_ms) VALUES (?, ?, ?, ?, ?, 0, ?) ON CONFLICT (event_id) DO NOTHING",
        (event["event_id"], event["room_id"], now_ms, json.dumps(event), PENDING, now_ms),
    )
    return txn.rowcount == 1


def add(
    txn: Cursor,
    event: dict[str, Any],
    enqueued_ms: int,
    *,
    state: str,
    next_attempt_ms: int,
    error: str | None = None,
) -> None:
    """Keep an event read from the stream: waiting (``PENDING``) or refused (``DEAD``).
    An event there already keeps its row (a replay after a crash changes nothing)."""
    txn.execute(
        f"INSERT INTO {TABLE} (event_id, room_id, enqueued_ms, event_json, state, attempts,"
        f" next_attempt_ms, last_error) VALUES (?, ?, ?, ?, ?, 1, ?, ?)"
        f" ON CONFLICT (event_id) DO NOTHING",
        (
            event["event_id"],
            event["room_id"],
            enqueued_ms,
            json.dumps(event),
            state,
            next_attempt_ms,
            None if error is None else _storable(error),
        ),
    )


def rooms_waiting(txn: Cursor) -> set[str]:
    """Rooms with a pending row: their later messages wait behind it."""
    txn.execute(f"SELECT DISTINCT room_id FROM {TABLE} WHERE state = ?", (PENDING,))
    return {str(room_id) for (room_id,) in txn.fetchall()}


def due_rows(txn: Cursor, now_ms: int, limit: int) -> list[OutboxRow]:
    """Pending rows whose time has come, oldest first, keeping each room's order: a row
    waits while an earlier row of its room is backing off (a reply after its parent)."""
    txn.execute(
        f"""
        SELECT o.event_id, o.room_id, o.enqueued_ms, o.event_json, o.attempts
        FROM {TABLE} o
        WHERE o.state = ? AND o.next_attempt_ms <= ?
          AND NOT EXISTS (
            SELECT 1 FROM {TABLE} e
            WHERE e.room_id = o.room_id AND e.state = ? AND e.next_attempt_ms > ?
              AND (e.enqueued_ms < o.enqueued_ms
                   OR (e.enqueued_ms = o.enqueued_ms AND e.event_id < o.event_id))
          )
        ORDER BY o.enqueued_ms, o.event_id
        LIMIT ?
        """,
        (PENDING, now_ms, PENDING, now_ms, limit),
    )
    return [
        OutboxRow(event_id, room_id, int(enqueued_ms), json.loads(event_json), int(attempts))
        for event_id, room_id, enqueued_ms, event_json, attempts in txn.fetchall()
    ]


def mark_written(txn: Cursor, event_ids: Iterable[str]) -> None:
    for event_id in event_ids:
        txn.execute(f"DELETE FROM {TABLE} WHERE event_id = ?", (event_id,))


def mark_retry(txn: Cursor, event_ids: Iterable[str], next_attempt_ms: int, error: str) -> None:
    for event_id in event_ids:
        txn.execute(
            f"UPDATE {TABLE} SET attempts = attempts + 1, next_attempt_ms = ?, last_error = ?"
            " WHERE event_id = ?",
            (next_attempt_ms, _storable(error), event_id),
        )


def failed_answering(txn: Cursor, event_id: str) -> int:
    """Count one more failure of a pending row while FHIR answered; how many now."""
    txn.execute(
        f"UPDATE {TABLE} SET {FAILED_ANSWERING} = {FAILED_ANSWERING} + 1"
        " WHERE event_id = ? AND state = ?",
        (event_id, PENDING),
    )
    txn.execute(f"SELECT {FAILED_ANSWERING} FROM {TABLE} WHERE event_id = ?", (event_id,))
    found = txn.fetchone()
    return 0 if found is None else int(found[0])


def mark_dead(txn: Cursor, event_id: str, reason: str) -> None:
    """A dead letter (its failure count starts again should the admin retry it)."""
    txn.execute(
        f"UPDATE {TABLE} SET state = ?, attempts = attempts + 1, last_error = ?,"
        f" {FAILED_ANSWERING} = 0 WHERE event_id = ?",
        (DEAD, _storable(reason), event_id),
    )


@attr.s(frozen=True, auto_attribs=True)
class StoredRow:
    """A row as it stands, pending or dead (to amend a message FHIR does not have yet)."""

    state: str
    event: dict[str, Any]
    last_error: str | None
    room_id: str = ""


def row_of(txn: Cursor, event_id: str) -> StoredRow | None:
    txn.execute(
        f"SELECT state, event_json, last_error, room_id FROM {TABLE} WHERE event_id = ?",
        (event_id,),
    )
    found = txn.fetchone()
    if found is None:
        return None
    state, event_json, last_error, room_id = found
    return StoredRow(state, json.loads(event_json), last_error, str(room_id))


def rewrite(txn: Cursor, event_id: str, event: dict[str, Any], last_error: str | None) -> None:
    """Replace a row's event and last error (keeping its state, attempts and schedule)."""
    txn.execute(
        f"UPDATE {TABLE} SET event_json = ?, last_error = ? WHERE event_id = ?",
        (json.dumps(event), None if last_error is None else _storable(last_error), event_id),
    )


def event_ids_in_room(
    txn: Cursor, room_id: str, matches: Callable[[dict[str, Any]], bool]
) -> list[str]:
    """The rows of a room (pending or dead) whose event ``matches``."""
    txn.execute(f"SELECT event_id, event_json FROM {TABLE} WHERE room_id = ?", (room_id,))
    return [event_id for event_id, event_json in txn.fetchall() if matches(json.loads(event_json))]


def counts(txn: Cursor) -> tuple[int, int]:
    """(pending, dead)."""
    txn.execute(f"SELECT state, COUNT(*) FROM {TABLE} GROUP BY state")
    by_state = {state: int(count) for state, count in txn.fetchall()}
    return by_state.get(PENDING, 0), by_state.get(DEAD, 0)


@attr.s(frozen=True, auto_attribs=True)
class DeadLetter:
    event_id: str
    room_id: str
    enqueued_ms: int
    attempts: int
    reason: str


def dead_letters(txn: Cursor, limit: int = 100) -> list[DeadLetter]:
    """Rows FHIR (or the mapping) refused for good, oldest first."""
    txn.execute(
        f"SELECT event_id, room_id, enqueued_ms, attempts, last_error FROM {TABLE}"
        " WHERE state = ? ORDER BY enqueued_ms, event_id LIMIT ?",
        (DEAD, limit),
    )
    return [
        DeadLetter(event_id, room_id, int(enqueued_ms), int(attempts), reason or "")
        for event_id, room_id, enqueued_ms, attempts, reason in txn.fetchall()
    ]


def requeue_dead(txn: Cursor, event_ids: Iterable[str] | None, now_ms: int) -> int:
    """Make dead letters pending again (all of them when ``event_ids`` is None), their failure
    counts back at 0 (a row older code dead-lettered may still carry one); how many."""
    reset = (
        f"UPDATE {TABLE} SET state = ?, attempts = 0, next_attempt_ms = ?, {FAILED_ANSWERING} = 0"
        " WHERE state = ?"
    )
    if event_ids is None:
        txn.execute(reset, (PENDING, now_ms, DEAD))
        return txn.rowcount
    requeued = 0
    for event_id in event_ids:
        txn.execute(reset + " AND event_id = ?", (PENDING, now_ms, DEAD, event_id))
        requeued += txn.rowcount
    return requeued


def _storable(text: str) -> str:
    """An error text cut to size, without U+0000: PostgreSQL's TEXT refuses it (SQLite's
    does not), and FHIR's error may echo what a message contained."""
    return text[:MAX_ERROR_LENGTH].replace("\x00", "\ufffd")


def retry_delay_ms(
    attempts: int, *, base_ms: int = 500, cap_ms: int = 60_000, rng: random.Random | None = None
) -> int:
    """Exponential backoff with jitter: half to all of min(cap, base · 2^attempts)."""
    ceiling = min(cap_ms, base_ms * 2 ** min(attempts, 20))
    return int(ceiling * (0.5 + 0.5 * (rng or random).random()))
