"""Scale (issue row 6): 10,000 CareTeams x 10 members — the module's cache memory, a full
reconcile, and access decisions at that size.

    python -m bench.scale [--teams N] [--pool P] [--smoke] [--fhir URL [--hapi-pid PID]]

Starts the HAPI dev server (unless --fhir is given), pins it and this process like the
other benchmarks, and seeds it with N CareTeams (FHIR transactions of client-assigned
ids, so seeding again changes nothing). Each team lists its own Patient and 9 people
drawn from a shared pool of P Practitioners and RelatedPersons; every person names its
Matrix account (half by identifier, half by telecom URI).

Everything runs in this process with the module's own classes and its real FHIR client
against that HAPI. **Synapse is not in the loop and Matrix-side changes are not
counted**: the sync's Matrix half is a stand-in whose rooms are new and empty, so each
team's plan invites everyone and nothing is written (rows 1 and 5 of the suite measure
the Matrix side).

- First sweep: ``Reconciler.sweep()`` (the first sweep reads every CareTeam) feeding a
  ``ChangeQueue`` whose apply is ``FhirSync.apply`` — for a CareTeam: its membership into
  a fresh ``CareTeamDirectory`` (one search with ``_include:iterate``), the space
  bookkeeping in an in-memory SQLite standing in for Synapse's database, the membership
  plan, and the search for teams listing this one. Timed from the sweep's start until the
  queue is idle. Baseline: paging every CareTeam with the same includes (what any bridge
  must at least read).
- Full reconcile (issue 11, ``sync.full_reconcile_interval``): ``Reconciler.full_reconcile()``
  right after, every team checked against FHIR while the stand-in Matrix side already
  matches; timed until the queue is idle. It must keep the decision cache whole (no team
  invalidated, as many cached after as before: the run fails otherwise). Same baseline.
- Memory: traced by tracemalloc, what the CareTeamDirectory and the PersonDirectory hold
  after a full reconcile and a lookup of every member (bytes while filled minus bytes once
  both are emptied). Baseline: the same for 100 teams. The directory's cache is sized to
  hold every team (Synapse's ``caches.per_cache_factors.care_team_membership``); as
  shipped it keeps ``MAX_CACHED_TEAMS`` x the default cache factor 0.5 (10,000).
- Decisions: ``CareTeamGate.user_may_join_room`` for random members of random teams with
  every team cached, against the same with one team cached; cold decisions (answer
  forgotten first) against the FHIR search alone; decisions with the cache as shipped;
  ``is_user_expired`` with every member remembered against a few remembered.
"""

from __future__ import annotations

import argparse
import gc
import logging
import math
import random
import resource
import time
import tracemalloc
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import requests
from twisted.internet import defer

from bench._common import NO_CACHE, Row, Target, add_stack_arguments, report, stack
from bench._module_parts import (
    SERVER_NAME,
    BenchApi,
    FixedBinding,
    MappedBinding,
    Rounds,
    StandInRooms,
    run_in_reactor,
    timed_rounds,
)
from devstack.fhir_seed import FhirSeeder
from devstack.waiting import wait_until
from synapse_fhir_module.config import FhirConfig, SyncConfig
from synapse_fhir_module.enforcement.account_validity import AccountValidity
from synapse_fhir_module.enforcement.gate import CareTeamGate
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.persons import matrix_uri
from synapse_fhir_module.fhir.team_directory import (
    MAX_CACHED_TEAMS,
    MEMBERSHIP_INCLUDES,
    CareTeamDirectory,
)
from synapse_fhir_module.sync.change_queue import ChangeQueue
from synapse_fhir_module.sync.fhir_to_matrix import FhirSync
from synapse_fhir_module.sync.reconcile import Reconciler
from synapse_fhir_module.sync.team_boundaries import TeamBoundaries

NAME = "scale"
SERVICE_USER = f"@fhir:{SERVER_NAME}"
TAG_SYSTEM = "https://github.com/synapse-fhir-module/bench/scale"
MEMBERS_FROM_POOL = 9
BUNDLE_ENTRIES = 500
SEED_IN_FLIGHT = 2
SMALL_TEAMS = 100  # the memory baseline
MEMORY_TARGET_MB = 100.0
RECONCILE_TARGET_S = 60.0
COLD_P99_TARGET_MS = 50.0


# --- The care network ---------------------------------------------------------------------


@dataclass
class Network:
    """N teams over a pool of people; ids and Matrix localparts carry ``tag``."""

    teams: int
    pool: int
    tag: str
    members: list[list[str]] = field(default_factory=list)  # per team: person references

    @classmethod
    def plan(cls, teams: int, pool: int, seed: int = 6) -> Network:
        rng = random.Random(seed)
        network = cls(teams, pool, f"s{teams}x{pool}")
        for i in range(teams):
            picked = rng.sample(range(pool), MEMBERS_FROM_POOL)
            network.members.append([network.patient(i), *map(network.pool_person, picked)])
        return network

    def team(self, i: int) -> str:
        return f"CareTeam/t{i}-{self.tag}"

    def patient(self, i: int) -> str:
        return f"Patient/p{i}-{self.tag}"

    def pool_person(self, j: int) -> str:
        # One in five of the pool is a RelatedPerson (a family carer), the rest clinicians.
        kind = "RelatedPerson" if j % 5 == 4 else "Practitioner"
        return f"{kind}/d{j}-{self.tag}"

    def user_of(self, reference: str) -> str:
        """The Matrix account a person names (its id is unique on this server)."""
        return f"@{reference.split('/', 1)[1]}:{SERVER_NAME}"

    def person(self, reference: str, patient: str | None = None) -> dict[str, Any]:
        kind, resource_id = reference.split("/", 1)
        user_id = self.user_of(reference)
        # Half the people by identifier, half by telecom URI: the module reads both.
        if sum(map(ord, resource_id)) % 2:
            identity: dict[str, Any] = {
                "identifier": [{"system": MATRIX_ID_SYSTEM, "value": user_id}]
            }
        else:
            identity = {"telecom": [{"system": "url", "value": matrix_uri(user_id)}]}
        resource = {"resourceType": kind, "id": resource_id, "active": True, **identity}
        if patient is not None:
            resource["patient"] = {"reference": patient}
        return resource | {"meta": {"tag": [{"system": TAG_SYSTEM, "code": self.tag}]}}

    def care_team(self, i: int) -> dict[str, Any]:
        participants = [
            {"member": {"reference": ref, "type": ref.split("/", 1)[0]}} for ref in self.members[i]
        ]
        return {
            "resourceType": "CareTeam",
            "id": self.team(i).split("/", 1)[1],
            "meta": {"tag": [{"system": TAG_SYSTEM, "code": self.tag}]},
            "status": "active",
            "name": "Care team",
            "subject": {"reference": self.patient(i), "type": "Patient"},
            "participant": participants,
        }

    def phases(self) -> Iterator[list[dict[str, Any]]]:
        """The resources in an order HAPI's referential integrity accepts: what a phase
        references was written in an earlier one."""
        yield [
            *(self.person(self.patient(i)) for i in range(self.teams)),
            *(
                self.person(self.pool_person(j))
                for j in range(self.pool)
                if self.pool_person(j).startswith("Practitioner/")
            ),
        ]
        yield [
            self.person(self.pool_person(j), patient=self.patient(j % self.teams))
            for j in range(self.pool)
            if self.pool_person(j).startswith("RelatedPerson/")
        ]
        yield [self.care_team(i) for i in range(self.teams)]

    def users(self, teams: range | None = None) -> list[str]:
        chosen = range(self.teams) if teams is None else teams
        return list(dict.fromkeys(self.user_of(ref) for i in chosen for ref in self.members[i]))


def seed(network: Network, fhir_url: str) -> float:
    """Write the network (transactions of BUNDLE_ENTRIES PUTs, SEED_IN_FLIGHT at a time) and
    wait until a search counts every team; the seconds that took."""
    started = time.perf_counter()
    seeder = FhirSeeder(fhir_url)

    def put_all(resources: list[dict[str, Any]]) -> None:
        seeder.put_all(resources, timeout=600)  # (a large transaction on a busy HAPI)

    with ThreadPoolExecutor(max_workers=SEED_IN_FLIGHT, thread_name_prefix="seed") as pool:
        for phase in network.phases():
            chunks = [
                phase[start : start + BUNDLE_ENTRIES]
                for start in range(0, len(phase), BUNDLE_ENTRIES)
            ]
            for future in [pool.submit(put_all, chunk) for chunk in chunks]:
                future.result()

    def all_teams_found() -> bool:
        response = requests.get(
            f"{fhir_url}/CareTeam",
            params={"_tag": f"{TAG_SYSTEM}|{network.tag}", "_summary": "count"},
            headers=NO_CACHE,
            timeout=60,
        )
        response.raise_for_status()
        return int(response.json()["total"]) >= network.teams

    wait_until(all_teams_found, timeout=600, what="every seeded CareTeam searchable", interval=1)
    return time.perf_counter() - started


# --- The module's parts -------------------------------------------------------------------


class CountingFhirClient(FhirClient):
    """The module's FHIR client, counting its HTTP exchanges."""

    requests_made = 0

    async def _send(self, *args: Any, **kwargs: Any) -> tuple[int, bytes]:
        self.requests_made += 1
        return await super()._send(*args, **kwargs)


def fhir_client(fhir_url: str) -> CountingFhirClient:
    return CountingFhirClient(FhirConfig(base_url=fhir_url, timeout=60.0))


def directory(api: BenchApi, fhir: FhirClient, teams: int | None) -> CareTeamDirectory:
    """A CareTeamDirectory; ``teams``: size its cache to hold that many (as
    ``caches.per_cache_factors.care_team_membership`` would), None: as shipped."""
    directory = CareTeamDirectory(api, fhir, ttl=24 * 3600.0)  # type: ignore[arg-type]
    if teams is not None:
        lru = directory.care_team_membership.cache.cache
        lru.set_cache_factor(max(1.0, math.ceil(teams * 1.1 / MAX_CACHED_TEAMS)))
    return directory


def cached_teams(teams: CareTeamDirectory) -> int:
    return len(teams.care_team_membership.cache.cache)


@dataclass
class Reconcile:
    seconds: float  # the first sweep, every team new: until the queue is idle
    synced: int  # references the queue applied
    fhir_requests: int
    spaces: int
    invites: int
    failures: int
    teams: CareTeamDirectory
    # The full reconcile after it (every team checked, Matrix already as FHIR says).
    full_seconds: float = 0.0
    full_checked: int = 0
    full_fhir_requests: int = 0
    full_invalidations: int = 0  # team answers forgotten meanwhile: none, the cache stays
    cached_before_full: int = 0
    cached_after_full: int = 0
    boundaries: int = 0


async def full_reconcile(fhir_url: str, *, cache_for: int | None) -> Reconcile:
    """A first sweep with everything fresh (directory, queue, watermarks), until idle; then
    the full reconcile (``sync.full_reconcile_interval``) over the same, until idle."""
    api = BenchApi()
    fhir = fhir_client(fhir_url)
    teams = directory(api, fhir, cache_for)
    rooms = StandInRooms()
    failures = synced = invalidations = 0
    # Who waits for the queue to be idle (one waiter at a time, made when it starts waiting:
    # the queue also falls idle between two pages of a sweep, which is not the end).
    waiter: defer.Deferred[None] | None = None
    failure: Exception | None = None
    queue: ChangeQueue | None = None

    def check(team_ref: str) -> None:
        assert queue is not None
        queue.check(team_ref)

    boundaries = TeamBoundaries(api, check)  # type: ignore[arg-type]
    sync = FhirSync(
        api,  # type: ignore[arg-type]
        SyncConfig(),
        fhir,
        teams,
        rooms,  # type: ignore[arg-type]
        service_user_id=SERVICE_USER,
        exempt_users=frozenset({SERVICE_USER}),
        bindings=RoomBindings(api, fhir, SERVICE_USER),  # type: ignore[arg-type]
        persons=PersonDirectory(fhir),
        boundaries=boundaries,
        now_ms=lambda: int(time.time() * 1000),
    )

    async def invalidate(reference: str) -> None:
        # FhirModule.invalidate, for what a CareTeam sweep queues.
        nonlocal invalidations
        if reference.startswith("CareTeam/"):
            invalidations += 1
            await teams.invalidate_team(reference)
        await teams.invalidate_resource(reference)

    async def apply(reference: str, changed: bool) -> None:
        nonlocal failures, synced
        synced += 1
        try:
            await sync.apply(reference, changed)
        except Exception as e:
            nonlocal failure
            failures += 1
            # The queue would retry it for ever: the measurement is void, say so now.
            failure = RuntimeError(f"reconcile: the sync of {reference} failed: {e!r}")
            if waiter is not None and not waiter.called:
                waiter.errback(failure)
            raise

    queue = ChangeQueue(api, apply, invalidate, prepare=sync.prepare)  # type: ignore[arg-type]
    reconciler = Reconciler(api, fhir, queue)  # type: ignore[arg-type]

    async def on_idle() -> None:
        if waiter is not None and not waiter.called:
            waiter.callback(None)

    async def until_idle() -> None:
        nonlocal waiter
        assert queue is not None
        if failure is not None:
            raise failure
        if queue.idle:
            return
        waiter = defer.Deferred()
        await waiter

    queue.when_idle(on_idle)
    await sync.start()
    queue.open()
    started = time.perf_counter()
    await reconciler.sweep()
    await until_idle()
    seconds = time.perf_counter() - started
    if failures or api.background_failures:
        raise RuntimeError(f"reconcile: {failures} syncs, {api.background_failures} jobs failed")
    result = Reconcile(
        seconds, synced, fhir.requests_made, rooms.spaces, rooms.invites, failures, teams
    )

    # The full reconcile: every team checked again, Matrix already matching.
    synced_before, requests_before, invalidations = synced, fhir.requests_made, 0
    result.cached_before_full = cached_teams(teams)
    started = time.perf_counter()
    await reconciler.full_reconcile()
    await until_idle()
    result.full_seconds = time.perf_counter() - started
    if failures or api.background_failures:
        raise RuntimeError(f"full reconcile: {failures} syncs failed")
    result.full_checked = synced - synced_before
    result.full_fhir_requests = fhir.requests_made - requests_before
    result.full_invalidations = invalidations
    result.cached_after_full = cached_teams(teams)
    result.boundaries = len(boundaries)
    for team_ref in list(boundaries._timers):  # (no timer may outlive the run)
        boundaries.cancel(team_ref)
    return result


async def page_all_teams(fhir: FhirClient) -> tuple[float, int, int]:
    """Every CareTeam with what it reaches, page by page: (seconds, teams, included)."""
    started = time.perf_counter()
    teams = included = 0
    params = [("_count", "100"), *MEMBERSHIP_INCLUDES]
    async for page in fhir.search_pages_json("CareTeam", params):
        for entry in page.get("entry") or []:
            if (entry.get("search") or {}).get("mode", "match") == "match":
                teams += 1
            else:
                included += 1
    return time.perf_counter() - started, teams, included


def small_teams(network: Network) -> int:
    return min(SMALL_TEAMS, network.teams)


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def traced_bytes() -> int:
    gc.collect()
    return tracemalloc.get_traced_memory()[0]


def empty(teams: CareTeamDirectory, persons: PersonDirectory) -> None:
    """Drop everything both directories remember."""
    teams.care_team_membership.cache.invalidate_all()
    teams._dependents.clear()  # (what a cleared cache leaves behind otherwise)
    persons._records.clear()


async def filled_bytes(
    network: Network, fhir_url: str, team_range: range, *, via_reconcile: bool
) -> dict[str, Any]:
    """Bytes the two directories hold once filled with ``team_range``'s teams and members.

    tracemalloc must be running. ``via_reconcile``: fill the team directory by a full
    reconcile (every team on the server), else by asking for each team in the range."""
    before = traced_bytes()
    started = time.perf_counter()
    if via_reconcile:
        result = await full_reconcile(fhir_url, cache_for=network.teams)
        teams, fhir = result.teams, fhir_client(fhir_url)
    else:
        fhir = fhir_client(fhir_url)
        teams = directory(BenchApi(), fhir, len(team_range))
        for i in team_range:
            await teams.membership(network.team(i))
    fill_seconds = time.perf_counter() - started
    persons = PersonDirectory(fhir)
    started = time.perf_counter()
    await persons.refresh(network.users(team_range))
    person_seconds = time.perf_counter() - started
    filled = traced_bytes()
    held_teams = cached_teams(teams)
    held_users = len(persons.remembered_users())
    empty(teams, persons)
    emptied = traced_bytes()
    return {
        "bytes": filled - emptied,
        "teams_cached": held_teams,
        "users_remembered": held_users,
        "traced_before_fill": before,
        "traced_filled": filled,
        "traced_emptied": emptied,
        "fill_seconds_traced": round(fill_seconds, 1),
        "person_lookup_seconds_traced": round(person_seconds, 1),
    }


# --- Decisions ----------------------------------------------------------------------------


def gate_for(teams: CareTeamDirectory, binding: Any) -> CareTeamGate:
    return CareTeamGate(
        binding,
        teams,
        service_user_id=SERVICE_USER,
        exempt_users=(),
        fail_closed=True,
        is_local=lambda user_id: user_id.endswith(f":{SERVER_NAME}"),
        remove_member_soon=lambda room_id, user_id: None,
    )


@dataclass
class Picks:
    """Random (room, member) pairs over ``teams`` teams; room i belongs to team i."""

    rooms: list[str]
    users: list[str]

    @classmethod
    def over(cls, network: Network, teams: int, count: int, seed: int) -> Picks:
        rng = random.Random(seed)
        picked = [rng.randrange(teams) for _ in range(count)]
        return cls(
            [f"!room{i}:{SERVER_NAME}" for i in picked],
            [network.user_of(rng.choice(network.members[i])) for i in picked],
        )


def room_map(network: Network) -> dict[str, str]:
    return {f"!room{i}:{SERVER_NAME}": network.team(i) for i in range(network.teams)}


async def decisions(
    network: Network,
    fhir_url: str,
    full: CareTeamDirectory,
    *,
    rounds: int,
    per_round: int,
    cold_per_round: int,
) -> dict[str, Rounds]:
    out: dict[str, Rounds] = {}
    count = rounds * per_round
    rooms = room_map(network)
    picks = Picks.over(network, network.teams, count, seed=1)

    # Baseline: one team cached, one member.
    fhir = fhir_client(fhir_url)
    one = directory(BenchApi(), fhir, None)
    one_gate = gate_for(one, FixedBinding(network.team(0)))
    first_member = network.user_of(network.members[0][1])
    await one_gate.user_may_join_room(first_member, "!room0:example.org", False)

    async def decide_one(i: int) -> str:
        return await one_gate.user_may_join_room(first_member, "!room0:example.org", False)

    # Every team cached (after the full reconcile).
    full_gate = gate_for(full, MappedBinding(rooms))
    assert cached_teams(full) >= network.teams, "the full directory lost teams"

    async def decide_full(i: int) -> str:
        return await full_gate.user_may_join_room(picks.users[i], picks.rooms[i], False)

    # Interleaved round by round, so both see the same machine.
    out["one"], out["full"] = Rounds([], [], 0), Rounds([], [], 0)
    for r in range(rounds):
        for key, call in (("one", decide_one), ("full", decide_full)):
            offset = r * per_round

            async def shifted(i: int, call: Callable[[int], Any] = call, o: int = offset) -> Any:
                return await call(o + i)

            got = await timed_rounds(shifted, rounds=1, per_round=per_round)
            out[key].p50 += got.p50
            out[key].p99 += got.p99
            out[key].calls += got.calls

    # Cold: forget the team's answer first, then decide (one FHIR search), against the
    # search alone, on random teams of the full set.
    cold_dir = directory(BenchApi(), fhir, network.teams)
    cold_gate = gate_for(cold_dir, MappedBinding(rooms))
    cold_picks = Picks.over(network, network.teams, 2 * rounds * cold_per_round, seed=2)

    async def decide_cold(i: int) -> str:
        room = cold_picks.rooms[i]
        await cold_dir.invalidate_team(rooms[room])
        return await cold_gate.user_may_join_room(cold_picks.users[i], room, False)

    async def search_only(i: int) -> Any:
        team_id = rooms[cold_picks.rooms[i]].split("/", 1)[1]
        return await fhir.search_json("CareTeam", [("_id", team_id), *MEMBERSHIP_INCLUDES])

    await timed_rounds(decide_cold, rounds=1, per_round=cold_per_round)  # HAPI's JIT
    out["cold"], out["search"] = Rounds([], [], 0), Rounds([], [], 0)
    for r in range(rounds):
        for key, call in (("cold", decide_cold), ("search", search_only)):
            offset = (r + 1) * cold_per_round

            async def shifted_cold(
                i: int, call: Callable[[int], Any] = call, o: int = offset
            ) -> Any:
                return await call(o + i)

            got = await timed_rounds(shifted_cold, rounds=1, per_round=cold_per_round)
            out[key].p50 += got.p50
            out[key].p99 += got.p99
            out[key].calls += got.calls
    return out


async def shipped_cache_decisions(
    network: Network, teams: CareTeamDirectory, *, rounds: int, per_round: int
) -> Rounds:
    """Random decisions on a directory whose cache is as shipped, once it is full: what
    random access finds after a full reconcile too (the last teams synced), so most
    decisions ask FHIR."""
    gate = gate_for(teams, MappedBinding(room_map(network)))
    capacity = teams.care_team_membership.cache.cache.max_size
    warm = min(network.teams, capacity + 100)
    picks = Picks.over(network, network.teams, warm + rounds * per_round, seed=3)

    async def decide(i: int) -> str:
        return await gate.user_may_join_room(picks.users[i], picks.rooms[i], False)

    for i in range(warm):  # until the cache is full (or holds every team)
        await decide(i)

    async def measured(i: int) -> str:
        return await decide(warm + i)

    return await timed_rounds(measured, rounds=rounds, per_round=per_round)


async def validity_rounds(
    network: Network, fhir_url: str, persons: PersonDirectory, *, rounds: int, per_round: int
) -> dict[str, Rounds]:
    """is_user_expired with every member remembered, against 10 remembered."""
    api = BenchApi()
    few_persons = PersonDirectory(fhir_client(fhir_url))
    few_users = network.users(range(1))
    await few_persons.refresh(few_users)
    few = AccountValidity(api, few_persons, exempt_users=(), expire_unmapped=False)  # type: ignore[arg-type]
    full = AccountValidity(api, persons, exempt_users=(), expire_unmapped=False)  # type: ignore[arg-type]
    rng = random.Random(4)
    all_users = persons.remembered_users()
    many_picks = [rng.choice(all_users) for _ in range(rounds * per_round)]
    few_picks = [rng.choice(few_users) for _ in range(rounds * per_round)]

    async def few_call(i: int) -> bool | None:
        return await few.is_user_expired(few_picks[i])

    async def many_call(i: int) -> bool | None:
        return await full.is_user_expired(many_picks[i])

    return {
        "few": await timed_rounds(few_call, rounds=rounds, per_round=per_round),
        "many": await timed_rounds(many_call, rounds=rounds, per_round=per_round),
    }


# --- The run ------------------------------------------------------------------------------


@dataclass
class Sizes:
    teams: int
    pool: int
    reconcile_runs: int
    rounds: int
    decisions_per_round: int
    cold_per_round: int
    shipped_per_round: int


async def measure(network: Network, fhir_url: str, sizes: Sizes) -> dict[str, Any]:
    out: dict[str, Any] = {"details": {}}
    details = out["details"]
    fhir = fhir_client(fhir_url)
    # Warm HAPI and the client on the very searches measured below.
    for i in range(min(20, network.teams)):
        await fhir.search_json(
            "CareTeam", [("_id", network.team(i).split("/", 1)[1]), *MEMBERSHIP_INCLUDES]
        )

    # Full reconcile, against paging everything, in turns; each directory's cache sized for
    # every team. The first run's directory is kept for the decisions.
    paging: list[float] = []
    reconcile: list[float] = []
    full_reconcile_s: list[float] = []
    kept: list[Reconcile] = []  # the first run's
    for run in range(sizes.reconcile_runs):
        seconds, teams_read, included = await page_all_teams(fhir)
        paging.append(seconds)
        details.setdefault("paging", []).append(
            {"seconds": round(seconds, 2), "teams": teams_read, "included": included}
        )
        result = await full_reconcile(fhir_url, cache_for=network.teams)
        reconcile.append(result.seconds)
        full_reconcile_s.append(result.full_seconds)
        if result.synced < network.teams or result.full_checked < network.teams:
            raise RuntimeError(
                f"not every team was synced: {result.synced} by the first sweep,"
                f" {result.full_checked} by the full reconcile, of {network.teams}"
            )
        if result.full_invalidations or result.cached_after_full < result.cached_before_full:
            raise RuntimeError(
                f"the full reconcile evicted the cache: {result.full_invalidations} teams"
                f" invalidated, {result.cached_before_full} → {result.cached_after_full} cached"
            )
        details.setdefault("reconcile", []).append(
            {
                "run": run + 1,
                "seconds": round(result.seconds, 2),
                "teams_synced": result.synced,
                "fhir_requests": result.fhir_requests,
                "fhir_requests_per_team": round(result.fhir_requests / max(result.synced, 1), 2),
                "spaces_planned": result.spaces,
                "invites_planned": result.invites,
                "teams_cached_after": cached_teams(result.teams),
                "full_reconcile_seconds": round(result.full_seconds, 2),
                "full_reconcile_teams_checked": result.full_checked,
                "full_reconcile_fhir_requests": result.full_fhir_requests,
                "full_reconcile_invalidations": result.full_invalidations,
                "teams_cached_before_full": result.cached_before_full,
                "teams_cached_after_full": result.cached_after_full,
                "boundaries_scheduled": result.boundaries,
            }
        )
        print(
            f"  reconcile run {run + 1}: first sweep {result.seconds:.1f} s for {result.synced}"
            f" teams ({result.fhir_requests} FHIR requests); full reconcile"
            f" {result.full_seconds:.1f} s for {result.full_checked} ({result.full_fhir_requests}"
            f" requests, cache {result.cached_before_full} → {result.cached_after_full});"
            f" paging alone {seconds:.1f} s",
            flush=True,
        )
        kept[1:] = []
        kept.append(result)
    out["full_reconcile"] = full_reconcile_s
    out["paging"], out["reconcile"] = paging, reconcile
    full = kept[0].teams
    del kept

    # Memory: tracemalloc from here on (it slows Python down: nothing timed above).
    rss_before = rss_mb()
    tracemalloc.start()
    small = await filled_bytes(network, fhir_url, range(small_teams(network)), via_reconcile=False)
    print(f"  memory, {small_teams(network)} teams: {small['bytes'] / 1e6:.2f} MB", flush=True)
    big = await filled_bytes(network, fhir_url, range(network.teams), via_reconcile=True)
    print(f"  memory, {network.teams} teams: {big['bytes'] / 1e6:.1f} MB", flush=True)
    tracemalloc.stop()
    rss_after = rss_mb()
    details["memory_small"], details["memory_full"] = small, big
    out["memory_small"], out["memory_full"] = small["bytes"], big["bytes"]

    # Decisions on the first run's directory; every member's person looked up (untraced).
    persons = PersonDirectory(fhir)
    await persons.refresh(network.users())
    details["rss_mb"] = {
        "before_traced_fill": round(rss_before, 1),
        "after_traced_fill": round(rss_after, 1),
        "after_person_lookup": round(rss_mb(), 1),
        "peak": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
    }
    out["decisions"] = await decisions(
        network,
        fhir_url,
        full,
        rounds=sizes.rounds,
        per_round=sizes.decisions_per_round,
        cold_per_round=sizes.cold_per_round,
    )
    out["validity"] = await validity_rounds(
        network, fhir_url, persons, rounds=sizes.rounds, per_round=sizes.decisions_per_round
    )
    shipped = directory(BenchApi(), fhir, None)
    out["shipped"] = await shipped_cache_decisions(
        network, shipped, rounds=sizes.rounds, per_round=sizes.shipped_per_round
    )
    details["shipped_cache_teams_held"] = cached_teams(shipped)
    return out


def rows_of(network: Network, out: dict[str, Any], sizes: Sizes) -> list[Row]:
    n = f"{network.teams:,}"
    paging = Row("read all CareTeams + includes (baseline)", "s", out["paging"])
    small_mb = out["memory_small"] / 1e6
    full_mb = out["memory_full"] / 1e6
    memory_small = Row(
        f"cache memory, {small_teams(network)} teams (baseline)",
        "MB",
        [small_mb],
        note=f"{out['memory_small'] / small_teams(network) / 1e3:.1f} kB per team",
    )
    decisions: dict[str, Rounds] = out["decisions"]
    one = decisions["one"].rows("decision, 1 team cached (baseline)", "µs")
    search = decisions["search"].rows("FHIR membership search alone (baseline)", "ms")
    few = out["validity"]["few"].rows("is_user_expired, 10 remembered (baseline)", "µs")
    return [
        paging,
        Row(
            f"first sweep (every team new), {n} teams",
            "s",
            out["reconcile"],
            paging,
            Target("<=", RECONCILE_TARGET_S),
            note="first sweep until the queue is idle; Matrix writes not counted",
        ),
        Row(
            f"full reconcile (every team checked), {n} teams",
            "s",
            out["full_reconcile"],
            paging,
            Target("<=", RECONCILE_TARGET_S),
            note=(
                "sync.full_reconcile_interval, after the first sweep: no team invalidated,"
                " the decision cache kept whole (checked), boundaries scheduled"
            ),
        ),
        memory_small,
        Row(
            f"cache memory, {n} teams",
            "MB",
            [full_mb],
            memory_small,
            Target("<=", MEMORY_TARGET_MB),
            note=(
                f"CareTeamDirectory + PersonDirectory, tracemalloc;"
                f" {out['memory_full'] / network.teams / 1e3:.1f} kB per team"
            ),
        ),
        *one,
        *decisions["full"].rows(f"decision, {n} teams cached", "µs", baseline=one),
        *search,
        *decisions["cold"].rows(
            f"cold decision, {n} teams in FHIR",
            "ms",
            baseline=search,
            p99_target=Target("<=", COLD_P99_TARGET_MS),
        ),
        *out["shipped"].rows(
            f"decision, cache as shipped, {n} teams",
            "ms",
            baseline=search,
            note=(
                f"the directory's cache holds {out['details']['shipped_cache_teams_held']}"
                f" teams as shipped ({MAX_CACHED_TEAMS:,} x cache factor 0.5); measured once"
                " it is full"
            ),
        ),
        *few,
        *out["validity"]["many"].rows(
            f"is_user_expired, {len(network.users()):,} remembered", "µs", baseline=few
        ),
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--teams", type=int, help="CareTeams (default 10,000; smoke: 50)")
    parser.add_argument("--pool", type=int, help="shared people (default 2,000; smoke: 40)")
    parser.add_argument(
        "--reconcile-runs",
        type=int,
        default=1,
        help="full reconciles timed (besides the one traced for memory)",
    )
    parser.add_argument("--rounds", type=int, default=5)
    add_stack_arguments(parser)
    args = parser.parse_args()
    smoke = bool(args.smoke)
    teams = args.teams or (50 if smoke else 10_000)
    sizes = Sizes(
        teams=teams,
        pool=args.pool or (40 if smoke else 2000),
        reconcile_runs=args.reconcile_runs,
        rounds=args.rounds if not smoke else min(args.rounds, 3),
        decisions_per_round=200 if smoke else 2000,
        cold_per_round=5 if smoke else 40,
        shipped_per_round=20 if smoke else 100,
    )
    if sizes.reconcile_runs < 1:
        parser.error("--reconcile-runs must be at least 1")
    if sizes.pool < MEMBERS_FROM_POOL:
        parser.error(f"--pool must be at least {MEMBERS_FROM_POOL}")
    network = Network.plan(sizes.teams, sizes.pool)
    # Each fresh directory registers its cache's metrics again; Synapse logs that as an
    # error, harmless outside Synapse.
    logging.getLogger("synapse.util.metrics").setLevel(logging.CRITICAL)

    with stack(NAME, args) as the_stack:
        seconds = seed(network, the_stack.fhir_url)
        print(f"seeded {teams:,} teams over {sizes.pool:,} people in {seconds:.0f} s", flush=True)
        out = run_in_reactor(lambda: measure(network, the_stack.fhir_url, sizes))
        out["details"]["seed_seconds"] = round(seconds, 1)
        report(
            NAME,
            f"Scale: {teams:,} CareTeams x 10 members, in-process (Synapse and Matrix writes"
            " not counted)",
            rows_of(network, out, sizes),
            the_stack=the_stack,
            parameters={
                "teams": sizes.teams,
                "pool": sizes.pool,
                "members_per_team": MEMBERS_FROM_POOL + 1,
                "reconcile_runs": sizes.reconcile_runs,
                "rounds": sizes.rounds,
                "decisions_per_round": sizes.decisions_per_round,
                "cold_decisions_per_round": sizes.cold_per_round,
                "shipped_cache_decisions_per_round": sizes.shipped_per_round,
            },
            details=out["details"],
        )


if __name__ == "__main__":
    main()
