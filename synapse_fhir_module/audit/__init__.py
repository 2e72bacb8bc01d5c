"""The audit trail: every decision the module makes about someone's access (a refusal, a
gated registration) and every change it makes in Matrix on the care record's behalf (an
invite, a removal, a ban, power levels, a relayed message), kept in the module's journal
table and, with ``audit.enabled``, written to FHIR as AuditEvents (docs/audit.md).

May import: config, storage, fhir, identity, http_exchange, service_user, callback_safety.
"""
