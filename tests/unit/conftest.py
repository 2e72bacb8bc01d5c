"""Property tests (hypothesis) run without a per-example deadline: on a shared, busy
machine a pure function can take longer than hypothesis' 200 ms default, and a deadline
missed once but met on the replay fails the run as "flaky"."""

from __future__ import annotations

from hypothesis import settings

settings.register_profile("unit", deadline=None)
settings.load_profile("unit")
