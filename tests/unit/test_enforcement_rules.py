"""CareTeamGate's rules on the paths a two-server test can't easily reach: remote invites,
profile changes in suspended teams, an unreachable directory on the federation path, and
changes to what binds a room. (Stand-ins for room state and the directory; the same rules
run against real Synapse and HAPI in tests/integration.)"""

from __future__ import annotations

import copy
from typing import Any

import pytest
import pytest_twisted
from synapse.module_api import NOT_SPAM
from synapse.module_api.errors import Codes

from synapse_fhir_module.enforcement.denials import Denied, Reason
from synapse_fhir_module.enforcement.gate import CareTeamGate
from synapse_fhir_module.fhir.care_team import Member, TeamMembership
from synapse_fhir_module.fhir.team_directory import DirectoryUnavailable

SERVICE = "@fhir:a.org"
ROOM = "!room:a.org"
MEMBER_REMOTE = "@gp:b.org"
OUTSIDER_REMOTE = "@mallory:b.org"
MEMBER_LOCAL = "@anna:a.org"
OUTSIDER_LOCAL = "@olga:a.org"


class Event:
    """Just the EventBase attributes the gate reads."""

    def __init__(
        self,
        event_type: str,
        sender: str,
        content: dict,
        state_key: str | None = None,
        redacts: str | None = None,
    ) -> None:
        self.type = event_type
        self.sender = sender
        self.content = content
        self.state_key = state_key
        self.redacts = redacts
        self.room_id = ROOM
        self.event_id = "$e"

    def sent_by(self, sender: str, *, state_key: str | None = None) -> Event:
        """The same event from ``sender`` (and about ``state_key`` if given): a copy, so
        a parametrized event stays as written for the next test."""
        other = copy.copy(self)
        other.sender = sender
        if state_key is not None:
            other.state_key = state_key
        return other

    def is_state(self) -> bool:
        return self.state_key is not None


class Bindings:
    def __init__(self, team: str | None = "CareTeam/t", memberships: dict | None = None) -> None:
        self.team = team
        self.memberships = memberships or {}

    async def care_team_of(self, room_id: str) -> str | None:
        return self.team

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        return (self.team,) if self.team else ()

    async def membership_of(self, room_id: str, user_id: str) -> str | None:
        return self.memberships.get(user_id)

    async def binding_event_ids(self, room_id: str) -> set[str]:
        return {"$binding"}


class Teams:
    def __init__(
        self,
        status: str = "active",
        unavailable: bool = False,
        inactive: frozenset[str] = frozenset(),
    ) -> None:
        self.status = status
        self.unavailable = unavailable
        self.inactive = inactive

    async def membership(self, team_ref: str) -> TeamMembership:
        if self.unavailable:
            raise DirectoryUnavailable("down")
        members = {
            u: Member(u, f"Practitioner/{u}", "Practitioner") for u in (MEMBER_REMOTE, MEMBER_LOCAL)
        }
        return TeamMembership(
            team=team_ref, status=self.status, members=members, inactive=self.inactive
        )


def gate(
    bindings: Any = None,
    teams: Any = None,
    *,
    fail_closed: bool = True,
    forbid_encryption: bool = False,
) -> tuple[CareTeamGate, list[tuple[str, str]]]:
    banned: list[tuple[str, str]] = []
    g = CareTeamGate(
        bindings or Bindings(),
        teams or Teams(),
        service_user_id=SERVICE,
        exempt_users=(),
        fail_closed=fail_closed,
        is_local=lambda user_id: user_id.endswith(":a.org"),
        remove_member_soon=lambda room, user: banned.append((room, user)),
        forbid_encryption=forbid_encryption,
    )
    return g, banned


def member_event(sender: str, target: str, membership: str) -> Event:
    return Event("m.room.member", sender, {"membership": membership}, state_key=target)


@pytest_twisted.ensureDeferred
async def test_remote_outsider_joining_is_soft_failed_and_banned() -> None:
    g, banned = gate()
    result = await g.check_event_for_spam(member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "join"))
    assert result == Codes.FORBIDDEN
    assert banned == [(ROOM, OUTSIDER_REMOTE)]


@pytest_twisted.ensureDeferred
async def test_remote_outsider_inviting_a_member_bans_nobody() -> None:
    g, banned = gate()
    result = await g.check_event_for_spam(member_event(OUTSIDER_REMOTE, MEMBER_LOCAL, "invite"))
    assert result == Codes.FORBIDDEN
    assert banned == []  # the invitee did nothing wrong


@pytest_twisted.ensureDeferred
async def test_remote_member_profile_change_in_a_suspended_team_passes() -> None:
    g, banned = gate(Bindings(memberships={MEMBER_REMOTE: "join"}), Teams(status="suspended"))
    result = await g.check_event_for_spam(member_event(MEMBER_REMOTE, MEMBER_REMOTE, "join"))
    assert result == NOT_SPAM
    assert banned == []


@pytest_twisted.ensureDeferred
async def test_unreachable_directory_refuses_a_received_entry_but_no_received_message() -> None:
    g, banned = gate(teams=Teams(unavailable=True))
    message = Event("m.room.message", MEMBER_REMOTE, {"msgtype": "m.text", "body": "x"})
    assert await g.check_event_for_spam(message) == NOT_SPAM  # (stripped for good otherwise)
    join = member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "join")
    assert await g.check_event_for_spam(join) == Codes.FORBIDDEN  # fail_closed: closed
    assert banned == [(ROOM, OUTSIDER_REMOTE)]


@pytest_twisted.ensureDeferred
async def test_unreachable_directory_admits_a_received_entry_only_when_failing_open() -> None:
    g, banned = gate(teams=Teams(unavailable=True), fail_closed=False)
    join = member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "join")
    assert await g.check_event_for_spam(join) == NOT_SPAM
    assert banned == []


@pytest_twisted.ensureDeferred
async def test_unreachable_directory_refuses_local_senders() -> None:
    g, _ = gate(teams=Teams(unavailable=True))
    with pytest.raises(Denied) as caught:
        await g.check_event_allowed(  # type: ignore[arg-type]
            Event("m.room.message", MEMBER_LOCAL, {"body": "x"}), {}
        )
    assert caught.value.reason.value == "directory_unavailable"


@pytest.mark.parametrize(
    "event",
    [
        Event("m.room.message", OUTSIDER_LOCAL, {"msgtype": "m.text", "body": "x"}),
        Event("m.reaction", OUTSIDER_LOCAL, {}),
        Event("m.room.redaction", OUTSIDER_LOCAL, {}, redacts="$message"),
        Event("m.room.topic", OUTSIDER_LOCAL, {"topic": "x"}, state_key=""),
        member_event(OUTSIDER_LOCAL, MEMBER_LOCAL, "leave"),  # a kick
        member_event(OUTSIDER_LOCAL, MEMBER_LOCAL, "ban"),
        member_event(OUTSIDER_LOCAL, OUTSIDER_LOCAL, "join"),  # a profile change
    ],
)
@pytest_twisted.ensureDeferred
async def test_a_former_member_still_joined_can_do_nothing_but_leave(event: Event) -> None:
    g, _ = gate(Bindings(memberships={OUTSIDER_LOCAL: "join"}))
    state = {
        ("m.room.member", OUTSIDER_LOCAL): Event(
            "m.room.member", OUTSIDER_LOCAL, {"membership": "join"}
        )
    }
    with pytest.raises(Denied) as caught:
        await g.check_event_allowed(event, state)  # type: ignore[arg-type]
    assert caught.value.reason.value == "not_in_care_team"
    # The same from a remote former member: soft-failed.
    remote = event.sent_by(
        OUTSIDER_REMOTE, state_key=OUTSIDER_REMOTE if event.state_key == OUTSIDER_LOCAL else None
    )
    assert await g.check_event_for_spam(remote) == Codes.FORBIDDEN  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_leaving_is_always_allowed() -> None:
    g, _ = gate()
    leave = member_event(OUTSIDER_LOCAL, OUTSIDER_LOCAL, "leave")
    assert await g.check_event_allowed(leave, {}) == (True, None)  # type: ignore[arg-type]
    leave = member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "leave")
    assert await g.check_event_for_spam(leave) == NOT_SPAM  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_member_whose_person_is_inactive_is_told_so() -> None:
    g, _ = gate(teams=Teams(inactive=frozenset({OUTSIDER_LOCAL})))
    with pytest.raises(Denied) as caught:
        await g.check_event_allowed(  # type: ignore[arg-type]
            Event("m.room.message", OUTSIDER_LOCAL, {"body": "x"}), {}
        )
    assert caught.value.reason.value == "account_inactive"


@pytest.mark.parametrize(
    ("event", "reason"),
    [
        (
            Event("m.room.tombstone", MEMBER_LOCAL, {"replacement_room": "!n:a.org"}, state_key=""),
            "protected_state",
        ),
        (
            Event("m.room.join_rules", MEMBER_LOCAL, {"join_rule": "public"}, state_key=""),
            "protected_state",
        ),
        (Event("m.room.power_levels", MEMBER_LOCAL, {}, state_key=""), "protected_state"),
        (
            Event(
                "m.room.encryption",
                MEMBER_LOCAL,
                {"algorithm": "m.megolm.v1.aes-sha2"},
                state_key="",
            ),
            "protected_state",
        ),
        (
            Event("m.room.third_party_invite", MEMBER_LOCAL, {}, state_key="token"),
            "third_party_invite_forbidden",
        ),
    ],
)
@pytest_twisted.ensureDeferred
async def test_members_cannot_change_what_decides_who_is_in_the_room(
    event: Event, reason: str
) -> None:
    g, _ = gate()
    with pytest.raises(Denied) as caught:
        await g.check_event_allowed(event, {})  # type: ignore[arg-type]
    assert caught.value.reason.value == reason
    remote = event.sent_by(MEMBER_REMOTE)
    assert await g.check_event_for_spam(remote) == Codes.FORBIDDEN  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_the_service_users_forced_encryption_is_emptied_when_forbidden() -> None:
    g, _ = gate(forbid_encryption=True)
    event = Event("m.room.encryption", SERVICE, {"algorithm": "m.megolm.v1.aes-sha2"}, state_key="")
    allowed, replacement = await g.check_event_allowed(event, {})  # type: ignore[arg-type]
    assert allowed and replacement is not None
    assert replacement["content"] == {} and replacement["type"] == "m.room.encryption"
    g, _ = gate()
    assert await g.check_event_allowed(event, {}) == (True, None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "event",
    [
        Event("m.space.parent", MEMBER_LOCAL, {}, state_key="!space:a.org"),
        Event("m.space.child", MEMBER_LOCAL, {}, state_key="!other:a.org"),
        Event("org.synapse_fhir.thread", MEMBER_LOCAL, {"reference": "x"}, state_key=""),
        Event("m.room.redaction", MEMBER_LOCAL, {}, redacts="$binding"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_only_the_service_user_changes_what_binds_a_room(event: Event) -> None:
    g, _ = gate()
    with pytest.raises(Denied) as caught:
        await g.check_event_allowed(event, {})  # type: ignore[arg-type]
    assert caught.value.reason.value == "protected_state"
    # Received over federation: soft-failed.
    remote = event.sent_by(MEMBER_REMOTE)
    assert await g.check_event_for_spam(remote) == Codes.FORBIDDEN  # type: ignore[arg-type]
    # The service user may.
    by_service = event.sent_by(SERVICE)
    assert await g.check_event_allowed(by_service, {}) == (True, None)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_space_links_of_ordinary_rooms_are_free() -> None:
    g, _ = gate(Bindings(team=None))
    event = Event("m.space.parent", MEMBER_LOCAL, {}, state_key="!space:a.org")
    assert await g.check_event_allowed(event, {}) == (True, None)  # type: ignore[arg-type]
    redaction = Event("m.room.redaction", MEMBER_LOCAL, {}, redacts="$binding")
    assert await g.check_event_allowed(redaction, {}) == (True, None)  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_received_binding_change_is_refused_even_while_the_directory_is_away() -> None:
    g, _ = gate(teams=Teams(unavailable=True))
    event = Event("m.space.child", MEMBER_REMOTE, {"via": ["b.org"]}, state_key="!other:a.org")
    assert await g.check_event_for_spam(event) == Codes.FORBIDDEN  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_a_remote_members_profile_change_is_never_banned_while_the_directory_is_away() -> (
    None
):
    g, banned = gate(Bindings(memberships={MEMBER_REMOTE: "join"}), Teams(unavailable=True))
    profile = member_event(MEMBER_REMOTE, MEMBER_REMOTE, "join")
    assert await g.check_event_for_spam(profile) == NOT_SPAM  # (not an entry: it passes)
    assert banned == []


@pytest_twisted.ensureDeferred
async def test_a_dummy_event_with_content_is_not_free() -> None:
    g, _ = gate(Bindings(memberships={OUTSIDER_LOCAL: "join"}))
    free = Event("org.matrix.dummy_event", OUTSIDER_LOCAL, {})
    assert await g.check_event_allowed(free, {}) == (True, None)  # type: ignore[arg-type]
    with pytest.raises(Denied):
        carrier = Event("org.matrix.dummy_event", OUTSIDER_LOCAL, {"note": "still here"})
        await g.check_event_allowed(carrier, {})  # type: ignore[arg-type]


class SharedBindings(Bindings):
    """A thread addressed to two teams."""

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        return ("CareTeam/a", "CareTeam/b")


class TwoTeams:
    """Team a lists only MEMBER_LOCAL; team b lists only OUTSIDER_LOCAL (and is inactive
    when ``b_status`` says so)."""

    def __init__(self, b_status: str = "active") -> None:
        self.b_status = b_status

    async def membership(self, team_ref: str) -> TeamMembership:
        user, status = (
            (MEMBER_LOCAL, "active")
            if team_ref == "CareTeam/a"
            else (OUTSIDER_LOCAL, self.b_status)
        )
        members = {user: Member(user, f"Practitioner/{user}", "Practitioner")}
        return TeamMembership(team=team_ref, status=status, members=members)


@pytest_twisted.ensureDeferred
async def test_a_member_of_any_of_a_threads_teams_enters_and_speaks() -> None:
    g, _ = gate(SharedBindings(), TwoTeams())
    for user in (MEMBER_LOCAL, OUTSIDER_LOCAL):
        assert await g.user_may_join_room(user, ROOM, True) == NOT_SPAM
        message = Event("m.room.message", user, {"msgtype": "m.text", "body": "hi"})
        assert await g.check_event_allowed(message, {}) == (True, None)
    with pytest.raises(Denied) as caught:
        await g.user_may_join_room(MEMBER_REMOTE, ROOM, True)
    assert caught.value.reason is Reason.NOT_IN_CARE_TEAM


@pytest_twisted.ensureDeferred
async def test_an_inactive_team_admits_nobody_new_while_the_others_still_do() -> None:
    g, _ = gate(SharedBindings(), TwoTeams(b_status="inactive"))
    assert await g.user_may_join_room(MEMBER_LOCAL, ROOM, True) == NOT_SPAM
    with pytest.raises(Denied) as caught:
        await g.user_may_join_room(OUTSIDER_LOCAL, ROOM, True)
    assert caught.value.reason is Reason.CARE_TEAM_INACTIVE
