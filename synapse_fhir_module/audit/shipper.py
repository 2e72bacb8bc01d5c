"""Ships the audit journal to FHIR as AuditEvents, on the instance that runs background work.

The journal table is the queue: a row leaves it when FHIR has its AuditEvent
(``shipped_ms``). Rows go oldest first, ``audit.batch_size`` at a time, as one
``transaction`` Bundle of conditional creates (``ifNoneExist`` on the row's audit-id tag),
so a batch sent twice — a crash after FHIR answered, a lost answer — writes nothing twice.

Woken by the journal after each batch it writes here, and every ``audit.poll_interval``
for rows other instances journaled. Never on the event path: everything here runs in
Synapse's background processes.

FHIR away (or refusing the module itself: 401/403) → the batch waits, with exponential
backoff and jitter. FHIR refusing one entry (another 4xx) → the batch is halved until that
entry is alone; its row is set aside with the status and FHIR's issue codes (never FHIR's
diagnostics, which may quote what was sent) and the rest go on.
"""

from __future__ import annotations

import logging
import random
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attr
from fhir.resources.R4B.auditevent import AuditEvent
from pydantic import ValidationError
from synapse.module_api import ModuleApi

from synapse_fhir_module.audit import journal_store
from synapse_fhir_module.audit.audit_event import audit_event, bundle_entry
from synapse_fhir_module.audit.journal_store import JournalRow
from synapse_fhir_module.audit.metrics import (
    AUDIT_FAILED,
    AUDIT_LAG,
    AUDIT_OLDEST_PENDING,
    AUDIT_PENDING,
    AUDIT_PRUNED,
    AUDIT_SHIPPED,
)
from synapse_fhir_module.config import AuditConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import reference_of
from synapse_fhir_module.fhir.errors import FhirError, FhirPermanentError

logger = logging.getLogger(__name__)

BACKOFF_BASE_MS = 1_000
# Woken passes start at most this often: while decisions keep coming (a refusal every
# 200 ms, say) one pass a second ships them all in one Bundle, instead of a pass, a
# Bundle and their database round trips per decision. (It bounds the audit lag's p50
# near half of it; the send path never waits for either.)
SHIP_GAP_MS = 1_000
# The queue's gauges are counted at most this often (a count per pass costs more than
# the pass at a steady trickle).
GAUGE_INTERVAL_MS = 5_000
BACKOFF_CAP_MS = 60_000
PRUNE_INTERVAL_MS = 10 * 60_000
PRUNE_CHUNK = 5_000
# Care teams whose subject is remembered (a team's patient does not change in practice;
# the memory is dropped whole when full).
MAX_REMEMBERED_TEAMS = 10_000


class Persons(Protocol):
    """What the shipper asks of the person directory (fhir/person_directory.py)."""

    def remembered(self, user_id: str) -> Any: ...

    async def refresh(self, user_ids: Sequence[str]) -> list[Any]: ...


@attr.s(frozen=True, auto_attribs=True)
class AuditCounts:
    """For ``/health``: the shipper's queue."""

    enabled: bool
    pending: int = 0
    oldest_age_seconds: float | None = None
    refused: int = 0


class AuditShipper:
    def __init__(
        self,
        api: ModuleApi,
        fhir: FhirClient,
        config: AuditConfig,
        *,
        service_user_id: str,
        persons: Persons,
        now_ms: Callable[[], int],
        rng: random.Random | None = None,
    ) -> None:
        self._api = api
        self._fhir = fhir
        self._config = config
        self._service_user_id = service_user_id
        self._persons = persons
        self._now_ms = now_ms
        self._rng = rng or random.Random()
        self._running = False
        self._again = False
        self._scheduled = False
        self._failures = 0
        self._not_before = 0
        self._last_pass_ms: int | None = None
        self._gauges_due_ms = 0
        self._patients: dict[str, str | None] = {}

    def wake(self) -> None:
        """Rows were journaled here: ship them soon (at once unless backing off)."""
        if self._running:
            self._again = True
            return
        if self._scheduled:
            return
        self._scheduled = True
        now = self._now_ms()
        next_pass = now if self._last_pass_ms is None else self._last_pass_ms + SHIP_GAP_MS
        delay = max(0, self._not_before - now, next_pass - now)
        self._api.delayed_background_call(delay, self._woken, desc="fhir_audit_ship")

    async def _woken(self) -> None:
        self._scheduled = False
        await self.ship()

    async def ship(self) -> int:
        """Ship what waits, batch after batch, until nothing does or FHIR fails; how many
        rows FHIR took. (One pass at a time; a wake during it runs another.)"""
        if self._running:
            self._again = True
            return 0
        if self._now_ms() < self._not_before:
            return 0
        self._running = True
        self._last_pass_ms = self._now_ms()
        shipped = 0
        try:
            while True:
                self._again = False
                rows = await self._api.run_db_interaction(
                    "fhir_audit_unshipped", journal_store.unshipped, self._config.batch_size
                )
                if not rows:
                    break
                taken = await self._ship_batch(rows)
                if taken is None:  # FHIR away: wait, then try again
                    break
                shipped += taken
                if len(rows) < self._config.batch_size:
                    break  # that was all (rows journaled since woke us: `_again`)
        except Exception as e:  # (the database away: the loop tries again)
            logger.warning("Shipping the audit journal failed (%s)", type(e).__name__)
        finally:
            self._running = False
        if self._now_ms() >= self._gauges_due_ms:
            self._gauges_due_ms = self._now_ms() + GAUGE_INTERVAL_MS
            await self._update_gauges()
        if self._again:
            self.wake()
        return shipped

    async def counts(self) -> AuditCounts:
        pending, oldest = await self._api.run_db_interaction(
            "fhir_audit_count", journal_store.count_unshipped
        )
        refused = await self._api.run_db_interaction(
            "fhir_audit_count_refused", journal_store.count_refused
        )
        age = None if oldest is None else max(0.0, (self._now_ms() - oldest) / 1000)
        return AuditCounts(enabled=True, pending=pending, oldest_age_seconds=age, refused=refused)

    async def prune(self) -> int:
        """Delete the rows older than ``audit.retention`` that FHIR has (or refused)."""
        before = self._now_ms() - int(self._config.retention * 1000)
        total = 0
        while True:
            gone = await self._api.run_db_interaction(
                "fhir_audit_prune",
                journal_store.prune,
                before,
                self._config.enabled,
                PRUNE_CHUNK,
            )
            total += gone
            if gone < PRUNE_CHUNK:
                break
        AUDIT_PRUNED.inc(total)
        return total

    async def _ship_batch(self, rows: list[JournalRow]) -> int | None:
        """One batch: how many FHIR took, or None when FHIR could not be reached."""
        persons = await self._persons_of(rows)
        patients = await self._patients_of(rows)
        entries: list[tuple[JournalRow, dict[str, Any]]] = []
        for row in rows:
            resource = audit_event(
                row.decision,
                server_name=self._api.server_name,
                service_user_id=self._service_user_id,
                persons=persons,
                patients=patients,
            )
            problem = invalid_audit_event(resource)
            if problem:
                await self._refused(row, problem)
            else:
                entries.append((row, bundle_entry(row.decision, resource)))
        try:
            taken = await self._write(entries)
        except FhirError as e:
            self._back_off()
            AUDIT_FAILED.labels(kind="transient").inc(len(entries))
            failure = f"HTTP {e.status}" if e.status else "FHIR unreachable"
            logger.info(
                "FHIR did not take %d AuditEvents (%s); trying again in %d ms",
                len(entries),
                failure,
                self._not_before - self._now_ms(),
            )
            await self._api.run_db_interaction(
                "fhir_audit_failure",
                journal_store.note_failure,
                [row.decision.audit_id for row, _ in entries],
                failure,
            )
            return None
        self._failures, self._not_before = 0, 0
        if taken:
            now = self._now_ms()
            await self._api.run_db_interaction(
                "fhir_audit_shipped",
                journal_store.mark_shipped,
                [row.decision.audit_id for row in taken],
                now,
            )
            AUDIT_SHIPPED.inc(len(taken))
            for row in taken:
                AUDIT_LAG.observe(max(0, now - row.recorded_ms) / 1000)
        return len(taken)

    async def _write(self, entries: list[tuple[JournalRow, dict[str, Any]]]) -> list[JournalRow]:
        """Write ``entries`` as one transaction; halves on a refusal until the refused
        entry is alone. Raises FhirError when FHIR is away (or refuses the module)."""
        if not entries:
            return []
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [entry for _, entry in entries],
        }
        try:
            await self._fhir.transaction_json(bundle)
        except FhirPermanentError as e:
            if e.status in (401, 403, 407):
                raise  # FHIR refuses the module, not an entry: everything waits
            if len(entries) == 1:
                await self._refused(entries[0][0], refusal_reason(e))
                return []
            middle = len(entries) // 2
            return [*await self._write(entries[:middle]), *await self._write(entries[middle:])]
        return [row for row, _ in entries]

    async def _refused(self, row: JournalRow, failure: str) -> None:
        logger.warning("FHIR refused the AuditEvent of %s (%s)", row.decision.audit_id, failure)
        AUDIT_FAILED.labels(kind="refused").inc()
        await self._api.run_db_interaction(
            "fhir_audit_refused",
            journal_store.mark_refused,
            row.decision.audit_id,
            failure,
            self._now_ms(),
        )

    def _back_off(self) -> None:
        ceiling = min(BACKOFF_CAP_MS, BACKOFF_BASE_MS * 2**self._failures)
        self._failures = min(self._failures + 1, 16)
        self._not_before = self._now_ms() + int(ceiling * (0.5 + 0.5 * self._rng.random()))

    async def _persons_of(self, rows: Sequence[JournalRow]) -> dict[str, str]:
        """Matrix user id → FHIR person, for the users of ``rows`` FHIR names (asked of
        FHIR for those the directory does not remember; unknown when it cannot say)."""
        users = {
            user
            for row in rows
            for user in (row.decision.user_id, row.decision.actor_id)
            if user and user != self._service_user_id
        }
        found: dict[str, str] = {}
        unknown = []
        for user in sorted(users):
            record = self._persons.remembered(user)
            if record is None:
                unknown.append(user)
            elif record.person is not None:
                found[user] = record.person
        if unknown:
            try:
                for record in await self._persons.refresh(unknown):
                    if record.person is not None:
                        found[record.user_id] = record.person
            except FhirError as e:
                logger.info("Could not look up the persons of audited users (%s)", e)
        return found

    async def _patients_of(self, rows: Sequence[JournalRow]) -> Mapping[str, str]:
        """``CareTeam/…`` → its subject Patient, for the teams of ``rows``."""
        teams = {row.decision.care_team for row in rows if row.decision.care_team}
        missing = sorted(t for t in teams if t not in self._patients and t.startswith("CareTeam/"))
        if missing:
            if len(self._patients) > MAX_REMEMBERED_TEAMS:
                self._patients = {}
            try:
                found = await self._fhir.search_json(
                    "CareTeam",
                    [
                        ("_id", ",".join(t.partition("/")[2] for t in missing)),
                        ("_elements", "subject"),
                    ],
                )
            except FhirError as e:
                logger.info("Could not read the subjects of audited care teams (%s)", e)
                found = None
            if found is not None:
                subjects = {
                    f"CareTeam/{resource.get('id')}": reference_of(resource.get("subject"))
                    for resource in found
                }
                for team in missing:
                    subject = subjects.get(team)
                    self._patients[team] = (
                        subject if subject and subject.startswith("Patient/") else None
                    )
        return {t: p for t in teams if (p := self._patients.get(t)) is not None}

    async def _update_gauges(self) -> None:
        try:
            pending, oldest = await self._api.run_db_interaction(
                "fhir_audit_count", journal_store.count_unshipped
            )
        except Exception:
            return
        AUDIT_PENDING.set(pending)
        AUDIT_OLDEST_PENDING.set(0 if oldest is None else oldest / 1000)


def invalid_audit_event(resource: Mapping[str, Any]) -> str | None:
    """Why ``resource`` is not a valid R4 (R4B) AuditEvent, naming fields, never values."""
    try:
        AuditEvent.model_validate(resource)
    except ValidationError as e:
        problems = (
            f"{'.'.join(str(part) for part in error['loc']) or 'resource'}: {error['type']}"
            for error in e.errors(include_input=False, include_url=False)
        )
        return "not valid FHIR: " + "; ".join(problems)
    return None


def refusal_reason(error: FhirPermanentError) -> str:
    """A refusal as the journal keeps it: the status only. (FHIR's diagnostics can quote
    what a request carried; they stay out, as does anything else FHIR wrote.)"""
    return f"HTTP {error.status}"
