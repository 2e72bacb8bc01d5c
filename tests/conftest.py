"""Shared pytest set-up: the log files of the servers a failed run leaves behind."""

from __future__ import annotations

from pathlib import Path

import pytest

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
