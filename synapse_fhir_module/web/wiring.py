"""The module's HTTP resources on Synapse's listener, on every instance: ``/notify`` (the
shim and FHIR Subscriptions), ``/health``, the dead letters and the operator console
(server admins only, ``web.admin``); and
the probe of FHIR behind ``/health`` and ``synapse_fhir_fhir_up``, on every instance too
(each serves requests that read FHIR, so each says whether it reaches it)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Collection

from synapse.module_api import ModuleApi

from synapse_fhir_module.audit import journal_store
from synapse_fhir_module.audit.shipper import AuditCounts
from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.identity.counts import IdentityCounts
from synapse_fhir_module.recording.recorder import now_ms
from synapse_fhir_module.recording.wiring import RecordingPart
from synapse_fhir_module.sync.counts import SyncCounts
from synapse_fhir_module.sync.subscriptions import NOTIFY_PATH
from synapse_fhir_module.web.admin.console import register_console
from synapse_fhir_module.web.dead_letters import (
    DEAD_LETTERS_PATH,
    RETRY_PATH,
    DeadLettersResource,
    RetryDeadLettersResource,
)
from synapse_fhir_module.web.health import (
    HEALTH_PATH,
    FhirReachability,
    HealthReport,
    HealthResource,
    no_outbox,
)
from synapse_fhir_module.web.webhook import Notification, NotifyResource

# How often each instance asks FHIR's /metadata, asked or not (a scrape every 15-30 s
# sees a fresh answer; the probe's own cache keeps /health polling from adding load).
PROBE_INTERVAL_MS = 10_000


def register_resources(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    fhir: FhirClient,
    teams: CareTeamDirectory,
    keep: Collection[str],
    recording: RecordingPart | None,
    sync_counts: Callable[[], Awaitable[SyncCounts]],
    identity_counts: Callable[[], IdentityCounts],
    on_notification: Callable[[Notification], None],
    audit_counts: Callable[[], Awaitable[AuditCounts]] | None = None,
    retry_refused_audit: Callable[[], Awaitable[int]] | None = None,
) -> None:
    reachability = FhirReachability(fhir)
    api.delayed_background_call(0, reachability.probe, desc="fhir_reachability_probe")
    api.looping_background_call(
        reachability.probe,
        PROBE_INTERVAL_MS,
        desc="fhir_reachability_probe",
        run_on_all_instances=True,
    )
    report = HealthReport(
        reachability,
        recording.counts if recording else no_outbox,
        sync_counts,
        identity_counts,
        audit_counts,
    )
    api.register_web_resource(HEALTH_PATH, HealthResource(report))
    if recording is not None:
        api.register_web_resource(DEAD_LETTERS_PATH, DeadLettersResource(api))
        api.register_web_resource(
            RETRY_PATH, RetryDeadLettersResource(api, now_ms, recording.table_changed)
        )
    register_console(
        api,
        report=report,
        teams=teams,
        keep=keep,
        recent_refusals=journal_store.recent_refusals,
        now_ms=now_ms,
        outbox_changed=recording.table_changed if recording else None,
        retry_refused_audit=retry_refused_audit,
    )
    # FHIR says what changed (design.md: endpoints); the background instance makes Matrix match.
    api.register_web_resource(NOTIFY_PATH, NotifyResource(config.webhook.secret, on_notification))
