"""Communications written to the real HAPI dev server in transaction Bundles: every kind of
message validates against R4 and meets the OZO constraints, a repeated batch changes
nothing, and an entry HAPI refuses becomes a dead letter while the rest is written; edits
and redactions are conditional updates of the stored original."""

from __future__ import annotations

import uuid
from collections.abc import Mapping
from typing import Any

import pytest
import pytest_twisted
import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from synapse_fhir_module.config import RedactionPolicy
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from synapse_fhir_module.mapping.communication import (
    Redaction,
    RoomContext,
    communication_reference,
    message_write,
    redaction_write,
)
from synapse_fhir_module.recording.amendments import (
    Amended,
    CommunicationAmender,
    edited,
    withdrawn,
)
from synapse_fhir_module.recording.writer import CommunicationWriter


@pytest.fixture
def room(hapi: HapiDevServer) -> RoomContext:
    tag = uuid.uuid4().hex[:8]
    FhirSeeder(hapi.base_url).put_all(
        [
            {"resourceType": "Patient", "id": f"p-{tag}", "active": True},
            {"resourceType": "Practitioner", "id": f"gp-{tag}", "active": True},
            {
                "resourceType": "CareTeam",
                "id": f"team-{tag}",
                "status": "active",
                "subject": {"reference": f"Patient/p-{tag}"},
            },
            {
                "resourceType": "CommunicationRequest",
                "id": f"thread-{tag}",
                "status": "active",
                "subject": {"reference": f"Patient/p-{tag}"},
                "recipient": [{"reference": f"CareTeam/team-{tag}"}],
            },
        ]
    )
    return RoomContext(
        thread=f"CommunicationRequest/thread-{tag}",
        care_team=f"CareTeam/team-{tag}",
        patient=f"Patient/p-{tag}",
    )


def sender(room: RoomContext) -> str:
    return "Practitioner/gp-" + room.thread.rsplit("-", 1)[1]


def event(event_id: str, content: dict[str, Any], event_type: str = "m.room.message") -> dict:
    return {
        "type": event_type,
        "event_id": event_id,
        "origin_server_ts": 1_779_000_000_000,
        "content": content,
    }


def communications(hapi: HapiDevServer, event_id: str) -> list[dict[str, Any]]:
    bundle = requests.get(
        f"{hapi.base_url}/Communication",
        params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    return [entry["resource"] for entry in bundle.get("entry", [])]


def validation_errors(hapi: HapiDevServer, resource: dict[str, Any]) -> list[str]:
    outcome = requests.post(
        f"{hapi.base_url}/Communication/$validate",
        json=resource,
        headers={"Content-Type": "application/fhir+json"},
        timeout=60,
    ).json()
    return [
        issue.get("diagnostics", "")
        for issue in outcome.get("issue", [])
        if issue.get("severity") in ("error", "fatal")
    ]


def assert_ozo_shape(c: dict[str, Any], *, payload: bool = True) -> None:
    assert c["partOf"] and all(
        p["reference"].startswith("CommunicationRequest/") and p["type"] == "CommunicationRequest"
        for p in c["partOf"]
    )
    assert c["sender"]["reference"] and c["sender"]["type"]
    if payload:
        assert c["payload"] and all(
            "contentString" in p or "contentAttachment" in p for p in c["payload"]
        )


@pytest_twisted.ensureDeferred
async def test_every_kind_of_message_is_written_valid_and_once(
    hapi: HapiDevServer, fhir: FhirClient, room: RoomContext
) -> None:
    gp = sender(room)
    tag = room.thread.rsplit("-", 1)[1]
    ids = {k: f"${k}-{tag}" for k in ("text", "reply", "file", "encrypted")}
    writes = [
        (
            ids["text"],
            message_write(event(ids["text"], {"msgtype": "m.text", "body": "BP?"}), room, gp),
        ),
        (
            ids["reply"],
            message_write(
                event(
                    ids["reply"],
                    {
                        "msgtype": "m.text",
                        "body": "150/95",
                        "m.relates_to": {"m.in_reply_to": {"event_id": ids["text"]}},
                    },
                ),
                room,
                gp,
                parent=communication_reference(ids["text"]),  # (in the same transaction)
            ),
        ),
        (
            ids["file"],
            message_write(
                event(
                    ids["file"],
                    {
                        "msgtype": "m.image",
                        "body": "wound.jpg",
                        "url": "mxc://example.org/abc",
                        "info": {"mimetype": "image/jpeg", "size": 2048},
                    },
                ),
                room,
                gp,
            ),
        ),
        (
            ids["encrypted"],
            message_write(
                event(ids["encrypted"], {"ciphertext": "x"}, "m.room.encrypted"), room, gp
            ),
        ),
    ]
    writer = CommunicationWriter(fhir)
    first = await writer.write(writes)
    again = await writer.write(writes)  # a retry after a lost answer
    assert first.written == list(ids.values()) and first.dead == {}
    assert again.written == list(ids.values()) and again.dead == {}

    written = {kind: communications(hapi, event_id) for kind, event_id in ids.items()}
    assert {kind: len(found) for kind, found in written.items()} == dict.fromkeys(ids, 1)
    text, reply, image, encrypted = (written[k][0] for k in ("text", "reply", "file", "encrypted"))
    assert reply["inResponseTo"] == [{"reference": f"Communication/{text['id']}"}]
    assert image["payload"][0]["contentAttachment"]["url"] == "mxc://example.org/abc"
    for c in (text, reply, image):
        assert_ozo_shape(c)
    assert_ozo_shape(encrypted, payload=False)
    assert "payload" not in encrypted
    for c in (text, reply, image, encrypted):
        assert validation_errors(hapi, c) == []


@pytest_twisted.ensureDeferred
async def test_a_message_redacted_before_fhir_had_it_is_written_withdrawn(
    hapi: HapiDevServer, fhir: FhirClient, room: RoomContext
) -> None:
    gp = sender(room)
    writer = CommunicationWriter(fhir)
    never_written = event(f"$unwritten-{uuid.uuid4().hex[:8]}", {})
    await writer.write([(never_written["event_id"], redaction_write(never_written, room, gp))])
    (created,) = communications(hapi, never_written["event_id"])
    assert created["status"] == "entered-in-error" and "payload" not in created
    assert validation_errors(hapi, created) == []

    # An earlier attempt did reach FHIR (its answer was lost): the same write withdraws it.
    written_id = f"$written-{uuid.uuid4().hex[:8]}"
    written = event(written_id, {"msgtype": "m.text", "body": "BP 150/95"})
    await writer.write([(written_id, message_write(written, room, gp))])
    await writer.write([(written_id, redaction_write(written, room, gp))])
    (withdrawn_one,) = communications(hapi, written_id)
    assert withdrawn_one["status"] == "entered-in-error" and "payload" not in withdrawn_one
    assert withdrawn_one["meta"]["versionId"] == "2"


@pytest_twisted.ensureDeferred
async def test_an_amendment_is_a_conditional_update_that_survives_a_rival_write(
    hapi: HapiDevServer, fhir: FhirClient, room: RoomContext
) -> None:
    gp = sender(room)
    original_id = f"$orig-{uuid.uuid4().hex[:8]}"
    original = event(original_id, {"msgtype": "m.text", "body": "BP 150/95"})
    await CommunicationWriter(fhir).write([(original_id, message_write(original, room, gp))])
    decided_on: list[str] = []

    def edit_after_a_rival(stored: Mapping[str, Any]) -> Any:
        decided_on.append(stored["meta"]["versionId"])
        if len(decided_on) == 1:
            # Another system writes the Communication between our read and our write.
            rival = {k: v for k, v in stored.items() if k != "meta"} | {"language": "nl"}
            requests.put(
                f"{hapi.base_url}/Communication/{stored['id']}",
                json=rival,
                headers={"Content-Type": "application/fhir+json"},
                timeout=30,
            ).raise_for_status()
        return edited(stored, gp, {"contentString": "BP 150/90"})

    result = await CommunicationAmender(fhir).amend(original_id, edit_after_a_rival)
    (c,) = communications(hapi, original_id)
    assert result == Amended(f"Communication/{c['id']}")
    # HAPI refused the write on version 1 (409); version 2, the rival's, was read again.
    assert decided_on == ["1", "2"]
    assert c["meta"]["versionId"] == "3"
    assert c["payload"] == [{"contentString": "BP 150/90"}]
    assert c["language"] == "nl"  # the rival's change is not lost

    by_sender = Redaction("@anna:example.org", gp, 1_779_000_060_000)
    await CommunicationAmender(fhir).amend(
        original_id, lambda stored: withdrawn(stored, by_sender, RedactionPolicy.SENDER)
    )
    (redacted,) = communications(hapi, original_id)
    assert redacted["status"] == "entered-in-error"
    assert "payload" not in redacted and redacted["language"] == "nl"
    assert validation_errors(hapi, redacted) == []


@pytest_twisted.ensureDeferred
async def test_a_refused_entry_is_a_dead_letter_and_the_rest_is_written(
    hapi: HapiDevServer, fhir: FhirClient, room: RoomContext
) -> None:
    gp = sender(room)
    tag = uuid.uuid4().hex[:8]
    good = [f"$good{n}-{tag}" for n in range(5)]
    poison = f"$poison-{tag}"
    writes = [
        (event_id, message_write(event(event_id, {"msgtype": "m.text", "body": "ok"}), room, gp))
        for event_id in good[:2]
    ]
    # Sent by a person FHIR does not know: HAPI refuses the reference.
    writes.append(
        (
            poison,
            message_write(
                event(poison, {"msgtype": "m.text", "body": "?"}), room, "Practitioner/nobody"
            ),
        )
    )
    writes += [
        (event_id, message_write(event(event_id, {"msgtype": "m.text", "body": "ok"}), room, gp))
        for event_id in good[2:]
    ]
    result = await CommunicationWriter(fhir).write(writes)
    assert sorted(result.written) == sorted(good)
    assert list(result.dead) == [poison]
    assert "Practitioner/nobody" in result.dead[poison]
    assert all(len(communications(hapi, event_id)) == 1 for event_id in good)
    assert communications(hapi, poison) == []
