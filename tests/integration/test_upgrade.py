"""Upgrading in place: a Synapse whose database holds the module's tables as the first
release left them (tests/fixtures/schema_v1.sql: no version table, the outbox without its
failure count) with rows in them — a saved stream position, pending outbox rows, dead
letters — starts with this release, migrates them, and records on without loss. On
PostgreSQL and on SQLite; and a database a newer release migrated stops Synapse."""

from __future__ import annotations

import json
import sqlite3
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

from devstack.hapi import HapiDevServer
from devstack.postgres import PostgresDatabase
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.module import MIGRATIONS
from synapse_fhir_module.recording import outbox_store, position_store
from synapse_fhir_module.storage import VERSION_TABLE
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    event_ids_in_thread,
    health,
)

SCHEMA_V1 = Path(__file__).resolve().parents[1] / "fixtures" / "schema_v1.sql"
PREFIX = "synapse_fhir_"


class Tables:
    """The module's tables, reached directly while Synapse is stopped (DB-API: psycopg2
    or sqlite3, each with its own placeholder)."""

    def __init__(self, connect: Callable[[], Any], placeholder: str, list_tables: str) -> None:
        self._connect = connect
        self._placeholder = placeholder
        self._list_tables = list_tables

    def run(self, work: Callable[[Any], Any]) -> Any:
        connection = self._connect()
        try:
            cursor = connection.cursor()
            result = work(cursor)
            connection.commit()
            return result
        finally:
            connection.close()

    def sql(self, statement: str) -> str:
        return statement.replace("?", self._placeholder)

    def module_tables(self, cursor: Any) -> list[str]:
        cursor.execute(self._list_tables)
        return sorted(name for (name,) in cursor.fetchall() if name.startswith(PREFIX))

    def back_to_the_first_release(self) -> None:
        """Every module table as the first release made it (its rows kept), and no
        version table: what a database looks like before this release first starts."""

        def work(cursor: Any) -> None:
            kept: dict[str, tuple[list[str], list[tuple[Any, ...]]]] = {}
            for table in self.module_tables(cursor):
                cursor.execute(f"SELECT * FROM {table}")
                names = [column[0] for column in cursor.description]
                kept[table] = (names, cursor.fetchall())
                cursor.execute(f"DROP TABLE {table}")
            for statement in SCHEMA_V1.read_text().split(";"):
                lines = [line for line in statement.splitlines() if not line.startswith("--")]
                if "".join(lines).strip():
                    cursor.execute("\n".join(lines))
            for table in self.module_tables(cursor):
                cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")
                v1 = [column[0] for column in cursor.description]
                names, rows = kept.get(table, ([], []))
                keep = [names.index(name) for name in v1 if name in names]
                columns = ", ".join(names[i] for i in keep)
                marks = ", ".join("?" for _ in keep)
                for row in rows:
                    cursor.execute(
                        self.sql(f"INSERT INTO {table} ({columns}) VALUES ({marks})"),
                        tuple(row[i] for i in keep),
                    )
            assert VERSION_TABLE not in self.module_tables(cursor)

        self.run(work)

    def add_outbox_row(self, event: dict[str, Any], state: str, error: str | None) -> None:
        """A row as the first release wrote it (its own statement, no failure count)."""
        self.run(
            lambda cursor: cursor.execute(
                self.sql(
                    f"INSERT INTO {outbox_store.TABLE} (event_id, room_id, enqueued_ms,"
                    " event_json, state, attempts, next_attempt_ms, last_error)"
                    " VALUES (?, ?, ?, ?, ?, 3, 0, ?)"
                ),
                (
                    event["event_id"],
                    event["room_id"],
                    event["origin_server_ts"],
                    json.dumps(event),
                    state,
                    error,
                ),
            )
        )

    def one(self, statement: str) -> Any:
        def work(cursor: Any) -> Any:
            cursor.execute(statement)
            row = cursor.fetchone()
            return None if row is None else row[0]

        return self.run(work)

    def columns(self, table: str) -> set[str]:
        def work(cursor: Any) -> set[str]:
            cursor.execute(f"SELECT * FROM {table} WHERE 1 = 0")
            return {column[0] for column in cursor.description}

        return self.run(work)


def postgres_tables(database: PostgresDatabase) -> Tables:
    return Tables(
        database.connect,
        "%s",
        "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()",
    )


def sqlite_tables(server: SynapseServer) -> Tables:
    return Tables(
        lambda: sqlite3.connect(server.workdir / "homeserver.db"),
        "?",
        "SELECT name FROM sqlite_master WHERE type = 'table'",
    )


def left_over_message(room: str, sender: str, text: str) -> dict[str, Any]:
    """A message the first release read and left pending in its table (as it kept them)."""
    return {
        "event_id": f"$left-over-{uuid.uuid4().hex}",
        "room_id": room,
        "type": "m.room.message",
        "sender": sender,
        "origin_server_ts": 1_779_000_000_000,
        "content": {"msgtype": "m.text", "body": text},
        "redacts": None,
    }


def upgrade_and_record_on(server: SynapseServer, tables: Tables, hapi: HapiDevServer) -> None:
    _network, _service, room, gp = care_room(server, hapi.base_url)
    before = gp.send_text(room, "Voor de upgrade: wondzorg dag 1")
    written = wait_until(
        lambda: communication_of(hapi, before), timeout=60, what="the first message in FHIR"
    )
    thread = written["partOf"][0]["reference"]
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="recording settled before the stop",
    )
    server.stop()

    # The database as the first release left it, with its rows.
    tables.back_to_the_first_release()
    position = tables.one(f"SELECT stream_token FROM {position_store.TABLE}")
    assert position is not None, "the saved position was kept"
    assert outbox_store.FAILED_ANSWERING not in tables.columns(outbox_store.TABLE)
    pending = [left_over_message(room, gp.user_id, f"Achtergebleven {n}") for n in range(3)]
    for event in pending:
        tables.add_outbox_row(event, outbox_store.PENDING, "HTTP 503 from FHIR")
    dead = [left_over_message(room, gp.user_id, f"Geweigerd {n}") for n in range(2)]
    for event in dead:
        tables.add_outbox_row(event, outbox_store.DEAD, "HTTP 422: refused by FHIR")

    server.start()
    # Migrated at start-up, once.
    wait_until(
        lambda: tables.one(f"SELECT version FROM {VERSION_TABLE}") == len(MIGRATIONS),
        timeout=30,
        what=f"the module's tables at schema version {len(MIGRATIONS)}",
    )
    assert len(MIGRATIONS) == 2
    assert outbox_store.FAILED_ANSWERING in tables.columns(outbox_store.TABLE)
    log = server.log_path.read_text(errors="replace")
    assert "Schema version 2: the outbox keeps a message's failures" in log
    # The pending rows reach FHIR, once each, in the room's thread; the dead letters stay.
    for event in pending:
        stored = wait_until(
            lambda e=event: communication_of(hapi, e["event_id"]),
            timeout=60,
            what="a row the first release left pending written to FHIR",
        )
        assert stored["partOf"][0]["reference"] == thread
    after = gp.send_text(room, "Na de upgrade: wondzorg dag 2")
    wait_until(lambda: communication_of(hapi, after), timeout=60, what="a message after upgrade")
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 2},
        timeout=30,
        what="the pending rows gone from the table, the two dead letters kept",
    )
    in_thread = event_ids_in_thread(hapi, thread)
    expected = [before, after, *(e["event_id"] for e in pending)]
    assert sorted(in_thread) == sorted(expected), "each message once, none lost, none twice"
    assert tables.one(f"SELECT COUNT(*) FROM {outbox_store.TABLE} WHERE state = 'dead'") == 2
    assert tables.one(f"SELECT version FROM {VERSION_TABLE}") == 2


def test_the_first_releases_tables_upgrade_on_postgresql_and_recording_goes_on(
    hapi: HapiDevServer, start_synapse: Any, postgres_database: PostgresDatabase
) -> None:
    server = start_synapse(module_config(hapi.base_url), postgres=postgres_database)
    upgrade_and_record_on(server, postgres_tables(postgres_database), hapi)


def test_the_first_releases_tables_upgrade_on_sqlite_and_a_newer_schema_stops_synapse(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url))
    tables = sqlite_tables(server)
    upgrade_and_record_on(server, tables, hapi)

    # A newer release migrated the tables, and this one is started again: it refuses.
    server.stop()
    tables.run(lambda cursor: cursor.execute(f"UPDATE {VERSION_TABLE} SET version = 3"))
    server.log_path.write_text("")
    server.start_expecting_failure(timeout=60)
    log = server.log_path.read_text(errors="replace")
    assert "Refusing to run: the module's tables are at schema version 3" in log
    assert "knows versions up to 2 only" in log
    assert tables.one(f"SELECT version FROM {VERSION_TABLE}") == 3
