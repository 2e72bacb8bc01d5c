"""Membership of a CareTeam from its FHIR data: periods, active flags, roles, nesting."""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from synapse_fhir_module.fhir.care_team import resolve_membership

NOW = datetime(2026, 5, 15, 12, 0, tzinfo=timezone.utc)
SNOMED = "http://snomed.info/sct"


def person(resource_type: str, rid: str, localpart: str, active: bool = True) -> dict[str, Any]:
    return {
        "resourceType": resource_type,
        "id": rid,
        "active": active,
        "telecom": [{"system": "url", "value": f"matrix:u/{localpart}:example.org"}],
    }


def participant(ref: str, period: dict | None = None, role: str | None = None) -> dict[str, Any]:
    p: dict[str, Any] = {"member": {"reference": ref}}
    if period:
        p["period"] = period
    if role:
        p["role"] = [{"coding": [{"system": SNOMED, "code": role}]}]
    return p


def team(rid: str, *participants: dict, status: str = "active") -> dict[str, Any]:
    return {
        "resourceType": "CareTeam",
        "id": rid,
        "status": status,
        "participant": list(participants),
    }


def by_ref(*resources: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{r['resourceType']}/{r['id']}": r for r in resources}


def test_direct_members_of_every_person_type() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Patient/pat"),
            participant("Practitioner/gp", role="62247001"),
            participant("RelatedPerson/dau"),
        ),
        person("Patient", "pat", "henk"),
        person("Practitioner", "gp", "anna"),
        person("RelatedPerson", "dau", "carla"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.admits_members
    assert set(membership.members) == {
        "@henk:example.org",
        "@anna:example.org",
        "@carla:example.org",
    }
    anna = membership.members["@anna:example.org"]
    assert (anna.person, anna.member_type, anna.roles) == (
        "Practitioner/gp",
        "Practitioner",
        frozenset({f"{SNOMED}|62247001"}),
    )


def test_periods_and_inactive_people_keep_members_out() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Practitioner/past", {"end": "2026-05-01"}),
            participant("Practitioner/future", {"start": "2026-06-01"}),
            participant("Practitioner/inactive"),
            participant("Practitioner/missing"),
            participant("Practitioner/current", {"start": "2026-01-01", "end": "2026-12-31"}),
        ),
        person("Practitioner", "past", "past"),
        person("Practitioner", "future", "future"),
        person("Practitioner", "inactive", "inactive", active=False),
        person("Practitioner", "current", "current"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert set(membership.members) == {"@current:example.org"}
    assert membership.inactive == frozenset({"@inactive:example.org"})


def test_practitioner_role_resolves_to_its_practitioner_when_active_and_current() -> None:
    resources = by_ref(
        team(
            "t",
            participant("PractitionerRole/ok", role="224535009"),
            participant("PractitionerRole/ended"),
            participant("PractitionerRole/off"),
        ),
        {
            "resourceType": "PractitionerRole",
            "id": "ok",
            "practitioner": {"reference": "Practitioner/n"},
        },
        {
            "resourceType": "PractitionerRole",
            "id": "ended",
            "period": {"end": "2025"},
            "practitioner": {"reference": "Practitioner/x"},
        },
        {
            "resourceType": "PractitionerRole",
            "id": "off",
            "active": False,
            "practitioner": {"reference": "Practitioner/y"},
        },
        person("Practitioner", "n", "nurse"),
        person("Practitioner", "x", "x"),
        person("Practitioner", "y", "y"),
    )
    members = resolve_membership("CareTeam/t", resources, NOW).members
    assert set(members) == {"@nurse:example.org"}
    assert members["@nurse:example.org"].member_type == "Practitioner"


def test_nested_team_members_count_and_cycles_terminate() -> None:
    resources = by_ref(
        team("outer", participant("Practitioner/gp"), participant("CareTeam/inner")),
        team("inner", participant("Practitioner/pharmacist"), participant("CareTeam/outer")),
        person("Practitioner", "gp", "anna"),
        person("Practitioner", "pharmacist", "piet"),
    )
    members = resolve_membership("CareTeam/outer", resources, NOW).members
    assert set(members) == {"@anna:example.org", "@piet:example.org"}


def test_inactive_nested_team_lends_nobody() -> None:
    resources = by_ref(
        team("outer", participant("CareTeam/inner")),
        team("inner", participant("Practitioner/p"), status="inactive"),
        person("Practitioner", "p", "piet"),
    )
    assert resolve_membership("CareTeam/outer", resources, NOW).members == {}


def test_deep_nesting_stops() -> None:
    chain = [team(f"t{i}", participant(f"CareTeam/t{i + 1}")) for i in range(10)]
    chain.append(team("t10", participant("Practitioner/deep")))
    resources = by_ref(*chain, person("Practitioner", "deep", "deep"))
    assert resolve_membership("CareTeam/t0", resources, NOW).members == {}
    assert set(resolve_membership("CareTeam/t7", resources, NOW).members) == {"@deep:example.org"}


def test_inactive_team_admits_nobody_new() -> None:
    resources = by_ref(
        team("t", participant("Practitioner/p"), status="suspended"),
        person("Practitioner", "p", "p"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.status == "suspended"
    assert not membership.admits_members


def test_one_account_claimed_by_two_people_is_unmapped() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Practitioner/a"),
            participant("Practitioner/b"),
            participant("Patient/c"),
        ),
        person("Practitioner", "a", "shared"),
        person("Practitioner", "b", "shared"),
        person("Patient", "c", "henk"),
    )
    assert set(resolve_membership("CareTeam/t", resources, NOW).members) == {"@henk:example.org"}


def test_same_person_twice_merges_roles() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Practitioner/a", role="1"),
            participant("PractitionerRole/r", role="2"),
        ),
        {
            "resourceType": "PractitionerRole",
            "id": "r",
            "practitioner": {"reference": "Practitioner/a"},
        },
        person("Practitioner", "a", "anna"),
    )
    member = resolve_membership("CareTeam/t", resources, NOW).members["@anna:example.org"]
    assert member.roles == frozenset({f"{SNOMED}|1", f"{SNOMED}|2"})


def at(text: str) -> float:
    return datetime.fromisoformat(text).timestamp()


def test_a_member_stops_counting_at_the_end_of_their_participation() -> None:
    resources = by_ref(
        team("t", participant("Practitioner/p", {"end": "2026-05-15T12:00:20Z"})),
        person("Practitioner", "p", "leaver"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.members["@leaver:example.org"].until == at("2026-05-15T12:00:20+00:00")
    assert membership.next_change == at("2026-05-15T12:00:20+00:00")
    # The answer kept in memory stops counting them at that moment, without FHIR.
    assert membership.is_member("@leaver:example.org", now=at("2026-05-15T12:00:20+00:00"))
    assert not membership.is_member("@leaver:example.org", now=at("2026-05-15T12:00:21+00:00"))
    assert membership.current_members(now=at("2026-05-15T12:00:21+00:00")) == {}


def test_the_earliest_end_on_the_way_to_a_member_counts() -> None:
    resources = by_ref(
        {
            **team("t", participant("CareTeam/inner", {"end": "2026-05-20"})),
            "period": {"end": "2026-06-30"},
        },
        {
            **team("inner", participant("PractitionerRole/r", {"end": "2026-07-01"})),
            "period": {"end": "2026-08-01"},
        },
        {
            "resourceType": "PractitionerRole",
            "id": "r",
            "period": {"end": "2026-05-18T09:00:00Z"},
            "practitioner": {"reference": "Practitioner/n"},
        },
        person("Practitioner", "n", "nurse"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.members["@nurse:example.org"].until == at("2026-05-18T09:00:00+00:00")
    assert membership.next_change == at("2026-05-18T09:00:00+00:00")


def test_a_member_reached_twice_counts_until_the_later_end() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Practitioner/a", {"end": "2026-05-16T00:00:00Z"}),
            participant("PractitionerRole/r"),
        ),
        {
            "resourceType": "PractitionerRole",
            "id": "r",
            "period": {"end": "2026-05-17T00:00:00Z"},
            "practitioner": {"reference": "Practitioner/a"},
        },
        person("Practitioner", "a", "anna"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.members["@anna:example.org"].until == at("2026-05-17T00:00:00+00:00")
    # Both ends are boundaries; the earlier one comes next.
    assert membership.next_change == at("2026-05-16T00:00:00+00:00")


def test_a_start_still_to_come_is_the_next_change() -> None:
    resources = by_ref(
        team(
            "t",
            participant("Practitioner/now"),
            participant("Practitioner/soon", {"start": "2026-05-15T12:05:00Z"}),
        ),
        person("Practitioner", "now", "now"),
        person("Practitioner", "soon", "soon"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert set(membership.members) == {"@now:example.org"}
    assert membership.members["@now:example.org"].until is None
    assert membership.next_change == at("2026-05-15T12:05:00+00:00")


def test_a_team_outside_its_period_has_no_members_and_admits_nobody() -> None:
    ended = by_ref(
        {**team("t", participant("Practitioner/p")), "period": {"end": "2026-05-01"}},
        person("Practitioner", "p", "p"),
    )
    membership = resolve_membership("CareTeam/t", ended, NOW)
    assert membership.members == {}
    assert not membership.in_period and not membership.admits_members
    assert membership.next_change is None
    not_yet = by_ref(
        {**team("t", participant("Practitioner/p")), "period": {"start": "2026-06-01"}},
        person("Practitioner", "p", "p"),
    )
    membership = resolve_membership("CareTeam/t", not_yet, NOW)
    assert membership.members == {} and not membership.admits_members
    assert membership.next_change == at("2026-06-01T00:00:00+00:00")


def test_an_unreadable_period_keeps_the_member_out() -> None:
    resources = by_ref(
        team("t", participant("Practitioner/p", {"end": "next tuesday"})),
        person("Practitioner", "p", "p"),
    )
    assert resolve_membership("CareTeam/t", resources, NOW).members == {}


def test_no_end_written_as_the_last_day_of_9999_is_a_long_membership() -> None:
    resources = by_ref(
        team("t", participant("Practitioner/p", {"end": "9999-12-31"})),
        person("Practitioner", "p", "p"),
    )
    membership = resolve_membership("CareTeam/t", resources, NOW)
    assert membership.is_member("@p:example.org", now=NOW.timestamp())
    assert membership.next_change is not None and membership.next_change > NOW.timestamp()
