"""What the binding state of a room the module bound must say, and what to send when it
says something else (pure: the module's record and the room's state in, events out).

For a team's space: ``org.synapse_fhir.care_team`` names the team, and an ``m.space.child``
lists each of the team's thread rooms. For a thread's room: ``org.synapse_fhir.thread``
names its CommunicationRequest and ``m.space.parent`` points at the team's space (the space
of the team it was made for; the spaces of its further teams list it too). Any
other binding state in such a room (a second parent, a care-team claim in a thread room, a
child the module never listed) must be empty.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from synapse_fhir_module.enforcement.binding_store import Binding

CARE_TEAM_STATE = "org.synapse_fhir.care_team"
THREAD_STATE = "org.synapse_fhir.thread"
SPACE_PARENT = "m.space.parent"
SPACE_CHILD = "m.space.child"
BINDING_STATE_TYPES = frozenset({CARE_TEAM_STATE, THREAD_STATE, SPACE_PARENT, SPACE_CHILD})

StateKey = tuple[str, str]
Content = Mapping[str, Any]


def expected_content(
    binding: Binding,
    event_type: str,
    state_key: str,
    *,
    children: Mapping[str, Binding],
    server_name: str,
) -> dict[str, Any] | None:
    """The content the state event (``event_type``, ``state_key``) of ``binding``'s room
    must have; None when it must be empty. ``children``: the thread rooms the module
    listed in this space, by room id."""
    if event_type == CARE_TEAM_STATE and state_key == "" and binding.is_space:
        return {"reference": binding.care_team}
    if event_type == THREAD_STATE and state_key == "" and binding.thread is not None:
        return {"reference": binding.thread}
    if event_type == SPACE_PARENT and not binding.is_space and state_key == binding.space_id:
        return {"via": [server_name], "canonical": True}
    if event_type == SPACE_CHILD and binding.is_space:
        child = children.get(state_key)
        if child is not None and lists(binding, child):
            return {"via": [server_name]}
    return None


def lists(space: Binding, child: Binding) -> bool:
    """Whether the space ``space`` must list the room ``child``: the space it was made in,
    or the space of one of its further teams."""
    return space.is_space and (
        child.space_id == space.room_id
        or (not child.is_space and space.care_team in child.further_teams)
    )


def drifted(expected: Content | None, actual: Content | None) -> bool:
    """Whether ``actual`` says something other than ``expected`` (only what binding
    decisions read: the reference, and whether a space link is live)."""
    return _meaning(expected) != _meaning(actual)


def repairs(
    binding: Binding,
    state: Mapping[StateKey, Content],
    *,
    children: Iterable[Binding],
    server_name: str,
) -> list[tuple[str, str, dict[str, Any]]]:
    """The state events that bring ``binding``'s room back to what the module bound.

    ``state``: the room's current binding state (type, state key) → content.
    """
    listed = {child.room_id: child for child in children if lists(binding, child)}
    required: list[StateKey] = []
    if binding.is_space:
        required.append((CARE_TEAM_STATE, ""))
        required.extend((SPACE_CHILD, room_id) for room_id in sorted(listed))
    else:
        required.append((THREAD_STATE, ""))
        if binding.space_id:
            required.append((SPACE_PARENT, binding.space_id))
    found = []
    for event_type, state_key in [*required, *sorted(set(state) - set(required))]:
        want = expected_content(
            binding, event_type, state_key, children=listed, server_name=server_name
        )
        have = state.get((event_type, state_key))
        if drifted(want, have):
            found.append((event_type, state_key, want if want is not None else {}))
    return found


def _meaning(content: Content | None) -> tuple[str | None, bool]:
    if not content:
        return None, False
    reference = content.get("reference")
    via = content.get("via")
    return (
        reference if isinstance(reference, str) else None,
        isinstance(via, list) and len(via) > 0,
    )
