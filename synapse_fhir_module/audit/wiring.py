"""The audit journal on every instance (each notes the decisions it makes there); shipping
the journal to FHIR as AuditEvents runs where background work runs, with ``audit.enabled``;
pruning the journal after ``audit.retention`` runs there too, always."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

import attr
from synapse.module_api import ModuleApi

from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.audit.shipper import PRUNE_INTERVAL_MS, AuditCounts, AuditShipper, Persons
from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.fhir.client import FhirClient

logger = logging.getLogger(__name__)

RETRY_MS = 5_000


def register_journal(
    api: ModuleApi, *, now_ms: Callable[[], int], max_refusals_per_minute: int | None = None
) -> AuditJournal:
    journal = AuditJournal(
        api,
        now_ms=now_ms,
        max_refusals_per_minute=max_refusals_per_minute,
        is_local=api.is_mine,
    )

    async def start() -> None:
        try:
            await journal.start()
        except Exception as e:
            logger.warning("Could not prepare the audit journal (%s); trying again in 5 s", e)
            api.delayed_background_call(RETRY_MS, start, desc="fhir_audit_start")

    api.delayed_background_call(0, start, desc="fhir_audit_start")
    return journal


@attr.s(frozen=True, auto_attribs=True)
class AuditPart:
    # The figures ``/health`` shows (counted at most every 5 s).
    counts: Callable[[], Awaitable[AuditCounts]]
    # Put the rows FHIR refused back in the queue; how many (the admin API's retry).
    retry_refused: Callable[[], Awaitable[int]]


def register_shipping(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    journal: AuditJournal,
    fhir: FhirClient,
    persons: Persons,
    service_user_id: str,
    runs_here: bool,
    now_ms: Callable[[], int],
) -> AuditPart:
    """Ship (with ``audit.enabled``) and prune the journal where background work runs;
    the figures ``/health`` shows and the retry of refused rows, on every instance."""
    shipper = AuditShipper(
        api,
        fhir,
        config.audit,
        service_user_id=service_user_id,
        persons=persons,
        now_ms=now_ms,
    )
    if runs_here:
        api.looping_background_call(
            _quietly(shipper.prune, "pruning"),
            PRUNE_INTERVAL_MS,
            desc="fhir_audit_prune",
            run_on_all_instances=True,
        )
        if config.audit.enabled:
            journal.add_listener(shipper.wake)
            api.looping_background_call(
                shipper.ship,
                int(config.audit.poll_interval * 1000),
                desc="fhir_audit_ship",
                run_on_all_instances=True,
            )

    async def counts() -> AuditCounts:
        if not config.audit.enabled:
            return AuditCounts(enabled=False)
        try:
            return await shipper.counts()
        except Exception:  # (the table not there yet, the database away)
            return AuditCounts(enabled=True)

    async def retry_refused() -> int:
        requeued = await shipper.retry_refused()
        if runs_here and config.audit.enabled:
            shipper.wake()
        # (Elsewhere the shipping instance finds them within audit.poll_interval.)
        return requeued

    return AuditPart(counts=counts, retry_refused=retry_refused)


def _quietly(step: Callable[[], Awaitable[object]], what: str) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        try:
            await step()
        except Exception as e:
            logger.warning("Audit journal %s failed (%s); trying again later", what, e)

    return run
