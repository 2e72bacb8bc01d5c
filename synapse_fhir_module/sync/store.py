"""Tables of the FHIR → Matrix sync in Synapse's own database (SQLite and PostgreSQL).

- ``synapse_fhir_rooms``: the space or room made for a FHIR resource (``CareTeam/12`` →
  its space, ``CommunicationRequest/7`` → its room), so each is made once.
- ``synapse_fhir_relayed``: Communications from other systems already posted into Matrix,
  so each appears once.
- ``synapse_fhir_sync_state``: small named values (the reconcile sweep's watermarks).
- ``synapse_fhir_thread_modes``: what a thread room's CommunicationRequest status last
  made it (``thread_status.ThreadMode``), so a sync of its team keeps a closed thread
  closed without reading every request (no row: open, as every room was before).

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from synapse_fhir_module.storage import Cursor

ROOMS = "synapse_fhir_rooms"
RELAYED = "synapse_fhir_relayed"
STATE = "synapse_fhir_sync_state"
THREAD_MODES = "synapse_fhir_thread_modes"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {ROOMS} (
        fhir_reference TEXT NOT NULL PRIMARY KEY,
        room_id TEXT NOT NULL
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {RELAYED} (
        communication TEXT NOT NULL PRIMARY KEY,
        room_id TEXT NOT NULL,
        sender TEXT,
        event_id TEXT
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {STATE} (
        name TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {THREAD_MODES} (
        room_id TEXT NOT NULL PRIMARY KEY,
        mode TEXT NOT NULL
    )
    """,
)


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def room_of(txn: Cursor, fhir_reference: str) -> str | None:
    txn.execute(f"SELECT room_id FROM {ROOMS} WHERE fhir_reference = ?", (fhir_reference,))
    row = txn.fetchone()
    return None if row is None else str(row[0])


def remember_room(txn: Cursor, fhir_reference: str, room_id: str) -> None:
    txn.execute(
        f"INSERT INTO {ROOMS} (fhir_reference, room_id) VALUES (?, ?)"
        " ON CONFLICT (fhir_reference) DO UPDATE SET room_id = excluded.room_id",
        (fhir_reference, room_id),
    )


def all_rooms(txn: Cursor) -> list[tuple[str, str]]:
    """(FHIR reference, room id) of every space and room made."""
    txn.execute(f"SELECT fhir_reference, room_id FROM {ROOMS} ORDER BY fhir_reference")
    return [(str(reference), str(room_id)) for reference, room_id in txn.fetchall()]


def claim_relay(txn: Cursor, communication: str, room_id: str, sender: str | None) -> bool:
    """Claim a Communication for relaying (by ``sender``); False when claimed before."""
    txn.execute(
        f"INSERT INTO {RELAYED} (communication, room_id, sender) VALUES (?, ?, ?)"
        " ON CONFLICT (communication) DO NOTHING",
        (communication, room_id, sender),
    )
    return txn.rowcount == 1


def source_of_event(txn: Cursor, event_id: str, room_id: str) -> str | None:
    """The FHIR resource the module posted ``event_id`` from into ``room_id``, if it did
    (an event id names no other room's relay)."""
    txn.execute(
        f"SELECT communication FROM {RELAYED} WHERE event_id = ? AND room_id = ?",
        (event_id, room_id),
    )
    row = txn.fetchone()
    return None if row is None else str(row[0])


def relayed_event(txn: Cursor, communication: str, room_id: str) -> str | None:
    """The event ``communication`` (a claim key) was posted as in ``room_id``, once posted."""
    txn.execute(
        f"SELECT event_id FROM {RELAYED} WHERE communication = ? AND room_id = ?",
        (communication, room_id),
    )
    row = txn.fetchone()
    return None if row is None or row[0] is None else str(row[0])


def is_claimed(txn: Cursor, communication: str) -> bool:
    txn.execute(f"SELECT 1 FROM {RELAYED} WHERE communication = ?", (communication,))
    return txn.fetchone() is not None


def release_relay(txn: Cursor, communication: str) -> None:
    txn.execute(f"DELETE FROM {RELAYED} WHERE communication = ?", (communication,))


def relayed_as(txn: Cursor, communication: str, event_id: str) -> None:
    txn.execute(
        f"UPDATE {RELAYED} SET event_id = ? WHERE communication = ?", (event_id, communication)
    )


def get_value(txn: Cursor, name: str) -> str | None:
    txn.execute(f"SELECT value FROM {STATE} WHERE name = ?", (name,))
    row = txn.fetchone()
    return None if row is None else str(row[0])


def set_value(txn: Cursor, name: str, value: str) -> None:
    txn.execute(
        f"INSERT INTO {STATE} (name, value) VALUES (?, ?)"
        " ON CONFLICT (name) DO UPDATE SET value = excluded.value",
        (name, value),
    )


def thread_mode_of(txn: Cursor, room_id: str) -> str | None:
    txn.execute(f"SELECT mode FROM {THREAD_MODES} WHERE room_id = ?", (room_id,))
    row = txn.fetchone()
    return None if row is None else str(row[0])


def set_thread_mode(txn: Cursor, room_id: str, mode: str) -> None:
    txn.execute(
        f"INSERT INTO {THREAD_MODES} (room_id, mode) VALUES (?, ?)"
        " ON CONFLICT (room_id) DO UPDATE SET mode = excluded.mode",
        (room_id, mode),
    )


def is_relay_event(
    txn: Cursor, communication: str, room_id: str, event_id: str, sender: str
) -> bool:
    """Whether ``event_id`` is the relay of ``communication`` — or, mid-relay (its event id
    not stored yet), an event by the very sender the claim was made for."""
    txn.execute(
        f"SELECT event_id, sender FROM {RELAYED} WHERE communication = ? AND room_id = ?",
        (communication, room_id),
    )
    row = txn.fetchone()
    if row is None:
        return False
    stored_event, claimed_by = row
    return bool(stored_event == event_id or (stored_event is None and claimed_by == sender))
