"""The outbox's SQL on SQLite (the same statements run on PostgreSQL through Synapse)."""

from __future__ import annotations

import random
import sqlite3
from collections.abc import Iterator

import pytest

from synapse_fhir_module.recording import outbox_store as store


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # idempotent: runs at every start
    yield cursor
    connection.close()


def event(event_id: str, room: str = "!a:example.org") -> dict:
    return {"event_id": event_id, "room_id": room, "type": "m.room.message", "content": {}}


def test_enqueue_is_idempotent_per_event(txn: sqlite3.Cursor) -> None:
    assert store.enqueue(txn, event("$1"), 1000) is True
    assert store.enqueue(txn, event("$1"), 1001) is False
    assert store.counts(txn) == (1, 0)


def test_due_rows_come_oldest_first_with_their_event(txn: sqlite3.Cursor) -> None:
    store.enqueue(txn, event("$2"), 1002)
    store.enqueue(txn, event("$1"), 1001)
    store.enqueue(txn, event("$3", "!b:example.org"), 1003)
    rows = store.due_rows(txn, 2000, limit=10)
    assert [r.event_id for r in rows] == ["$1", "$2", "$3"]
    assert rows[0].event == event("$1")
    assert [r.event_id for r in store.due_rows(txn, 2000, limit=2)] == ["$1", "$2"]
    assert store.due_rows(txn, 999, limit=10) == []


def test_a_backing_off_row_holds_back_its_room_only(txn: sqlite3.Cursor) -> None:
    store.enqueue(txn, event("$parent"), 1000)
    store.enqueue(txn, event("$reply"), 1001)
    store.enqueue(txn, event("$other", "!b:example.org"), 1002)
    store.mark_retry(txn, ["$parent"], 5000, "HTTP 503")
    # The reply must not overtake its parent; the other room flows on.
    assert [r.event_id for r in store.due_rows(txn, 2000, limit=10)] == ["$other"]
    assert [r.event_id for r in store.due_rows(txn, 5000, limit=10)] == [
        "$parent",
        "$reply",
        "$other",
    ]
    assert store.due_rows(txn, 5000, limit=1)[0].attempts == 1


def test_written_rows_leave_and_dead_rows_stay_with_their_reason(txn: sqlite3.Cursor) -> None:
    for n in range(3):
        store.enqueue(txn, event(f"${n}"), 1000 + n)
    store.mark_written(txn, ["$0"])
    store.mark_dead(txn, "$1", "HTTP 422: error: Communication.sender: minimum required = 1")
    assert store.counts(txn) == (1, 1)
    assert store.dead_letters(txn) == [
        store.DeadLetter(
            "$1",
            "!a:example.org",
            1001,
            1,
            "HTTP 422: error: Communication.sender: minimum required = 1",
        )
    ]
    # A dead row does not hold back the rest of its room.
    assert [r.event_id for r in store.due_rows(txn, 5000, limit=10)] == ["$2"]


def test_dead_letters_can_be_requeued_one_by_one_or_all(txn: sqlite3.Cursor) -> None:
    for n in range(4):
        store.enqueue(txn, event(f"${n}"), 1000 + n)
        store.mark_dead(txn, f"${n}", "HTTP 400")
    assert store.requeue_dead(txn, ["$1", "$unknown"], 7000) == 1
    assert store.counts(txn) == (1, 3)
    (row,) = store.due_rows(txn, 7000, limit=10)
    assert (row.event_id, row.attempts) == ("$1", 0)
    assert store.requeue_dead(txn, None, 8000) == 3
    assert store.counts(txn) == (4, 0)
    assert store.requeue_dead(txn, ["$1"], 9000) == 0  # already pending: untouched


def test_a_requeued_dead_letter_starts_its_failure_count_again(txn: sqlite3.Cursor) -> None:
    """A row dead-lettered by code that did not reset the count (the first release never
    touched the column; a rolling upgrade runs both) gets a fresh count when retried."""
    store.enqueue(txn, event("$1"), 1000)
    for _ in range(5):
        store.failed_answering(txn, "$1")
    txn.execute(f"UPDATE {store.TABLE} SET state = ? WHERE event_id = ?", (store.DEAD, "$1"))
    assert store.requeue_dead(txn, None, 2000) == 1
    assert store.failed_answering(txn, "$1") == 1


def test_a_row_can_be_read_and_rewritten_in_place(txn: sqlite3.Cursor) -> None:
    store.enqueue(txn, event("$1"), 1000)
    store.mark_dead(txn, "$1", "HTTP 422: quoting the message")
    room = event("$1")["room_id"]
    assert store.row_of(txn, "$1") == store.StoredRow(
        store.DEAD, event("$1"), "HTTP 422: quoting the message", room
    )
    erased = {**event("$1"), "content": {}, "withdrawn": {}}
    store.rewrite(txn, "$1", erased, "HTTP 422 (details erased)")
    assert store.row_of(txn, "$1") == store.StoredRow(
        store.DEAD, erased, "HTTP 422 (details erased)", room
    )
    # State, attempts and schedule stay: a retry still takes it from the dead letters.
    assert store.counts(txn) == (0, 1)
    assert store.requeue_dead(txn, ["$1"], 2000) == 1
    (row,) = store.due_rows(txn, 2000, limit=10)
    assert row.event == erased
    assert store.row_of(txn, "$unknown") is None


def test_rows_of_a_room_can_be_found_by_their_event(txn: sqlite3.Cursor) -> None:
    store.enqueue(txn, {**event("$edit"), "content": {"edits": "$orig"}}, 1000)
    store.enqueue(txn, {**event("$other"), "content": {}}, 1001)
    store.enqueue(
        txn, {**event("$elsewhere", "!b:example.org"), "content": {"edits": "$orig"}}, 1002
    )
    store.mark_dead(txn, "$edit", "HTTP 422")

    def edits_orig(e: dict) -> bool:
        return bool(e["content"].get("edits") == "$orig")

    assert store.event_ids_in_room(txn, "!a:example.org", edits_orig) == ["$edit"]


def test_backoff_grows_with_jitter_and_a_cap() -> None:
    rng = random.Random(7)
    delays = [store.retry_delay_ms(n, rng=rng) for n in range(12)]
    for n, delay in enumerate(delays):
        ceiling = min(60_000, 500 * 2**n)
        assert ceiling / 2 <= delay <= ceiling
    assert max(delays) <= 60_000
    assert len(set(delays)) == len(delays)  # jittered, not lock-step
