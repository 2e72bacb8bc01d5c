"""A thread's request status → what its room allows (pure)."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.mapping.thread_status import (
    RoomRules,
    ThreadMode,
    opens_room,
    parse_mode,
    room_rules,
    thread_mode,
)


@pytest.mark.parametrize(
    ("status", "mode", "opens"),
    [
        ("draft", ThreadMode.OPEN, True),
        ("active", ThreadMode.OPEN, True),
        ("completed", ThreadMode.READ_ONLY, False),
        ("revoked", ThreadMode.READ_ONLY, False),
        ("on-hold", ThreadMode.READ_ONLY, False),
        ("entered-in-error", ThreadMode.EMPTIED, False),
        ("unknown", ThreadMode.READ_ONLY, False),
        (None, ThreadMode.READ_ONLY, False),
    ],
)
def test_each_request_status(status: Any, mode: ThreadMode, opens: bool) -> None:
    assert thread_mode(status) is mode
    assert opens_room(status) is opens


@given(st.one_of(st.none(), st.text(), st.integers(), st.lists(st.text()), st.booleans()))
def test_anything_but_draft_or_active_never_opens_a_room(status: Any) -> None:
    if status not in ("draft", "active"):
        assert not opens_room(status)
        assert thread_mode(status) is not ThreadMode.OPEN


def test_a_stored_mode_reads_back_and_garbage_counts_as_open() -> None:
    for mode in ThreadMode:
        assert parse_mode(mode.value) is mode
    assert parse_mode("closed?") is ThreadMode.OPEN


def test_an_open_thread_of_an_active_team_is_writable_and_admits() -> None:
    assert room_rules(team_admits=True, team_emptied=False, mode=ThreadMode.OPEN) == RoomRules(
        emptied=False, admit_new=True, read_only=False
    )


def test_a_closed_thread_is_read_only_and_admits_nobody_whatever_the_team() -> None:
    for admits in (True, False):
        rules = room_rules(team_admits=admits, team_emptied=False, mode=ThreadMode.READ_ONLY)
        assert rules == RoomRules(emptied=False, admit_new=False, read_only=True)


def test_an_inactive_team_closes_an_open_thread() -> None:
    rules = room_rules(team_admits=False, team_emptied=False, mode=ThreadMode.OPEN)
    assert rules == RoomRules(emptied=False, admit_new=False, read_only=True)


@pytest.mark.parametrize(
    ("team_emptied", "mode"),
    [(True, ThreadMode.OPEN), (False, ThreadMode.EMPTIED), (True, ThreadMode.READ_ONLY)],
)
def test_either_side_empties_the_room(team_emptied: bool, mode: ThreadMode) -> None:
    rules = room_rules(team_admits=True, team_emptied=team_emptied, mode=mode)
    assert rules == RoomRules(emptied=True, admit_new=False, read_only=True)
