"""Matrix user ids ↔ FHIR persons (DESIGN §3), as pure functions on FHIR JSON.

A person (Practitioner, RelatedPerson or Patient) names its Matrix account either as
``telecom {system: "url", value: "matrix:u/alice:example.org"}`` (MSC2312 URI) or as
``identifier {system: "https://matrix.org/user-id", value: "@alice:example.org"}``.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from typing import Any

MATRIX_ID_SYSTEM = "https://matrix.org/user-id"
MATRIX_URI_PREFIX = "matrix:u/"
PERSON_TYPES = ("Practitioner", "RelatedPerson", "Patient")


def matrix_uri(user_id: str) -> str:
    """``@alice:example.org`` → ``matrix:u/alice:example.org``."""
    return MATRIX_URI_PREFIX + user_id.removeprefix("@")


def user_id_from_uri(uri: str) -> str | None:
    """``matrix:u/alice:example.org`` (with or without ``?action=...``) → ``@alice:example.org``."""
    if not uri.startswith(MATRIX_URI_PREFIX):
        return None
    rest = uri[len(MATRIX_URI_PREFIX) :].split("?", 1)[0].split("#", 1)[0]
    localpart, sep, server = rest.partition(":")
    if not localpart or not sep or not server:
        return None
    return f"@{localpart}:{server}"


def matrix_ids_of(person: Mapping[str, Any]) -> set[str]:
    """Every Matrix user id a person resource names, in either form."""
    found: set[str] = set()
    for telecom in _dicts(person.get("telecom")):
        if telecom.get("system") == "url" and isinstance(telecom.get("value"), str):
            user_id = user_id_from_uri(telecom["value"])
            if user_id:
                found.add(user_id)
    for identifier in _dicts(person.get("identifier")):
        value = identifier.get("value")
        if identifier.get("system") == MATRIX_ID_SYSTEM and isinstance(value, str):
            if value.startswith("@") and ":" in value:
                found.add(value)
    return found


def is_active(resource: Mapping[str, Any]) -> bool:
    """``active`` absent means active (FHIR's default reading for these resources)."""
    return resource.get("active", True) is not False


def person_searches(user_ids: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """FHIR token searches that find the persons naming any of ``user_ids``, in both forms.

    Six searches whatever the number of users: a comma ORs token values (Matrix ids
    contain no commas).
    """
    identifiers = ",".join(f"{MATRIX_ID_SYSTEM}|{user_id}" for user_id in user_ids)
    uris = ",".join(f"url|{matrix_uri(user_id)}" for user_id in user_ids)
    searches = []
    for resource_type in PERSON_TYPES:
        searches.append((resource_type, {"identifier": identifiers}))
        searches.append((resource_type, {"telecom": uris}))
    return searches


def _dicts(value: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Mapping)]
    return []
