"""Authorship of the record: only a message's sender edits its Communication, only the
sender (or, by configuration, a moderator, who is named) withdraws it, and a redacted
message leaves no text behind in the outbox. Real Synapse, real HAPI."""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import datetime, timezone
from typing import Any
from urllib.parse import quote, urlsplit

import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.stalling_proxy import StallingProxy
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.mapping.communication import MODERATOR_NOTE
from synapse_fhir_module.recording.amendments import ERASED
from tests.integration.care_network import CareNetwork, via_telecom
from tests.integration.test_communication_recording import (
    RETRY_DEAD_LETTERS,
    care_room,
    communication_of,
    dead_letters,
    health,
    wait_for_empty_outbox,
)


def edit(user: MatrixUser, room: str, original: str, text: str) -> str:
    """An edit as clients send it: a fallback body, the new content, and the relation."""
    return user.send(
        room,
        {
            "msgtype": "m.text",
            "body": f"* {text}",
            "m.new_content": {"msgtype": "m.text", "body": text},
            "m.relates_to": {"rel_type": "m.replace", "event_id": original},
        },
    )


def written(hapi: HapiDevServer, event_id: str) -> dict[str, Any]:
    return dict(
        wait_until(
            lambda: communication_of(hapi, event_id),
            timeout=30,
            what="the message written to FHIR",
        )
    )


def written_where(hapi: HapiDevServer, event_id: str, condition: Any, what: str) -> dict[str, Any]:
    """The message's Communication, once ``condition`` holds for it."""
    return dict(
        wait_until(
            lambda: (c := communication_of(hapi, event_id)) and condition(c) and c,
            timeout=30,
            what=what,
        )
    )


def texts_in_history(hapi: HapiDevServer, communication: dict[str, Any]) -> list[str | None]:
    """Each version's text, oldest first (None: a version without payload)."""
    bundle = requests.get(
        f"{hapi.base_url}/Communication/{communication['id']}/_history",
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    versions = sorted(
        (entry["resource"] for entry in bundle.get("entry", [])),
        key=lambda c: int(c["meta"]["versionId"]),
    )
    return [c["payload"][0].get("contentString") if "payload" in c else None for c in versions]


def settled(server: SynapseServer, hapi: HapiDevServer, user: MatrixUser, room: str) -> None:
    """Everything the room held before now has been through the outbox: a later message
    is in FHIR and nothing is pending (edits and redactions go after new messages)."""
    marker = user.send_text(room, "(later message)")
    written(hapi, marker)
    wait_until(
        lambda: health(server)["outbox"]["pending"] == 0,
        timeout=30,
        what="nothing pending in the outbox",
    )


def nurse_in_room(
    server: SynapseServer, service: MatrixUser, room: str, network: CareNetwork
) -> MatrixUser:
    """Bram, the team's nurse (a Practitioner), with the power level the module's sync gives
    practitioners (50: enough to redact others' messages in these rooms)."""
    nurse = register_user(server, network.localpart("bram"))
    service.invite(room, nurse.user_id)
    nurse.join(room)
    path = f"/_matrix/client/v3/rooms/{quote(room)}/state/m.room.power_levels"
    levels = service.request("GET", path)
    levels.setdefault("users", {})[nurse.user_id] = 50
    service.send_state(room, "m.room.power_levels", levels)
    return nurse


def origin_time(user: MatrixUser, room: str, event_id: str) -> str:
    """An event's origin_server_ts as the FHIR instant the module writes."""
    event = user.request("GET", f"/_matrix/client/v3/rooms/{quote(room)}/event/{quote(event_id)}")
    when = datetime.fromtimestamp(event["origin_server_ts"] / 1000, timezone.utc)
    return when.strftime("%Y-%m-%dT%H:%M:%S.") + f"{when.microsecond // 1000:03d}Z"


def outbox_row(server: SynapseServer, event_id: str) -> tuple[str, str, str | None] | None:
    """(state, event JSON, last error) of the module's own outbox row, read from Synapse's
    SQLite file (read-only)."""
    database = server.workdir / "homeserver.db"
    with sqlite3.connect(f"file:{database}?mode=ro", uri=True) as connection:
        row = connection.execute(
            "SELECT state, event_json, last_error FROM synapse_fhir_outbox WHERE event_id = ?",
            (event_id,),
        ).fetchone()
    return (row[0], row[1], row[2]) if row else None


# What an edit or a withdrawal leaves as recorded.
KEPT = ("id", "identifier", "sender", "sent", "partOf", "subject", "recipient")


def test_an_edit_by_its_sender_changes_only_the_payload(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    _network, _service, room, gp = care_room(synapse, hapi.base_url)
    question = gp.send_text(room, "Blood pressure this morning?")
    written(hapi, question)
    reply = gp.send(
        room,
        {
            "msgtype": "m.text",
            "body": "BP 150/95",
            "m.relates_to": {"m.in_reply_to": {"event_id": question}},
        },
    )
    before = written(hapi, reply)
    assert before["inResponseTo"]

    correction = edit(gp, room, reply, "BP 150/90")
    after = written_where(
        hapi, reply, lambda c: c["meta"]["versionId"] == "2", "the edit applied as version 2"
    )
    assert after["payload"] == [{"contentString": "BP 150/90"}]
    for key in (*KEPT, "status", "inResponseTo"):
        assert after[key] == before[key], key
    assert after["meta"]["tag"] == before["meta"]["tag"]
    assert communication_of(hapi, correction) is None  # an edit is no message of its own


def test_an_edit_by_another_member_changes_nothing(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    network, service, room, gp = care_room(synapse, hapi.base_url)
    nurse = nurse_in_room(synapse, service, room, network)
    original = gp.send_text(room, "Dressing changed at 10:00")
    written(hapi, original)

    edit(nurse, room, original, "Dressing not changed")  # Synapse accepts it; FHIR must not
    settled(synapse, hapi, gp, room)
    c = communication_of(hapi, original)
    assert c is not None
    assert c["payload"] == [{"contentString": "Dressing changed at 10:00"}]
    assert c["meta"]["versionId"] == "1"
    assert c["sender"]["reference"] == network.ref("Practitioner", "gp")


def test_an_edit_after_its_sender_redacted_the_message_does_not_revive_it(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    _network, _service, room, gp = care_room(synapse, hapi.base_url)
    original = gp.send_text(room, "Give 10 mg")
    written(hapi, original)
    gp.redact(room, original)
    withdrawn = written_where(
        hapi, original, lambda c: c["status"] == "entered-in-error", "withdrawn by its sender"
    )

    edit(gp, room, original, "Give 5 mg")
    settled(synapse, hapi, gp, room)
    c = communication_of(hapi, original)
    assert c is not None
    assert c["status"] == "entered-in-error" and "payload" not in c
    assert c["meta"]["versionId"] == withdrawn["meta"]["versionId"]
    assert texts_in_history(hapi, c) == ["Give 10 mg", None]


def test_a_colleagues_redaction_leaves_the_communication_as_it_is(
    hapi: HapiDevServer, synapse: SynapseServer
) -> None:
    network, service, room, gp = care_room(synapse, hapi.base_url)
    nurse = nurse_in_room(synapse, service, room, network)
    original = gp.send_text(room, "Wound clean, no signs of infection")
    written(hapi, original)

    nurse.redact(room, original)  # power level 50: Synapse accepts it (redactions: sender)
    settled(synapse, hapi, gp, room)
    c = communication_of(hapi, original)
    assert c is not None
    assert c["status"] == "completed"
    assert c["payload"] == [{"contentString": "Wound clean, no signs of infection"}]
    assert c["meta"]["versionId"] == "1"


def test_a_moderators_redaction_withdraws_the_communication_and_names_them(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url, communication={"redactions": "moderators"}))
    network, service, room, gp = care_room(server, hapi.base_url)
    nurse = nurse_in_room(server, service, room, network)
    by_nurse = gp.send_text(room, "Patient reports chest pain")
    by_admin = gp.send_text(room, "Wrong room, sorry")
    before = written(hapi, by_nurse)
    written(hapi, by_admin)

    redaction = nurse.redact(room, by_nurse)
    c = written_where(
        hapi, by_nurse, lambda c: c["status"] == "entered-in-error", "withdrawn by the nurse"
    )
    assert "payload" not in c
    assert c["note"] == [
        {
            "authorReference": {
                "reference": network.ref("Practitioner", "nurse"),
                "type": "Practitioner",
            },
            "time": origin_time(nurse, room, redaction),
            "text": MODERATOR_NOTE,
        }
    ]
    for key in KEPT:
        assert c[key] == before[key], key
    assert c["sender"]["reference"] == network.ref("Practitioner", "gp")  # still the author

    # A server admin acting through the service user, which has no FHIR person.
    service.redact(room, by_admin)
    c = written_where(
        hapi, by_admin, lambda c: c["status"] == "entered-in-error", "withdrawn by the admin"
    )
    (note,) = c["note"]
    assert note["authorString"] == service.user_id and "authorReference" not in note


def test_redacting_a_dead_letter_erases_its_text_and_a_retry_writes_it_withdrawn(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    audit_id = network.user_id("audit")  # exempt: in the room, but no FHIR person (yet)
    # A homeserver of its own: its dead letter must not show in the shared one's health.
    server = start_synapse(module_config(hapi.base_url, enforcement={"exempt_users": [audit_id]}))
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    room = create_room_in_space(service, create_bound_space(service, network.team))
    audit = register_user(server, network.localpart("audit"))
    service.invite(room, audit.user_id)
    audit.join(room)
    ops = register_user(server, network.localpart("ops"), admin=True)
    words = f"Henk-{network.tag}"
    # Its sender has no FHIR person yet: a dead letter, what it said kept in the outbox.
    poison = audit.send(
        room,
        {
            "msgtype": "m.text",
            "body": f"> quoted\n\n{words} has a fever",
            "m.relates_to": {"m.in_reply_to": {"event_id": f"$never-recorded-{network.tag}"}},
        },
    )
    (dead,) = wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == poison] or None,
        timeout=30,
        what="the message listed as a dead letter",
    )
    assert dead["reason"] == "the sender has no (single) FHIR person"
    row = outbox_row(server, poison)
    assert row is not None and words in row[1]

    audit.redact(room, poison)
    state, event_json, last_error = wait_until(
        lambda: (r := outbox_row(server, poison)) and words not in r[1] and r,
        timeout=30,
        what="the dead letter's text erased",
    )
    assert state == "dead"
    assert "fever" not in event_json and "never-recorded" not in event_json
    assert json.loads(event_json)["content"] == {}
    (dead,) = [d for d in dead_letters(ops) if d["event_id"] == poison]
    assert dead["reason"] == last_error == ERASED  # (nothing of FHIR's words either)

    # FHIR names the account's person; the retry writes the message withdrawn.
    seeder.put(network.person("Practitioner", "auditor", via_telecom(network.localpart("audit"))))
    assert ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [poison]}) == {"requeued": 1}
    c = written(hapi, poison)
    assert c["status"] == "entered-in-error"
    assert "payload" not in c and "inResponseTo" not in c and "note" not in c
    assert words not in json.dumps(c)
    assert c["sender"]["reference"] == network.ref("Practitioner", "auditor")
    wait_for_empty_outbox(server)


def test_an_edit_of_a_dead_letter_goes_into_it_and_a_retry_writes_the_edited_text(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url, communication={"rooms": "all"}))
    tag = uuid.uuid4().hex[:8]
    network = CareNetwork(tag)
    seeder = FhirSeeder(hapi.base_url)
    network.seed(seeder)
    ops = register_user(server, network.localpart("ops"), admin=True)
    gp = register_user(server, network.localpart("anna"))
    newcomer = register_user(server, f"newcomer_{tag}")  # no FHIR person yet
    room = gp.create_room(name="Ordinary room")
    gp.invite(room, newcomer.user_id)
    newcomer.join(room)
    unmapped = newcomer.send_text(room, "Temperature 38.5")
    wait_until(
        lambda: [d for d in dead_letters(ops) if d["event_id"] == unmapped] or None,
        timeout=30,
        what="the unmapped sender's message as a dead letter",
    )

    edit(gp, room, unmapped, "Temperature 36.0")  # not its author: not taken
    edit(newcomer, room, unmapped, "Temperature 37.5")
    settled(server, hapi, gp, room)
    seeder.put(network.person("Practitioner", "newcomer", via_telecom(f"newcomer_{tag}")))
    assert ops.request("POST", RETRY_DEAD_LETTERS, {"event_ids": [unmapped]}) == {"requeued": 1}
    c = written(hapi, unmapped)
    assert c["payload"] == [{"contentString": "Temperature 37.5"}]
    assert c["sender"]["reference"] == network.ref("Practitioner", "newcomer")
    assert c["meta"]["versionId"] == "1"
    wait_for_empty_outbox(server)


def test_a_write_by_someone_else_between_read_and_update_is_not_overwritten(
    hapi: HapiDevServer, start_synapse: Any
) -> None:
    # Synapse reaches HAPI through a proxy that lets another client write the Communication
    # just before the module's conditional update arrives.
    hapi_origin = "{0.scheme}://{0.netloc}".format(urlsplit(hapi.base_url))
    proxy = StallingProxy(hapi_origin)
    proxy.start()
    try:
        server = start_synapse(module_config(proxy.url("/fhir")))
        _network, _service, room, gp = care_room(server, hapi.base_url)
        original = gp.send_text(room, "Insulin 8 units")
        stored = written(hapi, original)
        url = f"{hapi.base_url}/Communication/{stored['id']}"

        def another_system_writes() -> None:
            current = requests.get(url, headers={"Cache-Control": "no-cache"}, timeout=30).json()
            current["language"] = "nl"
            del current["meta"]
            requests.put(
                url, json=current, headers={"Content-Type": "application/fhir+json"}, timeout=30
            ).raise_for_status()

        proxy.before_forwarding(
            lambda head: head.startswith(b"PUT /fhir/Communication/"), another_system_writes
        )
        edit(gp, room, original, "Insulin 6 units")
        c = written_where(
            hapi,
            original,
            lambda c: c.get("payload") == [{"contentString": "Insulin 6 units"}],
            "the edit applied",
        )
        assert c["language"] == "nl"  # the other system's write survived
        assert c["meta"]["versionId"] == "3"
        updates = [
            (if_match(head), status)
            for head, status in proxy.exchanges
            if head.startswith(b"PUT /fhir/Communication/")
        ]
        # Refused on the version read (HAPI: 409), read again, written on the new one.
        assert updates == [('W/"1"', 409), ('W/"2"', 200)]
    finally:
        proxy.stop()


def if_match(head: bytes) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        name, _, value = line.partition(":")
        if name.strip().lower() == "if-match":
            return value.strip()
    return None
