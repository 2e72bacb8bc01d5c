"""communication.profile: ozo — what the module writes meets OZOCommunication and
OZOCommunicationRequest, checked against the guide's own StructureDefinitions (read at
test time from ../shared/ozo) and the R4B models; base stays as it was."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.communicationrequest import CommunicationRequest
from hypothesis import assume, given
from hypothesis import strategies as st
from synapse.module_api.errors import ConfigError

from synapse_fhir_module import FhirModule
from synapse_fhir_module.config import CommunicationProfile, RedactionPolicy
from synapse_fhir_module.fhir.conventions import ORIGIN_TAG
from synapse_fhir_module.mapping.communication import (
    ENCRYPTED_TAG,
    WITHDRAWN,
    NotRecorded,
    Redaction,
    RoomContext,
    communication_reference,
    message_write,
    redaction_write,
    thread_request,
)
from synapse_fhir_module.mapping.profile import (
    ENCRYPTED_PLACEHOLDER,
    OZO_COMMUNICATION,
    OZO_COMMUNICATION_REQUEST,
    WITHDRAWN_PLACEHOLDER,
    communication_problems,
    request_problems,
)
from synapse_fhir_module.recording.amendments import edited, withdrawn
from synapse_fhir_module.recording.writer import invalid_communication
from tests.ozo_profiles import COMMUNICATION, COMMUNICATION_REQUEST, definition, element, unmet

OZO, BASE = CommunicationProfile.OZO, CommunicationProfile.BASE
ROOM = RoomContext(
    thread="CommunicationRequest/thread-1", care_team="CareTeam/team-1", patient="Patient/p-1"
)
GP = "Practitioner/gp-1"
DAUGHTER = "RelatedPerson/daughter-1"
BY_NURSE = Redaction("@bram:example.org", "Practitioner/nurse-1", 1_779_000_060_000)
TEXT = {"msgtype": "m.text", "body": "BP 150/95"}
IMAGE = {
    "msgtype": "m.image",
    "body": "wound.jpg",
    "url": "mxc://example.org/abc",
    "info": {"mimetype": "image/jpeg", "size": 2048},
}


def event(content: Any, event_type: str = "m.room.message", **extra: Any) -> dict[str, Any]:
    return {
        "type": event_type,
        "event_id": "$ev1",
        "room_id": "!r:example.org",
        "sender": "@anna:example.org",
        "origin_server_ts": 1_779_000_000_123,
        "content": content,
        **extra,
    }


def meets_ozo_communication(resource: dict[str, Any]) -> dict[str, Any]:
    """Fails unless ``resource`` is a valid R4 Communication meeting OZOCommunication, by
    the guide's definition and by the module's own check (which the writer applies)."""
    Communication.model_validate(resource)
    assert unmet(resource, definition(COMMUNICATION)) == []
    assert communication_problems(resource) == []
    assert invalid_communication(resource) is None
    return resource


def stored(resource: dict[str, Any]) -> dict[str, Any]:
    """A written Communication as FHIR returns it."""
    return {**copy.deepcopy(resource), "id": "c-1"} | {
        "meta": {**resource["meta"], "versionId": "1", "lastUpdated": "2026-05-17T06:40:01Z"}
    }


def test_the_guide_constrains_what_the_module_relies_on() -> None:
    """The cardinalities and types the issue names, as the guide's definitions state them
    (a new version of the guide that changed them fails here first)."""
    c = definition(COMMUNICATION)
    assert c["url"] == OZO_COMMUNICATION
    for element_id in (
        "Communication.partOf",
        "Communication.partOf.reference",
        "Communication.partOf.type",
        "Communication.sender",
        "Communication.sender.reference",
        "Communication.sender.type",
        "Communication.payload",
    ):
        assert element(c, element_id)["min"] == 1, element_id
    content = element(c, "Communication.payload.content[x]")
    assert {t["code"] for t in content["type"]} == {"string", "Attachment"}
    r = definition(COMMUNICATION_REQUEST)
    assert r["url"] == OZO_COMMUNICATION_REQUEST
    for element_id in (
        "CommunicationRequest.subject",
        "CommunicationRequest.subject.reference",
        "CommunicationRequest.subject.type",
        "CommunicationRequest.requester",
        "CommunicationRequest.requester.reference",
        "CommunicationRequest.requester.type",
        "CommunicationRequest.recipient",
        "CommunicationRequest.recipient.reference",
        "CommunicationRequest.recipient.type",
    ):
        assert element(r, element_id)["min"] == 1, element_id


@pytest.mark.parametrize("content", [TEXT, IMAGE], ids=["text", "file"])
def test_a_message_declares_and_meets_ozo_communication(content: dict[str, Any]) -> None:
    c = meets_ozo_communication(message_write(event(content), ROOM, GP, profile=OZO).resource)
    assert c["meta"] == {"tag": [ORIGIN_TAG], "profile": [OZO_COMMUNICATION]}
    assert c["partOf"] == [
        {"reference": "CommunicationRequest/thread-1", "type": "CommunicationRequest"}
    ]
    assert c["sender"] == {"reference": GP, "type": "Practitioner"}
    (payload,) = c["payload"]
    assert payload == (
        {"contentString": "BP 150/95"}
        if content is TEXT
        else {
            "contentAttachment": {
                "url": "mxc://example.org/abc",
                "contentType": "image/jpeg",
                "size": 2048,
                "title": "wound.jpg",
            }
        }
    )


def test_a_reply_meets_it_too() -> None:
    content = {**TEXT, "m.relates_to": {"m.in_reply_to": {"event_id": "$parent"}}}
    parent = communication_reference("$parent")
    c = meets_ozo_communication(
        message_write(event(content), ROOM, DAUGHTER, parent=parent, profile=OZO).resource
    )
    assert c["inResponseTo"] == [
        {"reference": "Communication?identifier=https://matrix.org/event-id|$parent"}
    ]
    assert c["sender"] == {"reference": DAUGHTER, "type": "RelatedPerson"}


def test_an_encrypted_event_carries_the_placeholder() -> None:
    c = message_write(
        event({"ciphertext": "x"}, "m.room.encrypted"), ROOM, GP, profile=OZO
    ).resource
    meets_ozo_communication(c)
    assert c["payload"] == [{"contentString": ENCRYPTED_PLACEHOLDER}]
    assert ENCRYPTED_TAG in c["meta"]["tag"]
    assert c["status"] == "completed"


@pytest.mark.parametrize("moderator", [None, BY_NURSE], ids=["by-sender", "by-moderator"])
def test_a_message_redacted_in_the_outbox_is_written_withdrawn_with_the_placeholder(
    moderator: Redaction | None,
) -> None:
    write = redaction_write(event(TEXT), ROOM, GP, moderator=moderator, profile=OZO)
    c = meets_ozo_communication(write.resource)
    assert (c["status"], c["payload"]) == (
        "entered-in-error",
        [{"contentString": WITHDRAWN_PLACEHOLDER}],
    )
    # The same through the outbox row that was erased by the redaction.
    row = {**event({}), WITHDRAWN: moderator.to_json() if moderator else {}}
    assert message_write(row, ROOM, GP, profile=OZO).resource == write.resource


def test_an_edit_keeps_the_profile_and_meets_it() -> None:
    original = stored(message_write(event(TEXT), ROOM, GP, profile=OZO).resource)
    after = edited(original, GP, {"contentString": "BP 150/90"}, profile=OZO)
    assert isinstance(after, dict)
    meets_ozo_communication(after)
    assert after["payload"] == [{"contentString": "BP 150/90"}]


@pytest.mark.parametrize("redaction", [Redaction("@anna:example.org", GP, 1), BY_NURSE])
def test_a_withdrawal_replaces_what_was_said_with_the_placeholder(redaction: Redaction) -> None:
    original = stored(message_write(event(TEXT), ROOM, GP, profile=OZO).resource)
    after = withdrawn(original, redaction, RedactionPolicy.MODERATORS, profile=OZO)
    assert isinstance(after, dict)
    meets_ozo_communication(after)
    assert after["status"] == "entered-in-error"
    assert after["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
    assert "BP 150/95" not in repr(after)


def test_records_written_under_base_gain_the_profile_when_amended_under_ozo() -> None:
    base = stored(message_write(event(TEXT), ROOM, GP).resource)
    assert "profile" not in base["meta"]
    after = withdrawn(
        base, Redaction("@anna:example.org", GP, 1), RedactionPolicy.SENDER, profile=OZO
    )
    assert isinstance(after, dict)
    meets_ozo_communication(after)


def test_a_record_that_declares_ozo_keeps_meeting_it_after_the_switch_back_to_base() -> None:
    ozo = stored(message_write(event(TEXT), ROOM, GP, profile=OZO).resource)
    after = withdrawn(ozo, Redaction("@anna:example.org", GP, 1), RedactionPolicy.SENDER)
    assert isinstance(after, dict)
    meets_ozo_communication(after)
    assert after["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]


def an_older_form(c: dict[str, Any]) -> None:
    """What another system (or an older version) may have stored under the profile's
    claim without meeting it: references without their ``type``."""
    c["partOf"][0].pop("type")
    c["sender"].pop("type")


@pytest.mark.parametrize("profile", [OZO, BASE])
def test_a_withdrawal_of_a_record_that_claims_ozo_without_meeting_it_drops_the_claim(
    profile: CommunicationProfile,
) -> None:
    """A withdrawal is never refused for the profile's sake: the record is withdrawn with
    the placeholder, and loses a claim it could not keep (a false claim is not written)."""
    claimed = stored(message_write(event(TEXT), ROOM, GP, profile=OZO).resource)
    an_older_form(claimed)
    assert communication_problems(claimed)  # (what the writer would refuse to send)
    after = withdrawn(
        claimed, Redaction("@anna:example.org", GP, 1), RedactionPolicy.SENDER, profile=profile
    )
    assert isinstance(after, dict)
    assert invalid_communication(after) is None
    assert after["status"] == "entered-in-error"
    assert after["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
    assert "profile" not in after["meta"]
    assert after["meta"]["tag"] == claimed["meta"]["tag"]
    assert "BP 150/95" not in repr(after)


def test_base_writes_declare_no_profile_and_keep_no_payload_once_withdrawn() -> None:
    c = message_write(event(TEXT), ROOM, GP).resource
    assert "profile" not in c["meta"]
    withdrawn_one = redaction_write(event(TEXT), ROOM, GP).resource
    assert "payload" not in withdrawn_one
    encrypted = message_write(event({"ciphertext": "x"}, "m.room.encrypted"), ROOM, GP).resource
    assert "payload" not in encrypted
    assert thread_request("!r:example.org", "CareTeam/team-1", "Patient/p-1") == {
        "resourceType": "CommunicationRequest",
        "meta": {"tag": [ORIGIN_TAG]},
        "identifier": [{"system": "https://matrix.org/room-id", "value": "!r:example.org"}],
        "status": "active",
        "recipient": [{"reference": "CareTeam/team-1", "type": "CareTeam"}],
        "subject": {"reference": "Patient/p-1", "type": "Patient"},
    }


def test_the_thread_the_module_opens_meets_ozo_communication_request() -> None:
    request = thread_request(
        "!r:example.org", "CareTeam/team-1", "Patient/p-1", requester=DAUGHTER, profile=OZO
    )
    CommunicationRequest.model_validate(request)
    assert unmet(request, definition(COMMUNICATION_REQUEST)) == []
    assert request_problems(request) == []
    assert request["meta"]["profile"] == [OZO_COMMUNICATION_REQUEST]
    assert request["status"] == "active"
    assert request["subject"] == {"reference": "Patient/p-1", "type": "Patient"}
    assert request["requester"] == {"reference": DAUGHTER, "type": "RelatedPerson"}
    assert request["recipient"] == [{"reference": "CareTeam/team-1", "type": "CareTeam"}]


@pytest.mark.parametrize(
    ("patient", "requester"),
    [(None, GP), ("Group/g-1", GP), ("Patient/p-1", None), ("Patient/p-1", "Device/d-1")],
)
def test_a_thread_without_patient_or_individual_requester_does_not_meet_it(
    patient: str | None, requester: str | None
) -> None:
    request = thread_request(
        "!r:example.org", "CareTeam/team-1", patient, requester=requester, profile=OZO
    )
    assert request_problems(request)
    assert unmet(request, definition(COMMUNICATION_REQUEST))


@pytest.mark.parametrize(
    "break_it",
    [
        lambda c: c.pop("partOf"),
        lambda c: c["partOf"][0].pop("type"),
        lambda c: c["partOf"][0].update(type="Communication"),
        lambda c: c.pop("sender"),
        lambda c: c["sender"].pop("type"),
        lambda c: c["sender"].update(reference="Device/d-1", type="Device"),
        lambda c: c.pop("payload"),
        lambda c: c["payload"][0].update(contentString=""),
    ],
)
def test_the_writer_refuses_what_claims_ozo_without_meeting_it(break_it: Any) -> None:
    c = message_write(event(TEXT), ROOM, GP, profile=OZO).resource
    break_it(c)
    reason = invalid_communication(c)
    assert reason is not None
    assert "BP 150/95" not in reason  # fields and rules only, never what was said


# -- properties ----------------------------------------------------------------------------

MISSING = object()
junk = st.one_of(
    st.just(MISSING),
    st.none(),
    st.just(""),
    st.just([]),
    st.just({}),
    st.sampled_from(
        [
            "Practitioner",
            "Device",
            "Patient/p-1",
            "Organization/o-1",
            "CommunicationRequest",
            "CareTeam",
            "x",
        ]
    ),
)


def _mutated(resource: dict[str, Any], path: tuple[Any, ...], value: Any) -> dict[str, Any]:
    result = copy.deepcopy(resource)
    node: Any = result
    for step in path[:-1]:
        node = node[step]
    if value is MISSING:
        node.pop(path[-1], None) if isinstance(node, dict) else None
    else:
        node[path[-1]] = value
    return result


COMMUNICATION_PATHS = [
    ("partOf",),
    ("partOf", 0),
    ("partOf", 0, "reference"),
    ("partOf", 0, "type"),
    ("sender",),
    ("sender", "reference"),
    ("sender", "type"),
    ("payload",),
    ("payload", 0),
    ("payload", 0, "contentString"),
    ("recipient", 0, "reference"),
    ("recipient", 0, "type"),
]
REQUEST_PATHS = [
    ("subject",),
    ("subject", "reference"),
    ("subject", "type"),
    ("requester",),
    ("requester", "reference"),
    ("requester", "type"),
    ("recipient",),
    ("recipient", 0),
    ("recipient", 0, "reference"),
    ("recipient", 0, "type"),
]


@given(st.lists(st.tuples(st.sampled_from(COMMUNICATION_PATHS), junk), min_size=1, max_size=3))
def test_whatever_the_guide_finds_wanting_the_module_refuses(
    changes: list[tuple[tuple[Any, ...], Any]],
) -> None:
    """The module's own check is at least as strict as the guide's definition: a
    Communication it would let through always meets OZOCommunication."""
    c = message_write(event(TEXT), ROOM, GP, profile=OZO).resource
    for path, value in changes:
        try:
            c = _mutated(c, path, value)
        except (KeyError, IndexError, TypeError):
            continue  # a path the earlier changes removed
    if unmet(c, definition(COMMUNICATION)):
        assert communication_problems(c)


@given(st.lists(st.tuples(st.sampled_from(REQUEST_PATHS), junk), min_size=1, max_size=3))
def test_whatever_the_guide_finds_wanting_in_a_thread_the_module_refuses(
    changes: list[tuple[tuple[Any, ...], Any]],
) -> None:
    request = thread_request(
        "!r:example.org", "CareTeam/team-1", "Patient/p-1", requester=GP, profile=OZO
    )
    for path, value in changes:
        try:
            request = _mutated(request, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    if unmet(request, definition(COMMUNICATION_REQUEST)):
        assert request_problems(request)


@given(st.lists(st.tuples(st.sampled_from(COMMUNICATION_PATHS), junk), min_size=1, max_size=3))
def test_whatever_a_record_claiming_ozo_holds_its_withdrawal_is_written(
    changes: list[tuple[tuple[Any, ...], Any]],
) -> None:
    """Any valid R4 record that claims OZOCommunication, met or not, is withdrawn by a
    redaction that counts: what is sent passes the writer's check, keeps nothing that was
    said, and claims the profile only when it meets it."""
    c = stored(message_write(event(TEXT), ROOM, GP, profile=OZO).resource)
    for path, value in changes:
        try:
            c = _mutated(c, path, value)
        except (KeyError, IndexError, TypeError):
            continue
    try:
        Communication.model_validate(c)
    except ValueError:
        assume(False)  # (FHIR never hands back what R4 cannot hold)
    for profile in (OZO, BASE):
        after = withdrawn(c, BY_NURSE, RedactionPolicy.MODERATORS, profile=profile)
        assert isinstance(after, dict)
        assert invalid_communication(after) is None
        assert after["status"] == "entered-in-error"
        assert after["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
        assert "BP 150/95" not in repr(after)
        if "profile" in after["meta"]:
            meets_ozo_communication(after)


text = st.text(max_size=40)
contents = st.one_of(
    st.fixed_dictionaries(
        {"msgtype": st.sampled_from(["m.text", "m.notice", "m.emote", "x.custom"]), "body": text}
    ),
    st.fixed_dictionaries(
        {
            "msgtype": st.sampled_from(["m.image", "m.file", "m.audio", "m.video"]),
            "body": text,
            "url": st.one_of(text, text.map(lambda t: f"mxc://example.org/{t}")),
        },
        optional={
            "info": st.dictionaries(
                st.sampled_from(["mimetype", "size"]),
                st.one_of(text, st.integers(), st.none()),
            ),
            "filename": text,
        },
    ),
    st.dictionaries(text, st.one_of(text, st.integers(), st.none()), max_size=3),
)


@given(
    content=contents,
    event_type=st.sampled_from(["m.room.message", "m.room.encrypted"]),
    withdrawn_by=st.sampled_from([None, "sender", "moderator"]),
    sender=st.sampled_from([GP, DAUGHTER, "Patient/p-1"]),
    reply_to=st.one_of(st.none(), st.just("$parent"), text),
    parent=st.sampled_from(
        [None, "Communication/c-9", "CommunicationRequest/t-1", "Communication?identifier=x|$p"]
    ),
)
def test_every_message_the_writer_would_send_meets_the_profile(
    content: dict[str, Any],
    event_type: str,
    withdrawn_by: str | None,
    sender: str,
    reply_to: str | None,
    parent: str | None,
) -> None:
    """Whatever a client puts in an event: under ozo the module either records nothing,
    or writes a valid R4 Communication meeting OZOCommunication, or (R4 cannot hold what
    was sent) keeps it as a dead letter — never a Communication that claims the profile
    without meeting it."""
    if reply_to is not None:
        content = {**content, "m.relates_to": {"m.in_reply_to": {"event_id": reply_to}}}
    extra: dict[str, Any] = {}
    if withdrawn_by == "sender":
        extra[WITHDRAWN] = {}
    elif withdrawn_by == "moderator":
        extra[WITHDRAWN] = BY_NURSE.to_json()
    try:
        write = message_write(
            event(content, event_type, **extra), ROOM, sender, parent=parent, profile=OZO
        )
    except NotRecorded:
        return
    if invalid_communication(write.resource) is None:  # what the writer sends
        meets_ozo_communication(write.resource)
        if withdrawn_by:
            assert write.resource["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]


@given(
    st.one_of(st.text(max_size=12), st.integers(), st.booleans(), st.none(), st.lists(st.text()))
)
def test_the_profile_key_takes_base_or_ozo_and_nothing_else(value: Any) -> None:
    raw = {"fhir": {"base_url": "http://127.0.0.1:8080/fhir"}, "communication": {"profile": value}}
    if value is None:  # (an empty key means the default)
        assert FhirModule.parse_config(raw).communication.profile is BASE
    elif value in ("base", "ozo"):
        assert FhirModule.parse_config(raw).communication.profile.value == value
    else:
        with pytest.raises(ConfigError) as caught:
            FhirModule.parse_config(raw)
        assert tuple(caught.value.path or ()) == ("communication", "profile")
        assert "expected one of base, ozo" in str(caught.value)


def test_ozo_records_care_team_rooms_only() -> None:
    """An ordinary room has no patient, so its thread could never meet the profile: the
    combination is refused at start-up rather than leaving those messages unwritten."""
    raw = {
        "fhir": {"base_url": "http://127.0.0.1:8080/fhir"},
        "communication": {"profile": "ozo", "rooms": "all"},
    }
    with pytest.raises(ConfigError) as caught:
        FhirModule.parse_config(raw)
    assert tuple(caught.value.path or ()) == ("communication", "rooms")
    assert "rooms: care_team" in str(caught.value)
    raw["communication"]["rooms"] = "care_team"
    assert FhirModule.parse_config(raw).communication.profile is OZO
