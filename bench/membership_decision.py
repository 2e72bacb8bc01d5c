"""Cost of a care-team decision inside the callback, and of is_user_expired.

    python -m bench.membership_decision [--runs N] [--rounds R] [--smoke]
        [--fhir URL [--hapi-pid PID]]

Starts the HAPI dev server (unless --fhir is given), pins it and this process like the
other benchmarks, writes a care network, and calls the module's own callback objects
(CareTeamGate, AccountValidity) with the real FHIR client, in this process. What Synapse
itself adds around a callback is not counted. Baselines, measured in the same run the
same way:

- cached: user_may_join_room for a member, the team's answer already in memory — against
  a callback that does nothing but return NOT_SPAM;
- cold: the same after forgetting the answer (one FHIR search with _include:iterate) —
  against that FHIR search alone;
- is_user_expired: for a remembered account — against the no-op callback.

Each measure is timed in R rounds; each round gives one p50 and one p99, and the table
shows their median, min and max across rounds.
"""

from __future__ import annotations

import argparse
import uuid
from typing import Any

from synapse.module_api import NOT_SPAM

from bench._common import Row, Target, add_stack_arguments, report, stack
from bench._module_parts import BenchApi, FixedBinding, Rounds, run_in_reactor, timed_rounds
from devstack.fhir_seed import FhirSeeder
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.enforcement.account_validity import AccountValidity
from synapse_fhir_module.enforcement.gate import CareTeamGate
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import MEMBERSHIP_INCLUDES, CareTeamDirectory
from tests.integration.care_network import CareNetwork

NAME = "membership_decision"
ROOM = "!bench:example.org"
COLD_P99_MS = 50.0
CACHED_P50_US = 50.0


async def measure(fhir_url: str, runs: int, rounds: int) -> dict[str, Rounds]:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(fhir_url))
    fhir = FhirClient(FhirConfig(base_url=fhir_url, timeout=10.0))
    api: Any = BenchApi()
    teams = CareTeamDirectory(api, fhir, ttl=3600.0)
    gate = CareTeamGate(
        FixedBinding(network.team),  # type: ignore[arg-type]
        teams,
        service_user_id="@fhir:example.org",
        exempt_users=(),
        fail_closed=True,
        is_local=api.is_mine,
        remove_member_soon=lambda room_id, user_id: None,
    )
    member = network.user_id("anna")
    team_id = network.team.split("/", 1)[1]

    async def noop_callback(_: int) -> str:
        return NOT_SPAM

    async def decide(_: int) -> str:
        return await gate.user_may_join_room(member, ROOM, False)

    async def decide_cold(_: int) -> str:
        await teams.invalidate_team(network.team)
        return await gate.user_may_join_room(member, ROOM, False)

    async def search_only(_: int) -> Any:
        # The FHIR round trip a cold decision makes, without the module's processing.
        return await fhir.search_json("CareTeam", [("_id", team_id), *MEMBERSHIP_INCLUDES])

    persons = PersonDirectory(fhir)
    validity = AccountValidity(api, persons, exempt_users=(), expire_unmapped=False)
    await persons.refresh([member])

    async def expired(_: int) -> bool | None:
        return await validity.is_user_expired(member)

    per_round = max(runs // rounds, 1)
    cold_per_round = max(per_round // 50, 10)
    await decide(0)  # warm up connections and code paths
    results = {
        "noop": await timed_rounds(noop_callback, rounds=rounds, per_round=per_round),
        "cached": await timed_rounds(decide, rounds=rounds, per_round=per_round),
    }
    # Let HAPI's JIT settle on this query first.
    await timed_rounds(decide_cold, rounds=1, per_round=cold_per_round * 2)
    # Cold decisions and the search alone take turns round by round, so both see the same
    # HAPI (its JIT, its garbage collector, a neighbour's load).
    cold = Rounds([], [], 0)
    search = Rounds([], [], 0)
    for _ in range(rounds):
        for into, call in ((cold, decide_cold), (search, search_only)):
            one = await timed_rounds(call, rounds=1, per_round=cold_per_round)
            into.p50 += one.p50
            into.p99 += one.p99
            into.calls += one.calls
    results["cold"] = cold
    results["search"] = search
    results["expired"] = await timed_rounds(expired, rounds=rounds, per_round=per_round)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--runs", type=int, default=5000, help="calls per cached measure")
    parser.add_argument("--rounds", type=int, default=5)
    add_stack_arguments(parser)
    args = parser.parse_args()
    runs = min(args.runs, 500) if args.smoke else args.runs
    rounds = min(args.rounds, 3) if args.smoke else args.rounds

    with stack(NAME, args) as the_stack:
        results = run_in_reactor(lambda: measure(the_stack.fhir_url, runs, rounds))
        noop = results["noop"].rows("no-op callback (baseline)", "µs")
        search = results["search"].rows("FHIR membership search alone (baseline)", "ms")
        rows: list[Row] = [
            *noop,
            *results["cached"].rows(
                "cached decision", "µs", baseline=noop, p50_target=Target("<=", CACHED_P50_US)
            ),
            *search,
            *results["cold"].rows(
                "cold decision",
                "ms",
                baseline=search,
                p99_target=Target("<=", COLD_P99_MS),
                note="forgets the team's answer first: one FHIR search with _include:iterate",
            ),
            *results["expired"].rows("is_user_expired", "µs", baseline=noop),
        ]
        report(
            NAME,
            "Care-team decision and is_user_expired, in-process (Synapse not counted)",
            rows,
            the_stack=the_stack,
            parameters={
                "runs": runs,
                "rounds": rounds,
                "calls_per_round": {k: r.calls // rounds for k, r in results.items()},
            },
        )


if __name__ == "__main__":
    main()
