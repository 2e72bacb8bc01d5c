"""The operator console's pure parts: who is pending in a room, the query parameters, the
page's headers, and the files a wheel must carry."""

from __future__ import annotations

import re

import pytest
from synapse.module_api.errors import SynapseError
from twisted.web.test.requesthelper import DummyRequest

from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.audit.journal_store import JournalRow
from synapse_fhir_module.fhir.care_team import Member, TeamMembership
from synapse_fhir_module.mapping.thread_status import ThreadMode
from synapse_fhir_module.sync.membership_plan import room_target
from synapse_fhir_module.web.admin.denials import refusal_json
from synapse_fhir_module.web.admin.limits import MAX_FROM_LENGTH, parse_from, parse_limit
from synapse_fhir_module.web.admin.networks import room_view
from synapse_fhir_module.web.admin.page import (
    CONTENT_SECURITY_POLICY,
    FILES,
    StaticFile,
    read_static,
)

SERVICE = "@fhir:example.org"


def team(*users: str, status: str = "active", ref: str = "CareTeam/1") -> TeamMembership:
    return TeamMembership(
        team=ref,
        status=status,
        members={u: Member(u, f"Practitioner/{u[1:4]}", "Practitioner") for u in users},
    )


def test_pending_invite_is_a_member_neither_joined_nor_invited_and_removal_a_leaver() -> None:
    target = room_target([team("@anna:x", "@bram:x", "@carla:x")])
    view = room_view(
        target,
        {SERVICE: "join", "@anna:x": "join", "@bram:x": "invite", "@olga:x": "join"},
        keep=[SERVICE],
    )
    assert view.joined == ("@anna:x", "@fhir:example.org", "@olga:x")
    assert view.invited == ("@bram:x",)
    assert view.pending_invite == ("@carla:x",)
    assert view.pending_removal == ("@olga:x",)


def test_the_service_user_and_exempt_users_are_never_pending_removal() -> None:
    view = room_view(
        room_target([team("@anna:x")]),
        {SERVICE: "join", "@audit:x": "join", "@anna:x": "join"},
        keep=[SERVICE, "@audit:x"],
    )
    assert view.pending_removal == () and view.pending_invite == ()


def test_an_invite_of_someone_no_longer_listed_is_pending_removal_a_leaver_is_not() -> None:
    view = room_view(
        room_target([team("@anna:x")]),
        {"@anna:x": "join", "@ivo:x": "invite", "@lena:x": "leave"},
        keep=[],
    )
    assert view.pending_removal == ("@ivo:x",)


def test_a_team_that_admits_nobody_new_leaves_nobody_pending_invite() -> None:
    view = room_view(room_target([team("@anna:x", status="suspended")]), {}, keep=[])
    assert view.pending_invite == () and view.pending_removal == ()


def test_a_closed_thread_invites_nobody_and_an_entered_in_error_one_removes_everyone() -> None:
    members = {"@anna:x": "join"}
    closed = room_view(
        room_target([team("@anna:x", "@bram:x")], ThreadMode.READ_ONLY), members, keep=[]
    )
    assert closed.pending_invite == () and closed.pending_removal == ()
    emptied = room_view(room_target([team("@anna:x")], ThreadMode.EMPTIED), members, keep=[])
    assert emptied.pending_removal == ("@anna:x",)


def test_a_room_shared_by_two_teams_wants_the_members_of_both() -> None:
    target = room_target([team("@anna:x"), team("@piet:x", ref="CareTeam/2")])
    view = room_view(target, {"@anna:x": "join"}, keep=[])
    assert view.pending_invite == ("@piet:x",) and view.pending_removal == ()


def test_a_banned_member_fhir_lists_again_is_pending_invite() -> None:
    view = room_view(room_target([team("@anna:x")]), {"@anna:x": "ban"}, keep=[])
    assert view.pending_invite == ("@anna:x",)


def test_without_fhir_nothing_is_said_to_be_pending() -> None:
    view = room_view(None, {"@anna:x": "join", "@bram:x": "invite"}, keep=[])
    assert view.joined == ("@anna:x",) and view.invited == ("@bram:x",)
    assert view.pending_invite is None and view.pending_removal is None


def test_a_member_whose_period_ended_is_pending_removal() -> None:
    ended = TeamMembership(
        team="CareTeam/1",
        status="active",
        members={"@olga:x": Member("@olga:x", "Practitioner/o", "Practitioner", until=1000.0)},
    )
    view = room_view(room_target([ended], now=2000.0), {"@olga:x": "join"}, keep=[])
    assert view.pending_removal == ("@olga:x",)


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (None, 10),
        ({}, 10),
        ({b"limit": [b"1"]}, 1),
        ({b"limit": [b"50"]}, 50),
    ],
)
def test_limit_defaults_and_bounds(args: dict | None, expected: int) -> None:
    assert parse_limit(args, default=10, maximum=50) == expected


@pytest.mark.parametrize("raw", [b"0", b"51", b"-3", b"ten", b"", b"1e3", b"\xff", b"9" * 40])
def test_a_limit_out_of_bounds_or_not_a_number_is_a_400(raw: bytes) -> None:
    with pytest.raises(SynapseError) as caught:
        parse_limit({b"limit": [raw]}, default=10, maximum=50)
    assert caught.value.code == 400 and caught.value.errcode == "M_INVALID_PARAM"


def test_from_is_what_a_previous_page_gave() -> None:
    assert parse_from(None) is None
    assert parse_from({b"from": [b""]}) is None
    assert parse_from({b"from": [b"CareTeam/team-1"]}) == "CareTeam/team-1"


@pytest.mark.parametrize("raw", [b"\xff\xfe", b"a\nb", b"x" * (MAX_FROM_LENGTH + 1)])
def test_a_from_that_no_page_gives_is_a_400(raw: bytes) -> None:
    with pytest.raises(SynapseError) as caught:
        parse_from({b"from": [raw]})
    assert caught.value.code == 400


def test_a_refusal_goes_out_with_its_rule_room_user_and_time_only() -> None:
    row = JournalRow(
        decision=Decision(
            kind=DecisionKind.ACCESS_REFUSED,
            outcome=Outcome.REFUSED,
            recorded_ms=1_700_000_000_000,
            user_id="@mallory:x",
            actor_id="@anna:x",
            room_id="!r:x",
            care_team="CareTeam/1",
            request="CommunicationRequest/2",
            reason="not_in_care_team",
            detail="invite",
        ),
        shipped_ms=None,
        attempts=0,
        failure=None,
    )
    assert refusal_json(row) == {
        "ts": 1_700_000_000_000,
        "kind": "access_refused",
        "action": "invite",
        "rule": "not_in_care_team",
        "room_id": "!r:x",
        "user_id": "@mallory:x",
        "actor_id": "@anna:x",
    }


def test_the_page_forbids_inline_code_frames_and_other_origins() -> None:
    directives = dict(d.split(" ", 1) for d in CONTENT_SECURITY_POLICY.split("; "))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'" and directives["style-src"] == "'self'"
    assert directives["frame-ancestors"] == "'none'"
    assert directives["require-trusted-types-for"] == "'script'"
    assert "unsafe" not in CONTENT_SECURITY_POLICY


def test_the_page_has_no_inline_script_or_style_and_the_script_no_html_from_strings() -> None:
    html = read_static("index.html").decode()
    assert re.findall(r"<script[^>]*>", html) == ['<script src="console.js" defer>']
    assert "<style" not in html
    assert not re.search(r"\s(on[a-z]+|style)\s*=", html), "inline handler or style"
    script = read_static("console.js").decode()
    for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval("):
        assert sink not in script, sink


@pytest.mark.parametrize("name", sorted(FILES))
def test_each_file_of_the_page_goes_out_with_the_security_headers(name: str) -> None:
    request = DummyRequest([b""])
    body = StaticFile(name).render_GET(request)
    assert body == read_static(name)
    headers = {k.lower(): v for k, v in request.responseHeaders.getAllRawHeaders()}
    assert headers[b"content-type"] == [FILES[name]]
    assert headers[b"content-security-policy"] == [CONTENT_SECURITY_POLICY.encode()]
    assert headers[b"x-content-type-options"] == [b"nosniff"]
    assert headers[b"referrer-policy"] == [b"no-referrer"]
    assert headers[b"cache-control"] == [b"no-store"]
    assert headers[b"x-frame-options"] == [b"DENY"]
