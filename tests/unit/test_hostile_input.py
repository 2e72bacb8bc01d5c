"""Whatever FHIR, a webhook caller or a Matrix client sends, the parsers answer with the
module's own errors (or nothing) and never invent access: garbage never yields a member.

Each property runs on arbitrary JSON shapes (hypothesis); ``make fuzz`` runs them with a
larger budget (``HYPOTHESIS_PROFILE=fuzz``)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from synapse.api.errors import SynapseError

from synapse_fhir_module.fhir.care_team import resolve_membership
from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM
from synapse_fhir_module.fhir.dates import parse_fhir_datetime, period_bounds, period_covers
from synapse_fhir_module.fhir.persons import emails_of, is_user_id, matrix_ids_of
from synapse_fhir_module.web.webhook import _parse_shim_body

NOW = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
SCALARS = st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=40)
JSON = st.recursive(
    SCALARS,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=12), inner),
    max_leaves=30,
)
# FHIR-shaped garbage: the right keys, anything in them.
FIELDS = [
    "resourceType",
    "status",
    "period",
    "participant",
    "member",
    "reference",
    "telecom",
    "identifier",
    "system",
    "value",
    "active",
    "practitioner",
    "start",
    "end",
    "role",
]
SHAPED = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(FIELDS), inner, max_size=6)
    ),
    max_leaves=40,
)
REFERENCES = st.sampled_from(
    [
        "CareTeam/t",
        "CareTeam/u",
        "Practitioner/p",
        "PractitionerRole/r",
        "Patient/q",
        "RelatedPerson/s",
        "Practitioner/p/_history/1",
        "http://evil.example/Practitioner/p",
    ]
)


# A person that names an account, with anything else around it.
NAMING = st.builds(
    lambda extra, active: {
        **(extra if isinstance(extra, dict) else {}),
        "identifier": [{"system": MATRIX_ID_SYSTEM, "value": "@anna:example.org"}],
        "active": active,
    },
    SHAPED,
    st.one_of(st.just(True), SCALARS),
)
PARTICIPANT = st.fixed_dictionaries(
    {"member": st.builds(lambda r: {"reference": r}, st.just("Practitioner/p") | REFERENCES)},
    optional={"period": st.none() | JSON, "role": JSON},
)
TEAM = st.builds(
    lambda extra, participants, status: {
        **(extra if isinstance(extra, dict) else {}),
        "participant": participants,
        "status": status,
    },
    SHAPED,
    st.lists(st.one_of(PARTICIPANT, PARTICIPANT, SHAPED), max_size=4),
    st.one_of(st.just("active"), SCALARS),
)


@given(
    team=st.one_of(TEAM, SHAPED, JSON),
    others=st.fixed_dictionaries(
        {"Practitioner/p": st.one_of(NAMING, SHAPED)},
        optional={
            ref: st.one_of(NAMING, SHAPED, JSON)
            for ref in ["CareTeam/u", "PractitionerRole/r", "Patient/q", "RelatedPerson/s"]
        },
    ),
)
def test_garbage_never_yields_a_member(team: Any, others: dict[str, Any]) -> None:
    """A team and the resources it names, in any shape: resolving it never raises, and
    only an account some resource here names explicitly can be a member."""
    resources = {**others, "CareTeam/t": team}
    membership = resolve_membership("CareTeam/t", resources, NOW)
    named = set().union(*(matrix_ids_of(r) for r in resources.values() if isinstance(r, dict)))
    assert set(membership.members) <= named
    assert all(is_user_id(user_id) for user_id in membership.members)
    # Fail closed: a team that is no object, or whose own period cannot be read, admits
    # nobody; one whose status is not active or proposed lets nobody act.
    if not isinstance(team, dict) or period_bounds(team.get("period")) is None:
        assert membership.members == {}
    if not isinstance(team, dict) or team.get("status") not in ("active", "proposed"):
        assert not membership.admits_members


@given(SHAPED | JSON)
def test_a_person_of_any_shape_names_only_valid_accounts_and_addresses(person: Any) -> None:
    if not isinstance(person, dict):
        return
    assert all(is_user_id(user_id) for user_id in matrix_ids_of(person))
    assert all("@" in address for address in emails_of(person, ["urn:any"]))


@given(JSON)
def test_a_period_of_any_shape_is_read_or_refused_never_raises(period: Any) -> None:
    bounds = period_bounds(period)
    assert bounds is None or all(b is None or b.tzinfo is not None for b in bounds)
    assert period_covers(period, NOW) in (True, False)


@given(st.text(max_size=40))
def test_a_datetime_of_any_text_parses_or_raises_value_error(text: str) -> None:
    try:
        parsed = parse_fhir_datetime(text)
    except ValueError:
        return
    assert parsed.tzinfo is not None


@given(st.one_of(JSON.map(lambda v: json.dumps(v).encode()), st.binary(max_size=200)))
def test_a_shim_body_of_any_bytes_is_a_notification_or_a_400(body: bytes) -> None:
    try:
        notification = _parse_shim_body(body)
    except SynapseError as e:
        assert e.code == 400
        return
    assert "/" not in notification.id and notification.resource_type[0].isupper()


@pytest.mark.parametrize(
    "body",
    [
        b'{"resourceType": "CareTeam", "id": "t", "versionId": "1' + b"9" * 400 + b'", '
        b'"action": "update"}',
        b'{"resourceType": "CareTeam", "id": "t", "versionId": NaN, "action": "update"}',
        b"[" * 100_000,
    ],
    ids=["huge-version", "nan", "deep"],
)
def test_a_shim_body_built_to_hurt_is_a_400(body: bytes) -> None:
    with pytest.raises(SynapseError) as caught:
        _parse_shim_body(body)
    assert caught.value.code == 400
