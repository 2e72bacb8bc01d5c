"""The schema-version runner on SQLite (the same SQL runs on PostgreSQL through Synapse:
tests/integration/test_upgrade.py), with each ``run`` one transaction as Synapse's
``run_db_interaction`` makes it, and the module's own migrations on the first release's
tables (tests/fixtures/schema_v1.sql)."""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import pytest_twisted

from synapse_fhir_module.module import MIGRATIONS
from synapse_fhir_module.recording import outbox_store, position_store
from synapse_fhir_module.storage import (
    VERSION_TABLE,
    Cursor,
    Migration,
    SchemaTooNew,
    SchemaUpgrade,
    check_order,
    columns,
    migrate,
)

SCHEMA_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "schema_v1.sql"


class Database:
    """A SQLite database whose ``run`` is one transaction: committed, or rolled back."""

    def __init__(self, path: Path) -> None:
        self.connection = sqlite3.connect(path)

    async def run(self, desc: str, func: Callable[..., Any], *args: Any) -> Any:
        cursor = self.connection.cursor()
        try:
            result = func(cursor, *args)
        except BaseException:
            self.connection.rollback()
            raise
        self.connection.commit()
        return result

    def one(self, sql: str) -> Any:
        row = self.connection.execute(sql).fetchone()
        return None if row is None else row[0]

    def tables(self) -> set[str]:
        rows = self.connection.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        return {name for (name,) in rows}


@pytest.fixture
def db(tmp_path: Path) -> Iterator[Database]:
    database = Database(tmp_path / "homeserver.db")
    yield database
    database.connection.close()


def now() -> int:
    return 1_779_000_000_000


def steps(calls: list[int], count: int) -> list[Migration]:
    def step(version: int) -> Callable[[Cursor], None]:
        def apply(txn: Cursor) -> None:
            calls.append(version)
            txn.execute(f"CREATE TABLE made_by_{version} (x INTEGER)")

        return apply

    return [Migration(v, f"step {v}", step(v)) for v in range(1, count + 1)]


@pytest_twisted.ensureDeferred
async def test_steps_run_in_order_once_each(db: Database) -> None:
    calls: list[int] = []
    applied = await migrate(db.run, steps(calls, 3), now)
    assert [m.version for m in applied] == [1, 2, 3]
    assert calls == [1, 2, 3]
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 3
    # Again (the next start, or a second instance): nothing runs twice.
    assert await migrate(db.run, steps(calls, 3), now) == []
    assert calls == [1, 2, 3]
    # A release with one step more runs that step only.
    assert [m.version for m in await migrate(db.run, steps(calls, 4), now)] == [4]
    assert calls == [1, 2, 3, 4]
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 4


@pytest_twisted.ensureDeferred
async def test_a_step_that_fails_is_undone_with_its_version_and_runs_again_next_time(
    db: Database,
) -> None:
    calls: list[int] = []

    def broken(txn: Cursor) -> None:
        txn.execute("CREATE TABLE half_done (x INTEGER)")
        raise RuntimeError("the disk is full")

    with pytest.raises(RuntimeError):
        await migrate(db.run, [*steps(calls, 1), Migration(2, "broken", broken)], now)
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 1
    assert "made_by_1" in db.tables()
    assert "half_done" not in db.tables()  # (one transaction: the version and the change)
    applied = await migrate(db.run, steps(calls, 2), now)
    assert [m.version for m in applied] == [2]
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 2


@pytest_twisted.ensureDeferred
async def test_a_database_newer_than_the_code_is_refused_and_left_alone(db: Database) -> None:
    calls: list[int] = []
    await migrate(db.run, steps(calls, 3), now)
    with pytest.raises(SchemaTooNew) as refused:
        await migrate(db.run, steps([], 2), now)
    assert (refused.value.stored, refused.value.known) == (3, 2)
    assert "schema version 3" in str(refused.value)
    assert "up to 2" in str(refused.value)
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 3


def test_steps_must_be_numbered_from_one_without_gaps() -> None:
    check_order(MIGRATIONS)
    with pytest.raises(ValueError):
        check_order([Migration(1, "a", print), Migration(3, "c", print)])
    with pytest.raises(ValueError):
        check_order([Migration(2, "b", print), Migration(1, "a", print)])


def first_release_database(db: Database) -> None:
    """What the first release left: its tables, a saved position, a pending row, a dead
    letter."""
    db.connection.executescript(SCHEMA_V1.read_text())
    db.connection.execute(
        f"INSERT INTO {position_store.TABLE} (id, stream_token, saved_ms) VALUES (1, 's72_9', 5)"
    )
    for event_id, state, error in (("$pending", "pending", None), ("$dead", "dead", "HTTP 422")):
        event = {"event_id": event_id, "room_id": "!r:example.org", "type": "m.room.message"}
        # (The first release's own statement: it names no failure count.)
        db.connection.execute(
            f"INSERT INTO {outbox_store.TABLE} (event_id, room_id, enqueued_ms, event_json,"
            " state, attempts, next_attempt_ms, last_error) VALUES (?, ?, 1, ?, ?, 3, 0, ?)",
            (event_id, "!r:example.org", json.dumps(event), state, error),
        )
    db.connection.commit()


@pytest_twisted.ensureDeferred
async def test_the_first_releases_tables_upgrade_in_place_with_their_rows(db: Database) -> None:
    first_release_database(db)
    assert VERSION_TABLE not in db.tables()
    applied = await migrate(db.run, MIGRATIONS, now)
    assert [m.version for m in applied] == [1, 2]
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == len(MIGRATIONS) == 2
    assert outbox_store.FAILED_ANSWERING in columns(db.connection.cursor(), outbox_store.TABLE)
    cursor = db.connection.cursor()
    assert outbox_store.counts(cursor) == (1, 1)
    assert [row.event_id for row in outbox_store.due_rows(cursor, now(), 10)] == ["$pending"]
    assert outbox_store.failed_answering(cursor, "$pending") == 1
    assert position_store.load(cursor).stream_token == "s72_9"
    # The first release's code, should an operator go back, still writes its rows.
    cursor.execute(
        f"INSERT INTO {outbox_store.TABLE} (event_id, room_id, enqueued_ms, event_json,"
        " state, attempts, next_attempt_ms) VALUES ('$old', '!r:example.org', 2, '{}',"
        " 'pending', 0, 0) ON CONFLICT (event_id) DO NOTHING"
    )
    assert db.one(f"SELECT failed_answering FROM {outbox_store.TABLE} WHERE event_id = '$old'") == 0


@pytest_twisted.ensureDeferred
async def test_a_new_database_and_tables_made_before_the_migration_both_upgrade(
    tmp_path: Path,
) -> None:
    fresh = Database(tmp_path / "fresh.db")
    await migrate(fresh.run, MIGRATIONS, now)
    assert outbox_store.FAILED_ANSWERING in columns(fresh.connection.cursor(), outbox_store.TABLE)
    # A part made its table in the newest shape before the worker migrated.
    early = Database(tmp_path / "early.db")
    await early.run("outbox", outbox_store.create_schema)
    await migrate(early.run, MIGRATIONS, now)
    assert early.one(f"SELECT version FROM {VERSION_TABLE}") == 2
    for database in (fresh, early):
        await database.run("outbox", outbox_store.create_schema)  # (every start: no change)
        database.connection.close()


class Api:
    """The ModuleApi calls SchemaUpgrade makes."""

    def __init__(self, db: Database) -> None:
        self.run_db_interaction = db.run
        self.later: list[Callable[[], Any]] = []

    def delayed_background_call(self, msec: int, f: Callable[[], Any], desc: str) -> None:
        self.later.append(f)


@pytest.mark.parametrize("runs_here", [True, False], ids=["worker", "other instance"])
@pytest_twisted.ensureDeferred
async def test_every_instance_stops_on_a_database_newer_than_the_code(
    db: Database, runs_here: bool, caplog: pytest.LogCaptureFixture
) -> None:
    await migrate(db.run, [*MIGRATIONS, Migration(3, "from the future", print)], now)
    stopped: list[bool] = []
    api = Api(db)
    upgrade = SchemaUpgrade(
        api,  # type: ignore[arg-type]
        MIGRATIONS,
        runs_here=runs_here,
        now_ms=now,
        stop=lambda: stopped.append(True),
    )
    upgrade.start()
    await api.later.pop()()
    assert stopped == [True]
    assert "Refusing to run: the module's tables are at schema version 3" in caplog.text
    assert api.later == []  # (not tried again)
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 3


@pytest_twisted.ensureDeferred
async def test_only_the_worker_migrates(db: Database) -> None:
    first_release_database(db)
    other = SchemaUpgrade(
        Api(db),  # type: ignore[arg-type]
        MIGRATIONS,
        runs_here=False,
        now_ms=now,
        stop=lambda: pytest.fail("stopped"),
    )
    await other.ready()
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 0
    assert outbox_store.FAILED_ANSWERING not in columns(db.connection.cursor(), outbox_store.TABLE)
    worker = SchemaUpgrade(
        Api(db),  # type: ignore[arg-type]
        MIGRATIONS,
        runs_here=True,
        now_ms=now,
        stop=lambda: pytest.fail("stopped"),
    )
    await worker.ready()
    await worker.ready()  # (once per process)
    assert db.one(f"SELECT version FROM {VERSION_TABLE}") == 2
