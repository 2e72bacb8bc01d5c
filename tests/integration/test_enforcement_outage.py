"""Care-team decisions while FHIR is down: remembered answers hold for cache_ttl, then
fail closed with directory_unavailable (or fail open when configured)."""

from __future__ import annotations

import uuid
from collections.abc import Callable

import pytest

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.integration.care_network import CareNetwork
from tests.integration.matrix_views import expired_error

# Long enough that the message right after FHIR stops is well within it, even on a
# loaded machine; the test waits about this long for the refusal.
CACHE_TTL = 20.0


def bound_room(server: SynapseServer, network: CareNetwork) -> tuple[MatrixUser, str]:
    """A room bound to the network's team, made by the service user; nothing fetched yet."""
    service = service_session(register_user(server, network.localpart("root"), admin=True))
    return service, create_room_in_space(service, create_bound_space(service, network.team))


def send_error(user: MatrixUser, room: str) -> MatrixError | None:
    try:
        user.send_text(room, "ping")
    except MatrixError as e:
        return e
    return None


def test_cached_answers_hold_for_cache_ttl_then_fail_closed(
    hapi_running: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi_running.base_url))
    server = start_synapse(
        module_config(hapi_running.base_url, enforcement={"cache_ttl": f"{CACHE_TTL}s"})
    )
    service, room = bound_room(server, network)
    inactive = register_user(server, network.localpart("ivo"))
    wait_until(
        lambda: expired_error(inactive),
        timeout=30,
        what="the inactive practitioner's account expired before the outage",
    )
    # The team's membership is fetched here, at the invite, and remembered: nothing slow
    # lies between this and the message answered from memory below.
    gp = register_user(server, network.localpart("anna"))
    service.invite(room, gp.user_id)
    gp.join(room)
    gp.send_text(room, "before the outage")

    hapi_running.stop()
    gp.send_text(room, "answered from memory")

    error = wait_until(
        lambda: send_error(gp, room),
        timeout=CACHE_TTL + 20,
        what="decisions refused once the remembered answer is older than cache_ttl",
    )
    assert error.status == 403
    assert error.reason == "directory_unavailable"
    assert "try again" in error.body["error"]
    # Account validity was refreshed (every cache_ttl) during the outage and kept what it
    # knew: an outage never expires the active, nor revives the inactive.
    assert gp.whoami() == gp.user_id
    assert expired_error(inactive) is not None

    hapi_running.start()
    wait_until(
        lambda: send_error(gp, room) is None,
        timeout=30,
        what="decisions allowed again after FHIR came back",
    )


def test_unknown_team_while_fhir_is_down_fails_closed_or_open_as_configured(
    hapi_running: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi_running.base_url))
    closed = start_synapse(module_config(hapi_running.base_url))
    opened = start_synapse(module_config(hapi_running.base_url, enforcement={"fail_closed": False}))
    closed_service, closed_room = bound_room(closed, network)
    open_service, open_room = bound_room(opened, network)

    hapi_running.stop()
    gp_closed = register_user(closed, network.localpart("anna"))
    with pytest.raises(MatrixError) as caught:
        closed_service.invite(closed_room, gp_closed.user_id)
    assert caught.value.status == 403
    assert caught.value.reason == "directory_unavailable"

    gp_open = register_user(opened, network.localpart("anna"))
    open_service.invite(open_room, gp_open.user_id)  # fail_closed: false lets it through
    gp_open.join(open_room)
