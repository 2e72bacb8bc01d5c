"""Messages in a care-team room become FHIR Communications (real Synapse, real HAPI)."""

from __future__ import annotations

import os
import signal
import uuid
from typing import Any

import pytest
import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from tests.integration.care_network import CareNetwork, via_telecom

DEAD_LETTERS = "/_synapse/client/fhir/outbox/dead"
RETRY_DEAD_LETTERS = "/_synapse/client/fhir/outbox/dead/retry"


def communication_of(hapi: HapiDevServer, event_id: str) -> dict[str, Any] | None:
    bundle = requests.get(
        f"{hapi.base_url}/Communication",
        params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    entries = bundle.get("entry", [])
    assert len(entries) <= 1, f"{len(entries)} Communications for one event"
    return entries[0]["resource"] if entries else None


def event_ids_in_thread(hapi: HapiDevServer, thread: str) -> list[str]:
    """The event ids of every Communication in the thread (duplicates included)."""
    ids: list[str] = []
    url: str | None = f"{hapi.base_url}/Communication"
    params: dict[str, str] | None = {"part-of": thread, "_count": "100"}
    while url:  # every page
        bundle = requests.get(
            url, params=params, headers={"Cache-Control": "no-cache"}, timeout=30
        ).json()
        ids += [e["resource"]["identifier"][0]["value"] for e in bundle.get("entry", [])]
        url = next((k["url"] for k in bundle.get("link", []) if k["relation"] == "next"), None)
        params = None
    return ids


def first_written(hapi: HapiDevServer, user: MatrixUser, room: str, text: str) -> tuple[str, str]:
    """Send ``text``; once written, its event id and the thread (CommunicationRequest)."""
    event_id = user.send_text(room, text)
    thread = wait_until(
        lambda: (c := communication_of(hapi, event_id)) and c["partOf"][0]["reference"],
        timeout=30,
        what="the first message written",
    )
    return event_id, str(thread)


def thread_holding(
    hapi: HapiDevServer, thread: str, count: int, *, timeout: float, what: str
) -> list[str]:
    """The thread's event ids, once it holds at least ``count`` Communications."""

    def written() -> list[str] | None:
        ids = event_ids_in_thread(hapi, thread)
        return ids if len(ids) >= count else None

    return list(wait_until(written, timeout=timeout, what=what))


def wait_for_empty_outbox(server: SynapseServer) -> None:
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty",
    )


def health(server: SynapseServer) -> dict[str, Any]:
    return requests.get(server.url("/_synapse/client/fhir/health"), timeout=10).json()


def care_room(
    server: SynapseServer, fhir_url: str
) -> tuple[CareNetwork, MatrixUser, str, MatrixUser]:
    """A seeded care network, its bound room (made by the service user), and the GP in it."""
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(fhir_url))
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    return network, service, room, member_in_room(server, service, room, network)


def room_with_an_unattributed_member(
    server: SynapseServer, hapi: HapiDevServer, network: CareNetwork
) -> tuple[str, MatrixUser, MatrixUser, MatrixUser]:
    """The network seeded; its bound room with the GP and ``audit`` (exempt in the module's
    config: in the room, with no FHIR person); and an admin. (room, gp, audit, admin)"""
    network.seed(FhirSeeder(hapi.base_url))
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    gp = member_in_room(server, service, room, network)
    audit = register_user(server, network.localpart("audit"))
    service.invite(room, audit.user_id)
    audit.join(room)
    ops = register_user(server, network.localpart("ops"), admin=True)
    return room, gp, audit, ops


def member_in_room(
    synapse: SynapseServer, service: MatrixUser, room: str, network: CareNetwork
) -> MatrixUser:
    gp = register_user(synapse, network.localpart("anna"))
    service.invite(room, gp.user_id)
    gp.join(room)
    return gp


def test_message_in_a_care_team_room_becomes_a_communication(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    network, service, room, gp = care_room(synapse, hapi.base_url)

    # The room has no thread yet: the module opens one for it.
    event_id = gp.send_text(room, "Blood pressure 150/95 this morning")
    c = wait_until(
        lambda: communication_of(hapi, event_id),
        timeout=30,
        what="the message written to FHIR as a Communication",
    )
    assert c["status"] == "completed"
    assert c["payload"] == [{"contentString": "Blood pressure 150/95 this morning"}]
    assert c["sender"] == {"reference": network.ref("Practitioner", "gp"), "type": "Practitioner"}
    assert c["subject"]["reference"] == network.ref("Patient", "patient")
    assert c["recipient"] == [{"reference": network.team, "type": "CareTeam"}]
    (part_of,) = c["partOf"]
    assert part_of["type"] == "CommunicationRequest"
    # ...and bound the room to that thread.
    thread_state = service.request(
        "GET", f"/_matrix/client/v3/rooms/{room}/state/org.synapse_fhir.thread"
    )
    assert thread_state == {"reference": part_of["reference"]}

    # The next message lands in the same thread, and nothing stays behind in the outbox.
    second = gp.send_text(room, "Rechecked: 140/90")
    c2 = wait_until(lambda: communication_of(hapi, second), timeout=30, what="second message")
    assert c2["partOf"] == c["partOf"]
    wait_for_empty_outbox(synapse)

    # Redacting a message marks its Communication entered-in-error and drops the payload.
    gp.redact(room, second)
    redacted = wait_until(
        lambda: (r := communication_of(hapi, second)) and r["status"] == "entered-in-error" and r,
        timeout=30,
        what="the redacted message's Communication entered-in-error",
    )
    assert "payload" not in redacted
    assert redacted["id"] == c2["id"]


def test_messages_of_ordinary_rooms_are_not_recorded(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    tag = uuid.uuid4().hex[:8]
    alice = register_user(synapse, f"alice_{tag}")
    room = alice.create_room(name="Coffee")
    first = alice.send_text(room, "lunch?")
    # A care-team message sent after it is written; the ordinary one never is.
    network = CareNetwork(tag)
    network.seed(FhirSeeder(hapi.base_url))
    service = service_session(register_user(synapse, network.localpart("root"), admin=True))
    care_room = create_room_in_space(service, create_bound_space(service, network.team))
    gp = member_in_room(synapse, service, care_room, network)
    later = gp.send_text(care_room, "after the coffee message")
    wait_until(lambda: communication_of(hapi, later), timeout=30, what="the care-team message")
    assert communication_of(hapi, first) is None


def test_encryption_is_refused_in_care_team_rooms_when_forbidden(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(
        module_config(hapi.base_url, communication={"encrypted_rooms": "forbid"})
    )
    _network, service, room, gp = care_room(server, hapi.base_url)
    # Enough power to turn encryption on, were it not for the rule.
    levels = service.request("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.power_levels")
    levels.setdefault("users", {})[gp.user_id] = 100
    service.send_state(room, "m.room.power_levels", levels)

    with pytest.raises(MatrixError) as caught:
        gp.send_state(room, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})
    assert caught.value.status == 403
    assert caught.value.reason == "encryption_forbidden"
    # Ordinary rooms on the same server may still be encrypted.
    own = gp.create_room(name="Private")
    gp.send_state(own, "m.room.encryption", {"algorithm": "m.megolm.v1.aes-sha2"})


def test_recording_is_visible_in_prometheus_metrics(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url), metrics=True)
    _network, _service, room, gp = care_room(server, hapi.base_url)
    event_ids = [gp.send_text(room, f"observation {n}") for n in range(3)]
    for event_id in event_ids:
        wait_until(lambda e=event_id: communication_of(hapi, e), timeout=30, what="written")

    def metric(name: str) -> float | None:
        assert server.metrics_url is not None
        text = requests.get(server.metrics_url, timeout=10).text
        for line in text.splitlines():
            if line.startswith(name + " ") or line.startswith(name + "{"):
                return float(line.rsplit(" ", 1)[1])
        return None

    wait_until(
        lambda: metric("synapse_fhir_communications_written_total") == 3.0,
        timeout=30,
        what="3 written Communications counted",
    )
    assert metric("synapse_fhir_communication_lag_seconds_count") == 3.0
    assert metric("synapse_fhir_communications_failed_total") == 0.0
    wait_until(
        lambda: metric("synapse_fhir_outbox_pending") == 0.0,
        timeout=30,
        what="the pending gauge back at 0",
    )


def test_messages_sent_while_fhir_is_down_are_all_written_once_after_it_returns(
    hapi_running: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi_running.base_url))
    _network, _service, room, gp = care_room(server, hapi_running.base_url)
    first, thread = first_written(hapi_running, gp, room, "before the outage")

    hapi_running.stop()
    sent = [gp.send_text(room, f"during the outage {n}") for n in range(200)]
    wait_until(
        lambda: health(server)["outbox"]["pending"] == 200,
        timeout=30,
        what="200 messages waiting in the outbox",
    )
    hapi_running.start()

    ids = thread_holding(
        hapi_running, thread, 201, timeout=30, what="all 200 messages written within 30 s"
    )
    assert sorted(ids) == sorted([first, *sent]), "missing or duplicate Communications"
    wait_for_empty_outbox(server)


def test_messages_pending_when_synapse_is_killed_are_written_once_after_restart(
    hapi_running: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi_running.base_url))
    _network, _service, room, gp = care_room(server, hapi_running.base_url)
    first, thread = first_written(hapi_running, gp, room, "before the crash")

    # HAPI frozen: the drain's transaction is left in flight, and HAPI may still commit it
    # after Synapse is gone — the restarted Synapse sends those rows again.
    os.kill(hapi_running.process.pid, signal.SIGSTOP)
    try:
        sent = [gp.send_text(room, f"pending at the crash {n}") for n in range(50)]
        wait_until(
            lambda: health(server)["outbox"]["pending"] == 50,
            timeout=30,
            what="50 messages waiting in the outbox",
        )
        server.kill()  # SIGKILL: no clean shutdown
    finally:
        os.kill(hapi_running.process.pid, signal.SIGCONT)
    server.start()

    ids = thread_holding(
        hapi_running, thread, 51, timeout=60, what="all 50 pending messages written"
    )
    assert sorted(ids) == sorted([first, *sent]), "missing or duplicate Communications"
    wait_for_empty_outbox(server)


def test_a_message_that_cannot_be_written_yet_is_a_dead_letter_and_the_rest_are_written(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    audit_id = network.user_id("audit")  # exempt: in the room, but no FHIR person (yet)
    # A homeserver of its own: the dead letter must not show in the shared one's health.
    synapse = start_synapse(module_config(hapi.base_url, enforcement={"exempt_users": [audit_id]}))
    room, gp, audit, ops = room_with_an_unattributed_member(synapse, hapi, network)
    before = gp.send_text(room, "first")
    # Its sender has no FHIR person: kept, with the reason, until FHIR names one.
    unattributed = audit.send_text(room, "audit note")
    # An attachment whose `info` FHIR cannot hold is still written (without those fields).
    odd_file = gp.send(
        room,
        {
            "msgtype": "m.file",
            "body": "scan.pdf",
            "url": "mxc://example.org/scan",
            "info": {"mimetype": "", "size": 3_000_000_000},
        },
    )
    after = gp.send_text(room, "after the dead letter")

    for event_id in (before, odd_file, after):
        wait_until(lambda e=event_id: communication_of(hapi, e), timeout=30, what="written")
    dead = wait_until(
        lambda: [d for d in dead_letters(ops) if d["room_id"] == room] or None,
        timeout=30,
        what="the unattributed message listed as a dead letter",
    )
    assert [d["event_id"] for d in dead] == [unattributed]
    assert dead[0]["reason"] == "the sender has no (single) FHIR person"
    assert communication_of(hapi, unattributed) is None
    assert health(synapse)["outbox"]["dead"] >= 1

    # Dead letters are for admins only: to list, and to retry.
    with pytest.raises(MatrixError) as caught:
        gp.request("GET", DEAD_LETTERS)
    assert caught.value.status == 403
    with pytest.raises(MatrixError) as caught:
        gp.request("POST", RETRY_DEAD_LETTERS, {})
    assert caught.value.status == 403

    # Listed oldest first, as many as `limit` asks.
    later_notes = [audit.send_text(room, f"audit note {n}") for n in range(2)]
    wait_until(lambda: len(dead_letters(ops)) == 3, timeout=30, what="three dead letters listed")
    listed = ops.request("GET", DEAD_LETTERS + "?limit=2")["dead"]
    assert [d["event_id"] for d in listed] == [unattributed, later_notes[0]]
    # Retry all (`{}`): every one is pending again; with still no person, each comes back.
    assert ops.request("POST", RETRY_DEAD_LETTERS, {}) == {"requeued": 3}
    wait_until(
        lambda: {d["event_id"] for d in dead_letters(ops)} == {unattributed, *later_notes},
        timeout=30,
        what="the retried messages back as dead letters (their sender still has no person)",
    )


def test_all_rooms_are_recorded_when_configured_and_dead_letters_can_be_retried(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url, communication={"rooms": "all"}))
    tag = uuid.uuid4().hex[:8]
    network = CareNetwork(tag)
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    ops = register_user(server, network.localpart("ops"), admin=True)
    gp = register_user(server, network.localpart("anna"))  # has a Practitioner
    newcomer = register_user(server, f"newcomer_{tag}")  # has no FHIR person yet
    room = gp.create_room(name="Ordinary room")
    gp.invite(room, newcomer.user_id)
    newcomer.join(room)

    mapped = gp.send_text(room, "an ordinary room, recorded too")
    c = wait_until(lambda: communication_of(hapi, mapped), timeout=30, what="written")
    assert c["sender"]["reference"] == network.ref("Practitioner", "gp")
    assert "recipient" not in c and "subject" not in c
    (part_of,) = c["partOf"]
    # The ordinary room is not bound to its thread (that would make it a care-team room).
    with pytest.raises(MatrixError):
        gp.request("GET", f"/_matrix/client/v3/rooms/{room}/state/org.synapse_fhir.thread")

    unmapped = newcomer.send_text(room, "who am I in FHIR?")
    (dead,) = wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == unmapped] or None,
        timeout=30,
        what="the unmapped sender's message as a dead letter",
    )
    assert "no (single) FHIR person" in dead["reason"]

    # The operator gives the newcomer a FHIR person, then retries the dead letter.
    seeder.put(network.person("Practitioner", "newcomer", via_telecom(f"newcomer_{tag}")))
    assert ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [unmapped]}) == {"requeued": 1}
    retried = wait_until(lambda: communication_of(hapi, unmapped), timeout=30, what="retried")
    assert retried["sender"]["reference"] == network.ref("Practitioner", "newcomer")
    assert retried["partOf"] == [part_of]
    assert [d for d in dead_letters(ops) if d["event_id"] == unmapped] == []


def dead_letters(admin: MatrixUser) -> list[dict[str, Any]]:
    return list(admin.request("GET", DEAD_LETTERS + "?limit=1000")["dead"])
