"""Care-team enforcement with a real Synapse and the real HAPI dev server: only current
members of a room's CareTeam get in, as FHIR says, on every path."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import quote

import pytest
import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.care_network import CareNetwork
from tests.integration.matrix_views import expired_error, membership

CACHE_TTL = 2.0  # seconds: FHIR changes show within a few seconds without a push


@pytest.fixture(scope="module")
def enforcing(hapi: HapiDevServer, run_dir: Path) -> Iterator[SynapseServer]:
    config = module_config(hapi.base_url, enforcement={"cache_ttl": f"{CACHE_TTL}s"})
    server = SynapseServer(run_dir / "synapse-enforcing", config)
    SERVER_LOGS.extend([server.log_path, server.process.log_path])
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def network(hapi: HapiDevServer) -> CareNetwork:
    net = CareNetwork(uuid.uuid4().hex[:8])
    net.seed(FhirSeeder(hapi.base_url))
    return net


@pytest.fixture(scope="module")
def users(enforcing: SynapseServer, network: CareNetwork) -> Callable[..., MatrixUser]:
    registered: dict[str, MatrixUser] = {}

    def user(name: str, *, admin: bool = False) -> MatrixUser:
        if name not in registered:
            registered[name] = register_user(enforcing, network.localpart(name), admin=admin)
        return registered[name]

    return user


@pytest.fixture(scope="module")
def service(enforcing: SynapseServer, users: Callable[..., MatrixUser]) -> MatrixUser:
    return service_session(users("root", admin=True))


@pytest.fixture(scope="module")
def space(service: MatrixUser, network: CareNetwork) -> str:
    return create_bound_space(service, network.team)


def refused(action: Callable[[], object]) -> MatrixError:
    with pytest.raises(MatrixError) as caught:
        action()
    return caught.value


def assert_denied(error: MatrixError, reason: str) -> None:
    assert error.status == 403, error
    assert error.errcode == "M_FORBIDDEN", error
    assert error.reason == reason, error


def test_members_are_invited_and_join(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser], network: CareNetwork
) -> None:
    room = create_room_in_space(service, space)
    anna, bram, carla, henk = (users(n) for n in ("anna", "bram", "carla", "henk"))
    service.invite(room, anna.user_id)
    anna.join(room)
    # A practitioner reached through a PractitionerRole, a related person, the patient.
    for member in (bram, carla, henk):
        anna.invite(room, member.user_id)
        member.join(room)
    members = service.request("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]
    assert {anna.user_id, bram.user_id, carla.user_id, henk.user_id} <= set(members)


def test_non_member_cannot_be_invited(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space)
    anna = users("anna")
    service.invite(room, anna.user_id)
    anna.join(room)
    for outsider in ("mallory", "eve"):  # a practitioner elsewhere; nobody in FHIR
        error = refused(lambda o=outsider: anna.invite(room, users(o).user_id))
        assert_denied(error, "not_in_care_team")
        assert "care team" in error.body["error"]


def test_non_member_cannot_join_a_public_bound_room(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space, public=True)
    assert_denied(refused(lambda: users("mallory").join(room)), "not_in_care_team")
    # The same public room lets a member straight in.
    users("carla").join(room)


def test_server_admin_inviting_a_non_member_is_still_refused(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    """Spam checkers skip server admins; check_event_allowed does not."""
    room = create_room_in_space(service, space)
    # The GP happens to be a server admin of this homeserver.
    anna_admin = users("anna")
    users("root").request("PUT", f"/_synapse/admin/v2/users/{anna_admin.user_id}", {"admin": True})
    service.invite(room, anna_admin.user_id)
    anna_admin.join(room)
    assert_denied(
        refused(lambda: anna_admin.invite(room, users("mallory").user_id)), "not_in_care_team"
    )


def test_expired_and_future_participation_and_inactive_person_are_refused(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space)
    assert_denied(refused(lambda: service.invite(room, users("ivo").user_id)), "account_inactive")
    for name in ("olga", "fred"):
        assert_denied(
            refused(lambda n=name: service.invite(room, users(n).user_id)), "not_in_care_team"
        )


def test_nested_team_member_is_admitted_despite_a_cycle(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space)
    piet = users("piet")  # in the pharmacy team, which lists the home team back
    service.invite(room, piet.user_id)
    piet.join(room)
    assert membership(service, room, piet.user_id) == "join"


def test_inactive_person_is_expired_until_reactivated(
    hapi: HapiDevServer,
    service: MatrixUser,
    space: str,
    users: Callable[..., MatrixUser],
    network: CareNetwork,
) -> None:
    ivo = users("ivo")  # active: false in FHIR
    expired = wait_until(
        lambda: expired_error(ivo),
        timeout=15,
        what="the inactive practitioner's account reported expired",
    )
    assert expired.status == 403
    room = create_room_in_space(service, space)
    assert_denied(refused(lambda: service.invite(room, ivo.user_id)), "account_inactive")

    FhirSeeder(hapi.base_url).patch_active(network.ref("Practitioner", "inactive"), True)
    wait_until(lambda: ivo.whoami(), timeout=15, what="the reactivated account usable again")
    wait_until(
        lambda: service.invite(room, ivo.user_id) is None,
        timeout=15,
        what="the reactivated practitioner admitted",
    )
    ivo.join(room)


def test_person_who_leaves_the_team_can_no_longer_act_or_invite(
    hapi: HapiDevServer,
    service: MatrixUser,
    space: str,
    users: Callable[..., MatrixUser],
    network: CareNetwork,
) -> None:
    fhir = FhirSeeder(hapi.base_url)
    lena_ref = network.ref("Practitioner", "leaver")
    participants = network.standard_participants()
    fhir.put(network.care_team(*participants, network.participant(lena_ref)))
    room = create_room_in_space(service, space)
    lena, anna = users("lena"), users("anna")
    wait_until(
        lambda: service.invite(room, lena.user_id) is None,
        timeout=15,
        what="the new participant admitted",
    )
    lena.join(room)
    service.invite(room, anna.user_id)
    anna.join(room)
    hello = lena.send_text(room, "Hello team")
    # A practitioner's power (this test-made room has the private_chat preset's levels):
    # whatever is refused below is the module's doing, not Synapse's power levels.
    levels = service.request("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.power_levels")
    levels.setdefault("users", {})[lena.user_id] = 50
    service.send_state(room, "m.room.power_levels", levels)

    # Her participation ends today-minus-one: she is still joined, but no longer a member.
    fhir.put(network.care_team(*participants, network.participant(lena_ref, {"end": "2021-01-01"})))
    error = wait_until(
        lambda: _send_error(lena, room),
        timeout=15,
        what="the former participant refused when sending",
    )
    assert_denied(error, "not_in_care_team")
    assert_denied(
        refused(lambda: lena.invite(room, users("carla").user_id)), "inviter_not_in_care_team"
    )
    # Nothing but leaving: no reaction, no redaction (not even of her own message), no
    # state, no kick or ban.
    attempts = {
        "reaction": lambda: lena.send(
            room,
            {"m.relates_to": {"rel_type": "m.annotation", "event_id": hello, "key": "+1"}},
            "m.reaction",
        ),
        "redaction": lambda: lena.redact(room, hello),
        "topic": lambda: lena.send_state(room, "m.room.topic", {"topic": "mine now"}),
        "join rules": lambda: lena.send_state(room, "m.room.join_rules", {"join_rule": "public"}),
        "power levels": lambda: lena.send_state(room, "m.room.power_levels", levels),
        "kick": lambda: lena.request(
            "POST", f"/_matrix/client/v3/rooms/{room}/kick", {"user_id": anna.user_id}
        ),
        "ban": lambda: lena.request(
            "POST", f"/_matrix/client/v3/rooms/{room}/ban", {"user_id": anna.user_id}
        ),
        "profile change": lambda: lena.send_state(
            room,
            "m.room.member",
            {"membership": "join", "displayname": "Someone else"},
            state_key=lena.user_id,
        ),
    }
    for what, attempt in attempts.items():
        error = refused(attempt)
        assert (error.status, error.reason) == (403, "not_in_care_team"), (what, error)
    members = service.request("GET", f"/_matrix/client/v3/rooms/{room}/joined_members")["joined"]
    assert anna.user_id in members  # the kick and the ban did not happen
    lena.leave(room)  # leaving is always allowed


def test_room_upgrades_and_email_invites_are_refused_in_care_team_rooms(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space)
    anna = users("anna")
    service.invite(room, anna.user_id)
    anna.join(room)
    # Even with every power a member could be given below the service user's.
    levels = service.request("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.power_levels")
    levels.setdefault("users", {})[anna.user_id] = 99
    service.send_state(room, "m.room.power_levels", levels)

    tombstone = refused(
        lambda: anna.send_state(
            room,
            "m.room.tombstone",
            {"body": "moved", "replacement_room": "!elsewhere:example.org"},
        )
    )
    assert_denied(tombstone, "protected_state")
    upgrade = refused(
        lambda: anna.request(
            "POST", f"/_matrix/client/v3/rooms/{room}/upgrade", {"new_version": "10"}
        )
    )
    assert (upgrade.status, upgrade.errcode) == (403, "M_FORBIDDEN"), upgrade
    state = service.request("GET", f"/_matrix/client/v3/rooms/{room}/state")
    assert not [e for e in state if e["type"] == "m.room.tombstone"], "the room was tombstoned"

    email_invite = refused(
        lambda: anna.send_state(
            room,
            "m.room.third_party_invite",
            {
                "display_name": "someone@example.org",
                "key_validity_url": "https://id.example.org/_matrix/identity/v2/pubkey/isvalid",
                "public_key": "dGhpcyBpcyBub3QgYSBrZXk",
            },
            state_key="token-1",
        )
    )
    assert_denied(email_invite, "third_party_invite_forbidden")


def test_regular_users_cannot_touch_protected_state(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser], network: CareNetwork
) -> None:
    eve = users("eve")
    # Not even in a room of her own, where she has every power.
    own_room = eve.create_room(name="Mine")
    for event_type in ("org.synapse_fhir.care_team", "org.synapse_fhir.thread"):
        error = refused(
            lambda t=event_type: eve.send_state(own_room, t, {"reference": network.team})
        )
        assert_denied(error, "protected_state")
    # Nor pre-bind a room when creating it.
    error = refused(
        lambda: eve.create_room(
            initial_state=[
                {
                    "type": "org.synapse_fhir.thread",
                    "state_key": "",
                    "content": {"reference": "CommunicationRequest/x"},
                }
            ]
        )
    )
    assert_denied(error, "protected_state")
    # A room's own m.space.parent claim does not attach it to the patient's record.
    eve.send_state(own_room, "m.space.parent", {"via": ["example.org"]}, state_key=space)
    eve.invite(own_room, users("mallory").user_id)


def test_members_with_power_cannot_unbind_a_room(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    """Practitioners get power level 50 (enough for state and redactions by default),
    yet the links that bind a room to the care record stay the service user's."""
    room = create_room_in_space(service, space)
    anna = users("anna")
    service.invite(room, anna.user_id)
    anna.join(room)
    levels = service.request("GET", f"/_matrix/client/v3/rooms/{room}/state/m.room.power_levels")
    levels.setdefault("users", {})[anna.user_id] = 50
    service.send_state(room, "m.room.power_levels", levels)

    anna.send_state(room, "m.room.topic", {"topic": "Wound care"})  # power she does have
    for attempt in (
        lambda: anna.send_state(room, "m.space.parent", {}, state_key=space),
        lambda: anna.redact(room, service.state_event_id(room, "m.space.parent", space)),
    ):
        assert_denied(refused(attempt), "protected_state")
    # Still a care-team room: an outsider stays out.
    assert_denied(refused(lambda: anna.invite(room, users("mallory").user_id)), "not_in_care_team")


def test_room_bound_by_its_thread_belongs_to_the_request_s_care_team(
    hapi: HapiDevServer, service: MatrixUser, users: Callable[..., MatrixUser], network: CareNetwork
) -> None:
    """No space needed: the CommunicationRequest's recipient names the team."""
    thread_id = f"thread-{network.tag}"
    FhirSeeder(hapi.base_url).put(
        {
            "resourceType": "CommunicationRequest",
            "id": thread_id,
            "status": "active",
            "subject": {"reference": network.ref("Patient", "patient")},
            "recipient": [{"reference": network.team}],
        }
    )
    room = service.create_room(
        initial_state=[
            {
                "type": "org.synapse_fhir.thread",
                "state_key": "",
                "content": {"reference": f"CommunicationRequest/{thread_id}"},
            }
        ]
    )
    assert_denied(
        refused(lambda: service.invite(room, users("mallory").user_id)), "not_in_care_team"
    )
    carla = users("carla")
    service.invite(room, carla.user_id)
    carla.join(room)


def test_a_server_admin_cannot_force_an_outsider_into_a_care_team_room(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    """Synapse's admin API joins a user on their behalf; the join is still an event the
    care-team rules decide on."""
    room = create_room_in_space(service, space, public=True)
    mallory = users("mallory")
    error = refused(
        lambda: users("root", admin=True).request(
            "POST", f"/_synapse/admin/v1/join/{quote(room)}", {"user_id": mallory.user_id}
        )
    )
    assert_denied(error, "not_in_care_team")
    assert membership(service, room, mallory.user_id) is None


def test_knocking_is_an_entry_and_only_members_may_knock(
    service: MatrixUser, space: str, users: Callable[..., MatrixUser]
) -> None:
    room = create_room_in_space(service, space)
    service.send_state(room, "m.room.join_rules", {"join_rule": "knock"})
    mallory = users("mallory")
    error = refused(lambda: mallory.request("POST", f"/_matrix/client/v3/knock/{quote(room)}", {}))
    assert_denied(error, "not_in_care_team")
    assert membership(service, room, mallory.user_id) is None
    carla = users("carla")  # a member: her knock stands, for the service user to answer
    carla.request("POST", f"/_matrix/client/v3/knock/{quote(room)}", {})
    assert membership(service, room, carla.user_id) == "knock"


def test_a_team_that_is_not_active_admits_nobody_and_says_so(
    hapi: HapiDevServer, service: MatrixUser, users: Callable[..., MatrixUser], network: CareNetwork
) -> None:
    """A suspended team's rooms take no one new, even its own members: care_team_inactive."""
    suspended = network.care_team(*network.standard_participants(), status="suspended")
    suspended["id"] = f"suspended-{network.tag}"
    FhirSeeder(hapi.base_url).put(suspended)
    room = create_room_in_space(
        service, create_bound_space(service, f"CareTeam/suspended-{network.tag}")
    )
    anna = users("anna")  # a participant of that team
    assert_denied(refused(lambda: service.invite(room, anna.user_id)), "care_team_inactive")
    assert membership(service, room, anna.user_id) is None


def _send_error(user: MatrixUser, room: str) -> MatrixError | None:
    try:
        user.send_text(room, "still here?")
    except MatrixError as e:
        return e
    return None


def test_after_all_those_refusals_health_reports_fhir_reachable_and_nothing_retrying(
    enforcing: SynapseServer,
) -> None:
    """Refusals are decisions, not failures: none of the above left the module degraded."""
    health = requests.get(enforcing.url("/_synapse/client/fhir/health"), timeout=10).json()
    assert health["status"] == "ok", health
    assert health["fhir"] == {"reachable": True}
    assert health["sync"]["retrying"] == 0
