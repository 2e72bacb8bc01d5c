"""Where the recorder is in Synapse's event stream, in Synapse's own database.

One row: the stream position (a ``/sync`` token of the service user) before which FHIR
holds every recorded message, the service user's device and access token the recorder
reads the stream with, and how many messages the recorder holds in memory (for
``/health`` on every instance). Plain SQL that SQLite and PostgreSQL both accept.
"""

from __future__ import annotations

import attr

from synapse_fhir_module.storage import Cursor

TABLE = "synapse_fhir_recording_log"
ROW_ID = 1

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        id INTEGER NOT NULL PRIMARY KEY,
        stream_token TEXT,
        saved_ms BIGINT NOT NULL DEFAULT 0,
        device_id TEXT,
        access_token TEXT,
        pending INTEGER NOT NULL DEFAULT 0,
        behind_ms BIGINT NOT NULL DEFAULT 0,
        reported_ms BIGINT NOT NULL DEFAULT 0
    )
    """,
)


@attr.s(frozen=True, auto_attribs=True)
class LogRow:
    stream_token: str | None
    saved_ms: int
    device_id: str | None
    access_token: str | None
    pending: int
    behind_ms: int
    reported_ms: int


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)
    txn.execute(f"INSERT INTO {TABLE} (id) VALUES (?) ON CONFLICT (id) DO NOTHING", (ROW_ID,))


def load(txn: Cursor) -> LogRow:
    txn.execute(
        f"SELECT stream_token, saved_ms, device_id, access_token, pending, behind_ms,"
        f" reported_ms FROM {TABLE} WHERE id = ?",
        (ROW_ID,),
    )
    found = txn.fetchone()
    if found is None:
        return LogRow(None, 0, None, None, 0, 0, 0)
    token, saved_ms, device_id, access_token, pending, behind_ms, reported_ms = found
    return LogRow(
        token,
        int(saved_ms),
        device_id,
        access_token,
        int(pending),
        int(behind_ms),
        int(reported_ms),
    )


def reported(txn: Cursor) -> tuple[int, int]:
    """(pending, behind ms) as the recording instance last reported them (nothing
    secret: other instances answer /health with it)."""
    txn.execute(f"SELECT pending, behind_ms FROM {TABLE} WHERE id = ?", (ROW_ID,))
    found = txn.fetchone()
    return (0, 0) if found is None else (int(found[0]), int(found[1]))


def save_position(txn: Cursor, stream_token: str, now_ms: int) -> None:
    txn.execute(
        f"UPDATE {TABLE} SET stream_token = ?, saved_ms = ? WHERE id = ?",
        (stream_token, now_ms, ROW_ID),
    )


def save_session(txn: Cursor, device_id: str, access_token: str) -> None:
    txn.execute(
        f"UPDATE {TABLE} SET device_id = ?, access_token = ? WHERE id = ?",
        (device_id, access_token, ROW_ID),
    )


def report(txn: Cursor, pending: int, behind_ms: int, now_ms: int) -> None:
    txn.execute(
        f"UPDATE {TABLE} SET pending = ?, behind_ms = ?, reported_ms = ? WHERE id = ?",
        (pending, behind_ms, now_ms, ROW_ID),
    )
