"""What one Matrix account maps to, given the persons FHIR found for it."""

from __future__ import annotations

from synapse_fhir_module.fhir.person_directory import _record

USER = "@anna:example.org"


def test_one_active_person() -> None:
    record = _record(USER, {"Practitioner/1": {"active": True}}, 5.0)
    assert (record.person, record.active, record.ambiguous) == ("Practitioner/1", True, False)


def test_two_active_persons_is_ambiguous_and_unmapped() -> None:
    record = _record(USER, {"Practitioner/1": {"active": True}, "RelatedPerson/2": {}}, 5.0)
    assert (record.person, record.active, record.ambiguous) == (None, False, True)
    assert not record.mapped


def test_only_inactive_persons_maps_to_an_inactive_person() -> None:
    record = _record(USER, {"Practitioner/1": {"active": False}}, 5.0)
    assert (record.person, record.active) == ("Practitioner/1", False)


def test_one_active_beside_inactive_ones_wins() -> None:
    persons = {"Practitioner/1": {"active": False}, "Patient/2": {"active": True}}
    assert _record(USER, persons, 5.0).person == "Patient/2"


def test_nobody() -> None:
    record = _record(USER, {}, 5.0)
    assert (record.person, record.active, record.mapped) == (None, False, False)
