"""A HAPI that notifies nobody (the session's ``quiet_hapi``) and a Synapse with the
module's sync on: what the module does on its own (period boundaries, the full reconcile),
with nothing pushing changes.

The tests' own ``notify`` calls stand in for the shim where a set-up needs them.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.synapse import SynapseServer, module_config
from tests.conftest import SERVER_LOGS

SECRET = "test-webhook-secret"


class QuietStack:
    """A HAPI that notifies nobody, and a Synapse whose sweep runs once an hour."""

    def __init__(
        self,
        workdir: Path,
        hapi: HapiDevServer,
        *,
        full_reconcile_interval: str,
        extra_config: dict[str, Any] | None = None,
        **module: Any,
    ) -> None:
        self.hapi = hapi
        sync = {"poll_interval": "1h", "full_reconcile_interval": full_reconcile_interval}
        self.synapse = SynapseServer(
            workdir / "synapse",
            module_config(self.hapi.base_url, sync=sync, **module),
            extra_config=extra_config,
        )
        SERVER_LOGS.extend([self.synapse.log_path, self.synapse.process.log_path])
        self.fhir = FhirSeeder(self.hapi.base_url)

    def notify(self, reference: str) -> None:
        """What the shim would say after a write (the set-up's only notifications)."""
        self.synapse.notify(reference)

    def writes_since(self, moment: float) -> list[str]:
        """Every FHIR write since ``moment`` (Unix seconds), as ``Type/id``."""
        since = datetime.fromtimestamp(moment, timezone.utc).isoformat().replace("+00:00", "Z")
        bundle = requests.get(
            f"{self.hapi.base_url}/_history",
            params={"_since": since, "_count": "100"},
            headers={"Cache-Control": "no-cache"},
            timeout=30,
        ).json()
        return [
            f"{e['resource']['resourceType']}/{e['resource']['id']}"
            for e in bundle.get("entry", [])
            if "resource" in e
        ]


@contextmanager
def quiet_stack(workdir: Path, hapi: HapiDevServer, **options: Any) -> Iterator[QuietStack]:
    """A started QuietStack on that (running) HAPI; ``options`` as QuietStack takes them."""
    stack = QuietStack(workdir, hapi, **options)
    stack.synapse.start()
    try:
        yield stack
    finally:
        stack.synapse.stop()
