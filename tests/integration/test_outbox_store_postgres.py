"""The outbox's SQL on a real PostgreSQL, through Synapse's own database layer.

Each transaction runs the way ``run_db_interaction`` runs it on PostgreSQL: Synapse's
``LoggingTransaction`` (which turns ``?`` into ``%s``) over a psycopg2 connection in
Synapse's isolation level (REPEATABLE READ), committed at the end. The same cases as
``tests/unit/test_outbox_store.py`` (SQLite), plus what only a server shows: concurrent
enqueues of one event from two connections.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import pytest
from synapse.storage.database import LoggingTransaction
from synapse.storage.engines import PostgresEngine, create_engine

from devstack.postgres import PostgresDatabase
from devstack.waiting import wait_until
from synapse_fhir_module.recording import outbox_store as store
from synapse_fhir_module.sync import store as sync_store

T = TypeVar("T")


class SynapseStyleDb:
    """Runs functions of ``outbox_store`` as Synapse's ``runInteraction`` does."""

    def __init__(self, database: PostgresDatabase) -> None:
        self.database = database
        engine = create_engine(database.synapse_config())
        assert isinstance(engine, PostgresEngine)
        self.engine = engine
        self._connections: list[Any] = []

    def connection(self) -> Any:
        conn = self.database.connect()
        self.engine.attempt_to_set_isolation_level(conn, None)  # Synapse's default
        self._connections.append(conn)
        return conn

    @contextmanager
    def transaction(self, conn: Any = None) -> Iterator[LoggingTransaction]:
        conn = conn or self.connection()
        cursor = LoggingTransaction(
            txn=conn.cursor(), name="test", server_name="test", database_engine=self.engine
        )
        try:
            yield cursor
            conn.commit()
        except BaseException:
            conn.rollback()
            raise
        finally:
            cursor.close()

    def run(self, func: Callable[..., T], *args: Any) -> T:
        """One function in one committed transaction."""
        with self.transaction() as txn:
            return func(txn, *args)

    def close(self) -> None:
        for conn in self._connections:
            conn.close()


@pytest.fixture
def db(postgres_database: PostgresDatabase) -> Iterator[SynapseStyleDb]:
    db = SynapseStyleDb(postgres_database)
    db.run(store.create_schema)
    db.run(store.create_schema)  # idempotent: runs at every start
    yield db
    db.close()


def event(event_id: str, room: str = "!a:example.org", **content: Any) -> dict[str, Any]:
    return {"event_id": event_id, "room_id": room, "type": "m.room.message", "content": content}


def due(db: SynapseStyleDb, now_ms: int, limit: int = 10) -> list[str]:
    return [row.event_id for row in db.run(store.due_rows, now_ms, limit)]


def dead_letters(db: SynapseStyleDb) -> list[tuple[str, str]]:
    return [(d.event_id, d.reason) for d in db.run(store.dead_letters)]


def test_the_database_is_one_synapse_accepts(db: SynapseStyleDb) -> None:
    # Synapse refuses to start on a database with another encoding or collation.
    conn = db.connection()
    db.engine.check_database(conn)
    with conn.cursor() as cur:
        cur.execute("SELECT to_regclass(%s) IS NOT NULL", (store.TABLE,))
        assert cur.fetchone() == (True,)


def test_enqueue_is_idempotent_per_event(db: SynapseStyleDb) -> None:
    assert db.run(store.enqueue, event("$1"), 1000) is True
    assert db.run(store.enqueue, event("$1"), 1001) is False
    assert db.run(store.counts) == (1, 0)
    # Also inside one transaction (a callback repeated before the commit).
    with db.transaction() as txn:
        assert store.enqueue(txn, event("$2"), 1002) is True
        assert store.enqueue(txn, event("$2"), 1003) is False
    assert db.run(store.counts) == (2, 0)


def test_a_concurrent_duplicate_enqueue_keeps_one_row(db: SynapseStyleDb) -> None:
    """Two connections enqueue one event at once: the second waits for the first, then
    adds nothing, or fails in a way Synapse retries (a serialization failure)."""
    first_conn, second_conn = db.connection(), db.connection()
    outcome: dict[str, Any] = {}

    def second() -> None:
        try:
            with db.transaction(second_conn) as txn:
                outcome["added"] = store.enqueue(txn, event("$same"), 2000)
        except Exception as e:
            outcome["error"] = e

    with db.transaction(first_conn) as txn:
        assert store.enqueue(txn, event("$same"), 1000) is True
        thread = threading.Thread(target=second)
        thread.start()
        # The second insert is blocked on the first one's uncommitted row.
        wait_until(
            lambda: _waiting_on_a_lock(db, second_conn.get_backend_pid()),
            timeout=15,
            what="the second enqueue waiting for the first transaction",
        )
    thread.join(15)
    assert not thread.is_alive()
    if "error" in outcome:
        assert db.engine.is_deadlock(outcome["error"]), outcome["error"]  # Synapse retries
        assert db.run(store.enqueue, event("$same"), 3000) is False  # ...and the retry adds none
    else:
        assert outcome["added"] is False
    assert db.run(store.counts) == (1, 0)
    (row,) = db.run(store.due_rows, 5000, 10)
    assert row.enqueued_ms == 1000  # the first one's row, untouched


def _waiting_on_a_lock(db: SynapseStyleDb, pid: int) -> bool:
    conn = db.database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,))
            return cur.fetchone() == ("Lock",)
    finally:
        conn.close()


def test_due_rows_come_oldest_first_with_their_event(db: SynapseStyleDb) -> None:
    text = "Bloeddruk 150/95 — te hoog ✓ 🩺"  # non-ASCII survives the round trip
    db.run(store.enqueue, event("$2"), 1002)
    db.run(store.enqueue, event("$1", body=text), 1001)
    db.run(store.enqueue, event("$3", "!b:example.org"), 1003)
    rows = db.run(store.due_rows, 2000, 10)
    assert [r.event_id for r in rows] == ["$1", "$2", "$3"]
    assert rows[0].event == event("$1", body=text)
    assert rows[0].enqueued_ms == 1001 and rows[0].attempts == 0
    assert due(db, 2000, limit=2) == ["$1", "$2"]
    assert due(db, 999) == []


def test_rows_of_one_millisecond_come_in_byte_order_as_on_sqlite(db: SynapseStyleDb) -> None:
    # Synapse's C collation: 'B' (0x42) before 'a' (0x61), as SQLite's BINARY; a
    # linguistic collation would put '$a' first.
    for event_id in ["$b", "$a", "$B", "$A"]:
        db.run(store.enqueue, event(event_id), 1000)
    assert due(db, 1000) == ["$A", "$B", "$a", "$b"]
    db.run(store.mark_retry, ["$B"], 5000, "HTTP 503")
    # Rows after the backing-off one (in that order) wait; the one before it flows.
    assert due(db, 2000) == ["$A"]


def test_a_backing_off_row_holds_back_its_room_only(db: SynapseStyleDb) -> None:
    db.run(store.enqueue, event("$parent"), 1000)
    db.run(store.enqueue, event("$reply"), 1001)
    db.run(store.enqueue, event("$other", "!b:example.org"), 1002)
    db.run(store.mark_retry, ["$parent"], 5000, "HTTP 503")
    # The reply must not overtake its parent; the other room flows on.
    assert due(db, 2000) == ["$other"]
    assert due(db, 5000) == ["$parent", "$reply", "$other"]
    parent = db.run(store.due_rows, 5000, 1)[0]
    assert (parent.event_id, parent.attempts) == ("$parent", 1)
    db.run(store.mark_retry, ["$parent", "$reply"], 9000, "x" * 5000)
    assert due(db, 8999) == ["$other"]
    assert [(r.event_id, r.attempts) for r in db.run(store.due_rows, 9000, 10)] == [
        ("$parent", 2),
        ("$reply", 1),
        ("$other", 0),
    ]
    with db.transaction() as txn:  # the error is kept, cut to its maximum length
        txn.execute(f"SELECT last_error FROM {store.TABLE} WHERE event_id = ?", ("$reply",))
        assert txn.fetchone() == ("x" * store.MAX_ERROR_LENGTH,)


def test_written_rows_leave_and_dead_rows_stay_with_their_reason(db: SynapseStyleDb) -> None:
    for n in range(3):
        db.run(store.enqueue, event(f"${n}"), 1000 + n)
    db.run(store.mark_written, ["$0"])
    reason = "HTTP 422: error: Communication.sender: minimum required = 1"
    db.run(store.mark_dead, "$1", reason)
    assert db.run(store.counts) == (1, 1)
    assert dead_letters(db) == [("$1", reason)]
    # A dead row does not hold back the rest of its room, and is never due again.
    assert due(db, 5000) == ["$2"]
    db.run(store.mark_written, ["$2"])
    assert db.run(store.counts) == (0, 1)
    assert due(db, 10_000) == []


def test_a_reason_with_a_nul_character_is_kept(db: SynapseStyleDb) -> None:
    # PostgreSQL's text cannot hold U+0000 (SQLite's can); FHIR's error text may echo
    # what a message contained. The dead letter must still be recorded.
    db.run(store.enqueue, event("$1"), 1000)
    db.run(store.enqueue, event("$2"), 1001)
    db.run(store.enqueue, event("$3", "!b:example.org", body="a\x00b"), 1002)  # JSON escapes it
    assert db.run(store.due_rows, 1002, 10)[2].event == event("$3", "!b:example.org", body="a\x00b")
    db.run(store.mark_retry, ["$1"], 2000, "HTTP 503: bad\x00gateway")
    db.run(store.mark_dead, "$2", "HTTP 400: cannot parse 'a\x00b'")
    assert db.run(store.counts) == (2, 1)
    assert dead_letters(db) == [("$2", "HTTP 400: cannot parse 'a\ufffdb'")]


def test_the_sync_tables_work_on_postgresql(db: SynapseStyleDb) -> None:
    """sync_store's upserts and claims, same cases as tests/unit/test_sync_store.py."""
    db.run(sync_store.create_schema)
    db.run(sync_store.create_schema)
    db.run(sync_store.remember_room, "CareTeam/1", "!a:x")
    db.run(sync_store.remember_room, "CareTeam/1", "!b:x")
    assert db.run(sync_store.room_of, "CareTeam/1") == "!b:x"
    assert db.run(sync_store.claim_relay, "Communication/9", "!r:x", "@bram:x") is True
    assert db.run(sync_store.claim_relay, "Communication/9", "!r:x", "@bram:x") is False
    db.run(sync_store.relayed_as, "Communication/9", "$e1")
    assert db.run(sync_store.is_relay_event, "Communication/9", "!r:x", "$e1", "@bram:x") is True
    assert (
        db.run(sync_store.is_relay_event, "Communication/9", "!r:x", "$forged", "@bram:x") is False
    )
    assert db.run(sync_store.source_of_event, "$e1", "!r:x") == "Communication/9"
    assert db.run(sync_store.source_of_event, "$e1", "!other:x") is None
    db.run(sync_store.release_relay, "Communication/9")
    assert db.run(sync_store.claim_relay, "Communication/9", "!r:x", "@bram:x") is True
    db.run(sync_store.set_value, "watermark:CareTeam", "2026-11-25T10:00:00.000Z")
    db.run(sync_store.set_value, "watermark:CareTeam", "2026-11-25T11:00:00.000Z")
    assert db.run(sync_store.get_value, "watermark:CareTeam") == "2026-11-25T11:00:00.000Z"
