"""What the unread Tasks (``communication.unread_tasks``) are made from, in Synapse's own
database (SQLite and PostgreSQL), so no change is lost across restarts or instances:

- ``synapse_fhir_thread_latest``: each thread room's newest message FHIR holds;
- ``synapse_fhir_read_markers``: each account's ``m.fully_read`` marker in those rooms;
- ``synapse_fhir_unread_tasks``: what the module last wrote to each person's Task;
- ``synapse_fhir_unread_dirty``: rooms whose Tasks may have to change, with a version so a
  change noted while the room was being worked on is not cleared with it, and the moment
  before which a room that could not be done is not tried again.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from synapse_fhir_module.mapping.unread import LatestMessage, ReadMarker, TaskState
from synapse_fhir_module.storage import Cursor

LATEST = "synapse_fhir_thread_latest"
MARKERS = "synapse_fhir_read_markers"
TASKS = "synapse_fhir_unread_tasks"
DIRTY = "synapse_fhir_unread_dirty"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {LATEST} (
        room_id TEXT NOT NULL PRIMARY KEY,
        event_id TEXT NOT NULL,
        arrived_ms BIGINT NOT NULL,
        sender TEXT NOT NULL,
        communication TEXT NOT NULL,
        author TEXT
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {MARKERS} (
        room_id TEXT NOT NULL,
        user_id TEXT NOT NULL,
        event_id TEXT NOT NULL,
        arrived_ms BIGINT,
        PRIMARY KEY (room_id, user_id)
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {TASKS} (
        room_id TEXT NOT NULL,
        person TEXT NOT NULL,
        status TEXT NOT NULL,
        focus TEXT,
        PRIMARY KEY (room_id, person)
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {DIRTY} (
        room_id TEXT NOT NULL PRIMARY KEY,
        version BIGINT NOT NULL,
        not_before_ms BIGINT NOT NULL DEFAULT 0
    )
    """,
)


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def _mark_dirty(txn: Cursor, room_id: str) -> None:
    txn.execute(
        f"INSERT INTO {DIRTY} (room_id, version) VALUES (?, 1)"
        f" ON CONFLICT (room_id) DO UPDATE SET version = {DIRTY}.version + 1",
        (room_id,),
    )


def note_messages(txn: Cursor, rooms: Mapping[str, LatestMessage]) -> None:
    """Each room's newest message now in FHIR (kept only if newer than the one noted)."""
    for room_id, message in rooms.items():
        txn.execute(
            f"INSERT INTO {LATEST} (room_id, event_id, arrived_ms, sender, communication, author)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET"
            " event_id = excluded.event_id, arrived_ms = excluded.arrived_ms,"
            " sender = excluded.sender, communication = excluded.communication,"
            " author = excluded.author"
            f" WHERE excluded.arrived_ms >= {LATEST}.arrived_ms",
            (
                room_id,
                message.event_id,
                message.arrived_ms,
                message.sender,
                message.communication,
                message.author,
            ),
        )
        _mark_dirty(txn, room_id)


def note_marker(txn: Cursor, room_id: str, user_id: str, marker: ReadMarker) -> None:
    txn.execute(
        f"INSERT INTO {MARKERS} (room_id, user_id, event_id, arrived_ms) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (room_id, user_id) DO UPDATE SET"
        " event_id = excluded.event_id, arrived_ms = excluded.arrived_ms",
        (room_id, user_id, marker.event_id, marker.arrived_ms),
    )
    _mark_dirty(txn, room_id)


def mark_dirty(txn: Cursor, room_ids: Iterable[str]) -> None:
    """Look at these rooms' Tasks again (e.g. their members changed)."""
    for room_id in room_ids:
        _mark_dirty(txn, room_id)


def mark_rooms_with_open_tasks(txn: Cursor) -> None:
    """Every room with a Task not cancelled (a periodic check: a team can change with no
    event in the room, e.g. someone who never joined leaves it)."""
    txn.execute(f"SELECT DISTINCT room_id FROM {TASKS} WHERE status != 'cancelled'")
    for (room_id,) in txn.fetchall():
        _mark_dirty(txn, str(room_id))


def dirty_rooms(txn: Cursor, now_ms: int, limit: int) -> list[tuple[str, int]]:
    # In no fixed order: rooms waiting behind one that cannot be done yet still get a turn.
    txn.execute(
        f"SELECT room_id, version FROM {DIRTY} WHERE not_before_ms <= ? ORDER BY RANDOM() LIMIT ?",
        (now_ms, limit),
    )
    return [(str(room_id), int(version)) for room_id, version in txn.fetchall()]


def clear_dirty(txn: Cursor, rooms: Iterable[tuple[str, int]]) -> None:
    """Done with these rooms — unless something changed since (a newer version)."""
    for room_id, version in rooms:
        txn.execute(f"DELETE FROM {DIRTY} WHERE room_id = ? AND version = ?", (room_id, version))


def postpone(txn: Cursor, room_id: str, until_ms: int) -> None:
    """Leave the room marked, but not tried again before ``until_ms``."""
    txn.execute(f"UPDATE {DIRTY} SET not_before_ms = ? WHERE room_id = ?", (until_ms, room_id))


def marked_rooms(txn: Cursor) -> int:
    txn.execute(f"SELECT COUNT(*) FROM {DIRTY}")
    row = txn.fetchone()
    return int(row[0]) if row else 0


def room_state(
    txn: Cursor, room_id: str
) -> tuple[LatestMessage | None, dict[str, ReadMarker], dict[str, TaskState]]:
    """A room's latest message, its accounts' markers and its Tasks as last written."""
    txn.execute(
        f"SELECT event_id, arrived_ms, sender, communication, author FROM {LATEST}"
        " WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    latest = None
    if row is not None:
        author = None if row[4] is None else str(row[4])
        latest = LatestMessage(str(row[0]), int(row[1]), str(row[2]), str(row[3]), author)
    txn.execute(
        f"SELECT user_id, event_id, arrived_ms FROM {MARKERS} WHERE room_id = ?", (room_id,)
    )
    markers = {
        str(user_id): ReadMarker(str(event_id), None if arrived is None else int(arrived))
        for user_id, event_id, arrived in txn.fetchall()
    }
    txn.execute(f"SELECT person, status, focus FROM {TASKS} WHERE room_id = ?", (room_id,))
    written = {
        str(person): TaskState(str(status), None if focus is None else str(focus))
        for person, status, focus in txn.fetchall()
    }
    return latest, markers, written


def tasks_written(txn: Cursor, room_id: str, states: Mapping[str, TaskState]) -> None:
    for person, state in states.items():
        txn.execute(
            f"INSERT INTO {TASKS} (room_id, person, status, focus) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (room_id, person) DO UPDATE SET"
            " status = excluded.status, focus = excluded.focus",
            (room_id, person, state.status, state.focus),
        )
