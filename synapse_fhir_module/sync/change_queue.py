"""FHIR changes waiting to be applied to Matrix, worked through one at a time in the
background. A reference is queued at most once: a burst of notifications for one CareTeam
is one sync (the sync reads the current state anyway).

References are taken in batches: the batch's caches are invalidated, then ``prepare``
(optional) may load what the batch needs with a few requests instead of one per
reference, then each is applied in turn.

A reference whose sync fails is tried again, backing off from 5 s to 5 minutes, never
dropped (``retrying`` counts them, for ``/health`` and a metric). When the oldest reference
not yet applied was queued is a metric too (how far the sync is behind). Whoever needs to know
that everything queued has been applied (the reconcile sweep, before it moves its
watermark) registers ``when_idle``.

A reference queued to be checked rather than because it changed (the full reconcile, a
period boundary) keeps its cached answers: decisions meanwhile still answer from memory,
and the sync loads what it needs fresh.
"""

from __future__ import annotations

import itertools
import logging
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable

from synapse.module_api import ModuleApi

from synapse_fhir_module.sync.metrics import SYNC_OLDEST_WAITING, SYNC_QUEUED, SYNC_RETRYING

logger = logging.getLogger(__name__)

BATCH = 50
RETRY_FIRST_MS = 5_000
RETRY_MAX_MS = 300_000


class ChangeQueue:
    def __init__(
        self,
        api: ModuleApi,
        apply: Callable[[str, bool], Awaitable[None]],
        invalidate: Callable[[str], Awaitable[None]],
        prepare: Callable[[list[str]], Awaitable[None]] | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._api = api
        self._clock = clock
        self._apply = apply
        self._invalidate = invalidate
        self._prepare = prepare
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._unchanged: set[str] = set()  # pending only to be checked: caches kept
        self._failures: dict[str, int] = {}  # reference -> failed attempts in a row
        self._waiting: set[str] = set()  # scheduled for a retry
        self._retry_changed: set[str] = set()  # of those, the ones that changed (not checks)
        # Not applied yet (queued, running or waiting for a retry) -> when it was first
        # queued; in that order, so the first is the oldest.
        self._since: OrderedDict[str, float] = OrderedDict()
        self._idle_callbacks: list[Callable[[], Awaitable[None]]] = []
        self._running = False
        self._open = False  # until the sync's tables exist, changes only gather

    def __len__(self) -> int:
        return len(self._pending)

    @property
    def retrying(self) -> int:
        """References whose sync failed and waits for another attempt."""
        return len(self._waiting)

    @property
    def oldest_waiting(self) -> float | None:
        """When (Unix seconds) the oldest reference not applied yet was queued."""
        return next(iter(self._since.values()), None)

    @property
    def idle(self) -> bool:
        """Nothing queued, running or waiting for a retry."""
        return not (self._pending or self._waiting or self._running)

    def when_idle(self, callback: Callable[[], Awaitable[None]]) -> None:
        self._idle_callbacks.append(callback)

    def open(self) -> None:
        self._open = True
        self._run_soon()

    def push(self, reference: str) -> None:
        """Queue a changed resource. The caches that hold it are invalidated now, not when
        its turn comes: access decisions must not wait behind a long queue."""
        if reference not in self._pending or reference in self._unchanged:
            self._api.run_as_background_process("fhir_invalidate", self._invalidate, reference)
        self._unchanged.discard(reference)
        self._enqueue(reference)

    def check(self, reference: str) -> None:
        """Queue a resource to make Matrix match it, with no known change (its caches stay)."""
        if reference not in self._pending:
            self._unchanged.add(reference)
        self._enqueue(reference)

    def _enqueue(self, reference: str) -> None:
        self._pending.setdefault(reference, None)
        if reference not in self._since:
            self._since[reference] = self._clock()
            self._report_oldest()
        SYNC_QUEUED.set(len(self._pending))
        self._run_soon()

    def _report_oldest(self) -> None:
        SYNC_OLDEST_WAITING.set(next(iter(self._since.values()), 0))

    def _run_soon(self) -> None:
        if self._open and self._pending and not self._running:
            self._running = True
            self._api.run_as_background_process("fhir_sync_changes", self._work)

    async def _work(self) -> None:
        try:
            while self._pending:
                batch = list(itertools.islice(self._pending, BATCH))
                for reference in batch:
                    del self._pending[reference]
                SYNC_QUEUED.set(len(self._pending))
                for reference, changed in await self._start_batch(batch):
                    await self._apply_one(reference, changed)
        finally:
            self._running = False
        if self.idle:
            for callback in self._idle_callbacks:
                await callback()

    async def _start_batch(self, batch: list[str]) -> list[tuple[str, bool]]:
        """Invalidate and prepare a batch; the references ready to apply, each with
        whether it changed (False: queued only to be checked)."""
        ready = []
        unchanged = set()
        for reference in batch:
            if reference in self._unchanged:
                self._unchanged.discard(reference)
                unchanged.add(reference)
                ready.append(reference)
                continue
            # Again right before the sync reads FHIR: a lookup that started before the
            # push may have put the old answer back meanwhile.
            try:
                await self._invalidate(reference)
            except Exception as e:
                self._retry_later(reference, e)
            else:
                ready.append(reference)
        if self._prepare is not None and ready:
            try:
                await self._prepare(ready)
            except Exception as e:  # only a shortcut: each apply reads what it needs anyway
                logger.info("Preparing %d changes failed (%s)", len(ready), type(e).__name__)
            for reference in ready:
                if reference in self._pending and reference not in self._unchanged:
                    # Changed again while prepare read FHIR: its prepared answer may be
                    # older than the change.
                    try:
                        await self._invalidate(reference)
                    except Exception as e:  # (it is queued again: its turn comes)
                        logger.info("Invalidating %s failed (%s)", reference, type(e).__name__)
        return [(reference, reference not in unchanged) for reference in ready]

    async def _apply_one(self, reference: str, changed: bool) -> None:
        try:
            await self._apply(reference, changed)
        except Exception as e:
            self._retry_later(reference, e, changed)
        else:
            self._failures.pop(reference, None)
            if reference in self._pending:
                # Queued again while it was applied: that change waits from now (when
                # it came is not kept: at most this sync's time is left out).
                self._since.pop(reference, None)
                self._since[reference] = self._clock()
            elif reference not in self._waiting:
                self._since.pop(reference, None)
            self._report_oldest()

    def _retry_later(self, reference: str, e: Exception, changed: bool = True) -> None:
        failures = self._failures.get(reference, 0) + 1
        self._failures[reference] = failures
        delay_ms = min(RETRY_MAX_MS, RETRY_FIRST_MS * 2 ** min(failures - 1, 10))
        # (Type only: Synapse's errors can name users.)
        logger.warning(
            "Sync of %s failed (%s: %s); retrying in %d s",
            reference,
            type(e).__name__,
            e if _safe_to_log(e) else "…",
            delay_ms // 1000,
        )
        if reference in self._waiting:
            # A retry is already scheduled; a change meanwhile makes it a change.
            if changed:
                self._retry_changed.add(reference)
            return
        self._waiting.add(reference)
        if changed:
            self._retry_changed.add(reference)
        SYNC_RETRYING.set(len(self._waiting))
        self._api.delayed_background_call(delay_ms, self._retry, reference, desc="fhir_sync_retry")

    def _retry(self, reference: str) -> None:
        self._waiting.discard(reference)
        SYNC_RETRYING.set(len(self._waiting))
        if reference in self._retry_changed:
            self._retry_changed.discard(reference)
            self._enqueue(reference)
        else:
            # A check that failed is retried as a check: caches stay (a failing full
            # reconcile during an outage must not empty every worker's answers).
            self.check(reference)


def _safe_to_log(e: Exception) -> bool:
    # FHIR client errors say what failed where (no personal data); Synapse's may not.
    return type(e).__module__.startswith("synapse_fhir_module")
