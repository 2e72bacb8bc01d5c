"""``GET /_synapse/client/fhir/health`` (design.md: endpoints).

Answers ``{"status": "ok"|"degraded", "fhir": {"reachable": bool},
"outbox": {"pending": int, "dead": int}, "sync": {...}}`` (and, with
``communication.profile: ozo``, ``"recording": {"not_written_profile": int}``: messages the
profile could not hold since start — the service user's own, and those of exempt accounts
without a person — not written). Reachability
comes from FHIR's ``/metadata`` with a short timeout and is remembered for a few seconds,
so a monitoring system polling the endpoint does not turn into load on FHIR.

``sync`` (added to the contract's keys) describes the FHIR → Matrix sync on the instance
that runs it (``running``): resources queued, resources whose sync failed and waits for
another attempt (a failed invite or removal is never dropped), the teams with a period
boundary scheduled, and binding state found changed behind the module's back. Degraded:
FHIR unreachable, or a sync waiting for another attempt.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import attr
from synapse.module_api import DirectServeJsonResource, SynapseRequest

from synapse_fhir_module.audit.shipper import AuditCounts
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirError
from synapse_fhir_module.identity.counts import IdentityCounts
from synapse_fhir_module.recording.counts import OutboxCounts
from synapse_fhir_module.sync.counts import SyncCounts
from synapse_fhir_module.web.metrics import FHIR_UP

logger = logging.getLogger(__name__)

HEALTH_PATH = "/_synapse/client/fhir/health"


def no_identity() -> IdentityCounts:
    return IdentityCounts()


async def no_sync() -> SyncCounts:
    return SyncCounts()


async def no_outbox() -> OutboxCounts:
    """Until the outbox exists there is nothing pending and nothing dead."""
    return OutboxCounts()


class FhirReachability:
    """Whether FHIR answered ``/metadata`` lately; probes at most once per ``cache_for``.
    Each probe's answer is the ``synapse_fhir_fhir_up`` gauge (``probe`` keeps it fresh
    while nobody asks ``/health``)."""

    def __init__(
        self,
        fhir: FhirClient,
        *,
        probe_timeout: float = 2.0,
        cache_for: float = 5.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._fhir = fhir
        self._probe_timeout = probe_timeout
        self._cache_for = cache_for
        self._clock = clock
        self._checked_at: float | None = None
        self._reachable = False

    async def is_reachable(self) -> bool:
        now = self._clock()
        if self._checked_at is not None and now - self._checked_at < self._cache_for:
            return self._reachable
        try:
            await self._fhir.capabilities(timeout=self._probe_timeout)
            reachable = True
        except FhirError as e:
            if self._reachable or self._checked_at is None:
                logger.warning("FHIR server at %s not reachable: %s", self._fhir.base_url, e)
            reachable = False
        self._checked_at = self._clock()
        self._reachable = reachable
        FHIR_UP.set(1 if reachable else 0)
        return reachable

    async def probe(self) -> None:
        """For a periodic call: the gauge follows FHIR even on an idle instance."""
        await self.is_reachable()


class HealthReport:
    """What ``/health`` answers, and the lags the operator console adds to it: computed
    once per request, for either."""

    def __init__(
        self,
        reachability: FhirReachability,
        outbox_counts: Callable[[], Awaitable[OutboxCounts]] = no_outbox,
        sync_counts: Callable[[], Awaitable[SyncCounts]] = no_sync,
        identity_counts: Callable[[], IdentityCounts] = no_identity,
        audit_counts: Callable[[], Awaitable[AuditCounts]] | None = None,
    ) -> None:
        self._reachability = reachability
        self._outbox_counts = outbox_counts
        self._sync_counts = sync_counts
        self._identity_counts = identity_counts
        self._audit_counts = audit_counts

    async def health(self) -> dict[str, Any]:
        return (await self.with_lags())[0]

    async def with_lags(self) -> tuple[dict[str, Any], dict[str, Any]]:
        """(``/health``'s answer, the lags: how long the oldest message not in FHIR yet
        has waited, when the oldest FHIR change not yet in Matrix was queued)."""
        reachable = await self._reachability.is_reachable()
        outbox = await self._outbox_counts()
        sync = await self._sync_counts()
        audit = (
            {} if self._audit_counts is None else {"audit": attr.asdict(await self._audit_counts())}
        )
        health = {
            "status": "ok" if reachable and not sync.retrying else "degraded",
            "fhir": {"reachable": reachable},
            "outbox": {"pending": outbox.pending, "dead": outbox.dead},
            **_recording(outbox),
            "sync": attr.asdict(sync, filter=_in_health),
            "identity": attr.asdict(self._identity_counts()),
            **audit,
        }
        lags = {
            "recording": {
                "pending": outbox.pending,
                "dead": outbox.dead,
                "behind_ms": outbox.behind_ms,
            },
            "sync": {
                "running": sync.running,
                "queued": sync.queued,
                "retrying": sync.retrying,
                "oldest_waiting_ms": sync.oldest_waiting_ms,
            },
            "fhir_reachable": reachable,
        }
        return health, lags


class HealthResource(DirectServeJsonResource):
    def __init__(self, report: HealthReport) -> None:
        super().__init__()
        self._report = report

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        return 200, await self._report.health()


def _in_health(attribute: attr.Attribute, value: object) -> bool:
    return bool(attribute.metadata.get("health", True))


def _recording(outbox: OutboxCounts) -> dict[str, dict[str, int]]:
    """``recording``, shown when the OZO profile counts what it leaves unwritten."""
    if outbox.not_written_profile is None:
        return {}
    return {"recording": {"not_written_profile": outbox.not_written_profile}}
