"""Leavers lose access on time (issue 11): when a participation, a PractitionerRole or the
team itself reaches the end of its period, the person is removed from the team's space and
every room of it — with no FHIR write at that moment and no notification.

Own HAPI without the shim: nothing notifies Synapse except the test's own calls while it
sets the team up. The reconcile sweep and the full reconcile run once an hour, so what
happens at the period's end is the module's own doing (the boundary it scheduled).
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import pytest

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.waiting import wait_until
from tests.integration.matrix_views import invited_space, membership, open_invites
from tests.integration.quiet_stack import QuietStack, quiet_stack

# Enough for the set-up below (accounts, FHIR writes, invites, joins) on a loaded machine.
SETUP_SECONDS = 40.0
# The promise: gone within 60 s of the period's end.
REMOVED_WITHIN = 60.0
FOLLOWS_WITHIN = 30.0


@pytest.fixture(scope="module")
def stack(run_dir: Path, quiet_hapi: HapiDevServer) -> Iterator[QuietStack]:
    # The sweep and the full reconcile once an hour: nothing but the boundary acts.
    with quiet_stack(run_dir / "quiet-stack", quiet_hapi, full_reconcile_interval="1h") as stack:
        yield stack


def instant(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def member(reference: str, period: dict[str, str] | None = None) -> dict[str, Any]:
    participant: dict[str, Any] = {"member": {"reference": reference}}
    if period:
        participant["period"] = period
    return participant


def practitioner(resource_id: str, user: MatrixUser) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": resource_id,
        "active": True,
        "telecom": [{"system": "url", "value": f"matrix:u/{user.user_id.removeprefix('@')}"}],
    }


def test_leavers_are_removed_when_their_period_ends_with_no_fhir_write(
    stack: QuietStack,
) -> None:
    tag = uuid.uuid4().hex[:8]
    users = {
        name: register_user(stack.synapse, f"{name}_{tag}")
        for name in ("anna", "bram", "carla", "dirk")
    }
    anna, bram, carla, dirk = (users[n] for n in ("anna", "bram", "carla", "dirk"))
    ends = time.time() + SETUP_SECONDS
    end = {"end": instant(ends)}
    team, ward = f"CareTeam/home-{tag}", f"CareTeam/ward-{tag}"
    thread = f"CommunicationRequest/wounds-{tag}"
    stack.fhir.put_all(
        [
            practitioner(f"anna-{tag}", anna),  # the GP: stays
            practitioner(f"bram-{tag}", bram),  # his participation ends
            practitioner(f"carla-{tag}", carla),  # her PractitionerRole ends
            practitioner(f"dirk-{tag}", dirk),  # his team's period ends
            {
                "resourceType": "PractitionerRole",
                "id": f"carla-role-{tag}",
                "active": True,
                "period": end,
                "practitioner": {"reference": f"Practitioner/carla-{tag}"},
            },
            {
                "resourceType": "CareTeam",
                "id": team.split("/")[1],
                "status": "active",
                "participant": [
                    member(f"Practitioner/anna-{tag}"),
                    member(f"Practitioner/bram-{tag}", end),
                    member(f"PractitionerRole/carla-role-{tag}"),
                ],
            },
            {
                "resourceType": "CareTeam",
                "id": ward.split("/")[1],
                "status": "active",
                "period": end,
                "participant": [member(f"Practitioner/dirk-{tag}")],
            },
            {
                "resourceType": "CommunicationRequest",
                "id": thread.split("/")[1],
                "status": "active",
                "recipient": [{"reference": team}],
            },
        ]
    )
    for reference in (team, ward, thread):
        stack.notify(reference)

    # Everyone joins the team's space and the thread's room while they are members.
    joined: dict[str, list[str]] = {}
    for user, team_ref in ((anna, team), (bram, team), (carla, team), (dirk, ward)):
        space = wait_until(
            lambda u=user, t=team_ref: invited_space(u, t),
            timeout=FOLLOWS_WITHIN,
            what=f"{user.user_id} invited to {team_ref}'s space",
        )
        user.join(space)
        joined[user.user_id] = [space]
    for user in (anna, bram, carla):
        room = wait_until(
            lambda u=user: next((r for r, ref in open_invites(u).items() if ref == thread), None),
            timeout=FOLLOWS_WITHIN,
            what=f"{user.user_id} invited to the thread's room",
        )
        user.join(room)
        joined[user.user_id].append(room)
    assert time.time() < ends - 2, "the set-up outlasted the periods: raise SETUP_SECONDS"

    # The periods end. Nothing is written to FHIR and nobody notifies Synapse.
    removed_at: dict[str, float] = {}
    for leaver in (bram, carla, dirk):
        for room in joined[leaver.user_id]:
            wait_until(
                lambda r=room, u=leaver: membership(u, r, u.user_id) == "leave",
                timeout=ends + REMOVED_WITHIN - time.time(),
                what=f"{leaver.user_id} removed from {room} within 60 s of the period's end",
            )
        removed_at[leaver.user_id] = time.time()
    assert all(moment >= ends for moment in removed_at.values()), "removed before the end"
    assert stack.writes_since(ends - 5) == [], "a FHIR write near the period's end"

    # They cannot come back; the GP, whose participation goes on, is still in both.
    for leaver, reason in ((bram, "not_in_care_team"), (carla, "not_in_care_team")):
        with pytest.raises(MatrixError) as caught:
            leaver.join(joined[leaver.user_id][0])
        assert (caught.value.status, caught.value.reason) == (403, reason)
    with pytest.raises(MatrixError) as caught:
        dirk.join(joined[dirk.user_id][0])
    assert (caught.value.status, caught.value.reason) == (403, "care_team_inactive")
    for room in joined[anna.user_id]:
        assert membership(anna, room, anna.user_id) == "join"
