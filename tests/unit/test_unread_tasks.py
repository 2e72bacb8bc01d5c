"""Unread-marker Tasks: what each person's Task must say (pure), and the tables the notes
live in (SQLite; PostgreSQL runs the same statements through Synapse)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from typing import Any, cast

import pytest
import pytest_twisted
from fhir.resources.R4B.task import Task
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir.care_team import Member, TeamMembership
from synapse_fhir_module.fhir.errors import FhirPermanentError, FhirTransientError
from synapse_fhir_module.mapping.unread import (
    CANCELLED,
    COMPLETED,
    OZO_TASK,
    REQUESTED,
    UNREAD_TASK_SYSTEM,
    LatestMessage,
    ReadMarker,
    TaskState,
    has_read,
    task_changes,
    task_entry,
    task_id,
)
from synapse_fhir_module.unread import store
from synapse_fhir_module.unread.tasks import REFUSED_WAIT_MS, UnreadTasks, latest_of

THREAD = "CommunicationRequest/7"
NOW = 1_000_000
LATEST = LatestMessage("$latest", 2_000, "@gp:x", "Communication/9")


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_schema(cursor)
    store.create_schema(cursor)  # (every instance creates it on first use)
    yield cursor
    connection.close()


def test_read_means_posted_marked_or_marked_later() -> None:
    """Events are placed by when this server got them (a sender chooses its own
    origin_server_ts: a message dated years ahead must not count as read, or as newest)."""
    assert has_read(LATEST, "@gp:x", None)  # its sender
    assert not has_read(LATEST, "@nurse:x", None)
    assert has_read(LATEST, "@nurse:x", ReadMarker("$latest", None))
    assert has_read(LATEST, "@nurse:x", ReadMarker("$join", 2_001))
    assert not has_read(LATEST, "@nurse:x", ReadMarker("$older", 1_999))
    # Same millisecond, another event: either may be first, so not read.
    assert not has_read(LATEST, "@nurse:x", ReadMarker("$other", 2_000))
    # A marker the module cannot place: not read.
    assert not has_read(LATEST, "@nurse:x", ReadMarker("$unknown", None))


def test_changes_name_only_the_tasks_that_differ() -> None:
    accounts = {"Practitioner/gp": {"@gp:x"}, "Practitioner/nurse": {"@nurse:x", "@n2:x"}}
    changes = task_changes(LATEST, accounts, {"@n2:x": ReadMarker("$latest", None)}, {})
    assert changes == {
        "Practitioner/gp": TaskState(COMPLETED, "Communication/9"),
        "Practitioner/nurse": TaskState(COMPLETED, "Communication/9"),  # (either account)
    }
    assert task_changes(LATEST, accounts, {"@n2:x": ReadMarker("$latest", None)}, changes) == {}
    # A person who left has their open Task cancelled, once.
    written = {**changes, "RelatedPerson/d": TaskState(REQUESTED, "Communication/8")}
    cancelled = task_changes(LATEST, accounts, {"@n2:x": ReadMarker("$latest", None)}, written)
    assert cancelled == {"RelatedPerson/d": TaskState(CANCELLED, "Communication/8")}
    assert task_changes(LATEST, accounts, {}, {**written, **cancelled}) == {
        "Practitioner/nurse": TaskState(REQUESTED, "Communication/9")
    }


persons = st.dictionaries(
    st.sampled_from(["Practitioner/a", "Practitioner/b", "RelatedPerson/c", "Patient/d"]),
    st.sets(st.sampled_from(["@a:x", "@b:x", "@c:x", "@d:x", "@gp:x"]), min_size=1),
)
markers = st.dictionaries(
    st.sampled_from(["@a:x", "@b:x", "@c:x", "@d:x"]),
    st.builds(
        ReadMarker,
        st.sampled_from(["$latest", "$x", "$y"]),
        st.none() | st.integers(0, 4_000),
    ),
)
states = st.dictionaries(
    st.sampled_from(["Practitioner/a", "RelatedPerson/c", "Practitioner/z"]),
    st.builds(
        TaskState,
        st.sampled_from([REQUESTED, COMPLETED, CANCELLED]),
        st.sampled_from(["Communication/8", "Communication/9"]),
    ),
)


@given(persons, markers, states)
def test_writing_the_changes_leaves_nothing_to_change(
    accounts: dict[str, set[str]], marks: dict[str, ReadMarker], written: dict[str, TaskState]
) -> None:
    changes = task_changes(LATEST, accounts, marks, written)
    after = {**written, **changes}
    assert task_changes(LATEST, accounts, marks, after) == {}
    for person in accounts:  # every member has a Task on the latest message
        assert after[person].focus == LATEST.communication
        assert after[person].status in (REQUESTED, COMPLETED)
    for person in set(written) - set(accounts):  # and nobody else an open one
        assert after[person].status == CANCELLED


def test_a_task_entry_is_a_conditional_update_of_a_valid_task() -> None:
    entry = task_entry(
        THREAD,
        "Practitioner/gp",
        "Patient/p",
        TaskState(REQUESTED, "Communication/9"),
        modified="2026-11-28T20:00:00Z",
        profile=CommunicationProfile.OZO,
    )
    task = entry["resource"]
    # At an id of its own, made from the thread and the person: never two to choose from.
    assert entry["request"] == {"method": "PUT", "url": f"Task/{task['id']}"}
    assert task["id"] == task_id(THREAD, "Practitioner/gp")
    assert task["id"] != task_id(THREAD, "Practitioner/g")
    assert task["id"] != task_id("CommunicationRequest/8", "Practitioner/gp")
    assert len(task["id"]) <= 64
    assert task["identifier"] == [
        {"system": UNREAD_TASK_SYSTEM, "value": "CommunicationRequest/7/Practitioner/gp"}
    ]
    Task.model_validate(task)
    assert task["meta"]["profile"] == [OZO_TASK]
    assert task["owner"] == {"reference": "Practitioner/gp", "type": "Practitioner"}
    assert task["for"] == {"reference": "Patient/p", "type": "Patient"}
    assert task["focus"] == {"reference": "Communication/9", "type": "Communication"}
    # OZOTask cannot hold a patient as owner, or a Task without a patient: no claim then.
    for person, patient in (("Patient/p", "Patient/p"), ("Practitioner/gp", None)):
        plain = task_entry(
            THREAD,
            person,
            patient,
            TaskState(REQUESTED, "Communication/9"),
            modified="2026-11-28T20:00:00Z",
            profile=CommunicationProfile.OZO,
        )["resource"]
        Task.model_validate(plain)
        assert "profile" not in plain["meta"]


def test_the_newest_message_of_a_room_is_kept(txn: sqlite3.Cursor) -> None:
    older = LatestMessage("$a", 1_000, "@gp:x", "Communication/1")
    newer = LatestMessage("$b", 2_000, "@n:x", "Communication/2")
    assert latest_of([("!r:x", newer), ("!r:x", older)]) == {"!r:x": newer}
    store.note_messages(txn, {"!r:x": newer})
    store.note_messages(txn, {"!r:x": older})  # (noted late: not the latest)
    latest, _, _ = store.room_state(txn, "!r:x")
    assert latest == newer


def test_marks_are_cleared_only_if_nothing_came_since(txn: sqlite3.Cursor) -> None:
    store.note_marker(txn, "!r:x", "@n:x", ReadMarker("$b", 2_000))
    taken = store.dirty_rooms(txn, NOW, 10)
    assert [room for room, _ in taken] == ["!r:x"]
    store.note_marker(txn, "!r:x", "@n:x", ReadMarker("$c", None))  # meanwhile
    store.clear_dirty(txn, taken)
    again = store.dirty_rooms(txn, NOW, 10)
    assert [room for room, _ in again] == ["!r:x"]
    assert store.marked_rooms(txn) == 1
    # A room that could not be done waits, still marked.
    store.postpone(txn, "!r:x", NOW + 5_000)
    assert store.dirty_rooms(txn, NOW, 10) == []
    assert [room for room, _ in store.dirty_rooms(txn, NOW + 5_000, 10)] == ["!r:x"]
    store.clear_dirty(txn, again)
    assert store.dirty_rooms(txn, NOW + 5_000, 10) == []
    assert store.marked_rooms(txn) == 0
    _, marks, _ = store.room_state(txn, "!r:x")
    assert marks == {"@n:x": ReadMarker("$c", None)}


def test_what_was_written_is_remembered_per_room_and_person(txn: sqlite3.Cursor) -> None:
    store.tasks_written(txn, "!r:x", {"Practitioner/a": TaskState(REQUESTED, "Communication/1")})
    store.tasks_written(txn, "!r:x", {"Practitioner/a": TaskState(COMPLETED, "Communication/1")})
    store.tasks_written(txn, "!s:x", {"Practitioner/a": TaskState(REQUESTED, None)})
    assert store.room_state(txn, "!r:x")[2] == {
        "Practitioner/a": TaskState(COMPLETED, "Communication/1")
    }
    # The periodic check marks the rooms with an open Task (not those all cancelled).
    store.tasks_written(txn, "!c:x", {"Practitioner/a": TaskState(CANCELLED, None)})
    store.mark_rooms_with_open_tasks(txn)
    assert sorted(room for room, _ in store.dirty_rooms(txn, NOW, 10)) == ["!r:x", "!s:x"]


# The loop (UnreadTasks.run) with the real tables on SQLite, and stand-ins for Synapse,
# the room bindings, the team directory and FHIR.


class _Api:
    def __init__(self) -> None:
        self._cursor = sqlite3.connect(":memory:").cursor()
        self.now = NOW

    async def run_db_interaction(self, desc: str, func: Any, *args: Any) -> Any:
        return func(self._cursor, *args)

    def get_current_time_msec(self) -> int:
        return self.now


class _Bindings:
    async def thread_of(self, room_id: str) -> str:
        return f"CommunicationRequest/{room_id.strip('!:x')}"

    async def care_teams_of(self, room_id: str) -> tuple[str, ...]:
        return (f"CareTeam/{room_id.strip('!:x')}",)


class _Teams:
    def __init__(self, broken: set[str]) -> None:
        self.broken = broken

    async def membership(self, team_ref: str) -> TeamMembership:
        if team_ref in self.broken:
            raise KeyError(team_ref)  # (anything unexpected)
        member = Member("@gp:x", "Practitioner/gp", "Practitioner")
        return TeamMembership(team_ref, "active", {"@gp:x": member}, subject="Patient/p")


class _Fhir:
    def __init__(self) -> None:
        self.refuse: set[str] = set()  # Task ids answered 422
        self.down = False
        self.bundles: list[list[str]] = []

    async def transaction_json(self, bundle: dict[str, Any]) -> dict[str, Any]:
        if self.down:
            raise FhirTransientError("unreachable")
        ids = [entry["resource"]["id"] for entry in bundle["entry"]]
        if self.refuse & set(ids):
            raise FhirPermanentError("refused", status=422)
        self.bundles.append(ids)
        return {"resourceType": "Bundle", "type": "transaction-response"}


def _loop(broken: set[str]) -> tuple[UnreadTasks, _Api, _Fhir]:
    api, fhir = _Api(), _Fhir()
    unread = UnreadTasks(
        cast(Any, api),
        cast(Any, fhir),
        cast(Any, _Bindings()),
        cast(Any, _Teams(broken)),
        profile=CommunicationProfile.BASE,
    )
    return unread, api, fhir


def _note(api: _Api, *rooms: str) -> None:
    for room in rooms:
        message = LatestMessage(f"$m{room}", NOW - 10, "@nurse:x", "Communication/9")
        store.note_messages(api._cursor, {room: message})


@pytest_twisted.ensureDeferred
async def test_a_room_that_cannot_be_done_waits_and_the_others_go_on() -> None:
    unread, api, fhir = _loop(broken={"CareTeam/2"})
    await unread.start()
    _note(api, "!1:x", "!2:x", "!3:x")
    fhir.refuse = {task_id("CommunicationRequest/3", "Practitioner/gp")}
    await unread.run()
    # Room 1 written; 2 (team unreadable) and 3 (refused by FHIR) wait, still marked.
    assert fhir.bundles[-1] == [task_id("CommunicationRequest/1", "Practitioner/gp")]
    assert store.marked_rooms(api._cursor) == 2
    assert store.room_state(api._cursor, "!1:x")[2] == {
        "Practitioner/gp": TaskState(REQUESTED, "Communication/9")
    }
    assert store.room_state(api._cursor, "!3:x")[2] == {}
    await unread.run()
    assert len(fhir.bundles) == 1  # (nothing due: both wait)
    # Later, FHIR takes room 3's Task; room 2 waits for its team.
    fhir.refuse = set()
    api.now = NOW + REFUSED_WAIT_MS
    await unread.run()
    assert fhir.bundles[-1] == [task_id("CommunicationRequest/3", "Practitioner/gp")]
    assert store.marked_rooms(api._cursor) == 1


@pytest_twisted.ensureDeferred
async def test_fhir_unreachable_keeps_every_room_marked() -> None:
    unread, api, fhir = _loop(broken=set())
    await unread.start()
    _note(api, "!1:x", "!2:x")
    fhir.down = True
    await unread.run()
    assert store.marked_rooms(api._cursor) == 2
    fhir.down = False
    await unread.run()  # (backing off: no round yet)
    assert fhir.bundles == []
    unread._resume_at = 0.0
    await unread.run()
    assert sorted(fhir.bundles[-1]) == sorted(
        task_id(f"CommunicationRequest/{n}", "Practitioner/gp") for n in (1, 2)
    )
    assert store.marked_rooms(api._cursor) == 0
    await unread.run()  # nothing changed: nothing written again
    assert len(fhir.bundles) == 1
