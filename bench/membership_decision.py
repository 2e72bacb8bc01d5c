"""Cost of a care-team decision inside the callback, and of is_user_expired.

    python -m bench.membership_decision [--runs N] [--fhir URL]

Starts the HAPI dev server (unless --fhir is given), writes a care network, and calls
the module's own callback objects (CareTeamGate, AccountValidity) with the real FHIR
client, in this process. What Synapse itself adds around a callback is not counted;
the baseline, measured in the same run and the same way, is a callback that does
nothing but return NOT_SPAM.

- cached: user_may_join_room for a member, the team's answer already in memory;
- cold: the same after forgetting the answer (one FHIR search with _include:iterate);
- is_user_expired: for a remembered account.
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from synapse.module_api import NOT_SPAM
from twisted.internet import defer, task

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from synapse_fhir_module.account_validity import AccountValidity
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.enforcement import CareTeamGate
from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.person_directory import PersonDirectory
from synapse_fhir_module.team_directory import MEMBERSHIP_INCLUDES, CareTeamDirectory
from tests.integration.care_network import CareNetwork

ROOM = "!bench:example.org"


class BenchApi:
    """The few ModuleApi members these parts touch, for running them outside Synapse."""

    server_name = "example.org"

    def register_cached_function(self, cached_func: Any) -> None:
        pass

    async def invalidate_cache(self, cached_func: Any, keys: tuple[Any, ...]) -> None:
        cached_func.invalidate(keys)

    def run_as_background_process(self, desc: str, func: Any, *args: Any) -> Any:
        return defer.ensureDeferred(func(*args))


class FixedBinding:
    """Every room belongs to one team (room state lookups are Synapse's cost, not ours)."""

    def __init__(self, team_ref: str) -> None:
        self._team_ref = team_ref

    async def care_team_of(self, room_id: str) -> str | None:
        return self._team_ref


async def timed(call: Callable[[], Awaitable[Any]], runs: int) -> list[float]:
    samples = []
    for _ in range(runs):
        started = time.perf_counter()
        await call()
        samples.append(time.perf_counter() - started)
    return samples


def summary_us(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)
    return {
        "p50_us": round(statistics.median(ordered) * 1e6, 1),
        "p99_us": round(ordered[int(len(ordered) * 0.99) - 1] * 1e6, 1),
        "max_us": round(ordered[-1] * 1e6, 1),
    }


async def run(fhir_url: str, runs: int) -> dict[str, Any]:
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
        is_local=lambda user_id: user_id.endswith(":example.org"),
        remove_member_soon=lambda room_id, user_id: None,
    )
    member = network.user_id("anna")

    async def noop_callback() -> str:
        return NOT_SPAM

    async def decide() -> str:
        return await gate.user_may_join_room(member, ROOM, False)

    async def decide_cold() -> str:
        await teams.invalidate_team(network.team)
        return await gate.user_may_join_room(member, ROOM, False)

    team_id = network.team.split("/", 1)[1]

    async def search_only() -> Any:
        # The FHIR round trip a cold decision makes, without the module's processing.
        return await fhir.search_json("CareTeam", [("_id", team_id), *MEMBERSHIP_INCLUDES])

    persons = PersonDirectory(fhir)
    validity = AccountValidity(api, persons, exempt_users=(), expire_unmapped=False)
    await persons.refresh([member])

    async def expired() -> bool | None:
        return await validity.is_user_expired(member)

    await decide()  # warm up connections and code paths
    baseline = await timed(noop_callback, runs)
    cached = await timed(decide, runs)
    cold_runs = max(runs // 50, 50)
    await timed(decide_cold, cold_runs)  # let HAPI's JIT settle on this query first
    cold = await timed(decide_cold, cold_runs)
    search = await timed(search_only, cold_runs)
    validity_samples = await timed(expired, runs)
    base_p50 = statistics.median(baseline)
    return {
        "runs": runs,
        "baseline_noop_callback": summary_us(baseline),
        "cached_decision": summary_us(cached)
        | {"ratio_p50_vs_baseline": round(statistics.median(cached) / base_p50, 1)},
        "cold_decision": summary_us(cold),
        "cold_fhir_search_alone": summary_us(search),
        "is_user_expired": summary_us(validity_samples)
        | {"ratio_p50_vs_baseline": round(statistics.median(validity_samples) / base_p50, 1)},
        "targets": {"cached_p50_us": 50, "cold_p99_ms": 50},
    }


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--runs", type=int, default=5000)
    parser.add_argument("--fhir", help="use this FHIR base URL instead of starting HAPI")
    args = parser.parse_args()

    hapi = None
    fhir_url = args.fhir
    if fhir_url is None:
        hapi = HapiDevServer(Path(tempfile.mkdtemp(prefix="bench-decision-")))
        hapi.start()
        fhir_url = hapi.base_url
    result: dict[str, Any] = {}
    try:

        async def go(reactor: Any) -> None:
            result.update(await run(fhir_url, args.runs))

        # react() ends with SystemExit: 0 on success, 1 when run() raised.
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    finally:
        if hapi is not None:
            hapi.stop()
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
