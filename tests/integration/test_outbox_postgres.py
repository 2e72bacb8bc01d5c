"""The outbox on PostgreSQL: a real Synapse on a real PostgreSQL database, with the module,
recording a care-team room into the session's HAPI (the SQLite runs are in
test_communication_recording.py)."""

from __future__ import annotations

from typing import Any

import requests

from devstack.hapi import HapiDevServer
from devstack.postgres import PostgresDatabase
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.recording import position_store
from synapse_fhir_module.recording.outbox_store import TABLE
from tests.integration.test_communication_recording import care_room, communication_of, health


def metric(server: SynapseServer, name: str) -> float | None:
    assert server.metrics_url is not None
    for line in requests.get(server.metrics_url, timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def version_of(hapi: HapiDevServer, event_id: str) -> str:
    communication = communication_of(hapi, event_id)
    assert communication is not None, f"no Communication for {event_id}"
    return str(communication["meta"]["versionId"])


def saved_position(database: PostgresDatabase) -> str | None:
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT stream_token FROM {position_store.TABLE}")
            (token,) = cur.fetchone()
        return None if token is None else str(token)
    finally:
        conn.close()


def outbox_table(database: PostgresDatabase) -> tuple[int, int]:
    """(rows in the outbox table now, rows ever inserted into it) in PostgreSQL itself."""
    conn = database.connect()
    try:
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM {TABLE}")
            (rows,) = cur.fetchone()
            cur.execute("SELECT n_tup_ins FROM pg_stat_user_tables WHERE relname = %s", (TABLE,))
            (inserted,) = cur.fetchone()
        return int(rows), int(inserted)
    finally:
        conn.close()


def test_the_outbox_records_a_care_team_room_on_postgresql(
    hapi: HapiDevServer, start_synapse: Any, postgres_database: PostgresDatabase
) -> None:
    server = start_synapse(module_config(hapi.base_url), postgres=postgres_database, metrics=True)
    assert server.config_path.read_text().count("psycopg2") == 1
    _network, _service, room, gp = care_room(server, hapi.base_url)

    sent = [gp.send_text(room, f"Wondzorg dag {n}: genezing verloopt goed ✓") for n in range(3)]
    written = {
        event_id: wait_until(
            lambda e=event_id: communication_of(hapi, e),
            timeout=30,
            what="the message written to FHIR as a Communication",
        )
        for event_id in sent
    }
    assert written[sent[0]]["payload"] == [
        {"contentString": "Wondzorg dag 0: genezing verloopt goed ✓"}
    ]
    assert len({c["id"] for c in written.values()}) == 3
    # All in the one thread the module opened for the room.
    assert len({c["partOf"][0]["reference"] for c in written.values()}) == 1

    gp.redact(room, sent[1])
    redacted = wait_until(
        lambda: (r := communication_of(hapi, sent[1])) and r["status"] == "entered-in-error" and r,
        timeout=30,
        what="the redacted message's Communication entered-in-error",
    )
    assert "payload" not in redacted
    assert redacted["id"] == written[sent[1]]["id"]

    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty",
    )
    wait_until(
        lambda: metric(server, "synapse_fhir_communications_written_total") == 4.0,
        timeout=15,
        what="3 messages and 1 redaction counted as written",
    )

    # Restart: the module finds its table in PostgreSQL and writes nothing again.
    versions = {e: version_of(hapi, e) for e in sent}
    server.stop()
    # Nothing went through the outbox table (the send path writes nothing): the module
    # keeps its place in Synapse's stream instead. (The statistics are complete once
    # Synapse's connections have closed.)
    wait_until(
        lambda: outbox_table(postgres_database) == (0, 0),
        timeout=15,
        what="no row ever inserted into the PostgreSQL outbox table",
    )
    assert saved_position(postgres_database) is not None
    server.start()
    assert health(server)["outbox"] == {"pending": 0, "dead": 0}
    after = gp.send_text(room, "Na de herstart")
    wait_until(lambda: communication_of(hapi, after), timeout=30, what="a message after restart")
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty after the restart",
    )
    # The restarted Synapse wrote that one message and nothing it had written before
    # (a re-write would come first: the restart drains before the new message exists).
    written_after = wait_until(
        lambda: metric(server, "synapse_fhir_communications_written_total"),
        timeout=15,
        what="the restarted Synapse counting what it wrote",
    )
    assert written_after == 1.0
    assert metric(server, "synapse_fhir_communications_failed_total") == 0.0
    # Still one Communication per event (communication_of checks), none updated since.
    assert {e: version_of(hapi, e) for e in sent} == versions
    server.stop()
    wait_until(
        lambda: outbox_table(postgres_database) == (0, 0),
        timeout=15,
        what="still no row inserted into the outbox table after the restart",
    )
