"""The identity service's tables in Synapse's own database (SQLite and PostgreSQL).

- ``synapse_fhir_identity_tokens``: identity-service access tokens, by the SHA-256 of the
  token (the token itself is never stored), with their user and expiry.
- ``synapse_fhir_identity_state``: small named values; ``lookup_pepper``, made once and
  kept, so every instance and every restart hashes with the same one.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from synapse_fhir_module.storage import Cursor

TOKENS = "synapse_fhir_identity_tokens"
STATE = "synapse_fhir_identity_state"
PEPPER = "lookup_pepper"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TOKENS} (
        token_hash TEXT NOT NULL PRIMARY KEY,
        user_id TEXT NOT NULL,
        created_ms BIGINT NOT NULL,
        expires_ms BIGINT NOT NULL
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TOKENS}_user ON {TOKENS} (user_id)",
    f"""
    CREATE TABLE IF NOT EXISTS {STATE} (
        name TEXT NOT NULL PRIMARY KEY,
        value TEXT NOT NULL
    )
    """,
)


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def store_token(
    txn: Cursor,
    token_hash: str,
    user_id: str,
    now_ms: int,
    expires_ms: int,
    *,
    keep_per_user: int,
) -> None:
    """Store a new token; drop every expired one, and the user's oldest beyond
    ``keep_per_user`` (each client that registers gets a token: the table must not grow
    with every registration)."""
    txn.execute(f"DELETE FROM {TOKENS} WHERE expires_ms <= ?", (now_ms,))
    txn.execute(
        f"INSERT INTO {TOKENS} (token_hash, user_id, created_ms, expires_ms) VALUES (?, ?, ?, ?)",
        (token_hash, user_id, now_ms, expires_ms),
    )
    txn.execute(
        f"DELETE FROM {TOKENS} WHERE user_id = ? AND token_hash NOT IN ("
        f" SELECT token_hash FROM {TOKENS} WHERE user_id = ?"
        " ORDER BY created_ms DESC, token_hash LIMIT ?)",
        (user_id, user_id, keep_per_user),
    )


def user_of_token(txn: Cursor, token_hash: str, now_ms: int) -> str | None:
    """The user of an unexpired token; None for an unknown or expired one."""
    txn.execute(
        f"SELECT user_id FROM {TOKENS} WHERE token_hash = ? AND expires_ms > ?",
        (token_hash, now_ms),
    )
    row = txn.fetchone()
    return None if row is None else str(row[0])


def delete_token(txn: Cursor, token_hash: str) -> bool:
    txn.execute(f"DELETE FROM {TOKENS} WHERE token_hash = ?", (token_hash,))
    return txn.rowcount > 0


def tokens_of_user(txn: Cursor, user_id: str) -> int:
    txn.execute(f"SELECT COUNT(*) FROM {TOKENS} WHERE user_id = ?", (user_id,))
    row = txn.fetchone()
    return 0 if row is None else int(row[0])


def pepper(txn: Cursor, candidate: str) -> str:
    """The stored pepper; ``candidate`` becomes it when there is none yet (the first
    instance to get here wins, the others read its pepper)."""
    txn.execute(
        f"INSERT INTO {STATE} (name, value) VALUES (?, ?) ON CONFLICT (name) DO NOTHING",
        (PEPPER, candidate),
    )
    txn.execute(f"SELECT value FROM {STATE} WHERE name = ?", (PEPPER,))
    row = txn.fetchone()
    assert row is not None  # inserted just above, or there before
    return str(row[0])
