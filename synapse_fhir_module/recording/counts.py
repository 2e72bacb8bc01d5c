"""What ``/health`` reports of recording: messages FHIR does not have yet, dead letters."""

from __future__ import annotations

import attr


@attr.s(frozen=True, auto_attribs=True)
class OutboxCounts:
    pending: int = 0
    dead: int = 0
    # Messages communication.profile: ozo left unwritten since start (the service user's);
    # None under the base profile, which leaves nothing unwritten for its sake.
    not_written_profile: int | None = None
    # How long the oldest message not yet in FHIR has waited (0: none waits); None where
    # it is not known (the tables not there yet). Not part of /health's outbox keys.
    behind_ms: int | None = None
