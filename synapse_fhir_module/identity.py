"""Matrix user ids ↔ FHIR persons (DESIGN §3), as pure functions on FHIR JSON.

A person (Practitioner, RelatedPerson or Patient) names its Matrix account either as
``telecom {system: "url", value: "matrix:u/alice:example.org"}`` (MSC2312 URI) or as
``identifier {system: "https://matrix.org/user-id", value: "@alice:example.org"}``.
Its email addresses are its ``telecom {system: "email"}`` entries.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from synapse_fhir_module.fhir_time import period_covers

MATRIX_ID_SYSTEM = "https://matrix.org/user-id"
MATRIX_URI_PREFIX = "matrix:u/"
EMAIL_TELECOM_SYSTEM = "email"
PERSON_TYPES = ("Practitioner", "RelatedPerson", "Patient")


def matrix_uri(user_id: str) -> str:
    """``@alice:example.org`` → ``matrix:u/alice:example.org``."""
    return MATRIX_URI_PREFIX + user_id.removeprefix("@")


def user_id_from_uri(uri: str) -> str | None:
    """``matrix:u/alice:example.org`` → ``@alice:example.org``.

    Only that exact form: the module finds persons by searching FHIR for it, token by
    token, so a form the search cannot find (``?action=chat``, a fragment) must not name
    an account here either — or a username FHIR seems not to name at registration would
    later turn out to be somebody's.
    """
    if not uri.startswith(MATRIX_URI_PREFIX):
        return None
    rest = uri[len(MATRIX_URI_PREFIX) :]
    if "?" in rest or "#" in rest or rest != rest.strip():
        return None
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


def normalise_email(address: str) -> str:
    """The form in which two email addresses are compared: trimmed, case-insensitive."""
    return address.strip().casefold()


def emails_of(person: Mapping[str, Any]) -> set[str]:
    """Every email address a person carries, normalised (``normalise_email``).

    The one place that says where a person's addresses are, so that more places (e.g.
    identifier systems) can be added here alone.
    """
    found: set[str] = set()
    now = datetime.now(timezone.utc)
    for telecom in _dicts(person.get("telecom")):
        value = telecom.get("value")
        if telecom.get("system") != EMAIL_TELECOM_SYSTEM or not isinstance(value, str):
            continue
        if telecom.get("use") == "old" or not period_covers(telecom.get("period"), now):
            continue  # an address the person no longer has (a successor may read it)
        address = normalise_email(value)
        if address:
            found.add(address)
    return found


def is_active(resource: Mapping[str, Any]) -> bool:
    """``active`` absent means active (FHIR's default reading for these resources); anything
    but ``true`` or absent (``false``, or a malformed ``"false"``) is not active."""
    return resource.get("active", True) is True


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


def email_searches(address: str) -> list[tuple[str, dict[str, str]]]:
    """FHIR searches (the ``email`` parameter) for the persons carrying ``address``.

    Only candidates: how a server matches tokens (case, spaces) is its own affair, so
    the caller checks what comes back with ``emails_of``.
    """
    value = _escape_search_value(address.strip())
    return [(resource_type, {"email": value}) for resource_type in PERSON_TYPES]


def _escape_search_value(value: str) -> str:
    # FHIR search syntax: a bare "|" would split system from value, a "," OR two values.
    for special in ("\\", "|", ",", "$"):
        value = value.replace(special, "\\" + special)
    return value


def _dicts(value: Any) -> Iterable[Mapping[str, Any]]:
    if isinstance(value, list):
        return [item for item in value if isinstance(item, Mapping)]
    return []
