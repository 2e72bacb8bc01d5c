"""Matrix events → FHIR Communications (design.md: mapping), checked against the R4 models."""

from __future__ import annotations

from typing import Any

import pytest
from fhir.resources.R4B.communication import Communication
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG, reference_of
from synapse_fhir_module.fhir.thread_teams import request_teams
from synapse_fhir_module.mapping.communication import (
    ENCRYPTED_TAG,
    MODERATOR_NOTE,
    WITHDRAWN,
    NotRecorded,
    Redaction,
    RoomContext,
    communication_reference,
    edit_payload,
    message_write,
    redaction_write,
    replaced_event,
    thread_request,
    unadoptable,
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


REPLY = {
    "msgtype": "m.text",
    "body": "Will do",
    "m.relates_to": {"m.in_reply_to": {"event_id": "$parent"}},
}


def test_a_reply_names_the_parent_the_recorder_found() -> None:
    # Written before it in the same transaction: FHIR resolves the conditional reference.
    same_batch = message_write(event(REPLY), ROOM, GP, parent=communication_reference("$parent"))
    assert valid(same_batch.resource)["inResponseTo"] == [
        {"reference": f"Communication?identifier={EVENT_ID_SYSTEM}|$parent"}
    ]
    # Recorded earlier, in this room's thread.
    recorded = message_write(event(REPLY), ROOM, GP, parent="Communication/c-7")
    assert valid(recorded.resource)["inResponseTo"] == [
        {"reference": "Communication/c-7", "type": "Communication"}
    ]


def test_a_reply_whose_parent_is_not_in_the_thread_is_written_without_it() -> None:
    """Never recorded, or another room's: no reference FHIR cannot resolve (which would
    refuse the message for good) and none into another thread."""
    c = valid(message_write(event(REPLY), ROOM, GP).resource)
    assert "inResponseTo" not in c
    assert c["payload"] == [{"contentString": "Will do"}]


def test_a_parent_is_named_only_for_a_reply() -> None:
    c = message_write(
        event({"msgtype": "m.text", "body": "hi"}), ROOM, GP, parent="Communication/c-7"
    )
    assert "inResponseTo" not in valid(c.resource)


def test_a_reply_to_a_message_posted_from_fhir_points_at_its_source() -> None:
    content = {
        "msgtype": "m.text",
        "body": "Thanks",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$relayed"}},
    }
    relayed = message_write(event(content), ROOM, GP, parent="Communication/lab-1")
    assert valid(relayed.resource)["inResponseTo"] == [
        {"reference": "Communication/lab-1", "type": "Communication"}
    ]
    # A reply to a thread's first message (the request's payload): partOf says it all.
    first = message_write(event(content), ROOM, GP, parent="CommunicationRequest/t")
    assert "inResponseTo" not in valid(first.resource)


EDIT = {
    "msgtype": "m.text",
    "body": "* BP 150/90",
    "m.new_content": {"msgtype": "m.text", "body": "BP 150/90"},
    "m.relates_to": {"rel_type": "m.replace", "event_id": "$original"},
}


def test_an_edit_names_its_original_and_the_new_payload() -> None:
    assert replaced_event(EDIT) == "$original"
    assert edit_payload(EDIT) == {"contentString": "BP 150/90"}
    assert replaced_event({"msgtype": "m.text", "body": "not an edit"}) is None
    with pytest.raises(NotRecorded):
        edit_payload({**EDIT, "m.new_content": None})


def test_an_edit_is_not_a_message_of_its_own() -> None:
    # (It changes the original's Communication: communication_amendments.)
    with pytest.raises(NotRecorded):
        message_write(event(EDIT, event_id="$edit"), ROOM, GP)


def test_redaction_marks_entered_in_error_and_drops_the_payload() -> None:
    write = redaction_write(event({"msgtype": "m.text", "body": "wrong patient"}), ROOM, GP)
    assert (write.method, write.url) == ("PUT", f"Communication?identifier={EVENT_ID_SYSTEM}|$ev1")
    c = valid(write.resource)
    assert c["status"] == "entered-in-error"
    assert "payload" not in c
    assert "note" not in c
    assert "wrong patient" not in str(c)


def test_a_message_redacted_in_the_outbox_is_written_withdrawn_without_its_reply() -> None:
    erased = event({}, **{WITHDRAWN: {}})  # (content erased, reply relation with it)
    write = message_write(erased, ROOM, GP, parent="Communication/lab-1")
    assert (write.method, write.url) == ("PUT", f"Communication?identifier={EVENT_ID_SYSTEM}|$ev1")
    c = valid(write.resource)
    assert c["status"] == "entered-in-error"
    assert "payload" not in c and "inResponseTo" not in c and "note" not in c
    assert c["sender"] == {"reference": GP, "type": "Practitioner"}
    assert c["sent"] == "2026-05-17T06:40:00.123Z"


def test_a_moderators_withdrawal_is_noted_with_their_person_or_their_matrix_id() -> None:
    nurse = Redaction("@bram:example.org", "Practitioner/nurse-1", 1_779_000_060_000)
    by_nurse = event({}, **{WITHDRAWN: nurse.to_json()})
    (note,) = valid(message_write(by_nurse, ROOM, GP).resource)["note"]
    assert note == {
        "text": MODERATOR_NOTE,
        "time": "2026-05-17T06:41:00.000Z",
        "authorReference": {"reference": "Practitioner/nurse-1", "type": "Practitioner"},
    }
    admin = Redaction("@fhir:example.org", None, 1_779_000_060_000)
    by_admin = event({}, **{WITHDRAWN: admin.to_json()})
    (note,) = valid(message_write(by_admin, ROOM, GP).resource)["note"]
    assert note["authorString"] == "@fhir:example.org" and "authorReference" not in note
    assert Redaction.from_json(nurse.to_json()) == nurse


def test_an_encrypted_message_withdrawn_keeps_its_encrypted_tag() -> None:
    erased = event({}, "m.room.encrypted", **{WITHDRAWN: {}})
    c = valid(message_write(erased, ROOM, GP).resource)
    assert c["status"] == "entered-in-error" and ENCRYPTED_TAG in c["meta"]["tag"]
    with pytest.raises(NotRecorded):
        message_write(erased, ROOM, GP, encrypted_policy="skip")


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


def test_a_room_several_teams_share_names_them_all_as_recipients() -> None:
    room = RoomContext(
        thread="CommunicationRequest/t",
        care_team="CareTeam/home",
        patient="Patient/p-1",
        further_teams=("CareTeam/clinic",),
    )
    c = valid(message_write(event({"msgtype": "m.text", "body": "hi"}), room, GP).resource)
    assert c["recipient"] == [
        {"reference": "CareTeam/home", "type": "CareTeam"},
        {"reference": "CareTeam/clinic", "type": "CareTeam"},
    ]


# -- which request may be a room's thread -------------------------------------------------

TEAMS = ("CareTeam/home", "CareTeam/clinic")
PATIENT = "Patient/p-1"


@pytest.mark.parametrize("profile", list(CommunicationProfile))
def test_the_request_the_module_opens_is_one_it_adopts(profile: CommunicationProfile) -> None:
    request = thread_request("!r:example.org", TEAMS[0], PATIENT, requester=GP, profile=profile)
    assert unadoptable(request, TEAMS, PATIENT) is None
    assert unadoptable(request, TEAMS[:1], PATIENT) is None
    # (An ordinary room's, with rooms: all: no team, no patient.)
    ordinary = thread_request("!r:example.org", None, None)
    assert unadoptable(ordinary, (), None) is None
    # A version suffix names the same resource.
    versioned = {**request, "recipient": [{"reference": f"{TEAMS[0]}/_history/3"}]}
    assert unadoptable(versioned, TEAMS, PATIENT) is None


def own(**changes: Any) -> dict[str, Any]:
    request = thread_request("!r:example.org", TEAMS[0], PATIENT)
    request.update(changes)
    return {key: value for key, value in request.items() if value is not None}


SENDER_TEAM = "http://ozoverbindzorg.nl/fhir/StructureDefinition/ozo-sender-careteam"


@pytest.mark.parametrize(
    ("request_", "why"),
    [
        (own(meta={"tag": []}), "origin tag"),
        (own(meta={"tag": [ORIGIN_TAG]}, recipient=[]), "room's care team"),
        (own(recipient=[{"reference": TEAMS[1]}]), "room's care team"),
        (own(recipient=[{"reference": TEAMS[0]}, {"reference": "CareTeam/x"}]), "someone other"),
        (own(recipient=[{"reference": TEAMS[0]}, {"reference": GP}]), "someone other"),
        (own(recipient=[{"reference": TEAMS[0]}, {"identifier": {"value": "x"}}]), "someone"),
        (own(recipient=[{"reference": TEAMS[0]}, "CareTeam/x"]), "someone other"),
        (
            own(extension=[{"url": SENDER_TEAM, "valueReference": {"reference": "CareTeam/x"}}]),
            "someone",
        ),
        (own(subject={"reference": "Patient/p-2"}), "patient"),
        (own(subject={"identifier": {"system": "bsn", "value": "1"}}), "patient"),
        (own(subject=None), "patient"),
    ],
)
def test_a_request_under_the_rooms_id_that_the_module_would_not_open_is_not_adopted(
    request_: dict[str, Any], why: str
) -> None:
    reason = unadoptable(request_, TEAMS, PATIENT)
    assert reason is not None and why in reason
    assert "p-2" not in reason and "bsn" not in reason  # rules, never values


def test_a_request_about_a_patient_is_not_the_thread_of_a_team_that_names_none() -> None:
    assert unadoptable(own(), TEAMS, None) is not None
    assert unadoptable(own(subject=None), TEAMS, None) is None


references = st.sampled_from(
    [*TEAMS, f"{TEAMS[0]}/_history/2", "CareTeam/other", PATIENT, "Patient/p-2", GP, "x"]
)
references_or_junk = st.one_of(
    references.map(lambda r: {"reference": r}),
    st.just({"identifier": {"value": "x"}}),
    st.just("junk"),
    st.none(),
)


@given(
    tagged=st.booleans(),
    recipients=st.one_of(st.none(), st.lists(references_or_junk, max_size=3)),
    subject=references_or_junk,
    sender_team=st.one_of(st.none(), references),
    patient=st.sampled_from([PATIENT, None]),
)
def test_an_adopted_thread_names_nobody_outside_the_room(
    tagged: bool,
    recipients: list[Any] | None,
    subject: Any,
    sender_team: str | None,
    patient: str | None,
) -> None:
    request: dict[str, Any] = {
        "resourceType": "CommunicationRequest",
        "meta": {"tag": [ORIGIN_TAG] if tagged else []},
    }
    if recipients is not None:
        request["recipient"] = recipients
    if subject is not None:
        request["subject"] = subject
    if sender_team is not None:
        request["extension"] = [{"url": SENDER_TEAM, "valueReference": {"reference": sender_team}}]
    if unadoptable(request, TEAMS, patient) is not None:
        return
    assert tagged
    named = [reference_of(r) for r in recipients or []]
    assert TEAMS[0] in named and set(named) <= set(TEAMS)
    assert set(request_teams(request)) <= set(TEAMS)
    assert reference_of(subject) == patient and (subject is None) == (patient is None)
