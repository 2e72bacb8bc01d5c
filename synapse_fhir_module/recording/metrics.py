"""Prometheus metrics of Communication recording (served on Synapse's metrics listener)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTBOX_PENDING = Gauge(
    "synapse_fhir_outbox_pending",
    "Messages Synapse has stored that FHIR does not have yet (in memory, or waiting in the"
    " outbox table)",
)
RECORDING_BEHIND = Gauge(
    "synapse_fhir_recording_behind_seconds",
    "How long the oldest message not yet in FHIR has waited (0: none waits)",
)
OUTBOX_DEAD = Gauge(
    "synapse_fhir_outbox_dead", "Messages FHIR refused for good (dead letters, with a reason)"
)
POSITION_AGE = Gauge(
    "synapse_fhir_recording_position_age_seconds",
    "Since a read of Synapse's stream last found FHIR holding every message before its end"
    " (grows while FHIR or the stream cannot be read)",
)
COMMUNICATIONS_WRITTEN = Counter(
    "synapse_fhir_communications_written", "Outbox rows written to FHIR as Communications"
)
COMMUNICATIONS_FAILED = Counter(
    "synapse_fhir_communications_failed", "Outbox rows turned into dead letters"
)
COMMUNICATIONS_NOT_WRITTEN = Counter(
    "synapse_fhir_communications_not_written",
    "Messages communication.profile: ozo cannot hold (the service user's, an exempt account's"
    " without a person), not written",
    ["reason"],
)
COMMUNICATIONS_REPLAYED = Counter(
    "synapse_fhir_communications_replayed",
    "Messages read again after a crash or restart that FHIR already had (nothing written)",
)
WRITE_RETRIES = Counter(
    "synapse_fhir_outbox_retries", "Outbox batches put back because FHIR was unreachable"
)
COMMUNICATION_LAG = Histogram(
    "synapse_fhir_communication_lag_seconds",
    "From a message's origin_server_ts until FHIR committed its Communication",
    buckets=(0.05, 0.1, 0.2, 0.3, 0.5, 1, 2, 5, 10, 30, 60, 300, 1800),
)
