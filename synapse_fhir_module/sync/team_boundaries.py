"""Makes Matrix follow a care team at each of its period boundaries — when a participation,
a PractitionerRole or the team itself starts or ends — with no FHIR write at that moment.

One timer per team, at the team's next boundary (``TeamMembership.next_change``) plus a
second's margin (a period covers its last instant). When it fires the team is queued for
a sync, which schedules the boundary after that. Timers live in memory: after a restart
the full reconcile syncs every team, and so schedules them again.

Two limits keep a FHIR writer from turning periods into work: a team is synced for its
boundaries at most every ``MIN_SPACING_S`` (one sync then handles every boundary passed
meanwhile; access decisions stop counting a leaver at the very moment anyway), and no
timer is set further ahead than ``HORIZON_S`` (the full reconcile sets it again).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from synapse.module_api import ModuleApi

MARGIN_S = 1.0
MIN_SPACING_S = 5.0
HORIZON_S = 86_400.0


class TeamBoundaries:
    def __init__(self, api: ModuleApi, on_boundary: Callable[[str], None]) -> None:
        self._api = api
        self._on_boundary = on_boundary
        self._timers: dict[str, tuple[float, Any]] = {}  # team → (moment, delayed call)
        self._fired_at: dict[str, float] = {}  # team → when its last boundary sync was due

    def __len__(self) -> int:
        return len(self._timers)

    def schedule(self, team_ref: str, moment: float | None) -> None:
        """Sync ``team_ref`` again just after ``moment`` (Unix seconds); None: no boundary."""
        current = self._timers.get(team_ref)
        if current is not None and current[0] == moment:
            return
        self.cancel(team_ref)
        if moment is None:
            return
        now = time.time()
        due = max(moment + MARGIN_S, self._fired_at.get(team_ref, 0.0) + MIN_SPACING_S)
        delay_ms = max(0.0, min(due - now, HORIZON_S) * 1000)
        call = self._api.delayed_background_call(
            delay_ms, self._fire, team_ref, moment, desc="fhir_team_boundary"
        )
        self._timers[team_ref] = (moment, call)

    def cancel(self, team_ref: str) -> None:
        current = self._timers.pop(team_ref, None)
        if current is not None and current[1].active():
            current[1].cancel()

    def _fire(self, team_ref: str, moment: float) -> None:
        current = self._timers.get(team_ref)
        if current is not None and current[0] == moment:
            del self._timers[team_ref]
        self._fired_at[team_ref] = time.time()
        self._on_boundary(team_ref)
