"""Synapse refuses to start on a bad module config, naming the key path."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from devstack.synapse import SynapseServer, module_config
from tests.conftest import SERVER_LOGS

FHIR = "http://127.0.0.1:9/fhir"  # never contacted: start-up fails first


@pytest.mark.parametrize(
    ("config", "key_path", "explanation"),
    [
        ({"service_user": "fhir"}, "modules.<item 0>.config.fhir", "required"),
        (
            {"fhir": {"base_url": "fhir.example.org"}},
            "modules.<item 0>.config.fhir.base_url",
            "http(s) URL",
        ),
        (
            module_config(FHIR, fhir={"base_url": FHIR, "timeout": 10}),
            "modules.<item 0>.config.fhir.timeout",
            "'10s'",
        ),
        (
            module_config(FHIR, communication={"encrypted_rooms": "drop"}),
            "modules.<item 0>.config.communication.encrypted_rooms",
            "metadata_only, skip, forbid",
        ),
        (
            module_config(FHIR, enforcement={"fail_close": True}),
            "modules.<item 0>.config.enforcement.fail_close",
            "unknown key",
        ),
    ],
)
def test_synapse_refuses_to_start_and_names_the_key(
    run_dir: Path, config: dict[str, Any], key_path: str, explanation: str
) -> None:
    server = SynapseServer(run_dir / f"bad-config-{uuid.uuid4().hex[:8]}", config)
    SERVER_LOGS.append(server.process.log_path)
    output = server.start_expecting_failure()
    assert server.process.exit_code() not in (0, None)
    assert key_path in output, output
    assert explanation in output, output
