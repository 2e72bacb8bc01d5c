"""Prometheus metrics of the module's HTTP side and of FHIR as each instance sees it
(served on Synapse's metrics listener)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge

FHIR_UP = Gauge(
    "synapse_fhir_fhir_up",
    "1 if FHIR answered /metadata at the last probe (every 10 s, and on /health), else 0",
)
NOTIFY_REJECTED = Counter(
    "synapse_fhir_notify_rejected",
    "Notifications the notify endpoint refused, by reason",
    # missing_secret | wrong_secret (401), malformed (400), not_found (404),
    # method_not_allowed (405), too_large (413), other
    ["reason"],
)
