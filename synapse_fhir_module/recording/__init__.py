"""Every message as a FHIR ``Communication``, exactly once: memory on the send path,
batches to FHIR, Synapse's own event stream read back for durability (a saved position,
a catch-up after a crash), and the outbox table for what must wait or was refused.

May import: ``fhir``, ``mapping``, ``enforcement`` (bindings), ``sync`` (its table tells
relays from messages), ``storage``, ``http_exchange``, ``service_user``, ``config``.
"""
