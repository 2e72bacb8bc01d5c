"""What ``/health`` reports of the FHIR → Matrix sync on the instance that runs it."""

from __future__ import annotations

import attr


@attr.s(frozen=True, auto_attribs=True)
class SyncCounts:
    running: bool = False
    queued: int = 0
    retrying: int = 0
    scheduled_boundaries: int = 0
    binding_incidents: int = 0
    # When (Unix ms) the oldest reference not yet synced was queued; None: none waits.
    # (The operator console's lag; left out of /health, whose keys are a contract.)
    oldest_waiting_ms: int | None = attr.ib(default=None, metadata={"health": False})
