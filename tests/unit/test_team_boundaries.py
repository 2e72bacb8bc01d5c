"""When a team is synced for its period boundaries (timers, not FHIR writes)."""

from __future__ import annotations

import time
from typing import Any

from synapse_fhir_module.sync.team_boundaries import (
    HORIZON_S,
    MARGIN_S,
    MIN_SPACING_S,
    TeamBoundaries,
)


class Call:
    def __init__(self, delay_s: float, f: Any, args: tuple[Any, ...]) -> None:
        self.delay_s, self.f, self.args, self.cancelled = delay_s, f, args, False

    def active(self) -> bool:
        return not self.cancelled

    def cancel(self) -> None:
        self.cancelled = True


class Api:
    def __init__(self) -> None:
        self.calls: list[Call] = []

    def delayed_background_call(self, msec: float, f: Any, *args: Any, desc: str = "") -> Call:
        call = Call(msec / 1000, f, args)
        self.calls.append(call)
        return call


def boundaries() -> tuple[TeamBoundaries, Api, list[str]]:
    api, fired = Api(), []
    return TeamBoundaries(api, fired.append), api, fired  # type: ignore[arg-type]


def test_a_boundary_fires_just_after_its_moment_and_is_replaced_not_added() -> None:
    timers, api, fired = boundaries()
    moment = time.time() + 30
    timers.schedule("CareTeam/1", moment)
    timers.schedule("CareTeam/1", moment)  # the same again: nothing new
    assert len(api.calls) == 1 and abs(api.calls[0].delay_s - (30 + MARGIN_S)) < 1
    timers.schedule("CareTeam/1", moment + 60)  # moved: the old timer goes
    assert api.calls[0].cancelled and len(timers) == 1
    call = api.calls[-1]
    call.f(*call.args)
    assert fired == ["CareTeam/1"] and len(timers) == 0


def test_no_boundary_no_timer_and_far_ones_are_capped() -> None:
    timers, api, _ = boundaries()
    timers.schedule("CareTeam/1", None)
    assert api.calls == []
    timers.schedule("CareTeam/1", time.time() + 50 * 365 * 86400)  # "until 2076"
    assert api.calls[0].delay_s <= HORIZON_S


def test_boundaries_close_together_are_synced_at_most_every_few_seconds() -> None:
    timers, api, _ = boundaries()
    now = time.time()
    timers.schedule("CareTeam/1", now - 2)  # passed: at once
    first = api.calls[-1]
    assert first.delay_s == 0
    first.f(*first.args)
    timers.schedule("CareTeam/1", now + 0.1)  # the next, a moment later
    assert api.calls[-1].delay_s >= MIN_SPACING_S - 1
