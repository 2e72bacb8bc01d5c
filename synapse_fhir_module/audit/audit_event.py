"""A journal row as an R4 AuditEvent (pure: plain data in, plain JSON out; docs/audit.md).

The shape follows the OZO guide's AuditEvents (``type`` from DICOM/HL7, the acting person
as a typed reference with ``requestor``, ``source.observer`` a Device, each resource of
the patient's network as an ``entity`` with its resource type and object role) and answers
NEN 7513's questions: who (``agent``), which patient's network (the CareTeam, its subject
Patient, the thread and the room as ``entity``), what (``type``, ``subtype``, ``action``),
when (``recorded``) and how it ended (``outcome``, ``outcomeDesc``: the reason code).

What it never carries: a message's text, a name, an email address. A Matrix user id is
there (``agent.altId``, ``agent.who.identifier``): it is how the user is known on Matrix.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.fhir.conventions import (
    AUDIT_ID_SYSTEM,
    MATRIX_ID_SYSTEM,
    ORIGIN_TAG,
    PERSON_TYPES,
    ROOM_ID_SYSTEM,
    SERVER_NAME_SYSTEM,
)
from synapse_fhir_module.fhir.dates import format_fhir_instant

DCM = "http://dicom.nema.org/resources/ontology/DCM"
EVENT_TYPES = "http://terminology.hl7.org/CodeSystem/audit-event-type"
SOURCE_TYPES = "http://terminology.hl7.org/CodeSystem/security-source-type"
ENTITY_TYPES = "http://terminology.hl7.org/CodeSystem/audit-entity-type"
OBJECT_ROLES = "http://terminology.hl7.org/CodeSystem/object-role"
RESOURCE_TYPES = "http://hl7.org/fhir/resource-types"
# The module's own codes: which decision (``subtype[0]``), and what was attempted or how
# an identity was established (``subtype[1]``, when there is such a code).
DECISION_SYSTEM = "urn:synapse-fhir-module:audit-decision"
DETAIL_SYSTEM = "urn:synapse-fhir-module:audit-detail"

# kind → (type: system, code, display; action)
_TYPES: dict[DecisionKind, tuple[str, str, str, str]] = {
    # Someone was refused access to a care-team room: a security alert, an execute.
    DecisionKind.ACCESS_REFUSED: (DCM, "110113", "Security Alert", "E"),
    # An account's registration went through the identity gate.
    DecisionKind.REGISTRATION: (DCM, "110114", "User Authentication", "E"),
    # Who may read a patient's network changed (membership, power levels).
    DecisionKind.MEMBER_INVITED: (DCM, "110136", "Security Roles Changed", "C"),
    DecisionKind.MEMBER_REMOVED: (DCM, "110136", "Security Roles Changed", "D"),
    DecisionKind.MEMBER_BANNED: (DCM, "110136", "Security Roles Changed", "D"),
    DecisionKind.MEMBER_UNBANNED: (DCM, "110136", "Security Roles Changed", "U"),
    DecisionKind.POWER_LEVELS_SET: (DCM, "110136", "Security Roles Changed", "U"),
    # A Communication from the record was read out of FHIR and posted into Matrix.
    DecisionKind.MESSAGE_RELAYED: (DCM, "110106", "Export", "R"),
}
_DECISION_DISPLAY = {
    DecisionKind.ACCESS_REFUSED: "Access refused by a care-team rule",
    DecisionKind.REGISTRATION: "Registration through the FHIR identity gate",
    DecisionKind.MEMBER_INVITED: "Invited to a care-team room",
    DecisionKind.MEMBER_REMOVED: "Removed from a care-team room",
    DecisionKind.MEMBER_BANNED: "Banned from a care-team room",
    DecisionKind.MEMBER_UNBANNED: "Ban lifted in a care-team room",
    DecisionKind.POWER_LEVELS_SET: "Power levels set from the care team",
    DecisionKind.MESSAGE_RELAYED: "Communication relayed into a room",
}
# A code as the module writes them ("join", "not_in_care_team", "email"): anything else in
# a row (it came from a table) is left out rather than written.
_CODE = re.compile(r"[a-z][a-z0-9_]{0,63}")
_REFERENCE = re.compile(r"([A-Z][A-Za-z]{0,63})/([A-Za-z0-9\-.]{1,64})")


def audit_event(
    decision: Decision,
    *,
    server_name: str,
    service_user_id: str,
    persons: Mapping[str, str],
    patients: Mapping[str, str],
) -> dict[str, Any]:
    """``decision`` as an AuditEvent.

    ``persons``: Matrix user id → its FHIR person ("Practitioner/12"), for those known;
    ``patients``: "CareTeam/…" → its subject ("Patient/5"), for those known.
    """
    type_system, type_code, type_display, action = _TYPES[decision.kind]
    subtype = [
        {
            "system": DECISION_SYSTEM,
            "code": decision.kind.value,
            "display": _DECISION_DISPLAY[decision.kind],
        }
    ]
    detail = decision.detail
    coded = decision.kind in (DecisionKind.ACCESS_REFUSED, DecisionKind.REGISTRATION)
    if coded and detail is not None and _is_code(detail):
        subtype.append({"system": DETAIL_SYSTEM, "code": detail})
    event: dict[str, Any] = {
        "resourceType": "AuditEvent",
        "meta": {"tag": [dict(ORIGIN_TAG), {"system": AUDIT_ID_SYSTEM, "code": decision.audit_id}]},
        "type": {"system": type_system, "code": type_code, "display": type_display},
        "subtype": subtype,
        "action": action,
        "recorded": format_fhir_instant(
            datetime.fromtimestamp(decision.recorded_ms / 1000, tz=timezone.utc)
        ),
        "outcome": "0" if decision.outcome is Outcome.SUCCESS else "4",
    }
    if decision.outcome is Outcome.REFUSED:
        event["outcomeDesc"] = decision.reason if _is_code(decision.reason) else "refused"
    event["agent"] = _agents(decision, service_user_id, persons)
    event["source"] = {
        "site": server_name,
        "observer": {
            "type": "Device",
            "identifier": {"system": SERVER_NAME_SYSTEM, "value": server_name},
        },
        "type": [{"system": SOURCE_TYPES, "code": "4", "display": "Application Server"}],
    }
    entities = _entities(decision, patients)
    if entities:
        event["entity"] = entities
    return event


def bundle_entry(decision: Decision, resource: Mapping[str, Any]) -> dict[str, Any]:
    """A transaction entry creating ``resource`` unless FHIR has this decision already."""
    return {
        "fullUrl": f"urn:uuid:{_uuid_of(decision.audit_id)}",
        "resource": dict(resource),
        "request": {
            "method": "POST",
            "url": "AuditEvent",
            "ifNoneExist": if_none_exist(decision.audit_id),
        },
    }


def if_none_exist(audit_id: str) -> str:
    return f"_tag={AUDIT_ID_SYSTEM}|{audit_id}"


def _agents(
    decision: Decision, service_user_id: str, persons: Mapping[str, str]
) -> list[dict[str, Any]]:
    actor = decision.actor_id or decision.user_id
    agents = []
    if actor is not None:
        agents.append(_agent(actor, service_user_id, persons, requestor=True))
    if decision.user_id is not None and decision.user_id != actor:
        agents.append(_agent(decision.user_id, service_user_id, persons, requestor=False))
    if not agents:  # (R4 requires one: the homeserver itself decided)
        agents.append(_agent(service_user_id, service_user_id, persons, requestor=True))
    return agents


def _agent(
    user_id: str, service_user_id: str, persons: Mapping[str, str], *, requestor: bool
) -> dict[str, Any]:
    matrix_id = {"system": MATRIX_ID_SYSTEM, "value": user_id}
    if user_id == service_user_id:
        # The module's own account: an application (a Device), known by its Matrix id.
        return {
            "type": {"coding": [{"system": DCM, "code": "110150", "display": "Application"}]},
            "who": {"type": "Device", "identifier": matrix_id},
            "altId": user_id,
            "requestor": requestor,
        }
    who: dict[str, Any] = {"identifier": matrix_id}
    person = persons.get(user_id)
    if person is not None and _is_reference(person, PERSON_TYPES):
        who = {"reference": person, "type": person.partition("/")[0], "identifier": matrix_id}
    role = ("110153", "Source Role ID") if requestor else ("110152", "Destination Role ID")
    return {
        "type": {"coding": [{"system": DCM, "code": role[0], "display": role[1]}]},
        "who": who,
        "altId": user_id,
        "requestor": requestor,
    }


def _entities(decision: Decision, patients: Mapping[str, str]) -> list[dict[str, Any]]:
    entities = []
    if decision.care_team and _is_reference(decision.care_team, ("CareTeam",)):
        patient = patients.get(decision.care_team)
        if patient is not None and _is_reference(patient, ("Patient",)):
            entities.append(_resource_entity(patient, role=("1", "Patient")))
        entities.append(_resource_entity(decision.care_team))
    if decision.request and _is_reference(decision.request, ("CommunicationRequest",)):
        entities.append(_resource_entity(decision.request))
    relayed = decision.kind is DecisionKind.MESSAGE_RELAYED
    if relayed and decision.detail and _is_reference(decision.detail, ("Communication",)):
        entities.append(_resource_entity(decision.detail))
    if decision.room_id:
        # A room is no FHIR resource: named by its id. Where a message went (a relay), or
        # whose access it governs (everything else).
        role = ("16", "Data Destination") if relayed else ("13", "Security Resource")
        entities.append(
            {
                "what": {"identifier": {"system": ROOM_ID_SYSTEM, "value": decision.room_id}},
                "type": {"system": ENTITY_TYPES, "code": "2", "display": "System Object"},
                "role": {"system": OBJECT_ROLES, "code": role[0], "display": role[1]},
            }
        )
    return entities


def _resource_entity(reference: str, role: tuple[str, str] = ("4", "Domain Resource")) -> dict:
    resource_type = reference.partition("/")[0]
    return {
        "what": {"reference": reference, "type": resource_type},
        "type": {"system": RESOURCE_TYPES, "code": resource_type, "display": resource_type},
        "role": {"system": OBJECT_ROLES, "code": role[0], "display": role[1]},
    }


def _is_code(value: str | None) -> bool:
    return value is not None and _CODE.fullmatch(value) is not None


def _is_reference(value: str, types: tuple[str, ...]) -> bool:
    found = _REFERENCE.fullmatch(value)
    return found is not None and found.group(1) in types


def _uuid_of(audit_id: str) -> uuid.UUID:
    try:
        return uuid.UUID(hex=audit_id)
    except ValueError:
        return uuid.uuid5(uuid.NAMESPACE_URL, AUDIT_ID_SYSTEM + "|" + audit_id)
