"""Unread-marker Tasks: what each person's Task must say (pure), and the tables the notes
live in (SQLite; PostgreSQL runs the same statements through Synapse)."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator

import pytest
from fhir.resources.R4B.task import Task
from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module import unread_store as store
from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.unread_mapping import (
    CANCELLED,
    COMPLETED,
    OZO_TASK,
    REQUESTED,
    LatestMessage,
    ReadMarker,
    TaskState,
    has_read,
    task_changes,
    task_entry,
)
from synapse_fhir_module.unread_tasks import latest_of

THREAD = "CommunicationRequest/7"
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
    assert entry["request"] == {
        "method": "PUT",
        "url": "Task?identifier=urn:synapse-fhir-module:unread|"
        "CommunicationRequest/7/Practitioner/gp",
    }
    task = entry["resource"]
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
    taken = store.dirty_rooms(txn, 10)
    assert [room for room, _ in taken] == ["!r:x"]
    store.note_marker(txn, "!r:x", "@n:x", ReadMarker("$c", None))  # meanwhile
    store.clear_dirty(txn, taken)
    again = store.dirty_rooms(txn, 10)
    assert [room for room, _ in again] == ["!r:x"]
    store.clear_dirty(txn, again)
    assert store.dirty_rooms(txn, 10) == []
    _, marks, _ = store.room_state(txn, "!r:x")
    assert marks == {"@n:x": ReadMarker("$c", None)}


def test_what_was_written_is_remembered_per_room_and_person(txn: sqlite3.Cursor) -> None:
    store.tasks_written(txn, "!r:x", {"Practitioner/a": TaskState(REQUESTED, "Communication/1")})
    store.tasks_written(txn, "!r:x", {"Practitioner/a": TaskState(COMPLETED, "Communication/1")})
    store.tasks_written(txn, "!s:x", {"Practitioner/a": TaskState(REQUESTED, None)})
    assert store.room_state(txn, "!r:x")[2] == {
        "Practitioner/a": TaskState(COMPLETED, "Communication/1")
    }
