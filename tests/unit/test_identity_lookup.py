"""Identity lookups, the pure parts: the spec's hashing, request bodies (property tests:
any JSON either parses to what was sent or is refused with a 400 naming the problem), the
address index, and the OpenID token body."""

from __future__ import annotations

import re
import string
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synapse.module_api.errors import SynapseError

from synapse_fhir_module.identity.lookup import (
    EMAIL,
    MAX_ADDRESSES,
    MAX_ENTRY_CHARS,
    NONE,
    SHA256,
    AddressIndex,
    LookupRequest,
    OpenIdToken,
    address_forms,
    check_pepper,
    lookup_hash,
    new_pepper,
    parse_lookup_request,
    parse_openid_token,
    plain_entry,
)

PEPPER = "matrixrocks"

json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text()
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
emails = st.builds(
    "{}@{}.{}".format,
    st.text(string.ascii_letters + string.digits + "._+-", min_size=1, max_size=20),
    st.text(string.ascii_letters + string.digits + "-", min_size=1, max_size=20),
    st.sampled_from(["org", "nl", "COM"]),
)


def refusal(call: Any, *args: Any, **kwargs: Any) -> SynapseError:
    with pytest.raises(SynapseError) as caught:
        call(*args, **kwargs)
    return caught.value


# --- hashing ---------------------------------------------------------------------------


def test_the_hash_is_the_spec_s_example() -> None:
    # The specification's own example: alice@example.com under the pepper "matrixrocks".
    assert lookup_hash("alice@example.com", EMAIL, PEPPER) == (
        "4kenr7N9drpCJ4AfalmlGQVsOn3o2RHjkADUpXJWZUc"
    )


@given(st.text(max_size=80), st.text(max_size=10), st.text(max_size=40))
def test_a_hash_is_unpadded_url_safe_base64_of_32_bytes(
    address: str, medium: str, pepper: str
) -> None:
    hashed = lookup_hash(address, medium, pepper)
    assert re.fullmatch(r"[A-Za-z0-9_-]{43}", hashed)


def test_the_pepper_is_random_letters_and_digits() -> None:
    first, second = new_pepper(), new_pepper()
    assert re.fullmatch(r"[A-Za-z0-9]{32}", first)
    assert first != second


# --- the lookup body -------------------------------------------------------------------


def body(**fields: Any) -> dict[str, Any]:
    return {"algorithm": SHA256, "pepper": PEPPER, "addresses": ["abc"], **fields}


def test_a_well_formed_body_parses() -> None:
    assert parse_lookup_request(body(algorithm=NONE, addresses=["a@b.org email"])) == (
        LookupRequest(NONE, PEPPER, ("a@b.org email",))
    )


@pytest.mark.parametrize("missing", ["algorithm", "pepper", "addresses"])
def test_a_missing_field_is_named(missing: str) -> None:
    raw = body()
    del raw[missing]
    error = refusal(parse_lookup_request, raw)
    assert (error.code, error.errcode) == (400, "M_MISSING_PARAMS")
    assert missing in error.msg


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"algorithm": "md5"}, "'algorithm' must be one of sha256, none"),
        ({"algorithm": 256}, "'algorithm'"),
        ({"pepper": None}, "'pepper'"),
        ({"pepper": "x" * 1000}, "'pepper'"),
        ({"addresses": "abc"}, "'addresses' must be a list of strings"),
        ({"addresses": ["abc", 1]}, "'addresses' must be a list of strings"),
        ({"addresses": ["a"] * (MAX_ADDRESSES + 1)}, f"At most {MAX_ADDRESSES}"),
        ({"addresses": ["a" * (MAX_ENTRY_CHARS + 1)]}, f"at most {MAX_ENTRY_CHARS}"),
    ],
)
def test_a_malformed_field_is_refused_with_invalid_param(fields: dict, named: str) -> None:
    error = refusal(parse_lookup_request, body(**fields))
    assert (error.code, error.errcode) == (400, "M_INVALID_PARAM")
    assert named in error.msg


def test_the_limit_on_addresses_can_be_lowered() -> None:
    assert parse_lookup_request(body(addresses=["a"] * 10), max_addresses=10)
    error = refusal(parse_lookup_request, body(addresses=["a"] * 11), max_addresses=10)
    assert "At most 10 addresses" in error.msg


def test_a_body_that_is_not_an_object_is_refused() -> None:
    error = refusal(parse_lookup_request, ["a"])
    assert (error.code, error.errcode) == (400, "M_BAD_JSON")


@given(json_values)
def test_any_json_parses_or_is_refused_with_a_400(raw: Any) -> None:
    try:
        request = parse_lookup_request(raw)
    except SynapseError as e:
        assert e.code == 400
        assert e.errcode in ("M_BAD_JSON", "M_MISSING_PARAMS", "M_INVALID_PARAM")
        return
    assert request.algorithm in (SHA256, NONE)
    assert len(request.addresses) <= MAX_ADDRESSES


@given(
    st.sampled_from([SHA256, NONE]),
    st.text(max_size=50),
    st.lists(st.text(max_size=60), max_size=30),
    st.dictionaries(st.text(max_size=8), json_values, max_size=3),
)
def test_a_valid_body_parses_to_exactly_what_was_sent(
    algorithm: str, pepper: str, addresses: list[str], extra: dict[str, Any]
) -> None:
    raw = {**extra, "algorithm": algorithm, "pepper": pepper, "addresses": addresses}
    assert parse_lookup_request(raw) == LookupRequest(algorithm, pepper, tuple(addresses))


def test_a_wrong_pepper_is_answered_with_the_right_one() -> None:
    error = refusal(check_pepper, LookupRequest(SHA256, "old", ()), PEPPER)
    assert (error.code, error.errcode) == (400, "M_INVALID_PEPPER")
    assert error.error_dict(None) == {
        "errcode": "M_INVALID_PEPPER",
        "error": error.msg,
        "algorithm": SHA256,
        "lookup_pepper": PEPPER,
    }
    check_pepper(LookupRequest(NONE, PEPPER, ()), PEPPER)  # also needed for none


# --- plain entries and address forms -----------------------------------------------------


@pytest.mark.parametrize(
    ("entry", "parsed"),
    [
        ("alice@example.org email", ("alice@example.org", "email")),
        ("+31 6 1234 msisdn", ("+31 6 1234", "msisdn")),
        ("alice@example.org", None),
        (" email", None),
        ("alice@example.org ", None),
    ],
)
def test_a_plain_entry_is_the_address_then_the_medium(
    entry: str, parsed: tuple[str, str] | None
) -> None:
    assert plain_entry(entry) == parsed


def test_address_forms_are_what_clients_may_hash() -> None:
    assert address_forms(" Alice@Example.ORG ") == {"alice@example.org"}
    # Synapse folds the local part's case (ß → ss) and lowers the domain.
    assert address_forms("Straße@Example.org") == {"straße@example.org", "strasse@example.org"}


# --- the address index ---------------------------------------------------------------------


INDEX = AddressIndex.build(["anna@example.org", "Bram@Example.org"], PEPPER)


def lookup(algorithm: str, *entries: str) -> dict[str, str]:
    return INDEX.wanted(LookupRequest(algorithm, PEPPER, entries))


def test_a_known_address_is_found_by_its_hash_and_an_unknown_one_is_absent() -> None:
    anna = lookup_hash("anna@example.org", EMAIL, PEPPER)
    bram = lookup_hash("bram@example.org", EMAIL, PEPPER)
    nobody = lookup_hash("nobody@example.org", EMAIL, PEPPER)
    other_pepper = lookup_hash("anna@example.org", EMAIL, "another")
    msisdn = lookup_hash("anna@example.org", "msisdn", PEPPER)
    assert lookup(SHA256, anna, bram, nobody, other_pepper, msisdn) == {
        anna: "anna@example.org",
        bram: "bram@example.org",
    }


def test_a_known_address_is_found_plain_in_any_case_and_only_as_email() -> None:
    entries = ("ANNA@example.org email", "anna@example.org msisdn", "anna@example.org")
    assert lookup(NONE, *entries) == {"ANNA@example.org email": "anna@example.org"}
    assert lookup(NONE, "nobody@example.org email") == {}


@given(st.lists(emails, min_size=1, max_size=10), st.text(min_size=1, max_size=20))
def test_every_indexed_address_is_found_both_ways(addresses: list[str], pepper: str) -> None:
    index = AddressIndex.build(addresses, pepper)
    for address in addresses:
        hashed = lookup_hash(address.lower(), EMAIL, pepper)
        plain = f"{address.upper()} email"
        found = index.wanted(LookupRequest(SHA256, pepper, (hashed,)))
        assert found == {hashed: address.casefold()}
        found = index.wanted(LookupRequest(NONE, pepper, (plain,)))
        assert found == {plain: address.casefold()}


# --- the OpenID token ----------------------------------------------------------------------


def test_an_openid_token_parses() -> None:
    raw = {
        "access_token": "SomeT0kenHere",
        "token_type": "Bearer",
        "matrix_server_name": "example.org",
        "expires_in": 3600,
    }
    assert parse_openid_token(raw) == OpenIdToken("SomeT0kenHere", "example.org")


@pytest.mark.parametrize(
    ("raw", "errcode"),
    [
        ({"matrix_server_name": "example.org"}, "M_MISSING_PARAMS"),
        ({"access_token": "t"}, "M_MISSING_PARAMS"),
        ({"access_token": "", "matrix_server_name": "example.org"}, "M_INVALID_PARAM"),
        ({"access_token": 5, "matrix_server_name": "example.org"}, "M_INVALID_PARAM"),
        ({"access_token": "t", "matrix_server_name": ["x"]}, "M_INVALID_PARAM"),
        (
            {"access_token": "t", "matrix_server_name": "example.org", "token_type": "MAC"},
            "M_INVALID_PARAM",
        ),
        ({"access_token": "t" * 2000, "matrix_server_name": "example.org"}, "M_INVALID_PARAM"),
    ],
)
def test_a_malformed_openid_token_is_refused(raw: dict, errcode: str) -> None:
    error = refusal(parse_openid_token, raw)
    assert (error.code, error.errcode) == (400, errcode)


@given(json_values)
def test_any_json_is_an_openid_token_or_a_400(raw: Any) -> None:
    try:
        token = parse_openid_token(raw)
    except SynapseError as e:
        assert e.code == 400
        return
    assert token.access_token and token.matrix_server_name
