"""The audit journal on every instance (each notes the decisions it makes there); shipping
the journal to FHIR as AuditEvents runs where background work runs, with ``audit.enabled``."""

from __future__ import annotations

import logging
from collections.abc import Callable

from synapse.module_api import ModuleApi

from synapse_fhir_module.audit.journal import AuditJournal

logger = logging.getLogger(__name__)

RETRY_MS = 5_000


def register_journal(api: ModuleApi, *, now_ms: Callable[[], int]) -> AuditJournal:
    journal = AuditJournal(api, now_ms=now_ms)

    async def start() -> None:
        try:
            await journal.start()
        except Exception as e:
            logger.warning("Could not prepare the audit journal (%s); trying again in 5 s", e)
            api.delayed_background_call(RETRY_MS, start, desc="fhir_audit_start")

    api.delayed_background_call(0, start, desc="fhir_audit_start")
    return journal
