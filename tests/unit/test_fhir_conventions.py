"""How a reference from FHIR JSON is read: one reading for the whole module."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.fhir.conventions import (
    FHIR_ID,
    RESOURCE_TYPE,
    dicts_in,
    is_fhir_id,
    reference_of,
)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ({"reference": "Practitioner/12"}, "Practitioner/12"),
        ({"reference": "CommunicationRequest/cr-1/_history/3"}, "CommunicationRequest/cr-1"),
        ({"reference": "https://other.example/fhir/Practitioner/12"}, None),  # not ours
        ({"reference": "#contained"}, None),
        ({"reference": "Practitioner/12/extra"}, None),
        ({"reference": "Practitioner/../12"}, None),
        ({"reference": "Practitioner/a b"}, None),
        ({"reference": "practitioner/12"}, None),
        ({"reference": "Practitioner/" + "x" * 65}, None),
        ({"reference": 12}, None),
        ({"display": "Dr. Jansen"}, None),
        ("Practitioner/12", None),
        (None, None),
    ],
)
def test_a_reference_is_a_relative_type_and_id_or_nothing(value: Any, expected: str | None) -> None:
    assert reference_of(value) == expected


JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=10), inner),
    max_leaves=10,
)


@given(st.one_of(JSON, st.builds(lambda r: {"reference": r}, st.text(max_size=80))))
def test_whatever_the_json_a_reference_is_well_formed_or_none(value: Any) -> None:
    found = reference_of(value)
    if found is not None:
        resource_type, resource_id = found.split("/")
        assert RESOURCE_TYPE.fullmatch(resource_type) and FHIR_ID.fullmatch(resource_id)
        assert is_fhir_id(resource_id)


@given(JSON)
def test_dicts_in_keeps_only_the_mappings_of_a_list(value: Any) -> None:
    found = dicts_in(value)
    assert all(isinstance(item, dict) for item in found)
    if not isinstance(value, list):
        assert found == []
