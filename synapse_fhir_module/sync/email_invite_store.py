"""When the module last mailed an address an invitation to join (``identity.invite_by_email``),
in Synapse's own database (SQLite and PostgreSQL): ``synapse_fhir_email_invites``, so the
"at most once per interval" promise survives restarts.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from synapse_fhir_module.storage import Cursor

TABLE = "synapse_fhir_email_invites"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        address TEXT NOT NULL PRIMARY KEY,
        sent_ms BIGINT NOT NULL
    )
    """,
)


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def mailed_since(txn: Cursor, address: str, since_ms: int) -> bool:
    txn.execute(f"SELECT sent_ms FROM {TABLE} WHERE address = ?", (address,))
    row = txn.fetchone()
    return row is not None and int(row[0]) > since_ms


def claim(txn: Cursor, address: str, now_ms: int, interval_ms: int) -> int | None:
    """Take the right to mail ``address`` now: None when it was mailed within the
    interval, else the previous claim's time (0: never), to hand back with ``release``
    if the mail cannot be sent."""
    txn.execute(f"SELECT sent_ms FROM {TABLE} WHERE address = ?", (address,))
    row = txn.fetchone()
    if row is not None and now_ms - int(row[0]) < interval_ms:
        return None
    previous = int(row[0]) if row is not None else 0
    txn.execute(
        f"INSERT INTO {TABLE} (address, sent_ms) VALUES (?, ?)"
        " ON CONFLICT (address) DO UPDATE SET sent_ms = excluded.sent_ms",
        (address, now_ms),
    )
    return previous


def release(txn: Cursor, address: str, claimed_ms: int, previous_ms: int) -> None:
    """Undo a claim whose mail was not sent (so the next sync tries again)."""
    if previous_ms:
        txn.execute(
            f"UPDATE {TABLE} SET sent_ms = ? WHERE address = ? AND sent_ms = ?",
            (previous_ms, address, claimed_ms),
        )
    else:
        txn.execute(f"DELETE FROM {TABLE} WHERE address = ? AND sent_ms = ?", (address, claimed_ms))
