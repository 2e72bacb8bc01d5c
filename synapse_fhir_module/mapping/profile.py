"""What ``communication.profile: ozo`` asks of the resources recording writes: the OZO
implementation guide's ``OZOCommunication`` and ``OZOCommunicationRequest`` (FHIR R4), as
pure checks of plain FHIR JSON.

The checks cover what the guide constrains in what the module fills in: cardinalities,
that a reference carries both ``reference`` and ``type``, and which resource types it may
name. The writer runs them on every resource that declares one of the profiles, so
nothing that claims a profile is sent without meeting it. Reasons name elements and rules,
never values (they end up in logs and dead letters).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping
from typing import Any

from synapse_fhir_module.fhir.conventions import PERSON_TYPES

OZO_COMMUNICATION = "http://ozoverbindzorg.nl/fhir/StructureDefinition/OZOCommunication"
OZO_COMMUNICATION_REQUEST = (
    "http://ozoverbindzorg.nl/fhir/StructureDefinition/OZOCommunicationRequest"
)

# The payload OZO requires where a message has none to give: fixed, non-clinical words,
# so the record never suggests they are what someone wrote.
WITHDRAWN_PLACEHOLDER = "Message withdrawn"
ENCRYPTED_PLACEHOLDER = "Encrypted message; the text is not in the care record"

# A sender or requester is an individual ...
INDIVIDUALS = frozenset(PERSON_TYPES)
# ... a message or thread is addressed to individuals or teams (OZOCareTeam and
# OZOOrganizationalCareTeam are both CareTeams); a Patient is not among them.
ADDRESSEES = frozenset({"Practitioner", "RelatedPerson", "CareTeam"})
THREADS = frozenset({"CommunicationRequest"})
PATIENTS = frozenset({"Patient"})


def declares(resource: Mapping[str, Any], profile: str) -> bool:
    """Whether ``resource`` claims ``profile`` in ``meta.profile``."""
    meta = resource.get("meta")
    profiles = meta.get("profile") if isinstance(meta, Mapping) else None
    return isinstance(profiles, list) and profile in profiles


def declare(resource: dict[str, Any], profile: str) -> None:
    """Add ``profile`` to ``resource``'s ``meta.profile`` (once)."""
    meta = resource.setdefault("meta", {})
    profiles = meta.setdefault("profile", [])
    if profile not in profiles:
        profiles.append(profile)


def undeclare(resource: dict[str, Any], profile: str) -> None:
    """Remove ``profile`` from ``resource``'s ``meta.profile`` (and an empty list)."""
    meta = resource.get("meta")
    if not isinstance(meta, dict):
        return
    profiles = meta.get("profile")
    if not isinstance(profiles, list) or profile not in profiles:
        return
    kept = [p for p in profiles if p != profile]
    if kept:
        meta["profile"] = kept
    else:
        del meta["profile"]


def communication_problems(resource: Mapping[str, Any]) -> list[str]:
    """Where ``resource`` falls short of OZOCommunication (empty: it meets it)."""
    problems = []
    part_of = _items(resource.get("partOf"))
    if not part_of:
        problems.append("partOf: at least one thread required")
    for reference in part_of:
        problems += _reference_problems("partOf", reference, THREADS)
    problems += _required_reference("sender", resource.get("sender"), INDIVIDUALS)
    for reference in _items(resource.get("recipient")):
        problems += _reference_problems("recipient", reference, ADDRESSEES, type_required=False)
    payload = _items(resource.get("payload"))
    if not payload:
        problems.append("payload: at least one required")
    for item in payload:
        problems += _content_problems(item)
    return problems


def request_problems(resource: Mapping[str, Any]) -> list[str]:
    """Where ``resource`` falls short of OZOCommunicationRequest (empty: it meets it)."""
    problems = []
    if not isinstance(resource.get("status"), str) or not resource["status"]:
        problems.append("status: required")
    problems += _required_reference("subject", resource.get("subject"), PATIENTS)
    problems += _required_reference("requester", resource.get("requester"), INDIVIDUALS)
    recipients = _items(resource.get("recipient"))
    if not recipients:
        problems.append("recipient: at least one required")
    for reference in recipients:
        problems += _reference_problems("recipient", reference, ADDRESSEES)
    if "sender" in resource:
        problems += _required_reference("sender", resource.get("sender"), INDIVIDUALS)
    return problems


def _required_reference(path: str, value: Any, allowed: Collection[str]) -> list[str]:
    if value is None:
        return [f"{path}: required"]
    return _reference_problems(path, value, allowed)


def _reference_problems(
    path: str, value: Any, allowed: Collection[str], *, type_required: bool = True
) -> list[str]:
    """A Reference with a relative ``reference`` ("Type/id") of an allowed type, whose
    ``type`` (required unless said otherwise) agrees with it."""
    if not isinstance(value, Mapping):
        return [f"{path}: not a Reference"]
    reference = value.get("reference")
    if not isinstance(reference, str) or not _relative(reference):
        return [f"{path}.reference: required, as Type/id"]
    named = reference.split("/", 1)[0]
    kind = value.get("type")
    if kind is None and not type_required:
        kind = named
    if not isinstance(kind, str) or kind not in allowed:
        return [f"{path}.type: required, one of {', '.join(sorted(allowed))}"]
    if kind != named:
        return [f"{path}: reference and type name different resource types"]
    return []


def _content_problems(item: Mapping[str, Any]) -> list[str]:
    kinds = [key for key in item if isinstance(key, str) and key.startswith("content")]
    if kinds == ["contentString"]:
        text = item["contentString"]
        return [] if isinstance(text, str) and text else ["payload.contentString: empty"]
    if kinds == ["contentAttachment"] and isinstance(item["contentAttachment"], Mapping):
        return []
    return ["payload.content[x]: one contentString or contentAttachment"]


def _relative(reference: str) -> bool:
    parts = reference.split("/")
    return len(parts) == 2 and all(parts) and "://" not in reference


def _items(value: Any) -> list[Mapping[str, Any]]:
    """The list's entries (a non-object entry counts as a malformed one)."""
    if not isinstance(value, list):
        return []
    return [item if isinstance(item, Mapping) else {} for item in value]
