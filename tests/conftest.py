"""Shared pytest set-up: hypothesis' profiles, and the log files of the servers a failed
run leaves behind.

Property tests run without a per-example deadline: on a shared, busy machine a pure
function can take longer than hypothesis' 200 ms default, and a deadline missed once but
met on the replay fails the run as "flaky". ``HYPOTHESIS_PROFILE=fuzz`` (``make fuzz``)
runs every property test with ``FUZZ_EXAMPLES`` examples (default 1000) instead of 100.
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import settings

settings.register_profile("default", deadline=None)
settings.register_profile(
    "fuzz", deadline=None, max_examples=int(os.environ.get("FUZZ_EXAMPLES", "1000"))
)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "default"))

# Log files of every server the tests started; shown when something failed.
SERVER_LOGS: list[Path] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    failed = terminalreporter.stats.get("failed") or terminalreporter.stats.get("error")
    if not failed or not SERVER_LOGS:
        return
    terminalreporter.section("server logs (kept for this failed run)")
    for path in SERVER_LOGS:
        terminalreporter.write_line(f"--- {path} (last 40 lines)")
        if path.exists():
            for line in path.read_text(errors="replace").splitlines()[-40:]:
                terminalreporter.write_line(line)
