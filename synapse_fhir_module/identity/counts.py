"""What ``/health`` reports of identity by email."""

from __future__ import annotations

import attr


@attr.s(frozen=True, auto_attribs=True)
class IdentityCounts:
    email: bool = False  # identity by email on
    # Addresses an account holds that several FHIR persons carry (they map nobody).
    ambiguous_emails: int = 0
