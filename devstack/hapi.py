"""The HAPI FHIR dev server (hapi/server/target/fhir-dev-server.jar) as a managed process."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence
from pathlib import Path

import requests

from devstack.ports import free_port
from devstack.processes import ManagedProcess
from devstack.waiting import StopWaiting, wait_until

REPO = Path(__file__).resolve().parent.parent
# SFM_DEV_SERVER_JAR points at another build (e.g. a copy kept while hapi/ is rebuilt).
DEV_SERVER_JAR = Path(
    os.environ.get("SFM_DEV_SERVER_JAR")
    or REPO / "hapi" / "server" / "target" / "fhir-dev-server.jar"
)
START_TIMEOUT = 240.0


class HapiDevServer:
    """One HAPI JPA server on 127.0.0.1.

    ``database_file``: an H2 file database that survives restarts; None keeps
    everything in memory. ``notify_url``/``notify_secret`` switch the shim on.
    ``integrity_on_delete`` False lets a resource others refer to be deleted.
    ``java_options`` go to the JVM (e.g. ``-Xmx512m``; none: the JVM's own ergonomics).
    """

    def __init__(
        self,
        workdir: Path,
        *,
        port: int | None = None,
        database_file: Path | None = None,
        notify_url: str | None = None,
        notify_secret: str | None = None,
        integrity_on_delete: bool = True,
        jar: Path = DEV_SERVER_JAR,
        java_options: Sequence[str] = (),
    ) -> None:
        if not jar.exists():
            raise FileNotFoundError(
                f"{jar} is missing: build it with `mvn -f hapi/pom.xml package`"
            )
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/fhir"
        argv = ["java", *java_options, "-jar", str(jar), f"--server.port={self.port}"]
        if database_file is not None:
            argv.append(f"--spring.datasource.url=jdbc:h2:file:{database_file}")
        if not integrity_on_delete:
            argv.append("--fhir.enforce-referential-integrity-on-delete=false")
        env = {}
        if notify_url:
            env["SYNAPSE_NOTIFY_URL"] = notify_url
            env["SYNAPSE_NOTIFY_SECRET"] = notify_secret or ""
        self.process = ManagedProcess("hapi", argv, workdir / f"hapi-{self.port}.log", env=env)
        self.start_seconds: float | None = None

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.process.start()
        wait_until(
            self._ready,
            timeout=timeout,
            what=f"HAPI answering {self.base_url}/metadata (log: {self.process.log_path})",
            interval=0.25,
        )
        self.start_seconds = time.monotonic() - self.process.started_at

    def stop(self) -> None:
        self.process.stop()

    def _ready(self) -> bool:
        if not self.process.running:
            raise StopWaiting(
                f"HAPI exited with code {self.process.exit_code()}:\n{self.process.log_tail()}"
            )
        try:
            return requests.get(f"{self.base_url}/metadata", timeout=5).status_code == 200
        except requests.RequestException:
            return False
