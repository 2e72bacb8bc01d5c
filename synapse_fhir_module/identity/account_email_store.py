"""Which local accounts hold which verified email addresses, in Synapse's own database
(SQLite and PostgreSQL), and which accounts' addresses changed since the sync last looked.

- ``synapse_fhir_account_emails``: a copy of Synapse's email 3PIDs the module keeps so it
  can go from an address to accounts (the ModuleApi only goes from an account to its
  addresses). Kept by the 3PID callbacks and by every lookup of an account, which
  corrects it from Synapse's own record; used to find *candidates* only — an account's
  person is always decided from Synapse's current 3PIDs.
- ``synapse_fhir_identity_changes``: accounts whose addresses changed, for the instance
  that runs the sync to re-sync the teams concerned (the callbacks run wherever the
  request was served).
- ``synapse_fhir_email_spellings``: how FHIR records spell addresses (``Jan@X.nl`` for
  ``jan@x.nl``): FHIR servers match search tokens exactly, so every instance searches
  every spelling any of them has read.
- ``synapse_fhir_email_ties``: which person an account's address made it, and when that
  address was verified. An address that later leads to another person (the record gave a
  leaver's old address to a successor) does not carry the account over: it must be
  verified again first.
- ``synapse_fhir_sso_accounts``: accounts made through single sign-on. Synapse stores the
  identity provider's email claim as verified without asking the provider whether it
  verified it, so those addresses identify nobody unless ``identity.trust_sso_emails``.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``).
"""

from __future__ import annotations

from collections.abc import Collection

from synapse_fhir_module.storage import Cursor

EMAILS = "synapse_fhir_account_emails"
CHANGES = "synapse_fhir_identity_changes"
SPELLINGS = "synapse_fhir_email_spellings"
TIES = "synapse_fhir_email_ties"
SSO = "synapse_fhir_sso_accounts"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {EMAILS} (
        user_id TEXT NOT NULL,
        address TEXT NOT NULL,
        PRIMARY KEY (user_id, address)
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {EMAILS}_address ON {EMAILS} (address)",
    f"""
    CREATE TABLE IF NOT EXISTS {SPELLINGS} (
        address TEXT NOT NULL,
        spelling TEXT NOT NULL,
        PRIMARY KEY (address, spelling)
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {TIES} (
        user_id TEXT NOT NULL,
        address TEXT NOT NULL,
        person TEXT NOT NULL,
        validated_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, address)
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {SSO} (
        user_id TEXT NOT NULL PRIMARY KEY,
        provider TEXT NOT NULL,
        recorded_ms BIGINT NOT NULL
    )
    """,
    f"""
    CREATE TABLE IF NOT EXISTS {CHANGES} (
        user_id TEXT NOT NULL,
        address TEXT NOT NULL,
        changed_ms BIGINT NOT NULL,
        PRIMARY KEY (user_id, address)
    )
    """,
)

# Addresses per query (SQLite's default limit on parameters is 999).
CHUNK = 500


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def replace_addresses(txn: Cursor, user_id: str, addresses: Collection[str]) -> bool:
    """Make ``addresses`` the account's set; True when that changed anything."""
    txn.execute(f"SELECT address FROM {EMAILS} WHERE user_id = ?", (user_id,))
    before = {str(address) for (address,) in txn.fetchall()}
    after = set(addresses)
    if before == after:
        return False
    for address in sorted(before - after):
        txn.execute(f"DELETE FROM {EMAILS} WHERE user_id = ? AND address = ?", (user_id, address))
    for address in sorted(after - before):
        txn.execute(f"INSERT INTO {EMAILS} (user_id, address) VALUES (?, ?)", (user_id, address))
    return True


def add_address(txn: Cursor, user_id: str, address: str) -> None:
    txn.execute(
        f"INSERT INTO {EMAILS} (user_id, address) VALUES (?, ?) ON CONFLICT DO NOTHING",
        (user_id, address),
    )


def remove_address(txn: Cursor, user_id: str, address: str) -> None:
    txn.execute(f"DELETE FROM {EMAILS} WHERE user_id = ? AND address = ?", (user_id, address))


def accounts_with(txn: Cursor, addresses: Collection[str]) -> dict[str, set[str]]:
    """``{address: accounts}`` for those of ``addresses`` any account holds."""
    return _by_address(txn, f"SELECT address, user_id FROM {EMAILS}", addresses)


def all_addresses(txn: Cursor) -> list[str]:
    txn.execute(f"SELECT DISTINCT address FROM {EMAILS} ORDER BY address")
    return [str(address) for (address,) in txn.fetchall()]


def note_change(txn: Cursor, user_id: str, address: str, now_ms: int) -> None:
    txn.execute(
        f"INSERT INTO {CHANGES} (user_id, address, changed_ms) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id, address) DO UPDATE SET changed_ms = excluded.changed_ms",
        (user_id, address, now_ms),
    )


def take_changes(txn: Cursor, limit: int = 100) -> list[tuple[str, str, int]]:
    """The oldest noted changes (left in place: ``done`` removes each once handled)."""
    txn.execute(
        f"SELECT user_id, address, changed_ms FROM {CHANGES} ORDER BY changed_ms LIMIT ?",
        (limit,),
    )
    return [(str(u), str(a), int(ms)) for u, a, ms in txn.fetchall()]


def done(txn: Cursor, user_id: str, address: str, changed_ms: int) -> None:
    """Forget a handled change, unless the same address changed again since it was taken."""
    txn.execute(
        f"DELETE FROM {CHANGES} WHERE user_id = ? AND address = ? AND changed_ms = ?",
        (user_id, address, changed_ms),
    )


def spellings_of(txn: Cursor, addresses: Collection[str]) -> dict[str, set[str]]:
    return _by_address(txn, f"SELECT address, spelling FROM {SPELLINGS}", addresses)


def _by_address(txn: Cursor, select: str, addresses: Collection[str]) -> dict[str, set[str]]:
    """``select`` (address and one more column) for these addresses, in chunks, grouped."""
    found: dict[str, set[str]] = {}
    wanted = sorted(addresses)
    for start in range(0, len(wanted), CHUNK):
        chunk = wanted[start : start + CHUNK]
        placeholders = ", ".join("?" for _ in chunk)
        txn.execute(f"{select} WHERE address IN ({placeholders})", tuple(chunk))
        for address, value in txn.fetchall():
            found.setdefault(str(address), set()).add(str(value))
    return found


def add_spellings(txn: Cursor, pairs: Collection[tuple[str, str]]) -> None:
    for address, spelling in sorted(pairs):
        txn.execute(
            f"INSERT INTO {SPELLINGS} (address, spelling) VALUES (?, ?) ON CONFLICT DO NOTHING",
            (address, spelling),
        )


def confirm_tie(txn: Cursor, user_id: str, address: str, person: str, validated_ms: int) -> bool:
    """Whether ``address`` may make ``user_id`` the account of ``person``: yes the first
    time (the tie is recorded), yes while it leads to the same person, and yes to another
    person only if the account verified the address after the tie was made (the tie
    moves). Else no."""
    txn.execute(
        f"SELECT person, validated_ms FROM {TIES} WHERE user_id = ? AND address = ?",
        (user_id, address),
    )
    row = txn.fetchone()
    if row is not None and str(row[0]) == person:
        return True
    if row is not None and validated_ms <= int(row[1]):
        return False
    txn.execute(
        f"INSERT INTO {TIES} (user_id, address, person, validated_ms) VALUES (?, ?, ?, ?)"
        " ON CONFLICT (user_id, address) DO UPDATE SET person = excluded.person,"
        " validated_ms = excluded.validated_ms",
        (user_id, address, person, validated_ms),
    )
    return True


def note_registration(txn: Cursor, user_id: str, provider: str | None, now_ms: int) -> None:
    """An account is being registered, through ``provider`` (single sign-on) or not."""
    if provider is None:
        txn.execute(f"DELETE FROM {SSO} WHERE user_id = ?", (user_id,))
        return
    txn.execute(
        f"INSERT INTO {SSO} (user_id, provider, recorded_ms) VALUES (?, ?, ?)"
        " ON CONFLICT (user_id) DO UPDATE SET provider = excluded.provider,"
        " recorded_ms = excluded.recorded_ms",
        (user_id, provider, now_ms),
    )


def made_by_sso(txn: Cursor, user_id: str) -> bool:
    txn.execute(f"SELECT 1 FROM {SSO} WHERE user_id = ?", (user_id,))
    return txn.fetchone() is not None


def copy_addresses(txn: Cursor, user_id: str, addresses: Collection[str], trust_sso: bool) -> bool:
    """One transaction per lookup: whether the account's addresses count (not an account
    made through single sign-on, unless its provider is trusted), and if so the copy
    brought up to date with them."""
    if not trust_sso and made_by_sso(txn, user_id):
        return False
    replace_addresses(txn, user_id, addresses)
    return True
