"""The reconcile sweep: at start-up and every ``sync.poll_interval``, ask FHIR what changed
since the last sweep (``_lastUpdated``) and queue it, so a lost push is only late.

The watermark — the newest ``meta.lastUpdated`` seen per type, FHIR's own clock — is kept
in Synapse's database, so a restart resumes where the last sweep ended. Each sweep looks
back a little before it, for writes committed after a sweep that carry an earlier time.

On the very first sweep CareTeams and CommunicationRequests are read in full (their spaces
and rooms must exist); Communications and persons start from now (old messages are not
replayed into rooms).

The full reconcile (at start-up and every ``sync.full_reconcile_interval``) queues every
CareTeam — those FHIR has and those the module bound a room to — to be checked, whatever
the sweeps saw: it repairs what no ``_lastUpdated`` search can show (a lost notification
older than the watermark, an expunged resource, binding state changed in Matrix) and
schedules each team's period boundaries again after a restart.
"""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from synapse.module_api import ModuleApi

from synapse_fhir_module.enforcement import binding_store
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import ORIGIN_TAG
from synapse_fhir_module.fhir.dates import format_fhir_instant, parse_fhir_datetime
from synapse_fhir_module.fhir.errors import FhirError
from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.sync.change_queue import ChangeQueue
from synapse_fhir_module.sync.fhir_to_matrix import SYNCED_TYPES

logger = logging.getLogger(__name__)

FULL_FIRST_SWEEP = frozenset({"CareTeam", "CommunicationRequest"})
OWN_WRITES = frozenset({"Communication", "CommunicationRequest"})
# Types whose deletion changes Matrix (the space or room empties; a deleted person or
# role leaves the teams that listed it).
DELETABLE = frozenset(
    {
        "CareTeam",
        "CommunicationRequest",
        "Practitioner",
        "PractitionerRole",
        "RelatedPerson",
        "Patient",
    }
)
LOOK_BACK = timedelta(seconds=10)
LISTING_RETRY_FIRST_S = 5.0
LISTING_RETRY_MAX_S = 300.0
PAGE_SIZE = "200"
EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Reconciler:
    def __init__(self, api: ModuleApi, fhir: FhirClient, queue: ChangeQueue) -> None:
        self._api = api
        self._fhir = fhir
        self._queue = queue
        self._push = queue.push
        self._sweeping = False
        self._reconciling = False
        self._listing_failures = 0
        # Watermarks reached but not yet saved: they move only once everything the sweep
        # queued has been applied, so a restart or a failing sync loses no change.
        self._unsaved: dict[str, str] = {}
        queue.when_idle(self._save_reached)
        # Per type: reference → lastUpdated of what the previous sweep saw.
        self._queued_last_sweep: dict[str, dict[str, str | None]] = {}

    async def sweep(self) -> None:
        if self._sweeping:
            return  # the previous sweep is still going (a slow FHIR)
        self._sweeping = True
        try:
            for resource_type in SYNCED_TYPES:
                try:
                    await self._sweep_type(resource_type)
                except FhirError as e:
                    logger.warning("Reconcile sweep of %s failed: %s", resource_type, e)
                except Exception:
                    logger.exception("Reconcile sweep of %s failed", resource_type)
        finally:
            self._sweeping = False
        if self._queue.idle:
            await self._save_reached()

    async def full_reconcile(self) -> None:
        """Queue every CareTeam to be checked against FHIR (see the module docstring).

        The teams the module bound rooms to first: they need no FHIR to be listed, so their
        boundaries are scheduled again even while FHIR is away (each check retries until it
        answers). Then FHIR's own list, retried with backoff until it is read.
        """
        if self._reconciling:
            return  # the previous one is still being listed (a slow FHIR)
        self._reconciling = True
        try:
            bound = set(
                await self._api.run_db_interaction("fhir_bound_teams", binding_store.bound_teams)
            )
            made = await self._api.run_db_interaction("fhir_sync_rooms", sync_store.all_rooms)
            bound.update(ref for ref, _ in made if ref.startswith("CareTeam/"))
            for team in sorted(bound):
                self._queue.check(team)
            await self._check_listed(bound)
        finally:
            self._reconciling = False

    async def _check_listed(self, already: set[str]) -> None:
        """Queue the CareTeams FHIR lists that are not in ``already``."""
        try:
            listed: set[str] = set()
            params = [("_elements", "id"), ("_count", PAGE_SIZE)]
            async for page in self._fhir.search_pages_json("CareTeam", params):
                listed.update(f"CareTeam/{r['id']}" for r in _resources(page))
        except FhirError as e:
            delay = min(LISTING_RETRY_MAX_S, LISTING_RETRY_FIRST_S * 2**self._listing_failures)
            self._listing_failures += 1
            logger.warning(
                "Full reconcile could not list FHIR's care teams (%s); trying again in %.0f s",
                e,
                delay,
            )
            self._api.delayed_background_call(
                delay * 1000, self._check_listed, already, desc="fhir_full_reconcile_listing"
            )
            return
        self._listing_failures = 0
        for team in sorted(listed - already):
            self._queue.check(team)
        logger.info("Full reconcile: %d care teams queued to be checked", len(already | listed))

    async def _save_reached(self) -> None:
        unsaved, self._unsaved = self._unsaved, {}
        for name, value in unsaved.items():
            await self._save(name, value)

    async def _sweep_type(self, resource_type: str) -> None:
        name = f"watermark:{resource_type}"
        since = await self._api.run_db_interaction(
            "fhir_sync_watermark", sync_store.get_value, name
        )
        # First sweep of a type that starts from now: only note what is there already.
        note_only = since is None and resource_type not in FULL_FIRST_SWEEP
        if note_only:
            since = await self._newest(resource_type) or format_fhir_instant(EPOCH)
        params: list[tuple[str, str]] = [
            ("_sort", "_lastUpdated"),
            ("_count", PAGE_SIZE),
            ("_elements", "id"),
        ]
        if resource_type in OWN_WRITES:
            # What the module wrote itself needs nothing in Matrix: leave it out at FHIR.
            params.append(("_tag:not", f"{ORIGIN_TAG['system']}|{ORIGIN_TAG['code']}"))
        start = EPOCH
        if since:
            start = parse_fhir_datetime(since) - LOOK_BACK
            params.append(("_lastUpdated", f"ge{format_fhir_instant(start)}"))
        newest = since
        queued = 0
        already = self._queued_last_sweep.get(resource_type, {})
        seen: dict[str, str | None] = {}
        async for page in self._fhir.search_pages_json(resource_type, params):
            for resource in _resources(page):
                reference = f"{resource_type}/{resource['id']}"
                updated = _last_updated(resource)
                seen[reference] = updated
                # The look-back window overlaps the last sweep: what it queued at this
                # very version needs nothing more.
                if not note_only and (updated is None or already.get(reference) != updated):
                    self._push(reference)
                    queued += 1
                if updated and (newest is None or _later(updated, newest)):
                    newest = updated
        if since and resource_type in DELETABLE and not note_only:
            queued += await self._queue_deleted(resource_type, start, already, seen)
        self._queued_last_sweep[resource_type] = seen
        if queued:
            logger.info("Reconcile: %d %s changed since the last sweep", queued, resource_type)
        if newest and (newest != since or note_only):
            self._unsaved[name] = newest

    async def _queue_deleted(
        self,
        resource_type: str,
        start: datetime,
        already: dict[str, str | None],
        seen: dict[str, str | None],
    ) -> int:
        """A search never shows deleted resources; their type's history does."""
        params = [("_since", format_fhir_instant(start)), ("_count", PAGE_SIZE)]
        queued = 0
        async for page in self._fhir.search_pages_json(f"{resource_type}/_history", params):
            for entry in page.get("entry") or []:
                request = entry.get("request") if isinstance(entry, dict) else None
                if not isinstance(request, dict) or request.get("method") != "DELETE":
                    continue
                parts = str(request.get("url") or "").split("/")
                if len(parts) < 2 or parts[0] != resource_type:
                    continue
                reference = f"{resource_type}/{parts[1]}"
                marker = f"deleted:{request.get('url')}"
                seen[reference] = marker
                if already.get(reference) != marker:
                    self._push(reference)
                    queued += 1
        return queued

    async def _newest(self, resource_type: str) -> str | None:
        # The first page only: following its `next` links would read every resource of
        # the type, one per request.
        params = [("_sort", "-_lastUpdated"), ("_count", "1"), ("_elements", "id")]
        async for page in self._fhir.search_pages_json(resource_type, params):
            found = _resources(page)
            return _last_updated(found[0]) if found else None
        return None

    async def _save(self, name: str, value: str) -> None:
        await self._api.run_db_interaction(
            "fhir_sync_watermark_set", sync_store.set_value, name, value
        )


def _resources(page: dict[str, Any]) -> list[dict[str, Any]]:
    return [
        entry["resource"]
        for entry in page.get("entry") or []
        if isinstance(entry, dict)
        and isinstance(entry.get("resource"), dict)
        and isinstance(entry["resource"].get("id"), str)
        and (entry.get("search") or {}).get("mode", "match") == "match"
    ]


def _last_updated(resource: dict[str, Any]) -> str | None:
    """``meta.lastUpdated``, when it is an instant this module can read (FHIR's own clock;
    a garbled one must not stop the sweep of the whole type)."""
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, dict) else None
    if not isinstance(value, str):
        return None
    try:
        parse_fhir_datetime(value)
    except (ValueError, ArithmeticError):
        return None
    return value


def _later(a: str, b: str) -> bool:
    return parse_fhir_datetime(a) > parse_fhir_datetime(b)
