"""Which FHIR person each account registered under the module's rule is, in Synapse's own
database (SQLite and PostgreSQL): the ``synapse_fhir_accounts`` table.

One row per account: its Matrix user id, its person (``Practitioner/12``), how the tie
was established (``username_and_email`` or ``email``, see ``registration_rule``) and
when. Written once the registration completed; read by the person directory for
accounts that no FHIR person names explicitly.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from collections.abc import Sequence

import attr

from synapse_fhir_module.storage import Cursor

TABLE = "synapse_fhir_accounts"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        user_id TEXT NOT NULL PRIMARY KEY,
        person TEXT NOT NULL,
        established_by TEXT NOT NULL,
        recorded_ms BIGINT NOT NULL
    )
    """,
)


@attr.s(frozen=True, auto_attribs=True)
class RecordedAccount:
    user_id: str
    person: str
    established_by: str
    recorded_ms: int


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def record_account(
    txn: Cursor, user_id: str, person: str, established_by: str, now_ms: int
) -> None:
    """Tie ``user_id`` to ``person`` (a later record of the same account replaces it)."""
    txn.execute(
        f"INSERT INTO {TABLE} (user_id, person, established_by, recorded_ms) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET person = excluded.person,"
        " established_by = excluded.established_by, recorded_ms = excluded.recorded_ms",
        (user_id, person, established_by, now_ms),
    )


def recorded_account(txn: Cursor, user_id: str) -> RecordedAccount | None:
    txn.execute(
        f"SELECT user_id, person, established_by, recorded_ms FROM {TABLE} WHERE user_id = ?",
        (user_id,),
    )
    row = txn.fetchone()
    if row is None:
        return None
    return RecordedAccount(str(row[0]), str(row[1]), str(row[2]), int(row[3]))


def persons_of_accounts(txn: Cursor, user_ids: Sequence[str]) -> dict[str, str]:
    """``{user_id: person}`` for those of ``user_ids`` that have a record."""
    if not user_ids:
        return {}
    placeholders = ", ".join("?" for _ in user_ids)
    txn.execute(
        f"SELECT user_id, person FROM {TABLE} WHERE user_id IN ({placeholders})",
        tuple(user_ids),
    )
    return {str(user_id): str(person) for user_id, person in txn.fetchall()}


def accounts_of_person(txn: Cursor, person: str) -> list[str]:
    """The accounts recorded as ``person``'s."""
    txn.execute(f"SELECT user_id FROM {TABLE} WHERE person = ? ORDER BY user_id", (person,))
    return [str(user_id) for (user_id,) in txn.fetchall()]


def accounts_of_persons(txn: Cursor, persons: Sequence[str]) -> dict[str, list[str]]:
    """``{person: accounts}`` for those of ``persons`` that have recorded accounts."""
    found: dict[str, list[str]] = {}
    for start in range(0, len(persons), 500):  # (SQLite's limit on parameters)
        chunk = list(persons[start : start + 500])
        placeholders = ", ".join("?" for _ in chunk)
        txn.execute(
            f"SELECT person, user_id FROM {TABLE} WHERE person IN ({placeholders})"
            " ORDER BY user_id",
            tuple(chunk),
        )
        for person, user_id in txn.fetchall():
            found.setdefault(str(person), []).append(str(user_id))
    return found
