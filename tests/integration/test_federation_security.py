"""Care-team access across federation that holds (issue 11), with two real homeservers:
A runs the module with its FHIR → Matrix sync (its own HAPI, whose shim notifies A, reached
through a proxy the test can make hang); B is a plain Synapse, another organisation's.

- A practitioner on B, at level 50 in A's care-team space, is refused by Synapse's own
  power-level rules when sending what binds the room or decides who is in it.
- An invite A cannot deliver (B is down) is retried until it succeeds, and counted.
- While FHIR cannot tell who is in the team, an entry B builds itself is refused
  (soft-failed and banned); once FHIR answers again the member is let back in.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import attr
import pytest
import requests

from devstack.federation import free_ports, loopback_server_name
from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.ports import free_port
from devstack.stalling_proxy import StallingProxy
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.matrix_views import invited_space

SECRET = "test-webhook-secret"
FEDERATION_TIMEOUT = 60.0
# A failed sync is tried again after 5 s, 10 s, 20 s, ...: generous.
RETRIED_WITHIN = 120.0
CACHE_TTL = "3s"
# Each reserved state type with content Synapse accepts as well-formed.
RESERVED_CONTENT: dict[str, dict[str, Any]] = {
    "org.synapse_fhir.care_team": {"reference": "CareTeam/elsewhere"},
    "org.synapse_fhir.thread": {"reference": "CommunicationRequest/elsewhere"},
    "m.space.child": {"via": ["elsewhere.example"]},
    "m.space.parent": {"via": ["elsewhere.example"]},
    "m.room.join_rules": {"join_rule": "public"},
    "m.room.history_visibility": {"history_visibility": "world_readable"},
    "m.room.encryption": {"algorithm": "m.megolm.v1.aes-sha2"},
    "m.room.tombstone": {"body": "moved", "replacement_room": "!elsewhere:elsewhere.example"},
    "m.room.server_acl": {"allow": ["*"], "deny": [], "allow_ip_literals": True},
    "m.room.power_levels": {"users_default": 100},
    "m.room.canonical_alias": {},
}
RESERVED = tuple(RESERVED_CONTENT)


@attr.s(auto_attribs=True)
class Federation:
    hapi: HapiDevServer
    proxy: StallingProxy  # between A and its FHIR server
    a: SynapseServer  # with the module and its sync
    b: SynapseServer  # plain Synapse


@pytest.fixture(scope="module")
def federation(run_dir: Path) -> Iterator[Federation]:
    port_a, port_b = free_ports(2)
    name_a, name_b = loopback_server_name(port_a), loopback_server_name(port_b)
    client_port_a = free_port()
    hapi = HapiDevServer(
        run_dir / "federated-hapi",
        notify_url=f"http://127.0.0.1:{client_port_a}/_synapse/client/fhir/notify",
        notify_secret=SECRET,
    )
    SERVER_LOGS.append(hapi.process.log_path)
    hapi.start()
    parts = urlsplit(hapi.base_url)
    proxy = StallingProxy(f"{parts.scheme}://{parts.netloc}")
    proxy.start()
    a = SynapseServer(
        run_dir / "federated-a",
        module_config(
            proxy.url("/fhir"),
            sync={"poll_interval": "1h", "full_reconcile_interval": "1h"},
            enforcement={"cache_ttl": CACHE_TTL},
        ),
        port=client_port_a,
        federation_port=port_a,
        federation_peers=[name_b],
        metrics=True,
    )
    b = SynapseServer(
        run_dir / "federated-b", None, federation_port=port_b, federation_peers=[name_a]
    )
    started: list[SynapseServer] = []
    try:
        for server in (a, b):
            SERVER_LOGS.extend([server.log_path, server.process.log_path])
            started.append(server)
            server.start()
        yield Federation(hapi, proxy, a, b)
    finally:
        for server in started:
            server.stop()
        proxy.stop()
        hapi.stop()


class Team:
    """A CareTeam: the patient on A, practitioners on B; people named per test."""

    def __init__(self, federation: Federation, *on_b: str) -> None:
        self.federation = federation
        self.tag = uuid.uuid4().hex[:8]
        self.patient = register_user(federation.a, f"henk_{self.tag}")
        self.users = {name: register_user(federation.b, f"{name}_{self.tag}") for name in on_b}
        self.ref = f"CareTeam/team-{self.tag}"
        self.fhir = FhirSeeder(federation.hapi.base_url)
        self.members = ["Patient/henk"]

    def person(self, resource_type: str, name: str, user: MatrixUser) -> dict[str, Any]:
        return {
            "resourceType": resource_type,
            "id": f"{name}-{self.tag}",
            "telecom": [{"system": "url", "value": f"matrix:u/{user.user_id.removeprefix('@')}"}],
        }

    def put(self, *members: str) -> None:
        """The team (re)written with these members of ``users`` besides the patient."""
        self.fhir.put_all(
            [
                self.person("Patient", "henk", self.patient),
                *(self.person("Practitioner", n, self.users[n]) for n in self.users),
                {
                    "resourceType": "CareTeam",
                    "id": self.ref.split("/")[1],
                    "status": "active",
                    "participant": [
                        {"member": {"reference": f"{ref}-{self.tag}"}}
                        for ref in ["Patient/henk", *(f"Practitioner/{n}" for n in members)]
                    ],
                },
            ]
        )

    def joined_space(self, user: MatrixUser) -> str:
        space = wait_until(
            lambda: invited_space(user, self.ref),
            timeout=FEDERATION_TIMEOUT,
            what=f"{user.user_id} invited to the team's space",
        )
        user.join(space)
        # B joins with partial state; listing the members waits for the full state.
        user.request("GET", f"/_matrix/client/v3/rooms/{quote(space)}/members")
        return space


def membership_on(viewer: MatrixUser, room_id: str, user_id: str) -> str | None:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.member/{quote(user_id)}"
    try:
        return str(viewer.request("GET", path)["membership"])
    except MatrixError as e:
        if e.status in (403, 404):
            return None
        raise


def health(server: SynapseServer) -> dict[str, Any]:
    return requests.get(server.url("/_synapse/client/fhir/health"), timeout=10).json()


def failed_actions(server: SynapseServer, action: str) -> float:
    assert server.metrics_url is not None
    text = requests.get(server.metrics_url, timeout=10).text
    for line in text.splitlines():
        if line.startswith(f'synapse_fhir_matrix_actions_failed_total{{action="{action}"}}'):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def refused(action: Callable[[], object]) -> MatrixError:
    with pytest.raises(MatrixError) as caught:
        action()
    return caught.value


def test_a_remote_practitioner_is_refused_by_synapses_own_power_level_rules(
    federation: Federation,
) -> None:
    team = Team(federation, "gp")
    team.put("gp")
    gp = team.users["gp"]
    space = team.joined_space(gp)
    henk = team.patient
    henk.join(
        wait_until(
            lambda: invited_space(henk, team.ref), timeout=FEDERATION_TIMEOUT, what="henk invited"
        )
    )

    for event_type in RESERVED:
        error = refused(
            lambda t=event_type: gp.send_state(space, t, RESERVED_CONTENT[t], state_key="")
        )
        # B (no module) refuses by the power levels A set: Synapse's own auth rules.
        assert (error.status, error.errcode) == (403, "M_FORBIDDEN"), (event_type, error)
        assert "user_level (50) < send_level (100)" in error.body["error"], error
    stranger = register_user(federation.b, f"stranger_{team.tag}")
    for action, target in (
        ("kick", henk.user_id),
        ("ban", henk.user_id),
        ("invite", stranger.user_id),
    ):
        error = refused(
            lambda p=action, t=target: gp.request(
                "POST", f"/_matrix/client/v3/rooms/{quote(space)}/{p}", {"user_id": t}
            )
        )
        assert (error.status, error.errcode) == (403, "M_FORBIDDEN"), (action, error)
    # A still holds the service user's binding, and henk is still in.
    binding = henk.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(space)}/state/org.synapse_fhir.care_team/"
    )
    assert binding == {"reference": team.ref}
    assert membership_on(henk, space, henk.user_id) == "join"


def test_an_invite_that_cannot_be_delivered_is_retried_until_it_is(
    federation: Federation,
) -> None:
    team = Team(federation, "gp", "nina")
    team.put("gp")
    team.joined_space(team.users["gp"])
    failed_before = failed_actions(federation.a, "invite")

    federation.b.stop()
    try:
        team.put("gp", "nina")  # the shim tells A; A's invite cannot reach B
        wait_until(
            lambda: health(federation.a)["sync"]["retrying"] >= 1,
            timeout=FEDERATION_TIMEOUT,
            what="the failed invite counted on /health",
        )
        assert health(federation.a)["status"] == "degraded"
        assert failed_actions(federation.a, "invite") > failed_before
    finally:
        federation.b.start()
    nina = team.users["nina"]
    wait_until(
        lambda: invited_space(nina, team.ref),
        timeout=RETRIED_WITHIN,
        what="the invite delivered once B is back",
    )
    wait_until(
        lambda: health(federation.a)["sync"]["retrying"] == 0,
        timeout=RETRIED_WITHIN,
        what="nothing left to retry",
    )


def test_an_entry_while_fhir_cannot_tell_is_refused_then_let_in_when_it_can(
    federation: Federation,
) -> None:
    team = Team(federation, "gp", "olaf")
    team.put("gp", "olaf")
    gp, olaf = team.users["gp"], team.users["olaf"]
    space = team.joined_space(gp)
    henk = team.patient
    henk.join(
        wait_until(
            lambda: invited_space(henk, team.ref), timeout=FEDERATION_TIMEOUT, what="henk invited"
        )
    )
    wait_until(
        lambda: invited_space(olaf, team.ref), timeout=FEDERATION_TIMEOUT, what="olaf invited"
    )

    federation.proxy.stall(600)  # FHIR hangs: A cannot tell who is in the team
    try:

        def directory_unavailable() -> bool:
            try:
                henk.send_text(space, "is the care record there?")
            except MatrixError as e:
                return e.reason == "directory_unavailable"
            return False

        wait_until(
            directory_unavailable, timeout=FEDERATION_TIMEOUT, what="A's directory unavailable"
        )
        # B is in the room, so B builds olaf's join itself: only A's check of what it
        # receives can refuse it. (B accepts it, A soft-fails it and bans him.)
        olaf.join(space)
        # Refused on A and banned; B (seen through the GP) applies the ban. (The sync
        # that would lift it cannot run while FHIR hangs.)
        wait_until(
            lambda: (
                membership_on(henk, space, olaf.user_id) == "ban"
                and membership_on(gp, space, olaf.user_id) == "ban"
            ),
            timeout=FEDERATION_TIMEOUT,
            what="olaf's join refused and banned, on A and on B, while FHIR was away",
        )
    finally:
        federation.proxy.stall(0)
    # FHIR answers again: olaf is a member, so the sync lifts the ban and invites him.
    wait_until(
        lambda: membership_on(gp, space, olaf.user_id) == "invite",
        timeout=RETRIED_WITHIN,
        what="olaf invited again once FHIR answers (as B sees it)",
    )
    olaf.join(space)
    wait_until(
        lambda: membership_on(henk, space, olaf.user_id) == "join",
        timeout=FEDERATION_TIMEOUT,
        what="olaf in the space on A",
    )
