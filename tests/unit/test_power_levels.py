"""Power levels of a care-team room from its FHIR members (design.md: mapping)."""

from __future__ import annotations

from typing import Any

from synapse_fhir_module.config import DEFAULT_POWER_LEVELS
from synapse_fhir_module.enforcement.power_levels import power_levels_content
from synapse_fhir_module.fhir.care_team import Member

SERVICE = "@fhir:x"
GP_ROLE = "http://snomed.info/sct|62247001"
GP = Member("@anna:x", "Practitioner/gp", "Practitioner", frozenset({GP_ROLE}))
NURSE = Member("@bram:x", "Practitioner/nurse", "Practitioner")
DAUGHTER = Member("@carla:x", "RelatedPerson/d", "RelatedPerson")
PATIENT = Member("@henk:x", "Patient/p", "Patient")
CURRENT = {"users": {SERVICE: 100, "@olga:x": 50}, "events_default": 0, "state_default": 50}


def levels(**overrides: Any) -> dict[str, Any]:
    arguments: dict[str, Any] = {
        "service_user": SERVICE,
        "creators": (),
        "keep": {},
        "by_type": DEFAULT_POWER_LEVELS,
        "by_role": {},
        "read_only": False,
    }
    arguments.update(overrides)
    return power_levels_content(CURRENT, [GP, NURSE, DAUGHTER, PATIENT], **arguments)


def test_defaults_by_member_type_and_leavers_lose_their_level() -> None:
    content = levels()
    assert content["users"] == {SERVICE: 100, "@anna:x": 50, "@bram:x": 50}
    assert content["events_default"] == 0
    assert content["state_default"] == 50  # not ours: left as the room has it


def test_a_role_code_outranks_the_member_type_but_never_the_service_user() -> None:
    assert levels(by_role={GP_ROLE: 75})["users"]["@anna:x"] == 75
    assert levels(by_role={GP_ROLE: 150})["users"]["@anna:x"] == 99


def test_read_only_leaves_only_the_service_user_able_to_send() -> None:
    content = levels(read_only=True, keep={"@audit:x": 50})
    assert content["users"] == {SERVICE: 100, "@audit:x": 50}
    assert content["events_default"] == 100


def test_room_v12_creators_are_not_listed() -> None:
    content = levels(creators=[SERVICE])
    assert SERVICE not in content["users"]
    assert content["users"]["@anna:x"] == 50


def test_what_binds_the_room_and_who_is_in_it_is_reserved_to_the_service_user() -> None:
    content = levels()
    for event_type in (
        "org.synapse_fhir.care_team",
        "org.synapse_fhir.thread",
        "m.space.child",
        "m.space.parent",
        "m.room.join_rules",
        "m.room.history_visibility",
        "m.room.encryption",
        "m.room.tombstone",
        "m.room.server_acl",
        "m.room.power_levels",
        "m.room.canonical_alias",
    ):
        assert content["events"][event_type] == 100, event_type
    assert (content["kick"], content["ban"], content["redact"]) == (100, 100, 100)
    assert content["invite"] == 100 and content["events"]["m.room.guest_access"] == 100
    assert content["users_default"] == 0
    # Nobody from FHIR reaches it.
    assert max(level for user, level in content["users"].items() if user != SERVICE) < 100


def test_reserved_levels_are_raised_never_lowered_and_other_levels_kept() -> None:
    current = {
        **CURRENT,
        "events": {"m.room.tombstone": 150, "m.room.topic": 50, "m.space.child": 0},
        "kick": 50,
        "invite": 0,
        "users_default": 100,  # e.g. changed by an admin acting as the service user
    }
    content = power_levels_content(
        current,
        [GP],
        service_user=SERVICE,
        creators=(),
        keep={},
        by_type=DEFAULT_POWER_LEVELS,
        by_role={},
        read_only=False,
    )
    assert content["events"]["m.room.tombstone"] == 150  # room v12: creators only
    assert content["events"]["m.space.child"] == 100
    assert content["events"]["m.room.topic"] == 50
    assert content["users_default"] == 0
    assert content["kick"] == 100 and content["invite"] == 100
    assert content["state_default"] == 50  # not the module's
