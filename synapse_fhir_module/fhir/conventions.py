"""The FHIR conventions every part of the module shares, defined once: the identifier
systems and the tag the module writes, which resource types stand for people, and how a
reference, an id and a JSON array from elsewhere are read.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

# A Communication's identifier: the Matrix event it records (the conditional creates key).
EVENT_ID_SYSTEM = "https://matrix.org/event-id"
# Identifies the CommunicationRequest the module opened for a room (its thread).
ROOM_ID_SYSTEM = "https://matrix.org/room-id"
# A person's identifier naming their Matrix account.
MATRIX_ID_SYSTEM = "https://matrix.org/user-id"
# A homeserver's server name (an AuditEvent's observer: the homeserver that decided).
SERVER_NAME_SYSTEM = "https://matrix.org/server-name"
# Names one audit journal row; an AuditEvent carries it as a tag (R4's AuditEvent has no
# identifier), which the conditional create searches on so a retry never writes twice.
AUDIT_ID_SYSTEM = "urn:synapse-fhir-module:audit-id"
# Marks what this module wrote, so it is never relayed back into Matrix (no loops).
ORIGIN_TAG = {"system": "urn:synapse-fhir-module:origin", "code": "matrix"}

# The resources that are a person (and can name a Matrix account).
PERSON_TYPES = ("Practitioner", "RelatedPerson", "Patient")
# What a CareTeam participant can be that makes people members: a person, or a
# PractitionerRole (its practitioner, while the role is active).
MEMBER_TYPES = ("Practitioner", "PractitionerRole", "RelatedPerson", "Patient")

RESOURCE_TYPE = re.compile(r"[A-Z][A-Za-z]{0,63}")
# FHIR's id: 1 to 64 of letters, digits, "-" and ".".
FHIR_ID = re.compile(r"[A-Za-z0-9\-.]{1,64}")


def is_fhir_id(value: Any) -> bool:
    return isinstance(value, str) and FHIR_ID.fullmatch(value) is not None


def reference_of(value: Any) -> str | None:
    """``{"reference": "Practitioner/12"}`` (or ``.../_history/3``) → ``Practitioner/12``.

    None for anything else: absolute URLs (not ours to follow), contained references,
    and a type or id FHIR's grammar does not allow.
    """
    if not isinstance(value, Mapping):
        return None
    ref = value.get("reference")
    if not isinstance(ref, str) or "://" in ref:
        return None
    parts = ref.split("/")
    if len(parts) not in (2, 4) or (len(parts) == 4 and parts[2] != "_history"):
        return None
    if not RESOURCE_TYPE.fullmatch(parts[0]) or not is_fhir_id(parts[1]):
        return None
    return f"{parts[0]}/{parts[1]}"


def dicts_in(value: Any) -> list[Mapping[str, Any]]:
    """The mappings in a JSON list (FHIR arrays from elsewhere may hold anything)."""
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Mapping)]
    return []
