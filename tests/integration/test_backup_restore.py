"""Backup and restore, as docs/operations.md tells an operator to do it: a Synapse on
PostgreSQL with the module recording while a member keeps sending; ``pg_dump`` (custom
format) in the middle of that traffic; Synapse stopped; the dump restored with
``pg_restore`` into a fresh cluster; Synapse started on it against the same FHIR server.
Every message acknowledged before the dump began is one Communication, none twice, none
lost; messages sent after it began are not in the restored Synapse, and FHIR keeps the
ones it already had."""

from __future__ import annotations

import os
import shutil
import subprocess
import threading
from pathlib import Path
from typing import Any

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser
from devstack.postgres import PostgresCluster, PostgresDatabase, find_program
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    event_ids_in_thread,
    health,
)

TIMEOUT = 300  # (pg_dump and pg_restore of a small Synapse database take seconds)


class Sender(threading.Thread):
    """Sends messages one after another until stopped; ``sent``: the acknowledged ones,
    in order (an event id is there once Synapse answered 200: committed)."""

    def __init__(self, user: MatrixUser, room: str) -> None:
        super().__init__(daemon=True)
        self._user = user
        self._room = room
        self.sent: list[str] = []
        self.error: BaseException | None = None
        self._stopping = threading.Event()

    def run(self) -> None:
        try:
            n = 0
            while not self._stopping.is_set():
                self.sent.append(self._user.send_text(self._room, f"Controle {n}: RR 130/85"))
                n += 1
                self._stopping.wait(0.05)  # (a steady flow, about 15 a second at most)
        except BaseException as e:  # (reported by the test)
            self.error = e

    def finish(self) -> list[str]:
        self._stopping.set()
        self.join(timeout=60)
        assert not self.is_alive(), "the sender did not stop"
        assert self.error is None, f"sending failed: {self.error!r}"
        return list(self.sent)


def pg_tool(name: str, *args: str, password: str) -> None:
    """Run a PostgreSQL client tool from the server's own directory (same version)."""
    tool = find_program(name)
    result = subprocess.run(
        [str(tool), *args],
        env={**os.environ, "PGPASSWORD": password},
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        check=False,
    )
    assert result.returncode == 0, f"{name} failed ({result.returncode}): {result.stderr}"


def event_ids_in(database: PostgresDatabase, event_ids: list[str]) -> set[str]:
    """Which of ``event_ids`` Synapse's own ``events`` table holds."""
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT event_id FROM events WHERE event_id = ANY(%s)", (event_ids,))
            return {str(event_id) for (event_id,) in cur.fetchall()}
    finally:
        conn.close()


def test_a_dump_taken_mid_traffic_restores_and_records_every_message_once(
    hapi: HapiDevServer,
    start_synapse: Any,
    postgres_database: PostgresDatabase,
    run_dir: Path,
    tmp_path: Path,
) -> None:
    server = start_synapse(module_config(hapi.base_url), postgres=postgres_database)
    _network, _service, room, gp = care_room(server, hapi.base_url)
    first = gp.send_text(room, "Start van de zorgdag")
    thread = wait_until(
        lambda: communication_of(hapi, first), timeout=60, what="the first message in FHIR"
    )["partOf"][0]["reference"]

    sender = Sender(gp, room)
    sender.start()
    wait_until(lambda: len(sender.sent) >= 20, timeout=60, what="20 messages sent")
    acknowledged_before_dump = [first, *sender.sent]  # (copied before pg_dump starts)
    dump = tmp_path / "synapse.dump"
    pg_tool(
        "pg_dump",
        "--format=custom",
        f"--file={dump}",
        f"--host={postgres_database.host}",
        f"--port={postgres_database.port}",
        f"--username={postgres_database.user}",
        f"--dbname={postgres_database.dbname}",
        password=postgres_database.password,
    )
    during_dump = len(sender.sent) + 1
    wait_until(
        lambda: len(sender.sent) + 1 >= during_dump + 10,
        timeout=60,
        what="10 messages sent after the dump",
    )
    everything = [first, *sender.finish()]
    # The old Synapse recorded all of them (those after the dump too) before it stops.
    for event_id in everything:
        wait_until(
            lambda e=event_id: communication_of(hapi, e),
            timeout=120,
            what="every message sent before the stop in FHIR",
        )
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=60,
        what="recording settled before the stop",
    )
    server.stop()

    # Restore into a fresh cluster, and start Synapse on it (same config, same HAPI).
    cluster = PostgresCluster(run_dir / "restored")
    SERVER_LOGS.append(cluster.process.log_path)
    try:
        cluster.start()
        restored = cluster.create_database("restored")
        pg_tool(
            "pg_restore",
            "--no-owner",
            "--no-privileges",
            "--single-transaction",
            "--exit-on-error",
            f"--host={restored.host}",
            f"--port={restored.port}",
            f"--username={restored.user}",
            f"--dbname={restored.dbname}",
            str(dump),
            password=restored.password,
        )
        in_restored = event_ids_in(restored, everything)
        assert set(acknowledged_before_dump) <= in_restored, "a message acked before the dump"
        after_dump = [e for e in everything if e not in in_restored]
        assert after_dump, "the sender went on after the dump: some messages are not in it"
        assert set(everything[during_dump:]) <= set(after_dump)
        print(
            f"sent {len(everything)}: {len(acknowledged_before_dump)} acknowledged before"
            f" pg_dump, {len(in_restored)} in the dump, {len(after_dump)} after it"
        )

        workdir = run_dir / f"restored-synapse-{restored.port}"
        workdir.mkdir()
        shutil.copy(server.workdir / "signing.key", workdir / "signing.key")
        again = SynapseServer(workdir, module_config(hapi.base_url), postgres=restored)
        SERVER_LOGS.extend([again.log_path, again.process.log_path])
        again.start()
        try:
            member = MatrixUser(again, gp.user_id, gp.access_token)
            later = member.send_text(room, "Na het terugzetten van de back-up")
            wait_until(
                lambda: communication_of(hapi, later),
                timeout=120,
                what="a message sent to the restored Synapse recorded",
            )
            wait_until(
                lambda: health(again)["outbox"] == {"pending": 0, "dead": 0},
                timeout=60,
                what="the restored Synapse's recording settled",
            )
            # Every message the restored Synapse holds: one Communication each.
            recorded = event_ids_in_thread(hapi, thread)
            assert len(recorded) == len(set(recorded)), "a message recorded twice"
            for event_id in [*sorted(in_restored), later]:
                assert recorded.count(event_id) == 1, "a restored message not recorded once"
            # Those sent after the dump began: FHIR keeps what it had (the old Synapse
            # wrote them), the restored Synapse does not have them.
            assert set(recorded) == {*everything, later}
            assert not event_ids_in(restored, after_dump)
        finally:
            again.stop()
    finally:
        cluster.stop()
