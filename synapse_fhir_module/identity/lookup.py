"""Identity Service API v2 lookups as pure functions: request bodies, hashing, and which
known address each looked-up entry stands for (``identity.service`` serves them).

A client hashes ``"<address> <medium> <pepper>"`` with SHA-256 and sends it URL-safe
base64 without padding (``sha256``), or sends ``"<address> <medium>"`` as it is
(``none``). Hashes cannot be reversed, so the server hashes the addresses it knows
(``AddressIndex``) and matches; an entry that matches nothing is simply absent from the
answer. Only the ``email`` medium resolves here.
"""

from __future__ import annotations

import base64
import hashlib
import secrets
import string
from collections.abc import Iterable, Mapping
from typing import Any

import attr
from synapse.module_api.errors import Codes, SynapseError

from synapse_fhir_module.fhir.persons import normalise_email

SHA256 = "sha256"
NONE = "none"
ALGORITHMS = (SHA256, NONE)
EMAIL = "email"

# One request looks up at most this many entries (Element looks up one address at a time;
# a phone book of a thousand is a lot). More is refused, not truncated.
MAX_ADDRESSES = 1000
# An email address has at most 254 characters; a hash 43.
MAX_ENTRY_CHARS = 512
MAX_PEPPER_CHARS = 256

# The identity-service spec's own code for a request that lacks a field (Synapse's
# Codes.MISSING_PARAM is the client-server API's singular form).
MISSING_PARAMS = "M_MISSING_PARAMS"
INVALID_PEPPER = "M_INVALID_PEPPER"

_PEPPER_ALPHABET = string.ascii_letters + string.digits
PEPPER_LENGTH = 32


def lookup_hash(address: str, medium: str, pepper: str) -> str:
    """The ``sha256`` form of an address: base64url, unpadded, of
    ``sha256("<address> <medium> <pepper>")``."""
    digest = hashlib.sha256(f"{address} {medium} {pepper}".encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


def new_pepper() -> str:
    """A random pepper of letters and digits (nothing a client could mangle)."""
    return "".join(secrets.choice(_PEPPER_ALPHABET) for _ in range(PEPPER_LENGTH))


@attr.s(frozen=True, auto_attribs=True)
class LookupRequest:
    algorithm: str
    pepper: str
    addresses: tuple[str, ...]


def parse_lookup_request(body: Any, *, max_addresses: int = MAX_ADDRESSES) -> LookupRequest:
    """The body of ``POST /lookup``: ``{"algorithm", "pepper", "addresses"}``.

    Raises SynapseError 400: ``M_MISSING_PARAMS`` (naming what is missing) or
    ``M_INVALID_PARAM`` (an unknown algorithm, wrong types, too many or too long
    entries). The pepper is checked against the server's by ``check_pepper``.
    """
    if not isinstance(body, Mapping):
        raise SynapseError(
            400, 'Expected a JSON object {"algorithm", "pepper", "addresses"}', Codes.BAD_JSON
        )
    missing = [key for key in ("algorithm", "pepper", "addresses") if key not in body]
    if missing:
        raise SynapseError(400, f"Missing: {', '.join(missing)}", MISSING_PARAMS)
    algorithm, pepper, addresses = body["algorithm"], body["pepper"], body["addresses"]
    if not isinstance(algorithm, str) or algorithm not in ALGORITHMS:
        raise _invalid(f"'algorithm' must be one of {', '.join(ALGORITHMS)}")
    if not isinstance(pepper, str) or len(pepper) > MAX_PEPPER_CHARS:
        raise _invalid("'pepper' must be the string /hash_details gave")
    if not isinstance(addresses, list) or not all(isinstance(a, str) for a in addresses):
        raise _invalid("'addresses' must be a list of strings")
    if len(addresses) > max_addresses:
        raise _invalid(f"At most {max_addresses} addresses per request")
    if any(len(address) > MAX_ENTRY_CHARS for address in addresses):
        raise _invalid(f"An address may have at most {MAX_ENTRY_CHARS} characters")
    return LookupRequest(algorithm, pepper, tuple(addresses))


def check_pepper(request: LookupRequest, pepper: str) -> None:
    """The client must send the current pepper, also for ``none`` (the spec's rule); a
    wrong one is answered with the right one, so the client need not ask again."""
    if not secrets.compare_digest(request.pepper.encode(), pepper.encode()):
        raise SynapseError(
            400,
            "Unknown or outdated pepper: use the one /hash_details gives",
            INVALID_PEPPER,
            additional_fields={"algorithm": request.algorithm, "lookup_pepper": pepper},
        )


def plain_entry(entry: str) -> tuple[str, str] | None:
    """A ``none`` entry, ``"<address> <medium>"`` → (address, medium); None if it has no
    medium. (The medium is what follows the last space: addresses may not hold one.)"""
    address, space, medium = entry.rpartition(" ")
    if not space or not address or not medium:
        return None
    return address, medium


def address_forms(address: str) -> set[str]:
    """The forms in which a client may send an address: lower case (what the spec asks
    of clients), Synapse's canonical form (local part case-folded, domain lower case),
    and the module's own comparison form (``normalise_email``)."""
    trimmed = address.strip()
    forms = {trimmed.lower(), normalise_email(trimmed)}
    local, at, domain = trimmed.rpartition("@")
    if at:
        forms.add(f"{local.casefold()}@{domain.lower()}")
    return {form for form in forms if form}


@attr.s(frozen=True, auto_attribs=True)
class AddressIndex:
    """The addresses that may resolve (normalised), and their ``sha256`` forms under one
    pepper → the normalised address."""

    pepper: str
    known: frozenset[str]
    hashes: Mapping[str, str]

    @classmethod
    def build(cls, addresses: Iterable[str], pepper: str) -> AddressIndex:
        known: set[str] = set()
        hashes: dict[str, str] = {}
        for address in addresses:
            normalised = normalise_email(address)
            if not normalised:
                continue
            known.add(normalised)
            for form in address_forms(address):
                hashes[lookup_hash(form, EMAIL, pepper)] = normalised
        return cls(pepper, frozenset(known), hashes)

    def wanted(self, request: LookupRequest) -> dict[str, str]:
        """Each entry of the request that names a known email address → that address
        (normalised). Unknown entries, other media and malformed entries are left out."""
        wanted: dict[str, str] = {}
        for entry in request.addresses:
            if request.algorithm == SHA256:
                address = self.hashes.get(entry)
            else:
                parsed = plain_entry(entry)
                if parsed is None or parsed[1] != EMAIL:
                    continue
                candidate = normalise_email(parsed[0])
                address = candidate if candidate in self.known else None
            if address is not None:
                wanted[entry] = address
        return wanted


@attr.s(frozen=True, auto_attribs=True)
class OpenIdToken:
    """What ``/account/register`` is given: the token ``/openid/request_token`` made."""

    access_token: str
    matrix_server_name: str


MAX_OPENID_TOKEN_CHARS = 1024


def parse_openid_token(body: Any) -> OpenIdToken:
    """``{"access_token", "token_type": "Bearer", "matrix_server_name", "expires_in"}``;
    only the first and the third are used (the homeserver knows when its token expires)."""
    if not isinstance(body, Mapping):
        raise SynapseError(
            400,
            'Expected the OpenID token object {"access_token", "matrix_server_name", ...}',
            Codes.BAD_JSON,
        )
    missing = [key for key in ("access_token", "matrix_server_name") if key not in body]
    if missing:
        raise SynapseError(400, f"Missing: {', '.join(missing)}", MISSING_PARAMS)
    access_token, server_name = body["access_token"], body["matrix_server_name"]
    if (
        not isinstance(access_token, str)
        or not access_token
        or len(access_token) > MAX_OPENID_TOKEN_CHARS
    ):
        raise _invalid("'access_token' must be the OpenID token's access_token")
    if not isinstance(server_name, str) or not server_name:
        raise _invalid("'matrix_server_name' must be a server name")
    token_type = body.get("token_type", "Bearer")
    if token_type != "Bearer":
        raise _invalid("'token_type' must be Bearer")
    return OpenIdToken(access_token, server_name)


def _invalid(message: str) -> SynapseError:
    return SynapseError(400, message, Codes.INVALID_PARAM)
