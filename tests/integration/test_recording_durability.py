"""No message is lost or written twice between Synapse's event stream and FHIR, whatever
crashes where (real Synapse with the module, real HAPI).

The module keeps no copy of a message: on_new_event hands it to memory, and the recorder
keeps its place in Synapse's own stream, read on from there after a restart. The crash
points come from ``synapse_fhir_module.recording.fault_hooks`` (inert unless the environment arms
them): Synapse ends itself at once, as a power cut would.
"""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any
from urllib.parse import quote

import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.recording import fault_hooks
from tests.integration.care_network import CareNetwork
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    dead_letters,
    first_written,
    health,
    room_with_an_unattributed_member,
    thread_holding,
)
from tests.integration.test_outbox_postgres import metric

REPLAYED = "synapse_fhir_communications_replayed_total"
WRITTEN = "synapse_fhir_communications_written_total"

# What fires an armed crash point (nobody without it can).
SECRET = uuid.uuid4().hex


def armed(point: str) -> dict[str, str]:
    """The environment that arms one crash point with this run's secret."""
    return {fault_hooks.ENVIRONMENT: f"{point}={SECRET}"}


def crashed_at_the_fault(server: SynapseServer, point: str) -> None:
    wait_until(
        lambda: not server.process.running,
        timeout=60,
        what="Synapse ending itself at the armed crash point",
    )
    assert server.process.exit_code() == fault_hooks.EXIT_CODE, server.process.log_tail()
    assert f"Test crash point {point}: ending the process now" in server.log_path.read_text()


def stored_event_with_fault(user: MatrixUser, room: str) -> str:
    """The id of the room's message that carries the fault key (Synapse stored it)."""
    path = f"/_matrix/client/v3/rooms/{quote(room)}/messages?dir=b&limit=50"
    for event in user.request("GET", path)["chunk"]:
        if fault_hooks.CONTENT_KEY in event.get("content", {}):
            return str(event["event_id"])
    raise AssertionError("Synapse did not store the message sent before the crash")


def test_a_message_whose_callback_never_ran_is_recorded_after_the_restart(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url), armed(fault_hooks.IN_CALLBACK))
    _network, _service, room, gp = care_room(server, hapi.base_url)
    first, thread = first_written(hapi, gp, room, "before the crash")

    # Synapse stores the message, then dies as on_new_event starts: the module never
    # sees it. (The answer to /send may or may not make it out first.)
    content = {
        "msgtype": "m.text",
        "body": "stored, then the crash",
        fault_hooks.CONTENT_KEY: SECRET,
    }
    try:
        gp.send(room, content)
    except requests.RequestException:
        pass  # (the connection died with Synapse)
    crashed_at_the_fault(server, fault_hooks.IN_CALLBACK)
    server.start()  # (still armed: what it reads back never fires the point again)

    unseen = stored_event_with_fault(gp, room)
    after = gp.send_text(room, "after the restart")
    ids = thread_holding(
        hapi, thread, 3, timeout=60, what="the message no callback saw, written after restart"
    )
    assert sorted(ids) == sorted([first, unseen, after]), "missing or duplicate Communications"
    written = communication_of(hapi, unseen)
    assert written is not None and written["payload"] == [
        {"contentString": "stored, then the crash"}
    ]


def test_a_crash_after_fhir_committed_a_batch_writes_nothing_twice(
    hapi_running: HapiDevServer, start_synapse: Any
) -> None:
    hapi = hapi_running
    server = start_synapse(
        module_config(hapi.base_url), armed(fault_hooks.AFTER_FHIR_COMMIT), metrics=True
    )
    _network, _service, room, gp = care_room(server, hapi.base_url)
    first, thread = first_written(hapi, gp, room, "before the batch")

    # HAPI frozen while the messages come: they form one batch once it thaws. FHIR
    # commits it; Synapse dies before the recorder notes anything of it.
    os.kill(hapi.process.pid, signal.SIGSTOP)
    try:
        sent = [gp.send_text(room, f"in the batch {n}") for n in range(10)]
        sent.append(
            gp.send(
                room,
                {
                    "msgtype": "m.text",
                    "body": "the batch's last",
                    fault_hooks.CONTENT_KEY: SECRET,
                },
            )
        )
        wait_until(
            lambda: health(server)["outbox"]["pending"] == 11,
            timeout=30,
            what="11 messages waiting for FHIR",
        )
    finally:
        os.kill(hapi.process.pid, signal.SIGCONT)
    crashed_at_the_fault(server, fault_hooks.AFTER_FHIR_COMMIT)
    assert communication_of(hapi, sent[-1]) is not None, "FHIR did not commit before the crash"
    server.start()  # (still armed: what it reads back never fires the point again)

    # Read again from the saved position: FHIR had them, nothing is written twice.
    wait_until(
        lambda: (metric(server, REPLAYED) or 0) >= 1,
        timeout=60,
        what="the committed batch read again after the restart, and found in FHIR",
    )
    ids = thread_holding(hapi, thread, 12, timeout=60, what="every message once")
    assert sorted(ids) == sorted([first, *sent]), "missing or duplicate Communications"
    assert {communication_of(hapi, e)["meta"]["versionId"] for e in sent} == {"1"}  # type: ignore[index]
    assert metric(server, WRITTEN) == 0.0  # (the restarted Synapse created none of them)
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="nothing pending after the replay",
    )


def test_a_poison_message_in_a_batch_of_50_leaves_49_written_and_one_dead_letter(
    hapi_running: HapiDevServer, start_synapse: Any
) -> None:
    hapi = hapi_running
    network = CareNetwork(uuid.uuid4().hex[:8])
    audit_id = network.user_id("audit")  # exempt: in the room, but no FHIR person
    server = start_synapse(
        module_config(
            hapi.base_url,
            enforcement={"exempt_users": [audit_id]},
            communication={"batch_size": 50},
        )
    )
    room, gp, audit, ops = room_with_an_unattributed_member(server, hapi, network)
    first, thread = first_written(hapi, gp, room, "before the outage")

    hapi.stop()
    good = [gp.send_text(room, f"good {n}") for n in range(24)]
    poison = audit.send_text(room, "no person can be named for this")
    good += [gp.send_text(room, f"good {n}") for n in range(24, 49)]
    wait_until(
        lambda: health(server)["outbox"]["pending"] == 50,
        timeout=30,
        what="the 50 messages waiting in memory for FHIR",
    )
    hapi.start()

    ids = thread_holding(hapi, thread, 50, timeout=60, what="the 49 good messages written")
    assert sorted(ids) == sorted([first, *good]), "missing or duplicate Communications"
    dead = wait_until(
        lambda: dead_letters(ops) or None,
        timeout=30,
        what="the poison message listed as a dead letter",
    )
    assert [(d["event_id"], d["reason"]) for d in dead] == [
        (poison, "the sender has no (single) FHIR person")
    ]
    assert communication_of(hapi, poison) is None
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 1},
        timeout=30,
        what="nothing pending, one dead letter",
    )
