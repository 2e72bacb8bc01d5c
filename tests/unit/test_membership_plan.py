"""Invites and removals that bring a room in line with its CareTeam."""

from __future__ import annotations

from synapse_fhir_module.sync.membership_plan import MembershipPlan, plan_membership

SERVICE = "@fhir:example.org"


def test_members_missing_are_invited_and_leavers_removed() -> None:
    plan = plan_membership(
        ["@anna:x", "@bram:x", "@carla:x"],
        {SERVICE: "join", "@anna:x": "join", "@bram:x": "invite", "@olga:x": "join"},
        keep=[SERVICE],
        admit_new=True,
    )
    assert plan == MembershipPlan(invite=("@carla:x",), remove=("@olga:x",))


def test_an_invite_or_knock_of_a_non_member_is_withdrawn_but_leavers_are_left_alone() -> None:
    plan = plan_membership(
        [],
        {"@ivo:x": "invite", "@kim:x": "knock", "@lena:x": "leave", "@max:x": "ban"},
        keep=[],
        admit_new=True,
    )
    assert plan == MembershipPlan(remove=("@ivo:x", "@kim:x"))


def test_a_banned_member_is_unbanned_before_the_invite() -> None:
    plan = plan_membership(["@anna:x"], {"@anna:x": "ban"}, keep=[], admit_new=True)
    assert plan == MembershipPlan(unban=("@anna:x",), invite=("@anna:x",))


def test_a_team_that_admits_nobody_new_invites_nobody_but_still_removes() -> None:
    plan = plan_membership(
        ["@anna:x", "@new:x"],
        {"@anna:x": "join", "@olga:x": "join"},
        keep=[],
        admit_new=False,
    )
    assert plan == MembershipPlan(remove=("@olga:x",))


def test_kept_users_are_never_removed() -> None:
    plan = plan_membership(
        [], {SERVICE: "join", "@audit:x": "join"}, keep=[SERVICE, "@audit:x"], admit_new=True
    )
    assert plan.empty


def test_only_the_invitable_are_invited_and_the_rest_kept() -> None:
    # A room shared by two teams, one of them inactive: its members stay, none is invited.
    plan = plan_membership(
        ["@a:x", "@b:x", "@c:x"],
        {"@b:x": "join", "@c:x": "ban", "@gone:x": "join"},
        keep=["@svc:x"],
        admit_new=True,
        invitable=["@c:x"],
    )
    assert plan == MembershipPlan(unban=("@c:x",), invite=("@c:x",), remove=("@gone:x",))
