"""A throwaway Prometheus server scraping homeservers' metrics listeners, as a managed
process.

``prometheus`` on 127.0.0.1 and a free port, its time-series database in a fresh temporary
directory (deleted at ``stop``), scraping and evaluating its rules at ``interval`` (short:
a test waits seconds, not minutes), stopped by its PID. What it knows is read through its
own HTTP API (``/api/v1/...``), as an operator's tools read it.

The binary comes from Debian's ``prometheus`` package (``make setup`` installs it when missing,
without starting a service: devstack/tools.py), or is the file ``SFM_PROMETHEUS`` names.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
import yaml

from devstack.ports import free_port
from devstack.processes import ManagedProcess
from devstack.tools import ToolNotInstalled, find_tool
from devstack.waiting import StopWaiting, wait_until

START_TIMEOUT = 60.0


def find_prometheus() -> str:
    """``SFM_PROMETHEUS`` when set, else :func:`devstack.tools.find_tool`'s (which names the
    package ``make setup`` installs when it is missing)."""
    configured = os.environ.get("SFM_PROMETHEUS")
    if configured:
        if not os.path.isfile(configured):
            raise ToolNotInstalled(f"prometheus not found at SFM_PROMETHEUS={configured}")
        return configured
    return find_tool("prometheus")


class PrometheusServer:
    """Scrapes each of ``targets`` (``host:port`` of a Synapse metrics listener) as job
    ``synapse`` and evaluates the rule files given; ``log_dir`` keeps its log."""

    def __init__(
        self,
        log_dir: Path,
        targets: Sequence[str],
        rule_files: Sequence[Path] = (),
        *,
        interval: str = "1s",
    ) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.root = Path(tempfile.mkdtemp(prefix="sfm-prometheus-"))
        config = {
            "global": {"scrape_interval": interval, "evaluation_interval": interval},
            "rule_files": [str(path) for path in rule_files],
            "scrape_configs": [
                {
                    "job_name": "synapse",
                    "metrics_path": "/_synapse/metrics",
                    "scrape_timeout": interval,
                    "static_configs": [{"targets": list(targets)}],
                }
            ],
        }
        config_path = self.root / "prometheus.yml"
        config_path.write_text(yaml.safe_dump(config, sort_keys=False))
        self.process = ManagedProcess(
            "prometheus",
            [
                find_prometheus(),
                f"--config.file={config_path}",
                f"--storage.tsdb.path={self.root / 'data'}",
                f"--web.listen-address=127.0.0.1:{self.port}",
            ],
            log_dir / f"prometheus-{self.port}.log",
            cwd=self.root,
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.process.start()
        wait_until(
            self._ready,
            timeout=timeout,
            what=f"Prometheus ready on {self.base_url} (log: {self.process.log_path})",
            interval=0.1,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM by its PID) and delete its directory."""
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def api(self, path: str, **params: str) -> Any:
        """``data`` of ``GET /api/v1/<path>``."""
        answer = requests.get(f"{self.base_url}/api/v1/{path}", params=params, timeout=10)
        answer.raise_for_status()
        body = answer.json()
        assert body["status"] == "success", body
        return body["data"]

    def alerts(self) -> list[dict[str, Any]]:
        """Active alerts (pending or firing), as ``/api/v1/alerts`` lists them."""
        return list(self.api("alerts")["alerts"])

    def rule_groups(self) -> list[dict[str, Any]]:
        return list(self.api("rules")["groups"])

    def query(self, expr: str) -> list[dict[str, Any]]:
        """The instant vector ``expr`` evaluates to now."""
        return list(self.api("query", query=expr)["result"])

    def targets_up(self) -> bool:
        targets = self.api("targets")["activeTargets"]
        return bool(targets) and all(target["health"] == "up" for target in targets)

    def _ready(self) -> bool:
        if not self.process.running:
            raise StopWaiting(
                f"Prometheus exited with code {self.process.exit_code()}:\n"
                f"{self.process.log_tail()}"
            )
        try:
            return requests.get(f"{self.base_url}/-/ready", timeout=2).status_code == 200
        except requests.RequestException:
            return False
