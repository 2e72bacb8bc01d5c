"""FHIR changes waiting to be applied to Matrix, worked through one at a time in the
background. A reference is queued at most once: a burst of notifications for one CareTeam
is one sync (the sync reads the current state anyway). Failures while FHIR is away are
retried; the reconcile sweep catches anything that is still missed."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from synapse.module_api import ModuleApi

from synapse_fhir_module.fhir_errors import FhirTransientError
from synapse_fhir_module.team_directory import DirectoryUnavailable

logger = logging.getLogger(__name__)

RETRY_MS = 5_000


class ChangeQueue:
    def __init__(self, api: ModuleApi, apply: Callable[[str], Awaitable[None]]) -> None:
        self._api = api
        self._apply = apply
        self._pending: dict[str, None] = {}  # insertion-ordered set
        self._running = False
        self._open = False  # until the sync's tables exist, changes only gather

    def open(self) -> None:
        self._open = True
        self._run_soon()

    def __len__(self) -> int:
        return len(self._pending)

    def push(self, reference: str) -> None:
        self._pending.setdefault(reference, None)
        self._run_soon()

    def _run_soon(self) -> None:
        if self._open and self._pending and not self._running:
            self._running = True
            self._api.run_as_background_process("fhir_sync_changes", self._work)

    async def _work(self) -> None:
        try:
            while self._pending:
                reference = next(iter(self._pending))
                del self._pending[reference]
                await self._apply_one(reference)
        finally:
            self._running = False

    async def _apply_one(self, reference: str) -> None:
        try:
            await self._apply(reference)
        except (FhirTransientError, DirectoryUnavailable) as e:
            logger.warning("Sync of %s waits for FHIR (%s); retrying in 5 s", reference, e)
            self._api.delayed_background_call(
                RETRY_MS, self.push, reference, desc="fhir_sync_retry"
            )
        except Exception:
            logger.exception("Sync of %s failed; the next sweep tries again", reference)
