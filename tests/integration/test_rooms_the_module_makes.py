"""Spaces and rooms the module makes guard themselves (issue 11): their power levels reserve
what binds them to the care record and decides who is in them to the service user, and
they honour ``communication.encrypted_rooms`` whatever the server's encryption default.

The power-level test runs with enforcement off: no module callback stands between the
practitioner and Synapse, so every refusal is Synapse's own auth rules — what also holds
where callbacks do not run (events another homeserver builds, state resolution).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.waiting import wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from tests.integration.matrix_views import invited_space, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack

FOLLOWS_WITHIN = 30.0
# Each reserved state type with content Synapse accepts as well-formed.
RESERVED_CONTENT: dict[str, dict[str, Any]] = {
    "org.synapse_fhir.care_team": {"reference": "CareTeam/elsewhere"},
    "org.synapse_fhir.thread": {"reference": "CommunicationRequest/elsewhere"},
    "m.space.child": {"via": ["elsewhere.example"]},
    "m.space.parent": {"via": ["elsewhere.example"]},
    "m.room.join_rules": {"join_rule": "public"},
    "m.room.history_visibility": {"history_visibility": "world_readable"},
    "m.room.encryption": {"algorithm": "m.megolm.v1.aes-sha2"},
    "m.room.tombstone": {"body": "moved", "replacement_room": "!elsewhere:elsewhere.example"},
    "m.room.server_acl": {"allow": ["*"], "deny": [], "allow_ip_literals": True},
    "m.room.power_levels": {"users_default": 100},
    "m.room.canonical_alias": {},
}
RESERVED = (
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
)


@pytest.fixture(scope="module")
def unenforced(quiet_hapi: HapiDevServer, run_dir: Path) -> Iterator[QuietStack]:
    with quiet_stack(
        run_dir / "unenforced",
        quiet_hapi,
        full_reconcile_interval="1h",
        enforcement={"enabled": False},
    ) as stack:
        yield stack


@pytest.fixture(scope="module")
def encrypting_server(quiet_hapi: HapiDevServer, run_dir: Path) -> Iterator[QuietStack]:
    with quiet_stack(
        run_dir / "encrypting",
        quiet_hapi,
        full_reconcile_interval="1h",
        communication={"encrypted_rooms": "forbid"},
        extra_config={"encryption_enabled_by_default_for_room_type": "all"},
    ) as stack:
        yield stack


def seed_team(stack: QuietStack, *names: str) -> tuple[str, str, dict[str, MatrixUser]]:
    """A team of practitioners ``names`` with one thread, notified; (team, thread, users)."""
    tag = uuid.uuid4().hex[:8]
    users = {name: register_user(stack.synapse, f"{name}_{tag}") for name in names}
    team, thread = f"CareTeam/team-{tag}", f"CommunicationRequest/thread-{tag}"
    stack.fhir.put_all(
        [
            *(
                {
                    "resourceType": "Practitioner",
                    "id": f"{name}-{tag}",
                    "telecom": [
                        {"system": "url", "value": f"matrix:u/{user.user_id.removeprefix('@')}"}
                    ],
                }
                for name, user in users.items()
            ),
            {
                "resourceType": "CareTeam",
                "id": team.split("/")[1],
                "status": "active",
                "participant": [
                    {"member": {"reference": f"Practitioner/{n}-{tag}"}} for n in names
                ],
            },
            {
                "resourceType": "CommunicationRequest",
                "id": thread.split("/")[1],
                "status": "active",
                "recipient": [{"reference": team}],
            },
        ]
    )
    stack.notify(team)
    stack.notify(thread)
    return team, thread, users


def join_space_and_room(user: MatrixUser, team: str, thread: str) -> tuple[str, str]:
    space = wait_until(
        lambda: invited_space(user, team), timeout=FOLLOWS_WITHIN, what="invited to the space"
    )
    user.join(space)
    room = wait_until(
        lambda: next((r for r, ref in open_invites(user).items() if ref == thread), None),
        timeout=FOLLOWS_WITHIN,
        what="invited to the thread's room",
    )
    user.join(room)
    return space, room


def state(user: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    return list(user.request("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state"))


def refused(action: Callable[[], object]) -> MatrixError:
    with pytest.raises(MatrixError) as caught:
        action()
    return caught.value


def test_power_levels_alone_keep_a_practitioner_from_what_binds_the_room(
    unenforced: QuietStack,
) -> None:
    team, thread, users = seed_team(unenforced, "anna", "bram")
    anna, bram = users["anna"], users["bram"]
    space, room = join_space_and_room(anna, team, thread)
    join_space_and_room(bram, team, thread)
    bram_says = bram.send_text(room, "a colleague's message")

    for room_id in (space, room):
        levels = anna.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.power_levels/"
        )
        assert levels["users"][anna.user_id] == 50  # a practitioner
        assert {t: levels["events"][t] for t in RESERVED} == dict.fromkeys(RESERVED, 100)
        assert (levels["kick"], levels["ban"], levels["redact"]) == (100, 100, 100)
        assert (levels["invite"], levels["users_default"]) == (100, 0)

        before = {(e["type"], e["state_key"]): e["event_id"] for e in state(anna, room_id)}
        for event_type in RESERVED:
            error = refused(
                lambda t=event_type, r=room_id: anna.send_state(
                    r, t, RESERVED_CONTENT[t], state_key=""
                )
            )
            # Synapse's own auth rule (the module's callbacks are off here).
            assert (error.status, error.errcode) == (403, "M_FORBIDDEN"), (event_type, error)
            assert "org.synapse_fhir.reason" not in error.body, error
            assert "user_level (50) < send_level (100)" in error.body["error"], error
        after = {(e["type"], e["state_key"]): e["event_id"] for e in state(anna, room_id)}
        assert after == before, "a reserved state event went through"

    stranger = register_user(unenforced.synapse, f"stranger_{uuid.uuid4().hex[:8]}")
    for action, path, target in (
        ("kick", "kick", bram.user_id),
        ("ban", "ban", bram.user_id),
        ("invite", "invite", stranger.user_id),  # membership comes from FHIR
    ):
        error = refused(
            lambda p=path, t=target: anna.request(
                "POST", f"/_matrix/client/v3/rooms/{quote(room)}/{p}", {"user_id": t}
            )
        )
        assert (error.status, error.errcode) == (403, "M_FORBIDDEN"), (action, error)
        assert "org.synapse_fhir.reason" not in error.body, error
    error = refused(lambda: anna.redact(room, bram_says))
    assert (error.status, error.errcode) == (403, "M_FORBIDDEN"), error
    # What members may change is theirs to change; their own messages are theirs to redact.
    anna.send_state(room, "m.room.topic", {"topic": "Wound care"})
    anna.redact(room, anna.send_text(room, "typo"))


def test_rooms_the_module_makes_stay_unencrypted_when_encryption_is_forbidden(
    encrypting_server: QuietStack,
) -> None:
    stack = encrypting_server
    team, thread, users = seed_team(stack, "anna")
    anna = users["anna"]
    space, room = join_space_and_room(anna, team, thread)
    # The server encrypts every new room by default (the control: a room of anna's own).
    own = anna.create_room(name="Mine")
    assert any(
        e["type"] == "m.room.encryption" and e["content"].get("algorithm") for e in state(anna, own)
    )
    # The module's space and room carry no encryption algorithm.
    for room_id in (space, room):
        algorithms = [
            e["content"].get("algorithm")
            for e in state(anna, room_id)
            if e["type"] == "m.room.encryption"
        ]
        assert not any(algorithms), (room_id, algorithms)
    # So messages there are readable, and recorded with their text.
    event_id = anna.send_text(room, "recorded in full")
    recorded = wait_until(
        lambda: (
            requests.get(
                f"{stack.hapi.base_url}/Communication",
                params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
                headers={"Cache-Control": "no-cache"},
                timeout=30,
            )
            .json()
            .get("entry")
        ),
        timeout=FOLLOWS_WITHIN,
        what="the message recorded",
    )[0]["resource"]
    assert recorded["payload"] == [{"contentString": "recorded in full"}]
