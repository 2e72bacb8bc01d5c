"""Care-team enforcement across federation: two real homeservers on 127.0.0.1.

Server A runs the module and holds the care-team rooms; server B is a plain Synapse
(no module), as another organisation's homeserver would be: whatever B runs, A must
decide who enters A's care-team rooms. Users of B try to join A's *public* bound room
over federation, so Synapse's own rules would let anyone in and only the module can
say no.

Where the module gets to decide (Synapse 1.163): a remote user's first join goes
through A's ``/make_join``, where A builds the join event with
``create_new_client_event`` — which runs ``check_event_allowed``. Spam-checker
callbacks (``user_may_join_room``) only see local users, so a refusal carrying
``org.synapse_fhir.reason`` on a federated join can only come from
``check_event_allowed``. B relays A's error to its client (``ProxiedRequestError``
keeps the extra fields).

Once B is in the room (a team member of B joined), B makes its other users' joins itself
and sends them to A as PDUs in a ``/send`` transaction: Synapse 1.163 calls
``check_event_allowed`` on no received PDU (on ``/send_join`` only for knocks). It does
run ``check_event_for_spam`` on every received PDU; the module refuses the entry there
(A soft-fails it: it never becomes A's room state) and A's service user removes the
person, so B sees them leave as well (the last test).
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attr
import pytest

from devstack.federation import free_ports, loopback_server_name
from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.care_network import MATRIX_ID_SYSTEM, TwoServerNames
from tests.integration.test_communication_recording import communication_of

FEDERATION_TIMEOUT = 30.0
REFUSAL_TEXT = "This room belongs to a care team"


@attr.s(auto_attribs=True, frozen=True)
class Federation:
    a: SynapseServer  # with the module, holds the care-team rooms
    b: SynapseServer  # plain Synapse, another organisation's homeserver


@attr.s(auto_attribs=True, frozen=True)
class RemoteCareNetwork(TwoServerNames):
    """A care team in FHIR whose patient is on A and whose GP's account is on B."""

    def resources(self) -> list[dict[str, Any]]:
        def person(resource_type: str, name: str, identity: dict[str, Any]) -> dict[str, Any]:
            return {"resourceType": resource_type, "id": f"{name}-{self.tag}", **identity}

        def member(ref: str) -> dict[str, Any]:
            return {"member": {"reference": ref, "type": ref.split("/")[0]}}

        patient = self.on_a("henk")
        return [
            person(
                "Patient",
                "patient",
                {"identifier": [{"system": MATRIX_ID_SYSTEM, "value": patient}]},
            ),
            # The GP's Matrix account lives on B (a MSC2312 URI with a server name and port).
            person("Practitioner", "gp", telecom(self.on_b("gp"))),
            # A practitioner in the same FHIR server, on B too, but not in this team.
            person("Practitioner", "outsider", telecom(self.on_b("mallory"))),
            {
                "resourceType": "CareTeam",
                "id": f"team-{self.tag}",
                "status": "active",
                "name": "Home care team",
                "subject": {"reference": self.ref("Patient", "patient"), "type": "Patient"},
                "participant": [
                    member(self.ref("Patient", "patient")),
                    member(self.ref("Practitioner", "gp")),
                ],
            },
        ]


def telecom(user_id: str) -> dict[str, Any]:
    return {"telecom": [{"system": "url", "value": f"matrix:u/{user_id.removeprefix('@')}"}]}


@pytest.fixture(scope="module")
def federation(hapi: HapiDevServer, run_dir: Path) -> Iterator[Federation]:
    port_a, port_b = free_ports(2)
    name_a, name_b = loopback_server_name(port_a), loopback_server_name(port_b)
    a = SynapseServer(
        run_dir / "synapse-federation-a",
        module_config(hapi.base_url),
        federation_port=port_a,
        federation_peers=[name_b],
    )
    b = SynapseServer(
        run_dir / "synapse-federation-b",
        None,
        federation_port=port_b,
        federation_peers=[name_a],
    )
    started: list[SynapseServer] = []
    try:
        for server in (a, b):
            SERVER_LOGS.extend([server.log_path, server.process.log_path])
            started.append(server)
            server.start()
        yield Federation(a, b)
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def network(hapi: HapiDevServer, federation: Federation) -> RemoteCareNetwork:
    net = RemoteCareNetwork(
        uuid.uuid4().hex[:8], federation.a.server_name, federation.b.server_name
    )
    FhirSeeder(hapi.base_url).put_all(net.resources())
    return net


@pytest.fixture(scope="module")
def users(federation: Federation, network: RemoteCareNetwork) -> Callable[[str], MatrixUser]:
    """Users of B, registered once each."""
    registered: dict[str, MatrixUser] = {}

    def user(name: str) -> MatrixUser:
        if name not in registered:
            registered[name] = register_user(federation.b, network.localpart(name))
        return registered[name]

    return user


@pytest.fixture(scope="module")
def service(federation: Federation, network: RemoteCareNetwork) -> MatrixUser:
    """A's service user (@fhir:<A>), the only one who may bind rooms to the care record."""
    return service_session(register_user(federation.a, network.localpart("root"), admin=True))


@pytest.fixture(scope="module")
def space(service: MatrixUser, network: RemoteCareNetwork) -> str:
    return create_bound_space(service, network.team)


def public_room(service: MatrixUser, space_id: str | None = None) -> str:
    """A public room on A; in the bound space when ``space_id`` is given."""
    if space_id is not None:
        return create_room_in_space(service, space_id, public=True)
    return service.create_room(name="Ordinary", preset="public_chat")


def join_over_federation(user: MatrixUser, room_id: str, via: str) -> None:
    query = urlencode({"via": via, "server_name": via})
    user.request("POST", f"/_matrix/client/v3/join/{quote(room_id)}?{query}", {})


def membership_on(viewer: MatrixUser, room_id: str, user_id: str) -> str | None:
    """``user_id``'s membership in ``room_id`` as ``viewer``'s server holds it."""
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.member/{quote(user_id)}"
    try:
        return str(viewer.request("GET", path)["membership"])
    except MatrixError as e:
        if e.status == 404:
            return None
        raise


def wait_for_event(viewer: MatrixUser, room_id: str, event_id: str, what: str) -> None:
    wait_until(
        lambda: viewer.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/event/{quote(event_id)}"
        ),
        timeout=FEDERATION_TIMEOUT,
        what=what,
    )


def refused(action: Callable[[], object]) -> MatrixError:
    with pytest.raises(MatrixError) as caught:
        action()
    return caught.value


def test_remote_outsiders_are_refused_by_check_event_allowed(
    federation: Federation,
    service: MatrixUser,
    space: str,
    users: Callable[[str], MatrixUser],
) -> None:
    a = federation.a
    room = public_room(service, space)
    # A practitioner known to FHIR but not in the team, and someone FHIR has never heard of.
    for name in ("mallory", "eve"):
        outsider = users(name)
        error = refused(partial(join_over_federation, outsider, room, a.server_name))
        # A's refusal, relayed by B to its client as is.
        assert error.status == 403, error
        assert error.errcode == "M_FORBIDDEN", error
        assert error.reason == "not_in_care_team", error
        assert REFUSAL_TEXT in error.body["error"], error
        # A never let them in.
        assert membership_on(service, room, outsider.user_id) is None
    # A refused while building the join in /make_join (create_new_client_event, where
    # check_event_allowed runs), not for a federation or signature problem.
    log = a.log_path.read_text(errors="replace")
    refusals = [
        line
        for line in log.splitlines()
        if f"Failed to create join to {room} because 403: {REFUSAL_TEXT}" in line
    ]
    assert len(refusals) == 2, "\n".join(refusals)


def test_control_remote_outsider_joins_an_ordinary_public_room_on_the_same_server(
    federation: Federation, service: MatrixUser, users: Callable[[str], MatrixUser]
) -> None:
    """The same join into a room bound to no care team works: federation is fine, and
    the refusal above is the module's doing."""
    room = public_room(service)
    mallory = users("mallory")
    join_over_federation(mallory, room, federation.a.server_name)
    assert membership_on(service, room, mallory.user_id) == "join"
    assert membership_on(mallory, room, mallory.user_id) == "join"


def test_remote_care_team_member_is_admitted(
    federation: Federation,
    service: MatrixUser,
    space: str,
    users: Callable[[str], MatrixUser],
) -> None:
    room = public_room(service, space)
    gp = users("gp")  # a Practitioner in the CareTeam naming @gp_<tag>:<B>
    join_over_federation(gp, room, federation.a.server_name)
    assert membership_on(service, room, gp.user_id) == "join"
    # And A delivers the room's traffic to B.
    wait_for_event(gp, room, service.send_text(room, "welcome"), "A's message in the room on B")


def test_remote_outsider_cannot_join_once_their_server_is_in_the_room(
    federation: Federation,
    service: MatrixUser,
    space: str,
    users: Callable[[str], MatrixUser],
) -> None:
    room = public_room(service, space)
    gp, mallory = users("gp"), users("mallory")
    join_over_federation(gp, room, federation.a.server_name)  # admitted: a team member
    # B joined with partial state (faster joins) and would still ask A's /make_join for
    # a second user. Listing every member waits until B holds the room's full state.
    gp.request("GET", f"/_matrix/client/v3/rooms/{quote(room)}/members")
    # So B does mallory's join itself, without asking A: it succeeds on B.
    join_over_federation(mallory, room, federation.a.server_name)
    # B let her in (A's ban may already have followed: it comes within moments).
    assert membership_on(gp, room, mallory.user_id) in ("join", "ban")
    # Something B sends after her join: once A has it, A has processed her join too.
    after = gp.send_text(room, "after mallory's join")
    wait_for_event(service, room, after, "B's event after the join received by A")
    # A soft-failed her join and its service user banned her; B (seen through the GP,
    # who is on B and still in the room) applied the ban.
    wait_until(
        lambda: (
            membership_on(service, room, mallory.user_id) == "ban"
            and membership_on(gp, room, mallory.user_id) == "ban"
        ),
        timeout=FEDERATION_TIMEOUT,
        what="the outsider banned from the care-team room, on A and on B",
    )
    # Her own server no longer shows her the room; the team member from B is still in.
    assert_denied_by_synapse(lambda: membership_on(mallory, room, mallory.user_id))
    assert membership_on(service, room, gp.user_id) == "join"


def assert_denied_by_synapse(action: Callable[[], object]) -> None:
    error = refused(action)
    assert error.status == 403 and "not in room" in error.body.get("error", ""), error


def test_a_refused_message_from_a_remote_former_member_is_not_recorded(
    hapi: HapiDevServer,
    federation: Federation,
    service: MatrixUser,
    space: str,
    network: RemoteCareNetwork,
    users: Callable[[str], MatrixUser],
) -> None:
    """Synapse soft-fails what check_event_for_spam refuses — and still hands it to
    on_new_event. A refused message is not part of the conversation: not in the record."""
    room = public_room(service, space)
    gp = users("gp")
    join_over_federation(gp, room, federation.a.server_name)
    henk = register_user(federation.a, network.localpart("henk"))  # the patient, on A
    henk.join(room)
    before = gp.send_text(room, "recorded while a member")
    wait_until(lambda: communication_of(hapi, before), timeout=FEDERATION_TIMEOUT, what="recorded")

    seeder = FhirSeeder(hapi.base_url)
    team = seeder.read(network.team)
    member = next(p for p in team["participant"] if "gp-" in p["member"]["reference"])
    member["period"] = {"end": "2021-01-01"}
    seeder.put(team)
    try:
        federation.a.notify(network.team)  # what the shim would say: A forgets the team
        # B still has the GP in the room (A's module does not sync here): B accepts the
        # message, A refuses what it receives and soft-fails it.
        after = gp.send_text(room, "sent after leaving the team")
        later = henk.send_text(room, "a member's message after it")
        wait_until(
            lambda: communication_of(hapi, later), timeout=FEDERATION_TIMEOUT, what="recorded"
        )
        assert communication_of(hapi, after) is None
        with pytest.raises(MatrixError) as caught:  # and A shows it to nobody
            henk.request("GET", f"/_matrix/client/v3/rooms/{quote(room)}/event/{quote(after)}")
        assert caught.value.status == 404
    finally:
        del member["period"]
        seeder.put(team)
        federation.a.notify(network.team)
