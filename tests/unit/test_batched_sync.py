"""Changes applied in batches: the queue prepares a batch, and the sync loads a batch's
CareTeams and the teams listing them with one search each (found by bench/scale: a full
reconcile searched twice per team)."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client import REGISTRY
from twisted.internet import defer

from synapse_fhir_module.fhir.team_directory import _reachable
from synapse_fhir_module.sync.change_queue import BATCH, ChangeQueue
from synapse_fhir_module.sync.fhir_to_matrix import FhirSync


class InlineApi:
    """Background work runs at once (no Synapse here)."""

    def run_as_background_process(self, desc: str, func: Any, *args: Any) -> Any:
        return defer.ensureDeferred(func(*args))


def team(team_id: str, *members: str) -> dict[str, Any]:
    return {
        "resourceType": "CareTeam",
        "id": team_id,
        "subject": {"reference": "Patient/outside"},
        "participant": [{"member": {"reference": m}} for m in members],
    }


def test_a_batched_answer_depends_only_on_what_its_own_team_reaches():
    by_ref = {
        "CareTeam/a": team("a", "Practitioner/1", "CareTeam/nested"),
        "CareTeam/nested": team("nested", "PractitionerRole/r"),
        "PractitionerRole/r": {
            "resourceType": "PractitionerRole",
            "id": "r",
            "practitioner": {"reference": "Practitioner/2"},
        },
        "Practitioner/1": {"resourceType": "Practitioner", "id": "1"},
        "Practitioner/2": {"resourceType": "Practitioner", "id": "2"},
        "CareTeam/b": team("b", "Practitioner/3"),
        "Practitioner/3": {"resourceType": "Practitioner", "id": "3"},
    }
    assert _reachable("CareTeam/a", by_ref) == {
        "CareTeam/a",
        "Practitioner/1",
        "CareTeam/nested",
        "PractitionerRole/r",
        "Practitioner/2",
    }
    assert _reachable("CareTeam/b", by_ref) == {"CareTeam/b", "Practitioner/3"}
    assert _reachable("CareTeam/gone", by_ref) == set()


@pytest_twisted.ensureDeferred
async def test_the_queue_invalidates_then_prepares_each_batch_then_applies_in_order():
    calls: list[tuple[str, Any]] = []

    async def apply(reference: str, changed: bool) -> None:
        calls.append(("apply" if changed else "check", reference))

    async def invalidate(reference: str) -> None:
        calls.append(("invalidate", reference))

    async def prepare(batch: list[str]) -> None:
        calls.append(("prepare", list(batch)))
        raise RuntimeError("FHIR hiccup")  # only a shortcut: the applies still run

    queue = ChangeQueue(InlineApi(), apply, invalidate, prepare=prepare)  # type: ignore[arg-type]
    references = [f"CareTeam/{n}" for n in range(BATCH + 3)]
    for reference in references:
        queue._enqueue(reference)  # (push would also invalidate at once)
    queue.open()
    first, second = references[:BATCH], references[BATCH:]
    assert calls == [
        *(("invalidate", r) for r in first),
        ("prepare", first),
        *(("apply", r) for r in first),
        *(("invalidate", r) for r in second),
        ("prepare", second),
        *(("apply", r) for r in second),
    ]
    assert queue.idle


@pytest_twisted.ensureDeferred
async def test_a_checked_reference_keeps_its_caches_unless_it_changes_meanwhile():
    calls: list[tuple[str, Any]] = []

    async def apply(reference: str, changed: bool) -> None:
        calls.append(("apply" if changed else "check", reference))

    async def invalidate(reference: str) -> None:
        calls.append(("invalidate", reference))

    queue = ChangeQueue(InlineApi(), apply, invalidate)  # type: ignore[arg-type]
    queue.check("CareTeam/a")
    queue.check("CareTeam/b")
    queue.push("CareTeam/b")  # a real change arrives while it waits: it counts as changed
    queue.open()
    assert calls == [
        ("invalidate", "CareTeam/b"),  # (push invalidates at once)
        ("invalidate", "CareTeam/b"),  # (and again right before the sync reads FHIR)
        ("check", "CareTeam/a"),
        ("apply", "CareTeam/b"),
    ]


class PrefetchingTeams:
    def __init__(self) -> None:
        self.prefetched: list[list[str]] = []

    async def prefetch(self, teams: list[str]) -> None:
        self.prefetched.append(list(teams))

    def now(self) -> float:
        return 0.0


class ListingFhir:
    """Answers the one search for teams that list any of the batch."""

    def __init__(self, teams: list[dict[str, Any]]) -> None:
        self.teams = teams
        self.searches: list[dict[str, str]] = []

    async def search_json(self, resource_type: str, params: dict[str, str]) -> list[dict]:
        assert resource_type == "CareTeam"
        self.searches.append(params)
        wanted = set(params["participant"].split(","))
        return [
            t
            for t in self.teams
            if any(p["member"]["reference"] in wanted for p in t.get("participant", []))
        ]


def sync_with(fhir: ListingFhir, teams: PrefetchingTeams) -> FhirSync:
    sync = FhirSync.__new__(FhirSync)  # only what prepare and the parent lookup use
    sync._fhir = fhir  # type: ignore[assignment]
    sync._teams = teams  # type: ignore[assignment]
    sync._parents_found = {}
    return sync


@pytest_twisted.ensureDeferred
async def test_prepare_finds_the_batchs_parents_with_one_search_and_each_answer_is_used_once():
    fhir = ListingFhir(
        [
            team("outer", "CareTeam/a", "Practitioner/1"),
            team("other-outer", "CareTeam/a"),
            team("self-listing", "CareTeam/self-listing"),
        ]
    )
    teams = PrefetchingTeams()
    sync = sync_with(fhir, teams)
    await sync.prepare(["CareTeam/a", "CareTeam/b", "Practitioner/9", "CareTeam/self-listing"])
    assert teams.prefetched == [["CareTeam/a", "CareTeam/b", "CareTeam/self-listing"]]
    assert len(fhir.searches) == 1
    assert await sync._teams_of_person("CareTeam/a") == [
        "CareTeam/other-outer",
        "CareTeam/outer",
    ]
    assert await sync._teams_of_person("CareTeam/b") == []  # listed by nobody: no search
    assert await sync._teams_of_person("CareTeam/self-listing") == []
    assert len(fhir.searches) == 1
    # Used once: asked again (a later change), it searches.
    await sync._teams_of_person("CareTeam/b")
    assert len(fhir.searches) == 2


@pytest_twisted.ensureDeferred
async def test_a_batch_of_one_team_is_not_prepared():
    fhir, teams = ListingFhir([]), PrefetchingTeams()
    sync = sync_with(fhir, teams)
    await sync.prepare(["CareTeam/a", "Practitioner/1"])
    assert teams.prefetched == [] and fhir.searches == []


class DelayedApi(InlineApi):
    """Delayed calls kept until the test runs them."""

    def __init__(self) -> None:
        self.delayed: list[tuple[Any, tuple[Any, ...]]] = []

    def delayed_background_call(self, msec: float, f: Any, *args: Any, desc: str = "") -> None:
        self.delayed.append((f, args))

    def run_delayed(self) -> None:
        delayed, self.delayed = self.delayed, []
        for f, args in delayed:
            f(*args)


@pytest_twisted.ensureDeferred
async def test_a_failed_check_is_retried_as_a_check_and_a_failed_change_as_a_change():
    calls: list[tuple[str, Any]] = []
    failing = {"CareTeam/a", "CareTeam/b"}

    async def apply(reference: str, changed: bool) -> None:
        calls.append(("apply" if changed else "check", reference))
        if reference in failing:
            raise RuntimeError("FHIR away")

    async def invalidate(reference: str) -> None:
        calls.append(("invalidate", reference))

    api = DelayedApi()
    queue = ChangeQueue(api, apply, invalidate)  # type: ignore[arg-type]
    queue.open()
    queue.check("CareTeam/a")  # e.g. the full reconcile
    queue._enqueue("CareTeam/b")  # a change (its push would also invalidate at once)
    assert queue.retrying == 2
    failing.clear()
    calls.clear()
    api.run_delayed()
    # The check is retried without forgetting anyone's cached answer; the change is not.
    assert calls == [("check", "CareTeam/a"), ("invalidate", "CareTeam/b"), ("apply", "CareTeam/b")]
    assert queue.retrying == 0 and queue.idle


def oldest_waiting() -> float | None:
    return REGISTRY.get_sample_value("synapse_fhir_sync_oldest_waiting_timestamp_seconds")


class StepClock:
    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def __call__(self) -> float:
        return self.now


@pytest_twisted.ensureDeferred
async def test_the_oldest_waiting_time_stays_while_a_change_is_retried_and_clears_once_applied():
    failing = {"CareTeam/a"}

    async def apply(reference: str, changed: bool) -> None:
        if reference in failing:
            raise RuntimeError("FHIR away")

    async def invalidate(reference: str) -> None:
        pass

    api, clock = DelayedApi(), StepClock()
    queue = ChangeQueue(api, apply, invalidate, clock=clock)  # type: ignore[arg-type]
    queue.open()
    first_queued = clock.now
    queue.push("CareTeam/a")  # fails: waits for a retry
    assert queue.retrying == 1
    assert oldest_waiting() == first_queued

    clock.now += 60
    queue.push("CareTeam/b")  # applied at once
    clock.now += 60
    api.run_delayed()  # the retry fails again: still the first time
    assert oldest_waiting() == first_queued

    failing.clear()
    api.run_delayed()
    assert queue.idle
    assert oldest_waiting() == 0


@pytest_twisted.ensureDeferred
async def test_once_the_oldest_is_applied_the_next_oldest_is_reported():
    release = defer.Deferred()

    async def apply(reference: str, changed: bool) -> None:
        if reference == "CareTeam/a":
            await release  # still running when b is queued

    async def invalidate(reference: str) -> None:
        pass

    clock = StepClock()
    queue = ChangeQueue(InlineApi(), apply, invalidate, clock=clock)  # type: ignore[arg-type]
    queue.open()
    queue.push("CareTeam/a")
    clock.now += 30
    second_queued = clock.now
    queue.push("CareTeam/b")
    assert oldest_waiting() == second_queued - 30
    release.callback(None)
    assert queue.idle
    assert oldest_waiting() == 0


@pytest_twisted.ensureDeferred
async def test_a_change_queued_again_while_it_is_applied_waits_from_the_end_of_that_sync():
    first, second = defer.Deferred(), defer.Deferred()
    runs = [first, second]

    async def apply(reference: str, changed: bool) -> None:
        await runs.pop(0)

    async def invalidate(reference: str) -> None:
        pass

    clock = StepClock()
    queue = ChangeQueue(InlineApi(), apply, invalidate, clock=clock)  # type: ignore[arg-type]
    queue.open()
    queue.push("CareTeam/a")
    clock.now += 30
    queue.push("CareTeam/a")  # changed again while its first sync runs
    clock.now += 30
    first_ended = clock.now
    # The second change waits from the end of the first sync, not from the first change
    # (not from when it came either: at most one sync's time is left out).
    first.callback(None)
    assert oldest_waiting() == first_ended
    second.callback(None)
    assert queue.idle
    assert oldest_waiting() == 0
