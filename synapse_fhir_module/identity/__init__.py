"""Who is who: Matrix accounts ↔ FHIR persons by email (what an identity server did), the
accounts the registration gate let in, and the identity-service endpoints (lookups by
hashed address, for this homeserver's own users only).

May import: ``fhir``, ``storage``, ``http_exchange``, ``callback_safety``, ``config``.
"""
