"""The audit journal's SQL on a real PostgreSQL, through Synapse's own database layer
(``LoggingTransaction`` over psycopg2, as ``run_db_interaction`` runs it): the same
statements the SQLite unit tests run — insert (twice), the queue, shipped and refused
rows, pruning after retention, recent refusals, the retry of set-aside rows."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from devstack.postgres import PostgresDatabase
from synapse_fhir_module.audit import journal_store as store
from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from tests.integration.test_outbox_store_postgres import SynapseStyleDb


@pytest.fixture
def db(postgres_database: PostgresDatabase) -> Iterator[SynapseStyleDb]:
    db = SynapseStyleDb(postgres_database)
    db.run(store.create_tables)
    db.run(store.create_tables)  # idempotent: every instance runs it at start
    yield db
    db.close()


def decision(at: int, **fields: Any) -> Decision:
    return Decision(
        kind=fields.pop("kind", DecisionKind.ACCESS_REFUSED),
        outcome=fields.pop("outcome", Outcome.REFUSED),
        recorded_ms=at,
        **fields,
    )


def test_the_journal_queue_on_postgresql(db: SynapseStyleDb) -> None:
    rows = [
        decision(1, user_id="@a:x.org", room_id="!r:x.org", reason="not_in_care_team"),
        decision(2, kind=DecisionKind.MEMBER_INVITED, outcome=Outcome.SUCCESS),
        decision(3, user_id="@b:x.org", reason="care_team_inactive", detail="join"),
        decision(4),
    ]
    db.run(store.insert_decisions, rows)
    db.run(store.insert_decisions, rows[:1])  # a flush retried after its commit
    assert [r.decision for r in db.run(store.unshipped, 10)] == rows
    assert db.run(store.count_unshipped) == (4, 1)
    assert [r.decision for r in db.run(store.recent_refusals, 2)] == [rows[3], rows[2]]

    db.run(store.mark_shipped, [rows[0].audit_id], 100)
    db.run(store.note_failure, [rows[1].audit_id], "HTTP 503")
    db.run(store.mark_refused, rows[2].audit_id, "HTTP 422", 101)
    waiting = db.run(store.unshipped, 10)
    assert [r.decision for r in waiting] == [rows[1], rows[3]]
    assert (waiting[0].attempts, waiting[0].failure) == (1, "HTTP 503")
    assert db.run(store.count_unshipped) == (2, 2)
    assert db.run(store.count_refused) == 1

    # Retention: with audit on, only what FHIR has goes (a row set aside after a refusal
    # stays until an admin retries it); off, everything old.
    assert db.run(store.prune, 4, True, 100) == 1
    assert db.run(store.count_refused) == 1
    assert [r.decision for r in db.run(store.unshipped, 10)] == [rows[1], rows[3]]
    assert db.run(store.prune, 3, False, 1) == 1  # rows[1], the one left recorded before 3
    assert [r.decision for r in db.run(store.unshipped, 10)] == [rows[3]]
    assert db.run(store.retry_refused) == 1
    assert [r.decision for r in db.run(store.unshipped, 10)] == [rows[2], rows[3]]
