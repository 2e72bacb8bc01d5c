"""Unread markers as FHIR Tasks (``communication.unread_tasks``), as pure functions.

Per thread and person one Task, found again by its identifier (the thread and the
person): ``requested`` while the thread's latest message is one the person has not read,
``completed`` once one of their accounts has read up to it (or posted it), ``cancelled``
when they are no longer a member. ``focus`` is that latest message's Communication.
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

import attr

from synapse_fhir_module.communication_mapping import ORIGIN_TAG
from synapse_fhir_module.communication_profile import declare
from synapse_fhir_module.config import CommunicationProfile

UNREAD_TASK_SYSTEM = "urn:synapse-fhir-module:unread"
OZO_TASK = "http://ozoverbindzorg.nl/fhir/StructureDefinition/OZOTask"
REQUESTED = "requested"
COMPLETED = "completed"
CANCELLED = "cancelled"
# OZOTask.owner may only be one of these (a patient's Task is written without the claim).
OZO_OWNER_TYPES = frozenset({"Practitioner", "RelatedPerson"})


@attr.s(frozen=True, auto_attribs=True)
class LatestMessage:
    """The newest message of a thread that FHIR holds as a Communication."""

    event_id: str
    sent_ms: int  # origin_server_ts
    sender: str  # the Matrix account that posted it
    communication: str  # "Communication/<id>"


@attr.s(frozen=True, auto_attribs=True)
class ReadMarker:
    """How far an account has read a room (its ``m.fully_read`` marker)."""

    event_id: str
    # The marked event's origin_server_ts; None when the module never saw that event.
    sent_ms: int | None


@attr.s(frozen=True, auto_attribs=True)
class TaskState:
    status: str  # REQUESTED | COMPLETED | CANCELLED
    focus: str | None  # "Communication/<id>"


def has_read(latest: LatestMessage, account: str, marker: ReadMarker | None) -> bool:
    """Whether ``account`` has read ``latest``: posted it, or marked it or a later event
    as read. A marker the module cannot place counts as not read (the Task stays open)."""
    if latest.sender == account:
        return True
    if marker is None:
        return False
    if marker.event_id == latest.event_id:
        return True
    # Strictly later: of two events in the same millisecond either may come first.
    return marker.sent_ms is not None and marker.sent_ms > latest.sent_ms


def task_changes(
    latest: LatestMessage,
    accounts_by_person: Mapping[str, Collection[str]],
    markers: Mapping[str, ReadMarker],
    written: Mapping[str, TaskState],
) -> dict[str, TaskState]:
    """Person → the state their Task must take, for those whose Task FHIR does not yet
    have in that state (``written``: what the module last wrote)."""
    wanted: dict[str, TaskState] = {}
    for person, accounts in accounts_by_person.items():
        read = any(has_read(latest, account, markers.get(account)) for account in accounts)
        wanted[person] = TaskState(COMPLETED if read else REQUESTED, latest.communication)
    for person, state in written.items():
        if person not in wanted and state.status != CANCELLED:
            wanted[person] = TaskState(CANCELLED, state.focus)  # left the thread
    return {person: state for person, state in wanted.items() if written.get(person) != state}


def task_key(thread: str, person: str) -> str:
    """The Task's identifier value: ``CommunicationRequest/5/Practitioner/7``."""
    return f"{thread}/{person}"


def task_entry(
    thread: str,
    person: str,
    patient: str | None,
    state: TaskState,
    *,
    modified: str,
    profile: CommunicationProfile = CommunicationProfile.BASE,
) -> dict[str, Any]:
    """A transaction entry: the conditional update of the person's Task in the thread
    (which creates it the first time).

    ``modified``: FHIR ``dateTime`` of now. Under the OZO profile the Task declares
    OZOTask when it can meet it (a patient to name, an owner OZO allows)."""
    owner_type = person.split("/", 1)[0]
    resource: dict[str, Any] = {
        "resourceType": "Task",
        "meta": {"tag": [dict(ORIGIN_TAG)]},
        "identifier": [{"system": UNREAD_TASK_SYSTEM, "value": task_key(thread, person)}],
        "basedOn": [{"reference": thread, "type": "CommunicationRequest"}],
        "status": state.status,
        "intent": "order",
        "owner": {"reference": person, "type": owner_type},
        "lastModified": modified,
    }
    if state.focus:
        resource["focus"] = {"reference": state.focus, "type": "Communication"}
    if patient:
        resource["for"] = {"reference": patient, "type": "Patient"}
    if (
        profile is CommunicationProfile.OZO
        and patient is not None
        and patient.startswith("Patient/")
        and owner_type in OZO_OWNER_TYPES
    ):
        declare(resource, OZO_TASK)
    return {
        "resource": resource,
        "request": {"method": "PUT", "url": f"Task?{task_search(thread, person)}"},
    }


def task_search(thread: str, person: str) -> str:
    return f"identifier={UNREAD_TASK_SYSTEM}|{task_key(thread, person)}"
