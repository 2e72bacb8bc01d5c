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
entry is alone; its row is set aside with the status (never FHIR's diagnostics, which may
quote what was sent) and the rest go on. But FHIR refusing entry after entry with the same
status (or more than ``MAX_SET_ASIDE_PER_PASS`` in a pass) is FHIR unable to take
AuditEvents at all (a gateway's 404, no conditional create on ``_tag``...), not bad
entries: the rows stay queued, as when FHIR is away. Set-aside rows stay in the journal
(never pruned with audit on) until an admin puts them back (``retry_refused``).

Users of other homeservers are named by their Matrix id only: their persons are not looked
up (a remote server can mint user ids at will). Local users unknown to the person
directory are asked about without growing it (``Persons.ask``), remembered here in a small
bounded memory.
"""

from __future__ import annotations

import logging
import random
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Protocol

import attr
from fhir.resources.R4B.auditevent import AuditEvent
from pydantic import ValidationError
from synapse.module_api import ModuleApi
from twisted.internet import defer

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
# A pass that sets aside more single entries than this is FHIR unable, not bad entries.
MAX_SET_ASIDE_PER_PASS = 3
# /health's audit figures are counted at most this often (anyone may ask /health).
COUNTS_INTERVAL_MS = 5_000
# Local users the person directory does not remember: their persons, asked of FHIR by the
# shipper, kept this long, this many at most (least recently used dropped first).
PERSON_MEMORY_MS = 5 * 60_000
MAX_PERSONS_REMEMBERED = 1_000
# Care teams whose subject is remembered (a team's patient does not change in practice;
# the memory is dropped whole when full).
MAX_REMEMBERED_TEAMS = 10_000


class Persons(Protocol):
    """What the shipper asks of the person directory (fhir/person_directory.py)."""

    def remembered(self, user_id: str) -> Any: ...

    async def ask(self, user_ids: Sequence[str]) -> list[Any]:
        """FHIR's answers for these users, not remembered by the directory."""


@attr.s(frozen=True, auto_attribs=True)
class AuditCounts:
    """For ``/health``: the shipper's queue."""

    enabled: bool
    pending: int = 0
    oldest_age_seconds: float | None = None
    refused: int = 0


class FhirUnable(Exception):
    """FHIR refused single entries again and again with one status: not the entries."""

    def __init__(self, status: int | None) -> None:
        super().__init__(f"HTTP {status}")
        self.status = status


@attr.s(auto_attribs=True)
class _Written:
    """What one batch came to, as the halving goes."""

    taken: list[JournalRow] = attr.Factory(list)
    # The single entries FHIR refused, with its answer.
    refused: list[tuple[JournalRow, FhirPermanentError]] = attr.Factory(list)


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
        # user id → (person or None, until when), for local users the directory lacks.
        self._persons_seen: OrderedDict[str, tuple[str | None, int]] = OrderedDict()
        # The statuses of the single entries set aside in this pass.
        self._pass_refusals: list[int | None] = []
        # The status that made FHIR unable, until a batch goes through whole.
        self._unable_status: int | None = None
        self._counted: tuple[int, int, int | None, int] | None = None
        self._counting: list[defer.Deferred] | None = None

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
        self._pass_refusals = []
        shipped = 0
        try:
            while True:
                self._again = False
                rows = await self._api.run_db_interaction(
                    "fhir_audit_unshipped", journal_store.unshipped, self._config.batch_size
                )
                if not rows:
                    break
                taken, went_on = await self._ship_batch(rows)
                shipped += taken
                if not went_on:  # FHIR away (or unable): wait, then try again
                    break
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
        """The queue, as counted at most every ``COUNTS_INTERVAL_MS`` (requests meanwhile,
        and those arriving while it is counted, share one count)."""
        now = self._now_ms()
        if self._counted is None or now >= self._counted[0] + COUNTS_INTERVAL_MS:
            if self._counting is not None:
                waiter: defer.Deferred = defer.Deferred()
                self._counting.append(waiter)
                await waiter
            else:
                self._counting = []
                try:
                    pending, oldest = await self._api.run_db_interaction(
                        "fhir_audit_count", journal_store.count_unshipped
                    )
                    refused = await self._api.run_db_interaction(
                        "fhir_audit_count_refused", journal_store.count_refused
                    )
                    self._counted = (self._now_ms(), pending, oldest, refused)
                finally:
                    waiters, self._counting = self._counting, None
                    for waiter in waiters:
                        waiter.callback(None)
            if self._counted is None:  # (the count failed)
                raise RuntimeError("the audit journal could not be counted")
        _, pending, oldest, refused = self._counted
        age = None if oldest is None else max(0.0, (self._now_ms() - oldest) / 1000)
        return AuditCounts(enabled=True, pending=pending, oldest_age_seconds=age, refused=refused)

    async def retry_refused(self) -> int:
        """Put the rows FHIR refused back in the queue (the cause fixed); how many."""
        requeued = await self._api.run_db_interaction(
            "fhir_audit_retry_refused", journal_store.retry_refused
        )
        self._counted = None
        self._unable_status = None
        logger.info("%d refused AuditEvents put back in the queue", requeued)
        return int(requeued)

    async def prune(self) -> int:
        """Delete the rows older than ``audit.retention`` that FHIR has (with audit off:
        every one)."""
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

    async def _ship_batch(self, rows: list[JournalRow]) -> tuple[int, bool]:
        """One batch: how many FHIR took, and whether it took the rest or set it aside
        (False: FHIR could not be reached, or was unable; the rest waits)."""
        persons = await self._persons_of(rows)
        patients = await self._patients_of(rows)
        # (Not validated here: the mapping makes valid R4, as its tests check; validating
        # every event cost more CPU than the rest of shipping. An entry FHIR refuses is
        # validated then, to say which field was wrong.)
        entries = [
            (
                row,
                bundle_entry(
                    row.decision,
                    audit_event(
                        row.decision,
                        server_name=self._api.server_name,
                        service_user_id=self._service_user_id,
                        persons=persons,
                        patients=patients,
                    ),
                ),
            )
            for row in rows
        ]
        written = _Written()
        try:
            await self._write(entries, written)
        except (FhirError, FhirUnable) as e:
            # (What FHIR took before it failed is shipped. FHIR unable: the entries refused
            # alone before the one that showed it are set aside — or that one, when it was
            # the first: every pass moves the queue by one at least, so two bad entries at
            # its head cannot hold it up for good (an admin's retry brings them back). The
            # rest waits.)
            await self._mark_shipped(written.taken)
            aside = (written.refused[:-1] or written.refused) if isinstance(e, FhirUnable) else []
            for row, error in aside:
                await self._refused(row, refusal_reason(error))
            done = {row.decision.audit_id for row in [*written.taken, *(r for r, _ in aside)]}
            waiting = [
                row.decision.audit_id for row, _ in entries if row.decision.audit_id not in done
            ]
            self._back_off()
            if isinstance(e, FhirUnable):
                self._unable_status = e.status
                AUDIT_FAILED.labels(kind="unable").inc(len(waiting))
                failure = f"HTTP {e.status} (every entry refused)"
            else:
                AUDIT_FAILED.labels(kind="transient").inc(len(waiting))
                failure = f"HTTP {e.status}" if e.status else "FHIR unreachable"
            logger.info(
                "FHIR did not take %d AuditEvents (%s); trying again in %d ms",
                len(waiting),
                failure,
                self._not_before - self._now_ms(),
            )
            await self._api.run_db_interaction(
                "fhir_audit_failure", journal_store.note_failure, waiting, failure
            )
            return len(written.taken), False
        self._failures, self._not_before = 0, 0
        if not written.refused:
            self._unable_status = None
        resources = {row.decision.audit_id: entry["resource"] for row, entry in entries}
        for row, error in written.refused:
            problem = invalid_audit_event(resources[row.decision.audit_id])
            reason = refusal_reason(error)
            await self._refused(row, f"{reason}; {problem}" if problem else reason)
        await self._mark_shipped(written.taken)
        return len(written.taken), True

    async def _mark_shipped(self, taken: Sequence[JournalRow]) -> None:
        if not taken:
            return
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

    async def _write(
        self, entries: list[tuple[JournalRow, dict[str, Any]]], written: _Written
    ) -> None:
        """Write ``entries`` as one transaction; halves on a refusal until the refused
        entry is alone (noted in ``written``, with what FHIR took). Raises FhirError when
        FHIR is away (or refuses the module), FhirUnable when single entries keep being
        refused alike."""
        if not entries:
            return
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
                written.refused.append((entries[0][0], e))
                self._refused_alone(e.status)
                return
            middle = len(entries) // 2
            await self._write(entries[:middle], written)
            await self._write(entries[middle:], written)
            return
        written.taken.extend(row for row, _ in entries)

    def _refused_alone(self, status: int | None) -> None:
        """A single entry refused: raises FhirUnable when that is FHIR, not the entry —
        the status that made FHIR unable before (no batch went through whole since), one
        refused earlier in this pass, or one refusal too many for a pass."""
        if (
            status == self._unable_status
            or status in self._pass_refusals
            or len(self._pass_refusals) >= MAX_SET_ASIDE_PER_PASS
        ):
            raise FhirUnable(status)
        self._pass_refusals.append(status)

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
        """Matrix user id → FHIR person, for the local users of ``rows`` FHIR names: as
        the directory remembers them, else asked of FHIR (without growing the directory);
        unknown when FHIR cannot say. Users of other servers: none (never looked up)."""
        users = {
            user
            for row in rows
            for user in (row.decision.user_id, row.decision.actor_id)
            if user and user != self._service_user_id and self._api.is_mine(user)
        }
        now = self._now_ms()
        found: dict[str, str] = {}
        unknown = []
        for user in sorted(users):
            record = self._persons.remembered(user)
            seen = self._persons_seen.get(user)
            if record is not None:
                person = record.person
            elif seen is not None and now < seen[1]:
                self._persons_seen.move_to_end(user)
                person = seen[0]
            else:
                unknown.append(user)
                continue
            if person is not None:
                found[user] = person
        if unknown:
            try:
                records = await self._persons.ask(unknown)
            except FhirError as e:
                logger.info("Could not look up the persons of audited users (%s)", e)
                records = []
            for record in records:
                self._persons_seen[record.user_id] = (record.person, now + PERSON_MEMORY_MS)
                self._persons_seen.move_to_end(record.user_id)
                if record.person is not None:
                    found[record.user_id] = record.person
            while len(self._persons_seen) > MAX_PERSONS_REMEMBERED:
                self._persons_seen.popitem(last=False)
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
