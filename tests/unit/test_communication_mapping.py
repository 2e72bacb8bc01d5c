"""Matrix events → FHIR Communications (DESIGN §3), checked against the R4 models."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.communication import Communication

from synapse_fhir_module.communication_mapping import (
    ENCRYPTED_TAG,
    EVENT_ID_SYSTEM,
    ORIGIN_TAG,
    NotRecorded,
    RoomContext,
    message_write,
    redacted_write,
    redaction_write,
)

ROOM = RoomContext(
    thread="CommunicationRequest/thread-1", care_team="CareTeam/team-1", patient="Patient/p-1"
)
GP = "Practitioner/gp-1"


def event(content: dict[str, Any], event_type: str = "m.room.message", **extra: Any) -> dict:
    return {
        "type": event_type,
        "event_id": "$ev1",
        "room_id": "!r:example.org",
        "sender": "@anna:example.org",
        "origin_server_ts": 1_779_000_000_123,
        "content": content,
        **extra,
    }


def valid(resource: dict[str, Any]) -> dict[str, Any]:
    """Fails unless the JSON is a well-formed R4 Communication."""
    Communication.model_validate(resource)
    return resource


@pytest.mark.parametrize("msgtype", ["m.text", "m.notice", "m.emote", "org.example.custom"])
def test_text_messages(msgtype: str) -> None:
    write = message_write(event({"msgtype": msgtype, "body": "BP 150/95"}), ROOM, GP)
    assert (write.method, write.url) == ("POST", "Communication")
    assert write.if_none_exist == f"identifier={EVENT_ID_SYSTEM}|$ev1"
    c = valid(write.resource)
    assert c["identifier"] == [{"system": EVENT_ID_SYSTEM, "value": "$ev1"}]
    assert c["status"] == "completed"
    assert c["sent"] == "2026-05-17T06:40:00.123Z"
    assert c["partOf"] == [
        {"reference": "CommunicationRequest/thread-1", "type": "CommunicationRequest"}
    ]
    assert c["sender"] == {"reference": GP, "type": "Practitioner"}
    assert c["subject"] == {"reference": "Patient/p-1", "type": "Patient"}
    assert c["recipient"] == [{"reference": "CareTeam/team-1", "type": "CareTeam"}]
    assert c["payload"] == [{"contentString": "BP 150/95"}]
    assert ORIGIN_TAG in c["meta"]["tag"]


def test_no_subject_without_a_patient() -> None:
    room = RoomContext(thread="CommunicationRequest/t", care_team="CareTeam/c", patient=None)
    c = valid(message_write(event({"msgtype": "m.text", "body": "hi"}), room, GP).resource)
    assert "subject" not in c


def test_reply_points_at_the_parent_communication() -> None:
    content = {
        "msgtype": "m.text",
        "body": "Will do",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$parent"}},
    }
    c = valid(message_write(event(content), ROOM, GP).resource)
    assert c["inResponseTo"] == [
        {"reference": f"Communication?identifier={EVENT_ID_SYSTEM}|$parent"}
    ]


def test_a_reply_to_a_message_posted_from_fhir_points_at_its_source() -> None:
    content = {
        "msgtype": "m.text",
        "body": "Thanks",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$relayed"}},
    }
    relayed = message_write(event(content), ROOM, GP, parent_source="Communication/lab-1")
    assert valid(relayed.resource)["inResponseTo"] == [
        {"reference": "Communication/lab-1", "type": "Communication"}
    ]
    # A reply to a thread's first message (the request's payload): partOf says it all.
    first = message_write(event(content), ROOM, GP, parent_source="CommunicationRequest/t")
    assert "inResponseTo" not in valid(first.resource)


def test_edit_is_a_new_version_of_the_original() -> None:
    content = {
        "msgtype": "m.text",
        "body": "* BP 150/90",
        "m.new_content": {"msgtype": "m.text", "body": "BP 150/90"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
    }
    write = message_write(event(content, event_id="$edit"), ROOM, GP)
    assert (write.method, write.url) == (
        "PUT",
        f"Communication?identifier={EVENT_ID_SYSTEM}|$original",
    )
    assert write.if_none_exist is None
    c = valid(write.resource)
    assert c["identifier"] == [{"system": EVENT_ID_SYSTEM, "value": "$original"}]
    assert c["payload"] == [{"contentString": "BP 150/90"}]


def test_redaction_marks_entered_in_error_and_drops_the_payload() -> None:
    write = redaction_write(event({"msgtype": "m.text", "body": "wrong patient"}), ROOM, GP)
    assert (write.method, write.url) == ("PUT", f"Communication?identifier={EVENT_ID_SYSTEM}|$ev1")
    c = valid(write.resource)
    assert c["status"] == "entered-in-error"
    assert "payload" not in c
    assert "wrong patient" not in str(c)


@pytest.mark.parametrize("msgtype", ["m.image", "m.file", "m.audio", "m.video"])
def test_files_become_attachments(msgtype: str) -> None:
    content = {
        "msgtype": msgtype,
        "body": "wound.jpg",
        "url": "mxc://example.org/AbCdEf",
        "info": {"mimetype": "image/jpeg", "size": 123456},
    }
    c = valid(message_write(event(content), ROOM, GP).resource)
    assert c["payload"] == [
        {
            "contentAttachment": {
                "url": "mxc://example.org/AbCdEf",
                "contentType": "image/jpeg",
                "size": 123456,
                "title": "wound.jpg",
            }
        }
    ]


@pytest.mark.parametrize(
    "info",
    [
        {"mimetype": "", "size": -1},
        {"mimetype": "image/ jpeg  x", "size": 3_000_000_000},
        {"mimetype": 7, "size": True},
        {"mimetype": "image/jpeg\n", "size": "12"},
    ],
)
def test_attachment_info_fhir_cannot_hold_is_left_out(info: dict[str, Any]) -> None:
    content = {"msgtype": "m.file", "body": "a.pdf", "url": "mxc://example.org/x", "info": info}
    c = valid(message_write(event(content), ROOM, GP).resource)
    assert c["payload"] == [{"contentAttachment": {"url": "mxc://example.org/x", "title": "a.pdf"}}]


def test_ordinary_room_has_no_recipient() -> None:
    room = RoomContext(thread="CommunicationRequest/t", care_team=None, patient=None)
    c = valid(message_write(event({"msgtype": "m.text", "body": "hi"}), room, GP).resource)
    assert "recipient" not in c
    assert "subject" not in c


def test_encrypted_event_metadata_only() -> None:
    encrypted = event(
        {"algorithm": "m.megolm.v1.aes-sha2", "ciphertext": "xyz"}, "m.room.encrypted"
    )
    c = valid(message_write(encrypted, ROOM, GP, encrypted_policy="metadata_only").resource)
    assert "payload" not in c
    assert ENCRYPTED_TAG in c["meta"]["tag"]


@pytest.mark.parametrize("policy", ["skip", "forbid"])
def test_encrypted_event_not_recorded_otherwise(policy: str) -> None:
    encrypted = event({"ciphertext": "xyz"}, "m.room.encrypted")
    with pytest.raises(NotRecorded):
        message_write(encrypted, ROOM, GP, encrypted_policy=policy)


@pytest.mark.parametrize(
    "bad",
    [
        event({"msgtype": "m.text"}),  # no body
        event({"msgtype": "m.image", "body": "x", "file": {"url": "mxc://e/1"}}),  # encrypted file
        event({"msgtype": "m.file", "body": "x", "url": "mxc://e/a b"}),  # not a URL
        event({"membership": "join"}, "m.room.member"),
        event({"msgtype": "m.text", "body": "x"}, origin_server_ts="yesterday"),
        event({"m.relates_to": {"rel_type": "m.replace"}, "body": "x"}),  # edit of nothing
    ],
)
def test_what_is_not_recorded(bad: dict[str, Any]) -> None:
    with pytest.raises(NotRecorded):
        message_write(bad, ROOM, GP)


def test_a_stored_communication_redacted() -> None:
    stored = message_write(event({"msgtype": "m.text", "body": "wrong patient"}), ROOM, GP).resource
    stored = stored | {"id": "c1", "meta": stored["meta"] | {"versionId": "3"}}
    write = redacted_write(stored, "$ev1")
    assert (write.method, write.url) == ("PUT", f"Communication?identifier={EVENT_ID_SYSTEM}|$ev1")
    c = valid(write.resource)
    assert c["status"] == "entered-in-error"
    assert "payload" not in c and "wrong patient" not in str(c)
    assert c["meta"] == {"tag": [ORIGIN_TAG]}
    assert c["id"] == "c1"
