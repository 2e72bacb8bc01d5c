"""The module loads into a real Synapse, registers its service user and reports health."""

from __future__ import annotations

from collections.abc import Callable

import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until

StartSynapse = Callable[..., SynapseServer]


def health(server: SynapseServer) -> dict:
    response = requests.get(server.url("/_synapse/client/fhir/health"), timeout=10)
    assert response.status_code == 200
    return response.json()


def test_health_reports_fhir_reachable(synapse: SynapseServer) -> None:
    assert health(synapse) == {
        "status": "ok",
        "fhir": {"reachable": True},
        "outbox": {"pending": 0, "dead": 0},
        # (This homeserver's sync is off: the keys are there, with nothing to count.)
        "sync": {
            "running": False,
            "queued": 0,
            "retrying": 0,
            "scheduled_boundaries": 0,
            "binding_incidents": 0,
        },
        # Identity by email is on by default; no address of this server's is ambiguous.
        "identity": {"email": True, "ambiguous_emails": 0},
        # Audit off by default: nothing to ship (the journal is still kept).
        "audit": {"enabled": False, "pending": 0, "oldest_age_seconds": None, "refused": 0},
    }


def test_service_user_is_registered_at_start(synapse: SynapseServer, admin: MatrixUser) -> None:
    user = wait_until(
        lambda: admin.request("GET", "/_synapse/admin/v2/users/@fhir:example.org"),
        timeout=10,
        what="the service user @fhir:example.org registered",
    )
    assert user["name"] == "@fhir:example.org"
    assert user["deactivated"] is False


def test_service_user_localpart_comes_from_config(
    hapi: HapiDevServer, start_synapse: StartSynapse
) -> None:
    server = start_synapse(module_config(hapi.base_url, service_user="care-bot"))
    admin = register_user(server, "admin", admin=True)
    user = wait_until(
        lambda: admin.request("GET", "/_synapse/admin/v2/users/@care-bot:example.org"),
        timeout=10,
        what="the configured service user @care-bot:example.org registered",
    )
    assert user["name"] == "@care-bot:example.org"


def test_restart_keeps_the_existing_service_user(
    hapi: HapiDevServer, start_synapse: StartSynapse
) -> None:
    """Registration at start is idempotent: a second start finds the user and goes on."""
    server = start_synapse(module_config(hapi.base_url))
    admin = register_user(server, "admin", admin=True)
    wait_until(
        lambda: admin.request("GET", "/_synapse/admin/v2/users/@fhir:example.org"),
        timeout=10,
        what="the service user registered on first start",
    )
    server.stop()
    server.start()
    assert health(server)["status"] == "ok"
    log = server.log_path.read_text()
    assert log.count("Registered the service user") == 1
    assert "Could not register the service user" not in log
