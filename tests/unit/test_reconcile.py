"""The reconcile sweep's bookkeeping, against a scripted FHIR and SQLite for its table."""

from __future__ import annotations

import sqlite3
from collections.abc import AsyncIterator, Callable
from typing import Any

import pytest_twisted

from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.sync.reconcile import Reconciler


class SqliteApi:
    """``run_db_interaction`` on an in-memory SQLite database (no Synapse here)."""

    def __init__(self) -> None:
        self.cursor = sqlite3.connect(":memory:").cursor()
        sync_store.create_schema(self.cursor)

    async def run_db_interaction(self, desc: str, func: Callable[..., Any], *args: Any) -> Any:
        return func(self.cursor, *args)


class ScriptedFhir:
    def __init__(self) -> None:
        self.resources: dict[str, list[dict[str, Any]]] = {}
        self.searches: list[tuple[str, dict[str, str]]] = []
        self.history: dict[str, list[dict[str, Any]]] = {}
        self.pages_read: dict[str, int] = {}

    def put(self, resource_type: str, resource_id: str, updated: str) -> None:
        found = self.resources.setdefault(resource_type, [])
        found[:] = [r for r in found if r["id"] != resource_id]
        found.append({"id": resource_id, "meta": {"lastUpdated": updated}})

    async def search_pages_json(self, resource_type: str, params: Any) -> AsyncIterator[dict]:
        self.searches.append((resource_type, dict(params)))
        if resource_type.endswith("/_history"):
            entries = self.history.get(resource_type.split("/")[0], [])
            yield {"resourceType": "Bundle", "type": "history", "entry": entries}
            return
        found = self.resources.get(resource_type, [])
        if dict(params).get("_sort") == "-_lastUpdated":
            found = sorted(found, key=lambda r: r["meta"]["lastUpdated"], reverse=True)
        count = int(dict(params).get("_count", "200"))
        for start in range(0, max(len(found), 1), count):
            self.pages_read[resource_type] = self.pages_read.get(resource_type, 0) + 1
            yield {
                "resourceType": "Bundle",
                "entry": [{"resource": r} for r in found[start : start + count]],
            }

    async def search_json(self, resource_type: str, params: Any) -> list[dict[str, Any]]:
        # As FhirClient.search_json: every page.
        return [
            entry["resource"]
            async for page in self.search_pages_json(resource_type, params)
            for entry in page["entry"]
        ]


class ListQueue(list):
    """A change queue that applies everything at once (so it is always idle)."""

    idle = True

    def push(self, reference: str) -> None:
        self.append(reference)

    def when_idle(self, callback: Any) -> None:
        pass


def sweeper() -> tuple[Reconciler, ScriptedFhir, list[str], SqliteApi]:
    api, fhir, queued = SqliteApi(), ScriptedFhir(), ListQueue()
    return Reconciler(api, fhir, queued), fhir, queued, api  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_first_sweep_reads_teams_in_full_and_later_ones_only_what_changed() -> None:
    reconciler, fhir, queued, api = sweeper()
    fhir.put("CareTeam", "a", "2026-11-25T10:00:00.000Z")
    fhir.put("CareTeam", "b", "2026-11-25T10:00:05.000Z")
    await reconciler.sweep()
    assert sorted(q for q in queued if q.startswith("CareTeam/")) == ["CareTeam/a", "CareTeam/b"]
    assert sync_store.get_value(api.cursor, "watermark:CareTeam") == "2026-11-25T10:00:05.000Z"

    # Nothing changed: the look-back window sees both again, but they are not re-queued.
    queued.clear()
    await reconciler.sweep()
    assert [q for q in queued if q.startswith("CareTeam/")] == []
    care_team_searches = [p for t, p in fhir.searches if t == "CareTeam"]
    assert care_team_searches[-1]["_lastUpdated"] == "ge2026-11-25T09:59:55.000Z"

    fhir.put("CareTeam", "a", "2026-11-25T10:01:00.000Z")  # a new version
    queued.clear()
    await reconciler.sweep()
    assert [q for q in queued if q.startswith("CareTeam/")] == ["CareTeam/a"]


@pytest_twisted.ensureDeferred
async def test_communications_start_from_now_and_leave_out_the_modules_own() -> None:
    reconciler, fhir, queued, api = sweeper()
    fhir.put("Communication", "old", "2026-11-25T09:00:00.000Z")
    await reconciler.sweep()
    assert "Communication/old" not in queued  # old messages are not replayed
    assert sync_store.get_value(api.cursor, "watermark:Communication") == (
        "2026-11-25T09:00:00.000Z"
    )
    fhir.put("Communication", "new", "2026-11-25T11:00:00.000Z")
    await reconciler.sweep()
    # The old one is in the look-back window again, and still not replayed.
    assert [q for q in queued if q.startswith("Communication/")] == ["Communication/new"]
    (_, params) = [s for s in fhir.searches if s[0] == "Communication"][-1]
    assert params["_tag:not"] == "urn:synapse-fhir-module:origin|matrix"


@pytest_twisted.ensureDeferred
async def test_a_first_sweep_from_now_reads_one_page_to_find_the_newest() -> None:
    reconciler, fhir, queued, api = sweeper()
    for i in range(5):
        fhir.put("Patient", f"p{i}", f"2026-11-25T09:00:0{i}.000Z")
    await reconciler.sweep()
    assert sync_store.get_value(api.cursor, "watermark:Patient") == "2026-11-25T09:00:04.000Z"
    newest = [p for t, p in fhir.searches if t == "Patient" and p["_sort"] == "-_lastUpdated"]
    assert len(newest) == 1
    # One page of one resource, not five: the `next` links are not followed.
    patient_searches = [p for t, p in fhir.searches if t == "Patient"]
    assert fhir.pages_read["Patient"] == len(patient_searches)
    assert not [q for q in queued if q.startswith("Patient/")]


@pytest_twisted.ensureDeferred
async def test_a_deleted_team_is_found_in_its_types_history_once() -> None:
    reconciler, fhir, queued, _api = sweeper()
    fhir.put("CareTeam", "a", "2026-11-25T10:00:00.000Z")
    await reconciler.sweep()
    fhir.history["CareTeam"] = [
        {"request": {"method": "PUT", "url": "CareTeam/a"}},
        {"request": {"method": "DELETE", "url": "CareTeam/gone/_history/3"}},
    ]
    queued.clear()
    await reconciler.sweep()
    assert [q for q in queued if q.startswith("CareTeam/")] == ["CareTeam/gone"]
    (_, params) = [s for s in fhir.searches if s[0] == "CareTeam/_history"][-1]
    assert params["_since"] == "2026-11-25T09:59:50.000Z"
    queued.clear()
    await reconciler.sweep()  # seen at this version already
    assert [q for q in queued if q.startswith("CareTeam/")] == []
