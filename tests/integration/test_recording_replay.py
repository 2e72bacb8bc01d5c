"""FHIR restored to an older point than Synapse: Communications the module wrote are gone
from FHIR while its saved position has passed them. docs/operations.md tells the operator
to move the position back to the start of Synapse's stream (SQL on the module's own table,
the recording instance stopped); the module then writes what FHIR lacks, once, and what FHIR
still has stays as it is."""

from __future__ import annotations

import sqlite3
from typing import Any

import requests

from devstack.hapi import HapiDevServer
from devstack.synapse import module_config
from devstack.waiting import wait_until
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    event_ids_in_thread,
    health,
)

# As docs/operations.md gives it.
MOVE_BACK = "UPDATE synapse_fhir_recording_log SET stream_token = 's1' WHERE id = 1"


def test_moving_the_position_back_writes_what_an_older_fhir_lacks_once(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url))
    _network, _service, room, gp = care_room(server, hapi.base_url)
    sent = [gp.send_text(room, f"Medicatie {n}: metoprolol 50 mg") for n in range(4)]
    written = {
        e: wait_until(lambda e=e: communication_of(hapi, e), timeout=60, what="in FHIR")
        for e in sent
    }
    thread = written[sent[0]]["partOf"][0]["reference"]
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="recording settled",
    )
    server.stop()

    # FHIR "restored" from before two of them were written.
    lost = sent[1:3]
    for event_id in lost:
        response = requests.delete(
            f"{hapi.base_url}/Communication/{written[event_id]['id']}", timeout=30
        )
        assert response.status_code in (200, 204), response.text
        assert communication_of(hapi, event_id) is None

    connection = sqlite3.connect(server.workdir / "homeserver.db")
    try:
        connection.execute(MOVE_BACK)
        connection.commit()
    finally:
        connection.close()
    server.start()

    for event_id in lost:
        again = wait_until(
            lambda e=event_id: communication_of(hapi, e),
            timeout=120,
            what="a Communication FHIR lost written again after the position moved back",
        )
        assert again["partOf"][0]["reference"] == thread
        assert again["payload"] == written[event_id]["payload"]
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=60,
        what="recording settled after the read-back",
    )
    # The ones FHIR kept are untouched (same resource, same version); none twice.
    for event_id in (sent[0], sent[3]):
        kept = communication_of(hapi, event_id)
        assert kept is not None
        assert (kept["id"], kept["meta"]["versionId"]) == (
            written[event_id]["id"],
            written[event_id]["meta"]["versionId"],
        )
    assert sorted(event_ids_in_thread(hapi, thread)) == sorted(sent)
    after = gp.send_text(room, "Na het terugzetten")
    wait_until(lambda: communication_of(hapi, after), timeout=60, what="recording goes on")
