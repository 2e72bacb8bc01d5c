"""Leavers lose access on time (issue 11): from the end of a participation to the member
gone from the care team's space.

    python -m bench.access_in_time [--members N] [--smoke] [--fhir URL --hapi-pid PID]

HAPI (the suite's, or one started here) and one Synapse with the module and its sync, the
sweep and the full reconcile once an hour, pinned as the other benchmarks are. A CareTeam
of N practitioners (20; smoke: 3) and a GP who stays; everyone joins the team's space
(the test's own notification of the team is the only one sent: HAPI's shim is off here).

- Period end (measured): each member's ``participant.period.end`` lies in the future,
  one second apart; nothing is written at those moments and nobody notifies Synapse. Per
  member: the ``origin_server_ts`` of their leave event minus their period's end.
- FHIR write (baseline): the same removal the way it happens when someone ends the
  participation in FHIR and the shim says so — here a PUT of the CareTeam ending one
  member's participation now, then the notification the shim would send, one member a
  second. Per member: the leave event's ``origin_server_ts`` minus the write's
  ``meta.lastUpdated``.

Target (issue 11): p95 ≤ 60 s. The boundary timer fires a second after the end (a period
covers its last instant); the rest is the sync.
"""

from __future__ import annotations

import argparse
import time
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from functools import partial
from typing import Any
from urllib.parse import quote

import requests

from bench._common import (
    NO_CACHE,
    Row,
    Stack,
    Target,
    add_stack_arguments,
    fhir_instant_seconds,
    percentile,
    report,
    stack,
)
from devstack.fhir_seed import FhirSeeder
from devstack.matrix_client import MatrixUser, register_user
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.integration.matrix_views import invited_space

NAME = "access_in_time"
TARGET_S = 60.0
SECRET = "bench-webhook-secret"
# Time to set the team up (accounts, FHIR, invites, joins) before the first period ends.
SETUP_S = 30.0
SPACING_S = 1.0
MEMBER_EVENTS = '{"types":["m.room.member"]}'


@dataclass
class Team:
    server: SynapseServer
    fhir: FhirSeeder
    tag: str
    gp: MatrixUser
    members: list[MatrixUser]
    space: str = ""

    @property
    def ref(self) -> str:
        return f"CareTeam/bench-{self.tag}"

    def practitioner_id(self, index: int) -> str:
        return f"m{index}-{self.tag}"

    def care_team(self, ends: dict[int, str]) -> dict[str, Any]:
        """The team; ``ends``: member index → the end of their participation."""
        participants: list[dict[str, Any]] = [
            {"member": {"reference": f"Practitioner/gp-{self.tag}"}}
        ]
        for index in range(len(self.members)):
            participant: dict[str, Any] = {
                "member": {"reference": f"Practitioner/{self.practitioner_id(index)}"}
            }
            if index in ends:
                participant["period"] = {"end": ends[index]}
            participants.append(participant)
        return {
            "resourceType": "CareTeam",
            "id": self.ref.split("/")[1],
            "status": "active",
            "participant": participants,
        }


def practitioner(resource_id: str, user: MatrixUser) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": resource_id,
        "telecom": [{"system": "url", "value": f"matrix:u/{user.user_id.removeprefix('@')}"}],
    }


def new_team(server: SynapseServer, fhir_url: str, members: int) -> Team:
    tag = uuid.uuid4().hex[:8]
    gp = register_user(server, f"gp_{tag}")
    users = [register_user(server, f"m{i}_{tag}") for i in range(members)]
    team = Team(server, FhirSeeder(fhir_url), tag, gp, users)
    team.fhir.put_all(
        [
            practitioner(f"gp-{tag}", gp),
            *(practitioner(team.practitioner_id(i), u) for i, u in enumerate(users)),
        ]
    )
    return team


def join_everyone(team: Team) -> None:
    for user in [team.gp, *team.members]:
        space = wait_until(
            partial(invited_space, user, team.ref), timeout=60, what="invited to the space"
        )
        user.join(space)
        team.space = space


def removed(team: Team, user: MatrixUser) -> bool:
    return user.user_id in leave_times(team)


def leave_times(team: Team) -> dict[str, float]:
    """Member user id → origin_server_ts (s) of their leave from the space, as the GP sees it."""
    chunk = team.gp.request(
        "GET",
        f"/_matrix/client/v3/rooms/{quote(team.space)}/messages?dir=b&limit=1000"
        f"&filter={quote(MEMBER_EVENTS)}",
    )["chunk"]
    return {
        e["state_key"]: e["origin_server_ts"] / 1000
        for e in chunk
        if e["content"].get("membership") == "leave" and e["state_key"] != e["sender"]
    }


def instant(moment: float) -> str:
    return datetime.fromtimestamp(moment, timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def period_end_arm(server: SynapseServer, fhir_url: str, members: int) -> list[float]:
    team = new_team(server, fhir_url, members)
    first_end = time.time() + SETUP_S + members * 0.5
    ends = {i: first_end + i * SPACING_S for i in range(members)}
    team.fhir.put(team.care_team({i: instant(moment) for i, moment in ends.items()}))
    server.notify(team.ref)
    join_everyone(team)
    if time.time() >= first_end:
        raise RuntimeError("the set-up outlasted the first period: raise SETUP_S")
    last = ends[members - 1]
    ids = {team.members[i].user_id: i for i in range(members)}

    def everyone_removed() -> dict[str, float] | None:
        found = leave_times(team)
        return found if set(ids) <= set(found) else None

    times = wait_until(
        everyone_removed,
        timeout=last - time.time() + 2 * TARGET_S,
        what="every member removed after their period's end",
        interval=0.5,
    )
    # (Periods are written with millisecond precision: `ends` is what FHIR holds.)
    return [times[user_id] - round(ends[index], 3) for user_id, index in ids.items()]


def fhir_write_arm(server: SynapseServer, fhir_url: str, members: int) -> list[float]:
    team = new_team(server, fhir_url, members)
    team.fhir.put(team.care_team({}))
    server.notify(team.ref)
    join_everyone(team)
    written: dict[str, float] = {}
    ended: dict[int, str] = {}
    for index, user in enumerate(team.members):
        ended[index] = instant(time.time() - 1)
        team.fhir.put(team.care_team(ended))
        stored = requests.get(f"{fhir_url}/{team.ref}", headers=NO_CACHE, timeout=30).json()
        written[user.user_id] = fhir_instant_seconds(stored["meta"]["lastUpdated"])
        server.notify(team.ref)  # what the shim sends after the commit
        wait_until(
            partial(removed, team, user),
            timeout=2 * TARGET_S,
            what="the member removed after the write",
            interval=0.1,
        )
    times = leave_times(team)
    return [times[user_id] - moment for user_id, moment in written.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--members", type=int, help="members whose period ends (default 20)")
    add_stack_arguments(parser)
    args = parser.parse_args()
    members = args.members or (3 if args.smoke else 20)
    with stack(NAME, args) as the_stack:
        run(the_stack, members)


def run(the_stack: Stack, members: int) -> None:
    server = the_stack.start_synapse(
        "synapse",
        module_config(
            the_stack.fhir_url,
            webhook={"secret": SECRET},
            sync={"poll_interval": "1h", "full_reconcile_interval": "1h"},
        ),
    )
    baseline_samples = fhir_write_arm(server, the_stack.fhir_url, members)
    samples = period_end_arm(server, the_stack.fhir_url, members)
    print(f"  period end → removed: {', '.join(f'{s:.2f}' for s in sorted(samples))} s")
    baseline = Row("FHIR write + notification → removed (baseline)", "s", baseline_samples)
    p95_baseline = Row("  p95 (baseline)", "s", [percentile(baseline_samples, 95)])
    report(
        NAME,
        f"Period end → member removed from the space, {members} members",
        [
            baseline,
            Row(
                "period end → removed, no FHIR write",
                "s",
                samples,
                baseline,
                Target("<=", TARGET_S),
                note="per member: leave event's origin_server_ts minus the period's end",
            ),
            p95_baseline,
            Row(
                "  p95",
                "s",
                [percentile(samples, 95)],
                p95_baseline,
                Target("<=", TARGET_S),
            ),
        ],
        the_stack=the_stack,
        parameters={"members": members, "spacing_s": SPACING_S},
        details={"period_end_s": samples, "fhir_write_s": baseline_samples},
        show_p95=True,
    )


if __name__ == "__main__":
    main()
