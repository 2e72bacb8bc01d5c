"""The account ↔ person table's SQL on a real PostgreSQL, through Synapse's own database
layer (as ``run_db_interaction`` runs it); the same cases as tests/unit/test_account_store.py
(SQLite)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from devstack.postgres import PostgresDatabase
from synapse_fhir_module.identity import account_store as store
from tests.integration.test_outbox_store_postgres import SynapseStyleDb


@pytest.fixture
def db(postgres_database: PostgresDatabase) -> Iterator[SynapseStyleDb]:
    db = SynapseStyleDb(postgres_database)
    db.run(store.create_schema)
    db.run(store.create_schema)  # idempotent: every instance creates it on first use
    yield db
    db.close()


def test_accounts_are_recorded_replaced_and_read_in_batches(db: SynapseStyleDb) -> None:
    assert db.run(store.recorded_account, "@anna:x") is None
    db.run(store.record_account, "@anna:x", "Practitioner/1", "username_and_email", 1000)
    db.run(store.record_account, "@henk:x", "Patient/1", "email", 1000)
    db.run(store.record_account, "@henk:x", "Patient/2", "email", 2_000_000_000_000)
    assert db.run(store.recorded_account, "@henk:x") == store.RecordedAccount(
        "@henk:x", "Patient/2", "email", 2_000_000_000_000
    )
    assert db.run(store.persons_of_accounts, ["@anna:x", "@henk:x", "@eve:x"]) == {
        "@anna:x": "Practitioner/1",
        "@henk:x": "Patient/2",
    }
    assert db.run(store.persons_of_accounts, []) == {}
