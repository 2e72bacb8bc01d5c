"""The OZO unread markers: per member and thread, a FHIR ``Task`` that follows the member's
Matrix read marker, written in the background.

May import: ``fhir``, ``mapping``, ``enforcement``, ``sync`` (its table), ``storage``,
``callback_safety``, ``config``.
"""
