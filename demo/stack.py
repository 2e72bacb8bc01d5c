"""The two servers of the demo: HAPI (H2 in memory) whose shim notifies Synapse (SQLite)
with the module, FHIR → Matrix sync on. Both on 127.0.0.1, stopped by PID."""

from __future__ import annotations

import secrets
from pathlib import Path

from devstack.hapi import HapiDevServer
from devstack.ports import free_port
from devstack.synapse import SynapseServer, module_config

NOTIFY_PATH = "/_synapse/client/fhir/notify"


class DemoStack:
    def __init__(self, workdir: Path) -> None:
        # Synapse's port is chosen first: HAPI's shim must know where to post.
        synapse_port = free_port()
        self.webhook_secret = secrets.token_hex(16)
        self.hapi = HapiDevServer(
            workdir,
            notify_url=f"http://127.0.0.1:{synapse_port}{NOTIFY_PATH}",
            notify_secret=self.webhook_secret,
        )
        self.synapse = SynapseServer(
            workdir / "synapse",
            module_config(
                self.hapi.base_url,
                webhook={"secret": self.webhook_secret},
                sync={"enabled": True, "poll_interval": "60s"},
            ),
            port=synapse_port,
        )

    @property
    def log_paths(self) -> list[Path]:
        return [self.hapi.process.log_path, self.synapse.log_path]

    def stop(self) -> None:
        """Whatever was started, by PID (a no-op for what never ran)."""
        self.synapse.stop()
        self.hapi.stop()
