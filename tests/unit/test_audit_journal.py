"""The audit journal: what the deciding code notes, how it reaches the journal table (in
batches, retried, never twice), and what the table answers (SQLite; PostgreSQL runs the
same statements through Synapse). tests/integration/test_audit_trail.py runs it for real."""

from __future__ import annotations

import sqlite3
from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import pytest
import pytest_twisted

from synapse_fhir_module.audit import journal_store as store
from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.audit.journal import (
    MAX_BATCH,
    MAX_FIELD,
    RETRY_MS,
    SAME_DECISION_MS,
    SUMMARY_REASON,
    AuditJournal,
)
from synapse_fhir_module.enforcement.denials import Denied, Reason
from synapse_fhir_module.enforcement.gate import CareTeamGate
from tests.unit.test_enforcement_rules import (
    MEMBER_LOCAL,
    OUTSIDER_LOCAL,
    OUTSIDER_REMOTE,
    ROOM,
    SERVICE,
    Bindings,
    Teams,
    member_event,
)


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_tables(cursor)
    store.create_tables(cursor)  # idempotent: every instance runs it at start
    yield cursor
    connection.close()


def decision(at: int, **fields: Any) -> Decision:
    return Decision(
        kind=fields.pop("kind", DecisionKind.ACCESS_REFUSED),
        outcome=fields.pop("outcome", Outcome.REFUSED),
        recorded_ms=at,
        **fields,
    )


def test_the_table_keeps_every_field_and_answers_refusals_newest_first(
    txn: sqlite3.Cursor,
) -> None:
    refused = decision(
        10,
        user_id="@olga:a.org",
        actor_id="@olga:a.org",
        room_id=ROOM,
        care_team="CareTeam/t",
        request="CommunicationRequest/7",
        reason="not_in_care_team",
        detail="join",
    )
    invited = decision(20, kind=DecisionKind.MEMBER_INVITED, outcome=Outcome.SUCCESS)
    later = decision(30, reason="care_team_inactive")
    store.insert_decisions(txn, [refused, invited, later])
    store.insert_decisions(txn, [refused])  # a flush retried after its commit: no second row
    rows = store.recent_refusals(txn, 10)
    assert [r.decision for r in rows] == [later, refused]
    assert (rows[1].reason, rows[1].room_id, rows[1].user_id, rows[1].kind) == (
        "not_in_care_team",
        ROOM,
        "@olga:a.org",
        "access_refused",
    )
    assert [r.decision for r in store.recent_refusals(txn, 1)] == [later]


def test_shipped_rows_leave_the_unshipped_list_and_failures_are_counted(
    txn: sqlite3.Cursor,
) -> None:
    first, second = decision(1), decision(2)
    store.insert_decisions(txn, [second, first])
    assert [r.decision for r in store.unshipped(txn, 10)] == [first, second]
    assert store.count_unshipped(txn) == (2, 1)
    store.note_failure(txn, [first.audit_id], "HTTP 503")
    store.note_failure(txn, [first.audit_id], "HTTP 503")
    row = store.unshipped(txn, 1)[0]
    assert (row.attempts, row.failure) == (2, "HTTP 503")
    store.mark_shipped(txn, [first.audit_id], 99)
    assert [r.decision for r in store.unshipped(txn, 10)] == [second]
    assert store.count_unshipped(txn) == (1, 2)
    store.mark_shipped(txn, [second.audit_id], 100)
    assert store.count_unshipped(txn) == (0, None)


class Api:
    """Runs database work on an SQLite cursor and holds background calls until told."""

    def __init__(self, txn: sqlite3.Cursor) -> None:
        self.txn = txn
        self.calls: list[tuple[int, Callable[[], Awaitable[None]]]] = []
        self.failing = False

    async def run_db_interaction(self, desc: str, func: Callable, *args: Any) -> Any:
        if self.failing:
            raise OSError("database away")
        return func(self.txn, *args)

    def delayed_background_call(self, msec: int, f: Callable, *args: Any, desc: str) -> None:
        self.calls.append((msec, f))

    async def run_calls(self) -> list[int]:
        delays = []
        while self.calls:
            msec, f = self.calls.pop(0)
            delays.append(msec)
            await f()
        return delays


class Clock:
    def __init__(self) -> None:
        self.now = 1_000

    def __call__(self) -> int:
        return self.now


def refused(journal: AuditJournal, user_id: str = "@olga:a.org") -> None:
    journal.note(
        DecisionKind.ACCESS_REFUSED,
        Outcome.REFUSED,
        user_id=user_id,
        room_id=ROOM,
        reason="not_in_care_team",
        detail="join",
    )


@pytest_twisted.ensureDeferred
async def test_decisions_noted_before_the_table_exists_are_written_once_it_does(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    refused(journal)
    assert api.calls == []  # nothing scheduled before start
    flushed: list[int] = []
    journal.add_listener(lambda: flushed.append(journal.unwritten))
    await journal.start()
    await api.run_calls()
    assert [(r.user_id, r.recorded_ms) for r in store.recent_refusals(txn, 10)] == [
        ("@olga:a.org", 1_000)
    ]
    assert flushed == [0]


@pytest_twisted.ensureDeferred
async def test_one_attempt_seen_by_two_callbacks_is_one_decision_but_a_retry_later_is_another(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    refused(journal)
    refused(journal)  # the spam check, then the event rule, about the same join
    refused(journal, user_id="@piet:a.org")  # someone else: a decision of its own
    clock.now += SAME_DECISION_MS
    refused(journal)  # they try again
    await api.run_calls()
    assert sorted(r.user_id or "" for r in store.recent_refusals(txn, 10)) == [
        "@olga:a.org",
        "@olga:a.org",
        "@piet:a.org",
    ]


@pytest_twisted.ensureDeferred
async def test_a_batch_the_database_refused_is_kept_and_written_on_the_retry(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    for i in range(MAX_BATCH + 3):
        refused(journal, user_id=f"@u{i}:a.org")
    api.failing = True
    _, flush = api.calls.pop(0)
    await flush()
    assert store.count_unshipped(txn)[0] == 0
    assert journal.unwritten == MAX_BATCH + 3
    assert [m for m, _ in api.calls] == [RETRY_MS]
    api.failing = False
    await api.run_calls()
    assert store.count_unshipped(txn)[0] == MAX_BATCH + 3  # in two batches
    assert journal.unwritten == 0


class Journal:
    def __init__(self) -> None:
        self.noted: list[dict[str, Any]] = []

    def note(self, kind: DecisionKind, outcome: Outcome, **fields: Any) -> None:
        self.noted.append({"kind": kind, "outcome": outcome, **fields})


class RememberingBindings(Bindings):
    def remembered(self, room_id: str) -> tuple[str, ...] | None:
        return (self.team,) if self.team else ()


def gate_with(journal: Journal) -> CareTeamGate:
    return CareTeamGate(
        RememberingBindings(),  # type: ignore[arg-type]
        Teams(),  # type: ignore[arg-type]
        service_user_id=SERVICE,
        exempt_users=(),
        fail_closed=True,
        is_local=lambda user_id: user_id.endswith(":a.org"),
        remove_member_soon=lambda room, user: None,
        journal=journal,  # type: ignore[arg-type]
    )


@pytest_twisted.ensureDeferred
async def test_a_refusal_is_noted_with_its_rule_room_person_and_attempt() -> None:
    journal = Journal()
    g = gate_with(journal)
    with pytest.raises(Denied):
        await g.user_may_join_room(OUTSIDER_LOCAL, ROOM, is_invited=False)
    with pytest.raises(Denied):
        await g.user_may_invite(OUTSIDER_LOCAL, MEMBER_LOCAL, ROOM)
    assert journal.noted == [
        {
            "kind": DecisionKind.ACCESS_REFUSED,
            "outcome": Outcome.REFUSED,
            "user_id": OUTSIDER_LOCAL,
            "actor_id": OUTSIDER_LOCAL,
            "room_id": ROOM,
            "care_team": "CareTeam/t",
            "reason": Reason.NOT_IN_CARE_TEAM.value,
            "detail": "join",
        },
        {
            "kind": DecisionKind.ACCESS_REFUSED,
            "outcome": Outcome.REFUSED,
            "user_id": MEMBER_LOCAL,
            "actor_id": OUTSIDER_LOCAL,
            "room_id": ROOM,
            "care_team": "CareTeam/t",
            "reason": Reason.INVITER_NOT_IN_CARE_TEAM.value,
            "detail": "invite",
        },
    ]


@pytest_twisted.ensureDeferred
async def test_what_is_allowed_is_not_noted_and_a_received_refusal_is() -> None:
    journal = Journal()
    g = gate_with(journal)
    await g.user_may_join_room(MEMBER_LOCAL, ROOM, is_invited=True)
    assert journal.noted == []
    await g.check_event_for_spam(member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "join"))
    assert [(n["user_id"], n["detail"], n["reason"]) for n in journal.noted] == [
        (OUTSIDER_REMOTE, "federated_join", Reason.NOT_IN_CARE_TEAM.value)
    ]


def bounded_journal(api: Api, clock: Clock) -> AuditJournal:
    return AuditJournal(
        api,  # type: ignore[arg-type]
        now_ms=clock,
        max_refusals_per_minute=3,
        is_local=lambda user: user.endswith(":a.org"),
    )


def refuse(journal: AuditJournal, user: str, room: str) -> None:
    journal.note(
        DecisionKind.ACCESS_REFUSED,
        Outcome.REFUSED,
        user_id=user,
        actor_id=user,
        room_id=room,
        reason="not_in_care_team",
        detail="join",
    )


@pytest_twisted.ensureDeferred
async def test_refusals_beyond_the_bound_leave_a_summary_row_and_never_hide_someone_elses(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = bounded_journal(api, clock)
    await journal.start()
    for i in range(10):  # an insider's cheap refusals, to hide what follows
        refuse(journal, "@spam:a.org", f"!r{i}:a.org")
    refuse(journal, "@spam:a.org", "!patient:a.org")  # the probe they wanted hidden
    for i in range(10):  # one user of a partner server uses up her share...
        refuse(journal, "@mallory:partner.org", f"!r{i}:a.org")
    refuse(journal, "@bob:partner.org", "!r0:a.org")  # ...and his is still journaled
    await api.run_calls()  # (the flushes, and the summary at the minute's end)
    rows = [r.decision for r in store.every_row(txn)]
    one_by_one = [(d.user_id, d.room_id) for d in rows if d.reason == "not_in_care_team"]
    assert one_by_one.count(("@bob:partner.org", "!r0:a.org")) == 1
    assert sum(1 for user, _ in one_by_one if user == "@spam:a.org") == 3
    assert sum(1 for user, _ in one_by_one if user == "@mallory:partner.org") == 3
    summaries = {d.user_id: d.detail for d in rows if d.reason == SUMMARY_REASON}
    assert summaries == {"@spam:a.org": "suppressed_8", "@mallory:partner.org": "suppressed_7"}
    assert journal.suppressed == 15


@pytest_twisted.ensureDeferred
async def test_remote_users_together_are_bounded_too_and_module_bans_of_them_count(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = bounded_journal(api, clock)
    await journal.start()
    for i in range(40):  # made-up users of servers minted at will
        refuse(journal, f"@bot{i}:evil{i}.org", "!r0:a.org")
        journal.note(DecisionKind.MEMBER_BANNED, Outcome.SUCCESS, user_id=f"@bot{i}:evil{i}.org")
    journal.note(DecisionKind.MEMBER_INVITED, Outcome.SUCCESS, user_id="@anna:a.org")
    refuse(journal, "@olga:a.org", "!r0:a.org")  # local users keep their own share
    await api.run_calls()
    rows = [r.decision for r in store.every_row(txn)]
    remote = [d for d in rows if d.user_id and ":evil" in d.user_id and d.reason != SUMMARY_REASON]
    assert len(remote) == 3 * 10  # REMOTE_FACTOR times the bound, refusals and bans together
    assert any(d.kind is DecisionKind.MEMBER_INVITED for d in rows)  # never bounded
    assert any(d.user_id == "@olga:a.org" for d in rows)
    assert (
        sum(int((d.detail or "_0").split("_")[1]) for d in rows if d.reason == SUMMARY_REASON) == 50
    )


@pytest_twisted.ensureDeferred
async def test_what_a_remote_server_put_in_an_event_cannot_stop_the_journal(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    refuse(journal, "@x\x00y:evil.org", "!r" + "z" * 10_000)
    await api.run_calls()
    (row,) = store.every_row(txn)
    assert row.user_id == "@x?y:evil.org"
    assert row.room_id is not None and len(row.room_id) == MAX_FIELD


@pytest_twisted.ensureDeferred
async def test_a_row_the_database_refuses_even_alone_is_dropped_and_the_rest_go_in(
    txn: sqlite3.Cursor,
) -> None:
    class Picky(Api):
        async def run_db_interaction(self, desc: str, func: Callable, *args: Any) -> Any:
            if args and any(d.user_id == "@bad:a.org" for d in args[0]):
                raise ValueError("refused")
            return await super().run_db_interaction(desc, func, *args)

    api, clock = Picky(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    for user in ("@a:a.org", "@bad:a.org", "@b:a.org"):
        refuse(journal, user, "!r:a.org")
    await api.run_calls()
    assert sorted(r.user_id or "" for r in store.every_row(txn)) == ["@a:a.org", "@b:a.org"]
    assert (journal.dropped, journal.unwritten) == (1, 0)


@pytest_twisted.ensureDeferred
async def test_a_received_membership_outside_the_known_ones_is_noted_as_a_code() -> None:
    journal = Journal()
    g = gate_with(journal)
    event = member_event(OUTSIDER_REMOTE, OUTSIDER_REMOTE, "join")
    event.content["membership"] = "join\x00<script>"
    await g.check_event_for_spam(event)
    assert [n["detail"] for n in journal.noted] == ["federated_membership"]


@pytest_twisted.ensureDeferred
async def test_a_lone_surrogate_from_a_request_is_replaced_not_stored(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = Api(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    refuse(journal, "@\ud800x:evil.example", "!r:a.org")
    await api.run_calls()
    (row,) = store.every_row(txn)
    assert row.user_id == "@?x:evil.example"


@pytest_twisted.ensureDeferred
async def test_rows_the_database_refuses_all_alike_while_it_answers_are_dropped(
    txn: sqlite3.Cursor,
) -> None:
    class Refusing(Api):
        async def run_db_interaction(self, desc: str, func: Callable, *args: Any) -> Any:
            if func is store.insert_decisions and any(d.user_id == "@bad:a.org" for d in args[0]):
                raise ValueError("refused")
            return await super().run_db_interaction(desc, func, *args)

    api, clock = Refusing(txn), Clock()
    journal = AuditJournal(api, now_ms=clock)  # type: ignore[arg-type]
    await journal.start()
    refuse(journal, "@bad:a.org", "!r1:a.org")
    refuse(journal, "@bad:a.org", "!r2:a.org")
    await api.run_calls()
    assert (journal.dropped, journal.unwritten) == (2, 0)
    refuse(journal, "@good:a.org", "!r1:a.org")  # the journal goes on
    await api.run_calls()
    assert [r.user_id for r in store.every_row(txn)] == ["@good:a.org"]
