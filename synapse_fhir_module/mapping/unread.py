"""Unread markers as FHIR Tasks (``communication.unread_tasks``), as pure functions.

Per thread and person one Task, at an id made from the thread and the person (so there is
never a second one to choose from) and with them as its identifier: ``requested`` while
the thread's latest message is one the person has not read, ``completed`` once one of
their accounts has read up to it (or posted it), ``cancelled`` when they are no longer a
member. ``focus`` is that latest message's Communication.
"""

from __future__ import annotations

import hashlib
from collections.abc import Collection, Mapping
from typing import Any

import attr

from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir.conventions import ORIGIN_TAG
from synapse_fhir_module.mapping.profile import declare

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
    # When this server got it (never the sender's own origin_server_ts, which a remote
    # server or an appservice chooses): what markers are placed against.
    arrived_ms: int
    sender: str  # the Matrix account that posted it
    communication: str  # "Communication/<id>"
    # The Communication's sender ("Practitioner/7"), when it names one: a message relayed
    # from the person's own OZO app is theirs, though the service user posted it.
    author: str | None = None


@attr.s(frozen=True, auto_attribs=True)
class ReadMarker:
    """How far an account has read a room (its ``m.fully_read`` marker)."""

    event_id: str
    # When this server got the marked event; None when the module never saw it.
    arrived_ms: int | None


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
    return marker.arrived_ms is not None and marker.arrived_ms > latest.arrived_ms


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
        read = person == latest.author or any(
            has_read(latest, account, markers.get(account)) for account in accounts
        )
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
    """A transaction entry: the update of the person's Task in the thread, at its own id
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
    resource["id"] = task_id(thread, person)
    return {"resource": resource, "request": {"method": "PUT", "url": f"Task/{resource['id']}"}}


def task_id(thread: str, person: str) -> str:
    """``unread-`` and a digest of the thread and the person: a valid FHIR id (letters, so
    servers that allow only such client ids take it) that no other pair gets."""
    digest = hashlib.sha256(task_key(thread, person).encode()).hexdigest()[:40]
    return f"unread-{digest}"
