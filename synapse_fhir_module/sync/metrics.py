"""Prometheus metrics of the FHIR → Matrix sync (served on Synapse's metrics listener)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

MATRIX_ACTIONS_FAILED = Counter(
    "synapse_fhir_matrix_actions_failed",
    "Invites, removals, unbans and power-level changes that failed (each is tried again)",
    ["action"],
)
SYNC_RETRYING = Gauge(
    "synapse_fhir_sync_retrying",
    "FHIR resources whose sync into Matrix failed and waits for another attempt",
)
SYNC_QUEUED = Gauge("synapse_fhir_sync_queued", "FHIR resources waiting to be synced into Matrix")
# A time rather than an age: it is right between updates (none come while the sync is
# stuck), and Prometheus computes the age (``time() - ...``).
SYNC_OLDEST_WAITING = Gauge(
    "synapse_fhir_sync_oldest_waiting_timestamp_seconds",
    "When the oldest FHIR resource not yet synced into Matrix (queued, or waiting for"
    " another attempt) was queued, as a Unix time; 0 when none waits",
)
BINDING_INCIDENTS = Counter(
    "synapse_fhir_binding_incidents",
    "Binding state of a room the module bound, changed behind its back (then repaired)",
)
EMAIL_INVITES = Counter(
    "synapse_fhir_email_invites",
    "Invitations to join mailed to care-team members without an account, by outcome",
    ["outcome"],  # sent | failed
)
PAYLOAD_PARTS_SKIPPED = Counter(
    "synapse_fhir_payload_parts_skipped",
    "Payload parts of a relayed Communication or opening CommunicationRequest not posted "
    "into Matrix (attachments without an http(s) or mxc:// URL, references)",
)
