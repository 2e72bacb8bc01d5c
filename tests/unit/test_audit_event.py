"""A journal row as an R4 AuditEvent: the codes per kind of decision, who (the person FHIR
knows, the Matrix id, the service user as a Device), which network (patient, team, thread,
room), the tag the conditional create keys on, and what never goes in."""

from __future__ import annotations

import json
from typing import Any

import pytest
from fhir.resources.R4B.auditevent import AuditEvent

from synapse_fhir_module.audit.audit_event import (
    DCM,
    DECISION_SYSTEM,
    DETAIL_SYSTEM,
    audit_event,
    bundle_entry,
    if_none_exist,
)
from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.fhir.conventions import (
    AUDIT_ID_SYSTEM,
    MATRIX_ID_SYSTEM,
    ORIGIN_TAG,
    ROOM_ID_SYSTEM,
    SERVER_NAME_SYSTEM,
)

SERVICE = "@fhir:a.org"
ROOM = "!room:a.org"
PERSONS = {"@anna:a.org": "Practitioner/7", "@olga:a.org": "RelatedPerson/3"}
PATIENTS = {"CareTeam/12": "Patient/5"}


def event_of(**fields: Any) -> dict[str, Any]:
    decision = Decision(
        kind=fields.pop("kind"),
        outcome=fields.pop("outcome", Outcome.SUCCESS),
        recorded_ms=fields.pop("recorded_ms", 1_764_400_000_123),
        **fields,
    )
    resource = audit_event(
        decision, server_name="a.org", service_user_id=SERVICE, persons=PERSONS, patients=PATIENTS
    )
    AuditEvent.model_validate(resource)  # valid R4 (R4B's AuditEvent is R4's)
    return resource


def codes(resource: dict[str, Any]) -> tuple[str, str, str, str, list[str]]:
    return (
        resource["type"]["code"],
        resource["action"],
        resource["outcome"],
        resource["subtype"][0]["code"],
        [s["code"] for s in resource["subtype"][1:]],
    )


@pytest.mark.parametrize(
    ("kind", "outcome", "detail", "expected"),
    [
        (DecisionKind.ACCESS_REFUSED, Outcome.REFUSED, "join", ("110113", "E", "4")),
        (DecisionKind.REGISTRATION, Outcome.SUCCESS, "email", ("110114", "E", "0")),
        (DecisionKind.REGISTRATION, Outcome.REFUSED, None, ("110114", "E", "4")),
        (DecisionKind.MEMBER_INVITED, Outcome.SUCCESS, None, ("110136", "C", "0")),
        (DecisionKind.MEMBER_REMOVED, Outcome.SUCCESS, None, ("110136", "D", "0")),
        (DecisionKind.MEMBER_BANNED, Outcome.SUCCESS, None, ("110136", "D", "0")),
        (DecisionKind.MEMBER_UNBANNED, Outcome.SUCCESS, None, ("110136", "U", "0")),
        (DecisionKind.POWER_LEVELS_SET, Outcome.SUCCESS, None, ("110136", "U", "0")),
        (DecisionKind.MESSAGE_RELAYED, Outcome.SUCCESS, "Communication/9", ("110106", "R", "0")),
    ],
)
def test_each_kind_has_its_type_action_and_outcome(
    kind: DecisionKind, outcome: Outcome, detail: str | None, expected: tuple[str, str, str]
) -> None:
    resource = event_of(
        kind=kind, outcome=outcome, user_id="@anna:a.org", room_id=ROOM, detail=detail
    )
    type_code, action, result, subtype, details = codes(resource)
    assert (type_code, action, result) == expected
    assert resource["type"]["system"] == DCM
    assert resource["subtype"][0]["system"] == DECISION_SYSTEM
    assert subtype == kind.value
    if kind in (DecisionKind.ACCESS_REFUSED, DecisionKind.REGISTRATION) and detail:
        assert details == [detail]
        assert resource["subtype"][1]["system"] == DETAIL_SYSTEM
    else:
        assert details == []
    assert resource["recorded"] == "2025-11-29T07:06:40.123Z"


def test_a_refusal_names_its_reason_the_person_and_the_patients_network() -> None:
    resource = event_of(
        kind=DecisionKind.ACCESS_REFUSED,
        outcome=Outcome.REFUSED,
        user_id="@anna:a.org",
        actor_id="@olga:a.org",  # Olga tried to invite Anna
        room_id=ROOM,
        care_team="CareTeam/12",
        request="CommunicationRequest/8",
        reason="inviter_not_in_care_team",
        detail="invite",
    )
    assert resource["outcomeDesc"] == "inviter_not_in_care_team"
    requestor, subject = resource["agent"]
    assert requestor["who"] == {
        "reference": "RelatedPerson/3",
        "type": "RelatedPerson",
        "identifier": {"system": MATRIX_ID_SYSTEM, "value": "@olga:a.org"},
    }
    assert (requestor["altId"], requestor["requestor"]) == ("@olga:a.org", True)
    assert requestor["type"]["coding"][0]["code"] == "110153"
    assert subject["who"]["reference"] == "Practitioner/7"
    assert (subject["altId"], subject["requestor"]) == ("@anna:a.org", False)
    assert subject["type"]["coding"][0]["code"] == "110152"
    whats = [e["what"] for e in resource["entity"]]
    assert whats == [
        {"reference": "Patient/5", "type": "Patient"},
        {"reference": "CareTeam/12", "type": "CareTeam"},
        {"reference": "CommunicationRequest/8", "type": "CommunicationRequest"},
        {"identifier": {"system": ROOM_ID_SYSTEM, "value": ROOM}},
    ]
    assert [e["role"]["code"] for e in resource["entity"]] == ["1", "4", "4", "13"]
    assert resource["source"] == {
        "site": "a.org",
        "observer": {
            "type": "Device",
            "identifier": {"system": SERVER_NAME_SYSTEM, "value": "a.org"},
        },
        "type": [
            {
                "system": "http://terminology.hl7.org/CodeSystem/security-source-type",
                "code": "4",
                "display": "Application Server",
            }
        ],
    }


def test_someone_fhir_does_not_know_is_their_matrix_id_only() -> None:
    resource = event_of(
        kind=DecisionKind.ACCESS_REFUSED,
        outcome=Outcome.REFUSED,
        user_id="@mallory:b.org",
        room_id=ROOM,
        reason="not_in_care_team",
        detail="federated_join",
    )
    (agent,) = resource["agent"]
    assert agent["who"] == {"identifier": {"system": MATRIX_ID_SYSTEM, "value": "@mallory:b.org"}}
    assert agent["requestor"] is True


def test_the_service_user_acts_as_a_device_and_the_member_is_the_other_agent() -> None:
    resource = event_of(
        kind=DecisionKind.MEMBER_INVITED,
        user_id="@anna:a.org",
        actor_id=SERVICE,
        room_id=ROOM,
        care_team="CareTeam/12",
    )
    device, member = resource["agent"]
    assert device == {
        "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
        "who": {"type": "Device", "identifier": {"system": MATRIX_ID_SYSTEM, "value": SERVICE}},
        "altId": SERVICE,
        "requestor": True,
    }
    assert (member["who"]["reference"], member["requestor"]) == ("Practitioner/7", False)
    assert "outcomeDesc" not in resource


def test_a_relay_names_the_communication_and_the_room_it_went_to() -> None:
    resource = event_of(
        kind=DecisionKind.MESSAGE_RELAYED,
        actor_id=SERVICE,
        room_id=ROOM,
        care_team="CareTeam/12",
        request="CommunicationRequest/8",
        detail="Communication/9",
    )
    assert [e["what"].get("reference") for e in resource["entity"]] == [
        "Patient/5",
        "CareTeam/12",
        "CommunicationRequest/8",
        "Communication/9",
        None,
    ]
    assert resource["entity"][-1]["role"]["code"] == "16"  # the room: data destination
    assert [a["altId"] for a in resource["agent"]] == [SERVICE]


def test_anything_but_a_code_or_a_reference_stays_out() -> None:
    """A row holds what the module wrote; should a field ever carry anything else (text),
    it is not copied into FHIR."""
    text = "Mevrouw de Boer heeft pijn"
    for kind in (DecisionKind.ACCESS_REFUSED, DecisionKind.MESSAGE_RELAYED):
        resource = event_of(
            kind=kind,
            outcome=Outcome.REFUSED,
            user_id="@anna:a.org",
            reason=text,
            detail=text,
            care_team=text,
            request=text,
        )
        assert text not in json.dumps(resource)
        assert resource["outcomeDesc"] == "refused"


def test_tagged_as_the_modules_and_created_once_by_its_audit_id() -> None:
    decision = Decision(
        kind=DecisionKind.MEMBER_REMOVED,
        outcome=Outcome.SUCCESS,
        recorded_ms=1,
        user_id="@anna:a.org",
        actor_id=SERVICE,
    )
    resource = audit_event(
        decision, server_name="a.org", service_user_id=SERVICE, persons={}, patients={}
    )
    assert resource["meta"]["tag"] == [
        ORIGIN_TAG,
        {"system": AUDIT_ID_SYSTEM, "code": decision.audit_id},
    ]
    entry = bundle_entry(decision, resource)
    assert entry["request"] == {
        "method": "POST",
        "url": "AuditEvent",
        "ifNoneExist": f"_tag={AUDIT_ID_SYSTEM}|{decision.audit_id}",
    }
    assert entry["request"]["ifNoneExist"] == if_none_exist(decision.audit_id)
    assert entry["fullUrl"].startswith("urn:uuid:")
    assert entry["resource"] == resource


def test_a_decision_with_nobody_named_is_the_homeservers_own() -> None:
    resource = event_of(kind=DecisionKind.POWER_LEVELS_SET, room_id=ROOM)
    (agent,) = resource["agent"]
    assert agent["who"]["type"] == "Device"
