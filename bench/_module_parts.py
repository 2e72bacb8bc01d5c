"""Stand-ins for the benchmarks that run the module's own classes in this process, outside
Synapse (membership_decision, scale): the few ModuleApi members those classes touch, the
Matrix side of the sync (which these benchmarks do not count), room bindings, and timing
in rounds.

Nothing here talks to Matrix: what Synapse adds around a callback, and the Matrix writes
of a sync, are measured by the benchmarks that run Synapse.
"""

from __future__ import annotations

import itertools
import logging
import sqlite3
import statistics
import time
from collections.abc import Awaitable, Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeVar

from twisted.internet import defer, reactor, task

from bench._common import Row, Target, percentile
from synapse_fhir_module.enforcement.binding_state import CARE_TEAM_STATE
from synapse_fhir_module.fhir.care_team import Member
from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.sync.membership_plan import MembershipPlan

logger = logging.getLogger(__name__)

SERVER_NAME = "example.org"
T = TypeVar("T")


class BenchApi:
    """The ModuleApi members the directories, the sync, the change queue and the reconcile
    sweep use: caches, background processes, and Synapse's database as an in-memory SQLite
    (the sync's tables: watermarks, the space made per team)."""

    server_name = SERVER_NAME

    def __init__(self) -> None:
        self._db = sqlite3.connect(":memory:")
        self._cursor = self._db.cursor()
        sync_store.create_schema(self._cursor)
        self.background_failures = 0

    def register_cached_function(self, cached_func: Any) -> None:
        pass

    async def invalidate_cache(self, cached_func: Any, keys: tuple[Any, ...]) -> None:
        cached_func.invalidate(keys)

    def run_as_background_process(self, desc: str, func: Any, *args: Any) -> Any:
        # Like Synapse's: a failure is logged, never handed to the caller.
        d = defer.ensureDeferred(func(*args))
        d.addErrback(self._log_failure, desc)
        return d

    def delayed_background_call(self, msec: float, f: Any, *args: Any, desc: str = "") -> Any:
        return reactor.callLater(
            msec / 1000, self.run_as_background_process, desc, _async(f), *args
        )

    async def run_db_interaction(self, desc: str, func: Callable[..., T], *args: Any) -> T:
        return func(self._cursor, *args)

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(f":{SERVER_NAME}")

    def _log_failure(self, failure: Any, desc: str) -> None:
        self.background_failures += 1
        logger.warning("background process %s failed: %s", desc, failure.type.__name__)


def _async(f: Callable[..., Any]) -> Callable[..., Awaitable[Any]]:
    async def call(*args: Any) -> Any:
        result = f(*args)
        if isinstance(result, Awaitable):
            return await result
        return result

    return call


class FixedBinding:
    """Every room belongs to one team (room state lookups are Synapse's cost, not ours)."""

    def __init__(self, team_ref: str) -> None:
        self._team_ref = team_ref

    async def care_team_of(self, room_id: str) -> str | None:
        return self._team_ref

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        return (self._team_ref,)


class MappedBinding:
    """Room id → team, from a dict (as RoomBindings answers once it has seen the room)."""

    def __init__(self, team_of_room: Mapping[str, str]) -> None:
        self._team_of_room = team_of_room

    async def care_team_of(self, room_id: str) -> str | None:
        return self._team_of_room.get(room_id)

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        team = self._team_of_room.get(room_id)
        return (team,) if team else ()


class StandInRooms:
    """The Matrix side of the sync (CareRooms) without Matrix: spaces made, state sent and
    invites given are remembered in memory, so a first sync of a team computes its full
    plan and a second finds Matrix as FHIR says (the steady state of a full reconcile).
    What it would have done is counted."""

    def __init__(self) -> None:
        self._spaces = itertools.count()
        self._state: dict[str, dict[tuple[str, str], dict[str, Any]]] = {}
        self._members: dict[str, dict[str, str]] = {}
        self.spaces = 0
        self.invites = 0
        self.removals = 0
        self.state_sent = 0

    async def create_space(self, team_ref: str, name: str) -> str:
        self.spaces += 1
        space = f"!space{next(self._spaces)}:{SERVER_NAME}"
        self._state[space] = {(CARE_TEAM_STATE, ""): {"reference": team_ref}}
        return space

    async def rooms_of_space(self, space_id: str) -> list[str]:
        return []

    async def memberships(self, room_id: str) -> dict[str, str]:
        return dict(self._members.get(room_id, {}))

    async def binding_state(self, room_id: str) -> dict[tuple[str, str], dict[str, Any]]:
        return dict(self._state.get(room_id, {}))

    async def send_state(
        self, room_id: str, event_type: str, state_key: str, content: dict[str, Any]
    ) -> None:
        self.state_sent += 1
        self._state.setdefault(room_id, {})[(event_type, state_key)] = content

    async def set_power_levels(
        self,
        room_id: str,
        members: Collection[Member],
        *,
        read_only: bool,
        care_team: str | None = None,
        request: str | None = None,
    ) -> None:
        pass

    async def apply_plan(
        self,
        room_id: str,
        plan: MembershipPlan,
        *,
        care_team: str | None = None,
        request: str | None = None,
    ) -> None:
        self.invites += len(plan.invite)
        self.removals += len(plan.remove)
        room = self._members.setdefault(room_id, {})
        room.update(dict.fromkeys(plan.invite, "invite"))
        for user_id in plan.remove:
            room[user_id] = "leave"


# --- Timing in rounds ---------------------------------------------------------------------


@dataclass
class Rounds:
    """Per round: the p50 and p99 of the calls timed in it, in seconds."""

    p50: list[float]
    p99: list[float]
    calls: int

    def rows(
        self,
        measure: str,
        unit: str,
        *,
        baseline: tuple[Row, Row] | None = None,
        p50_target: Target | None = None,
        p99_target: Target | None = None,
        note: str = "",
    ) -> tuple[Row, Row]:
        """A p50 row and a p99 row, each against the baseline's row of the same kind."""
        scale = {"s": 1.0, "ms": 1e3, "µs": 1e6}[unit]
        base50, base99 = baseline if baseline is not None else (None, None)
        return (
            Row(f"{measure} p50", unit, [v * scale for v in self.p50], base50, p50_target, note),
            Row(f"{measure} p99", unit, [v * scale for v in self.p99], base99, p99_target),
        )


async def timed_rounds(
    call: Callable[[int], Awaitable[Any]], *, rounds: int, per_round: int
) -> Rounds:
    """``call(i)`` ``rounds x per_round`` times, one at a time; a p50 and a p99 per round,
    so the median, min and max across rounds say how steady the figure is."""
    p50: list[float] = []
    p99: list[float] = []
    i = 0
    for _ in range(rounds):
        samples = []
        for _ in range(per_round):
            started = time.perf_counter()
            await call(i)
            samples.append(time.perf_counter() - started)
            i += 1
        p50.append(statistics.median(samples))
        p99.append(percentile(samples, 99))
    return Rounds(p50, p99, rounds * per_round)


def run_in_reactor(main: Callable[[], Awaitable[T]]) -> T:
    """Run ``main`` on the Twisted reactor (once per process) and return its result."""
    result: list[T] = []

    async def go(_reactor: Any) -> None:
        result.append(await main())

    try:
        # react() ends with SystemExit: 0 on success, 1 when main() raised.
        task.react(lambda r: defer.ensureDeferred(go(r)))
    except SystemExit as e:
        if e.code:
            raise
    return result[0]
