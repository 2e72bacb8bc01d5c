"""What the binding state of a room the module bound must say, and its repair (pure)."""

from __future__ import annotations

from synapse_fhir_module.enforcement.binding_state import (
    CARE_TEAM_STATE,
    SPACE_CHILD,
    SPACE_PARENT,
    THREAD_STATE,
    drifted,
    repairs,
)
from synapse_fhir_module.enforcement.binding_store import Binding

SERVER = "example.org"
SPACE = Binding("!space:x", "CareTeam/1")
ROOM = Binding("!room:x", "CareTeam/1", thread="CommunicationRequest/7", space_id="!space:x")
INTACT_SPACE = {
    (CARE_TEAM_STATE, ""): {"reference": "CareTeam/1"},
    (SPACE_CHILD, "!room:x"): {"via": [SERVER]},
}
INTACT_ROOM = {
    (THREAD_STATE, ""): {"reference": "CommunicationRequest/7"},
    (SPACE_PARENT, "!space:x"): {"via": [SERVER], "canonical": True},
}


def test_intact_binding_state_needs_nothing() -> None:
    assert repairs(SPACE, INTACT_SPACE, children=[ROOM], server_name=SERVER) == []
    assert repairs(ROOM, INTACT_ROOM, children=[], server_name=SERVER) == []


def test_an_overwritten_or_emptied_binding_is_sent_again() -> None:
    tampered = {**INTACT_SPACE, (CARE_TEAM_STATE, ""): {"reference": "CareTeam/666"}}
    assert repairs(SPACE, tampered, children=[ROOM], server_name=SERVER) == [
        (CARE_TEAM_STATE, "", {"reference": "CareTeam/1"})
    ]
    emptied = {**INTACT_ROOM, (THREAD_STATE, ""): {}}
    assert repairs(ROOM, emptied, children=[], server_name=SERVER) == [
        (THREAD_STATE, "", {"reference": "CommunicationRequest/7"})
    ]


def test_a_missing_link_is_sent_and_a_foreign_claim_emptied() -> None:
    state = {
        (CARE_TEAM_STATE, ""): {"reference": "CareTeam/1"},
        (SPACE_CHILD, "!stranger:x"): {"via": [SERVER]},
    }
    assert repairs(SPACE, state, children=[ROOM], server_name=SERVER) == [
        (SPACE_CHILD, "!room:x", {"via": [SERVER]}),
        (SPACE_CHILD, "!stranger:x", {}),
    ]
    state = {**INTACT_ROOM, (CARE_TEAM_STATE, ""): {"reference": "CareTeam/2"}}
    assert repairs(ROOM, state, children=[], server_name=SERVER) == [(CARE_TEAM_STATE, "", {})]


def test_only_what_decisions_read_counts_as_drift() -> None:
    assert not drifted({"via": [SERVER]}, {"via": ["other.org"], "order": "a"})
    assert drifted({"via": [SERVER]}, {"via": []})
    assert not drifted(None, {})
    assert drifted(None, {"reference": "CareTeam/1"})


def test_a_room_shared_by_two_teams_is_listed_by_both_spaces_and_neither_unlists_it() -> None:
    shared = Binding(
        "!shared:x",
        "CareTeam/1",
        thread="CommunicationRequest/8",
        space_id="!space:x",
        further_teams=("CareTeam/2",),
    )
    other_space = Binding("!space2:x", "CareTeam/2")
    listed = {
        (CARE_TEAM_STATE, ""): {"reference": "CareTeam/2"},
        (SPACE_CHILD, "!shared:x"): {"via": [SERVER]},
    }
    assert repairs(other_space, listed, children=[shared], server_name=SERVER) == []
    assert repairs(SPACE, INTACT_SPACE, children=[ROOM], server_name=SERVER) == []
    # Missing from the further team's space: listed again.
    unlisted = {(CARE_TEAM_STATE, ""): {"reference": "CareTeam/2"}}
    assert repairs(other_space, unlisted, children=[shared], server_name=SERVER) == [
        (SPACE_CHILD, "!shared:x", {"via": [SERVER]})
    ]
    # The room itself keeps one parent: the space it was made in.
    state = {
        (THREAD_STATE, ""): {"reference": "CommunicationRequest/8"},
        (SPACE_PARENT, "!space:x"): {"via": [SERVER], "canonical": True},
        (SPACE_PARENT, "!space2:x"): {"via": [SERVER]},
    }
    assert repairs(shared, state, children=[], server_name=SERVER) == [
        (SPACE_PARENT, "!space2:x", {})
    ]
    # A team no longer among the room's teams: its space must not list it.
    dropped = Binding(
        "!shared:x", "CareTeam/1", thread="CommunicationRequest/8", space_id="!space:x"
    )
    assert repairs(other_space, listed, children=[dropped], server_name=SERVER) == [
        (SPACE_CHILD, "!shared:x", {})
    ]
