"""Prometheus metrics of the audit trail (served on Synapse's metrics listener)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

AUDIT_PENDING = Gauge(
    "synapse_fhir_audit_pending",
    "Journaled decisions FHIR does not have yet as AuditEvents (audit.enabled)",
)
# A time rather than an age, as the sync's: Prometheus computes the age (time() - ...).
AUDIT_OLDEST_PENDING = Gauge(
    "synapse_fhir_audit_oldest_pending_timestamp_seconds",
    "When the oldest decision not yet in FHIR was made, as a Unix time; 0 when none waits",
)
AUDIT_SHIPPED = Counter("synapse_fhir_audit_shipped", "Decisions written to FHIR as AuditEvents")
AUDIT_FAILED = Counter(
    "synapse_fhir_audit_failed",
    "AuditEvents FHIR did not take: transient (tried again), unable (FHIR refused entry"
    " after entry alike: tried again) or refused (set aside until an admin retries them)",
    ["kind"],  # transient | unable | refused
)
AUDIT_LAG = Histogram(
    "synapse_fhir_audit_lag_seconds",
    "From a decision to FHIR having its AuditEvent",
    buckets=(0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 3600),
)
AUDIT_PRUNED = Counter("synapse_fhir_audit_pruned", "Journal rows deleted after audit.retention")
