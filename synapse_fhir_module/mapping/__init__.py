"""The data-mapping contract between Matrix and FHIR, as pure functions on JSON: a
message as a ``Communication`` (and the OZO profile's checks), a ``Communication`` from
another system as a Matrix message, a thread's status as the room's rules, the unread
markers as a ``Task``. No I/O.

May import: ``config``, ``fhir``.
"""
