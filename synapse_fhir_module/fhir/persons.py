"""Matrix user ids ↔ FHIR persons (design.md: mapping), as pure functions on FHIR JSON.

A person (Practitioner, RelatedPerson or Patient) names its Matrix account explicitly as
``telecom {system: "url", value: "matrix:u/alice:example.org"}`` (MSC2312 URI), as
``identifier {system: "https://matrix.org/user-id", value: "@alice:example.org"}``, or
(the Nuts proposal) as ``telecom {system: "other", value: "@alice:example.org"}`` marked
with a ``contactpoint-purpose`` extension whose value is ``matrix-messaging``.
Its email addresses are its ``telecom {system: "email"}`` entries and the identifiers
whose system the operator lists (``identity.email_identifier_systems``; OZO puts a
practitioner's address there). Which account an address makes a person's is decided
elsewhere (``person_directory``); here are only the readings of one resource.
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM, PERSON_TYPES, dicts_in
from synapse_fhir_module.fhir.dates import period_covers

MATRIX_URI_PREFIX = "matrix:u/"
EMAIL_TELECOM_SYSTEM = "email"
# The Nuts proposal's mark on a ``telecom {system: "other"}`` that holds a Matrix id. Any
# publisher's ``contactpoint-purpose`` extension counts (HL7's and Nictiz's share the name).
PURPOSE_EXTENSION_SUFFIX = "/contactpoint-purpose"
MATRIX_MESSAGING = "matrix-messaging"


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
    """Every Matrix user id a person resource names, in any of the three forms."""
    found: set[str] = set()
    for telecom in dicts_in(person.get("telecom")):
        value = telecom.get("value")
        if not isinstance(value, str):
            continue
        if telecom.get("system") == "url":
            user_id = user_id_from_uri(value)
            if user_id:
                found.add(user_id)
        elif telecom.get("system") == "other" and _for_matrix_messaging(telecom):
            if is_user_id(value):
                found.add(value)
    for identifier in dicts_in(person.get("identifier")):
        value = identifier.get("value")
        if identifier.get("system") == MATRIX_ID_SYSTEM and isinstance(value, str):
            if value.startswith("@") and ":" in value:
                found.add(value)
    return found


def is_user_id(value: str) -> bool:
    """``@localpart:server`` with nothing around it (what a FHIR search can find exactly)."""
    localpart, sep, server = value.removeprefix("@").partition(":")
    return (
        value.startswith("@")
        and bool(localpart and sep and server)
        and not any(c.isspace() or c in "?#|," for c in value)
    )


def _for_matrix_messaging(telecom: Mapping[str, Any]) -> bool:
    for extension in dicts_in(telecom.get("extension")):
        url = extension.get("url")
        if isinstance(url, str) and url.endswith(PURPOSE_EXTENSION_SUFFIX):
            if MATRIX_MESSAGING in _codes_of(extension):
                return True
    return False


def _codes_of(extension: Mapping[str, Any]) -> set[str]:
    """The codes an extension's value carries, whichever value[x] it uses."""
    codes = set()
    for key in ("valueCode", "valueString"):
        if isinstance(extension.get(key), str):
            codes.add(extension[key])
    codings = list(dicts_in(extension.get("valueCodeableConcept", {}).get("coding")))
    if isinstance(extension.get("valueCoding"), Mapping):
        codings.append(extension["valueCoding"])
    codes.update(c["code"] for c in codings if isinstance(c.get("code"), str))
    return codes


def normalise_email(address: str) -> str:
    """The form in which two email addresses are compared — Synapse's own canonical form of
    an account's address (MSC2265): trimmed, the local part case-folded, the domain lower
    case. Anything but one ``@`` with text on both sides is no address: ``""``.

    (Case-folding the domain too would make ``fußpflege.de`` and ``fusspflege.de``, two
    domains with two owners, one address.)"""
    local, sep, domain = address.strip().partition("@")
    if not local or not sep or not domain or "@" in domain:
        return ""
    return f"{local.casefold()}@{domain.lower()}"


def emails_of(person: Mapping[str, Any], identifier_systems: Collection[str] = ()) -> set[str]:
    """Every email address a person carries, normalised (``normalise_email``): its current
    email ``telecom`` entries and its identifiers of ``identifier_systems``.

    The one place that says where a person's addresses are.
    """
    found: set[str] = set()
    now = datetime.now(timezone.utc)
    for identifier in dicts_in(person.get("identifier")):
        value = identifier.get("value")
        if identifier.get("system") in identifier_systems and isinstance(value, str):
            if period_covers(identifier.get("period"), now) and identifier.get("use") != "old":
                address = normalise_email(value)
                if _looks_like_email(address):
                    found.add(address)
    for telecom in dicts_in(person.get("telecom")):
        value = telecom.get("value")
        if telecom.get("system") != EMAIL_TELECOM_SYSTEM or not isinstance(value, str):
            continue
        if telecom.get("use") == "old" or not period_covers(telecom.get("period"), now):
            continue  # an address the person no longer has (a successor may read it)
        address = normalise_email(value)
        if _looks_like_email(address):
            found.add(address)
    return found


def _looks_like_email(address: str) -> bool:
    """One plain ``local@domain``: what a mailer delivers to exactly as written. (Display
    names, comments, lists or quotes would let two spellings reach one mailbox.)"""
    local, sep, domain = address.rpartition("@")
    return (
        bool(local and sep and domain)
        and "." in domain
        and not any(c.isspace() or c in _NOT_IN_PLAIN_ADDRESS or ord(c) < 32 for c in address)
    )


_NOT_IN_PLAIN_ADDRESS = frozenset('()<>,;:"[]\\')


def is_active(resource: Mapping[str, Any]) -> bool:
    """``active`` absent means active (FHIR's default reading for these resources); anything
    but ``true`` or absent (``false``, or a malformed ``"false"``) is not active."""
    return resource.get("active", True) is True


def person_searches(user_ids: Sequence[str]) -> list[tuple[str, dict[str, str]]]:
    """FHIR token searches that find the persons naming any of ``user_ids``, in all three
    forms (see ``identity_searches``)."""
    return identity_searches(user_ids, ())


def email_searches(
    addresses: Iterable[str], identifier_systems: Collection[str] = ()
) -> list[tuple[str, dict[str, str]]]:
    """FHIR token searches for the persons carrying any of ``addresses`` (see
    ``identity_searches``)."""
    return identity_searches((), addresses, identifier_systems)


def identity_searches(
    user_ids: Sequence[str],
    addresses: Iterable[str],
    identifier_systems: Collection[str] = (),
) -> list[tuple[str, dict[str, str]]]:
    """FHIR token searches that find, at once, the persons naming any of ``user_ids``
    (three forms) and those carrying any of ``addresses`` (``telecom`` with system
    ``email``, identifiers of ``identifier_systems``): per person type at most two,
    ``identifier`` and ``telecom``, each ORing its tokens with commas.

    Only candidates: how a server matches tokens (case, spaces) is its own affair, so
    the caller checks what comes back (``matrix_ids_of``, ``emails_of``). Matrix ids are
    checked by ``is_user_id`` (no comma or bar); addresses are escaped.
    """
    user_ids = [user_id for user_id in user_ids if is_user_id(user_id)]
    values = sorted({_escape_search_value(a.strip()) for a in addresses} - {""})
    identifiers = [f"{MATRIX_ID_SYSTEM}|{user_id}" for user_id in user_ids]
    for system in sorted(identifier_systems):
        identifiers += [f"{_escape_search_value(system)}|{value}" for value in values]
    telecoms = [
        token
        for user_id in user_ids
        for token in (f"url|{matrix_uri(user_id)}", f"other|{user_id}")
    ]
    telecoms += [f"{EMAIL_TELECOM_SYSTEM}|{value}" for value in values]
    searches = []
    for resource_type in PERSON_TYPES:
        for chunk in _joined(identifiers):
            searches.append((resource_type, {"identifier": chunk}))
        for chunk in _joined(telecoms):
            searches.append((resource_type, {"telecom": chunk}))
    return searches


# Longest value of one search parameter: servers refuse URLs over 8 KiB (Jetty's and
# Tomcat's default), and the URL also carries the base and the escaping.
MAX_SEARCH_VALUE = 1500


def _joined(tokens: Sequence[str]) -> list[str]:
    """Tokens ORed with commas, split into values of at most ``MAX_SEARCH_VALUE``
    characters (a token longer than that is not searched for: no real address is)."""
    chunks: list[str] = []
    current = ""
    for token in tokens:
        if len(token) > MAX_SEARCH_VALUE:
            continue
        if current and len(current) + 1 + len(token) > MAX_SEARCH_VALUE:
            chunks.append(current)
            current = ""
        current = f"{current},{token}" if current else token
    if current:
        chunks.append(current)
    return chunks


def _escape_search_value(value: str) -> str:
    # FHIR search syntax: a bare "|" would split system from value, a "," OR two values.
    for special in ("\\", "|", ",", "$"):
        value = value.replace(special, "\\" + special)
    return value
