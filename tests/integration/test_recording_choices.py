"""What recording makes of files, edits and encrypted events, through a real Synapse and
HAPI (base profile): the choices ``communication.encrypted_rooms`` offers, asserted on the
Communications HAPI holds."""

from __future__ import annotations

from typing import Any

from devstack.synapse import module_config
from devstack.waiting import wait_until
from synapse_fhir_module.mapping.communication import ENCRYPTED_TAG
from tests.integration.test_communication_recording import care_room, communication_of, health
from tests.integration.test_ozo_recording import MEGOLM

WITHIN = 30.0


def test_a_file_an_edit_and_an_encrypted_event_as_communications(
    hapi: Any, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url))  # encrypted_rooms: metadata_only
    _, _, room, gp = care_room(server, hapi.base_url)

    photo = gp.send(
        room,
        {
            "msgtype": "m.image",
            "body": "wound.png",
            "url": "mxc://example.org/wound",
            "info": {"mimetype": "image/png", "size": 2048},
        },
    )
    c = wait_until(lambda: communication_of(hapi, photo), timeout=WITHIN, what="the file")
    (attachment,) = [part["contentAttachment"] for part in c["payload"]]
    assert attachment["url"] == "mxc://example.org/wound"
    assert attachment["contentType"] == "image/png"
    assert attachment["title"] == "wound.png"
    assert attachment["size"] == 2048

    said = gp.send_text(room, "Dressing changed at 9")
    wait_until(lambda: communication_of(hapi, said), timeout=WITHIN, what="the message")
    gp.send(
        room,
        {
            "msgtype": "m.text",
            "body": "* Dressing changed at 10",
            "m.new_content": {"msgtype": "m.text", "body": "Dressing changed at 10"},
            "m.relates_to": {"rel_type": "m.replace", "event_id": said},
        },
    )
    edited = wait_until(
        lambda: (
            (c := communication_of(hapi, said))
            and c["payload"] == [{"contentString": "Dressing changed at 10"}]
            and c
        ),
        timeout=WITHIN,
        what="the edit applied to the original's Communication",
    )
    assert edited["meta"]["versionId"] != "1"

    secret = gp.send(room, MEGOLM, "m.room.encrypted")
    e = wait_until(lambda: communication_of(hapi, secret), timeout=WITHIN, what="encrypted")
    assert "payload" not in e  # what it said is not the module's to know
    assert ENCRYPTED_TAG in e["meta"]["tag"]


def test_encrypted_rooms_skip_records_no_encrypted_event_and_the_rest_as_ever(
    hapi: Any, start_synapse: Any
) -> None:
    server = start_synapse(module_config(hapi.base_url, communication={"encrypted_rooms": "skip"}))
    _, _, room, gp = care_room(server, hapi.base_url)
    secret = gp.send(room, MEGOLM, "m.room.encrypted")
    after = gp.send_text(room, "Plain text after it")
    # Written in the room's order: once the later message is there, the encrypted one
    # would have been too.
    wait_until(lambda: communication_of(hapi, after), timeout=WITHIN, what="the later message")
    assert communication_of(hapi, secret) is None
    # Nor kept aside as a dead letter: nothing pending, nothing dead, once settled.
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=WITHIN,
        what="the outbox empty, no dead letter",
    )
