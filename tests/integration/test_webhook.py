"""The notify webhook (design.md: endpoints) on a real Synapse: what a caller is told, and that a
notification reaches the module (for now it refreshes the care-team caches)."""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.fhir_seed import FHIR_JSON, FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer
from devstack.waiting import wait_until
from synapse_fhir_module.web.webhook import NOTIFY_PATH
from tests.integration.care_network import CareNetwork

SECRET = "test-webhook-secret"  # devstack.synapse.module_config
AUTH = {"Authorization": f"Bearer {SECRET}"}
# HAPI's rest-hook sends deletes only with this channel extension.
SEND_DELETES = "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"


def notify(
    server: SynapseServer,
    method: str = "POST",
    path: str = "",
    body: Any = None,
    headers: dict[str, str] | None = None,
) -> requests.Response:
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    return requests.request(
        method,
        server.url(NOTIFY_PATH + path),
        data=data,
        headers=AUTH if headers is None else headers,
        timeout=30,
    )


def shim_body(resource_type: str = "CareTeam", resource_id: str = "team-1") -> dict[str, Any]:
    return {"resourceType": resource_type, "id": resource_id, "versionId": "2", "action": "update"}


def errcode(response: requests.Response) -> tuple[int, str]:
    return response.status_code, response.json()["errcode"]


def logged(server: SynapseServer, text: str) -> bool:
    return text in server.log_path.read_text(errors="replace")


def log_size(path: Path) -> int:
    return path.stat().st_size if path.exists() else 0


def problems_logged_since(path: Path, offset: int, pattern: str) -> list[str]:
    """Lines at WARN/WARNING or ERROR written after ``offset`` (whatever their wording)."""
    with path.open("rb") as log:
        log.seek(offset)
        text = log.read().decode(errors="replace")
    return [line for line in text.splitlines() if re.search(pattern, line)]


SYNAPSE_ERROR = r" - (ERROR|CRITICAL) - "


# --- what a caller is told -----------------------------------------------------------


def test_missing_or_wrong_secret_is_refused(synapse: SynapseServer) -> None:
    assert errcode(notify(synapse, body=shim_body(), headers={})) == (401, "M_MISSING_TOKEN")
    wrong = {"Authorization": "Bearer not-the-secret"}
    assert errcode(notify(synapse, body=shim_body(), headers=wrong)) == (401, "M_UNKNOWN_TOKEN")
    assert notify(synapse, "PUT", "/CareTeam/team-1", headers=wrong).status_code == 401
    assert notify(synapse, "DELETE", "/CareTeam/team-1", headers={}).status_code == 401


def test_one_mib_body_is_too_large(synapse: SynapseServer) -> None:
    huge = b" " * (1024 * 1024)
    assert errcode(notify(synapse, body=huge)) == (413, "M_TOO_LARGE")
    assert errcode(notify(synapse, "PUT", "/CareTeam/team-1", huge)) == (413, "M_TOO_LARGE")


def test_malformed_notification_is_refused(synapse: SynapseServer) -> None:
    assert errcode(notify(synapse, body=b'{"resourceType": "CareTeam",')) == (400, "M_BAD_JSON")
    assert errcode(notify(synapse, body=b"")) == (400, "M_BAD_JSON")
    bad_id = notify(synapse, body=shim_body(resource_id="team_1"))
    assert errcode(bad_id) == (400, "M_INVALID_PARAM")
    no_action = {"resourceType": "CareTeam", "id": "team-1"}
    assert errcode(notify(synapse, body=no_action)) == (400, "M_INVALID_PARAM")
    assert errcode(notify(synapse, "PUT", "/care-team/team-1")) == (400, "M_INVALID_PARAM")


def test_shim_notification_is_accepted(synapse: SynapseServer) -> None:
    team_id = f"team-{uuid.uuid4().hex[:8]}"
    response = notify(synapse, body=shim_body(resource_id=team_id))
    assert (response.status_code, response.json()) == (202, {"status": "accepted"})
    wait_until(
        lambda: logged(synapse, f"Notification: update CareTeam/{team_id}"),
        timeout=10,
        what="the module logging the notification",
    )


def test_subscription_form_is_accepted(synapse: SynapseServer) -> None:
    """As HAPI's rest-hook sends them: PUT with the resource (never read as data) and the
    version in If-Match, DELETE without a body; a /_history/ suffix is understood too."""
    team = {"resourceType": "CareTeam", "id": "team-1", "meta": {"versionId": "3"}}
    headers = {**AUTH, **FHIR_JSON, "If-Match": 'W/"3"'}
    for method, path, body, with_headers in [
        ("PUT", "/CareTeam/team-1", team, headers),
        ("PUT", "/CareTeam/team-1/_history/3", None, AUTH),
        ("DELETE", "/CareTeam/team-1", None, AUTH),
        ("DELETE", "/CareTeam/team-1/_history/4", None, AUTH),
    ]:
        response = notify(synapse, method, path, body, with_headers)
        assert response.status_code == 202, (method, path, response.text)
        # In FHIR: HAPI's rest-hook client parses the answer as a resource.
        assert response.json()["resourceType"] == "OperationOutcome"


def test_unknown_type_is_accepted_and_ignored(synapse: SynapseServer) -> None:
    response = notify(synapse, body=shim_body("Observation", "o-1"))
    assert (response.status_code, response.json()) == (202, {"status": "ignored"})
    for response in (
        notify(synapse, "PUT", "/Observation/o-1", {"resourceType": "Observation"}),
        notify(synapse, "DELETE", "/Observation/o-1"),
    ):
        assert response.status_code == 202
        assert response.json()["resourceType"] == "OperationOutcome"
        assert "ignored" in response.json()["issue"][0]["diagnostics"]


def test_wrong_method_is_not_allowed(synapse: SynapseServer) -> None:
    assert notify(synapse, "GET").status_code == 405
    assert notify(synapse, "POST", "/CareTeam/team-1", shim_body()).status_code == 405
    assert notify(synapse, "PUT").status_code == 405


# --- a notification reaches the module -----------------------------------------------


@pytest.fixture
def network(hapi: HapiDevServer) -> CareNetwork:
    net = CareNetwork(uuid.uuid4().hex[:8])
    net.seed(FhirSeeder(hapi.base_url))
    return net


def invite_error(service: MatrixUser, room: str, user_id: str) -> MatrixError | None:
    try:
        service.invite(room, user_id)
    except MatrixError as e:
        return e
    return None


def add_leaver_to_team(hapi: HapiDevServer, network: CareNetwork) -> str:
    """Lena joins the CareTeam in FHIR; returns her Matrix id."""
    lena = network.participant(network.ref("Practitioner", "leaver"))
    FhirSeeder(hapi.base_url).put(network.care_team(*network.standard_participants(), lena))
    return network.user_id("lena")


def test_notification_refreshes_the_care_team_at_once(
    synapse: SynapseServer, admin: MatrixUser, hapi: HapiDevServer, network: CareNetwork
) -> None:
    """The team is remembered for 5 minutes (the default cache_ttl); a notification makes
    the next decision ask FHIR again."""
    service = service_session(admin)
    room = create_room_in_space(service, create_bound_space(service, network.team))
    assert invite_error(service, room, network.user_id("anna")) is None  # team now cached
    mark = log_size(synapse.log_path)
    lena = add_leaver_to_team(hapi, network)
    error = invite_error(service, room, lena)
    assert error is not None and error.reason == "not_in_care_team", "cached team not used"

    team_id = network.team.split("/")[1]
    assert notify(synapse, body=shim_body(resource_id=team_id)).status_code == 202
    wait_until(
        lambda: invite_error(service, room, lena) is None,
        timeout=10,
        what="the new participant admitted after the notification",
    )
    assert problems_logged_since(synapse.log_path, mark, SYNAPSE_ERROR) == []


@pytest.fixture
def rest_hook(hapi: HapiDevServer, synapse: SynapseServer, network: CareNetwork) -> Iterator[str]:
    """A HAPI rest-hook Subscription (payload, deletes) on this test's CareTeams, pointing
    at the webhook; it is deleted afterwards."""
    team_ids = f"{network.team.split('/')[1]},gone-{network.tag}"
    subscription = {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": "webhook test",
        "criteria": f"CareTeam?_id={team_ids}",
        "channel": {
            "type": "rest-hook",
            "endpoint": synapse.url(NOTIFY_PATH),
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {SECRET}"],
            "extension": [{"url": SEND_DELETES, "valueBoolean": True}],
        },
    }
    url = f"{hapi.base_url}/Subscription"
    created = requests.post(url, json=subscription, headers=FHIR_JSON, timeout=60)
    created.raise_for_status()
    subscription_url = f"{url}/{created.json()['id']}"
    try:
        wait_until(
            lambda: requests.get(subscription_url, timeout=30).json()["status"] == "active",
            timeout=60,
            what="HAPI activating the rest-hook Subscription",
            interval=0.5,
        )
        yield subscription_url
    finally:
        requests.delete(subscription_url, timeout=60)


def test_hapi_rest_hook_subscription_reaches_the_module(
    synapse: SynapseServer,
    admin: MatrixUser,
    hapi: HapiDevServer,
    network: CareNetwork,
    rest_hook: str,
) -> None:
    """What HAPI really sends (PUT <endpoint>/CareTeam/<id> with the resource and
    If-Match: W/"<version>"; DELETE <endpoint>/CareTeam/<id>) is accepted and acted on."""
    service = service_session(admin)
    room = create_room_in_space(service, create_bound_space(service, network.team))
    assert invite_error(service, room, network.user_id("anna")) is None  # team now cached

    hapi_mark = log_size(hapi.process.log_path)
    lena = add_leaver_to_team(hapi, network)
    team = network.team
    wait_until(
        lambda: logged(synapse, f"Notification: update {team}"),
        timeout=60,
        what="HAPI's rest-hook PUT for the changed CareTeam accepted by the module",
        interval=0.25,
    )
    wait_until(
        lambda: invite_error(service, room, lena) is None,
        timeout=10,
        what="the new participant admitted after HAPI's notification",
    )

    fhir = FhirSeeder(hapi.base_url)
    gone = f"CareTeam/gone-{network.tag}"
    fhir.put({"resourceType": "CareTeam", "id": f"gone-{network.tag}", "status": "active"})
    requests.delete(f"{hapi.base_url}/{gone}", timeout=60).raise_for_status()
    wait_until(
        lambda: logged(synapse, f"Notification: delete {gone}"),
        timeout=60,
        what="HAPI's rest-hook DELETE accepted by the module",
        interval=0.25,
    )
    # HAPI took every answer as a successful delivery (it parses them as FHIR): nothing
    # about this subscription at WARN or ERROR in its log since the change.
    subscription = rest_hook.rsplit("/", 1)[1]
    hapi_problems = rf"\s(WARN|ERROR)\s.*(?i:subscription)\W+{re.escape(subscription)}\b"
    assert problems_logged_since(hapi.process.log_path, hapi_mark, hapi_problems) == []
