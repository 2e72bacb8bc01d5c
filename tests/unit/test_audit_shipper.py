"""The audit shipper against an SQLite journal and a FHIR stand-in: batches of
``audit.batch_size`` as transactions of conditional creates, a refused entry set aside
(status only) while the rest go on, FHIR away → the rows wait with backoff, the persons
and patients resolved at ship time, pruning after retention, and the refusal bound."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator, Sequence
from typing import Any

import attr
import pytest
import pytest_twisted
from twisted.internet import defer

from synapse_fhir_module.audit import journal_store as store
from synapse_fhir_module.audit.decision import Decision, DecisionKind, Outcome
from synapse_fhir_module.audit.journal import REFUSAL_WINDOW_MS, AuditJournal
from synapse_fhir_module.audit.metrics import AUDIT_FAILED
from synapse_fhir_module.audit.shipper import (
    COUNTS_INTERVAL_MS,
    MAX_PERSONS_REMEMBERED,
    MAX_SET_ASIDE_PER_PASS,
    PERSON_MEMORY_MS,
    SHIP_GAP_MS,
    AuditShipper,
)
from synapse_fhir_module.config import AuditConfig
from synapse_fhir_module.fhir.conventions import AUDIT_ID_SYSTEM
from synapse_fhir_module.fhir.errors import FhirPermanentError, FhirTransientError
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from tests.unit.test_audit_journal import Api, Clock

SERVICE = "@fhir:a.org"
SECRET = "Mevrouw de Boer heeft pijn"


@pytest.fixture
def txn() -> Iterator[sqlite3.Cursor]:
    connection = sqlite3.connect(":memory:")
    cursor = connection.cursor()
    store.create_tables(cursor)
    yield cursor
    connection.close()


class ShipApi(Api):
    server_name = "a.org"

    def is_mine(self, user_id: str) -> bool:
        return user_id.endswith(":a.org")


@attr.s(auto_attribs=True)
class Record:
    user_id: str
    person: str | None


class Persons:
    def __init__(self, remembered: dict[str, str | None], in_fhir: dict[str, str]) -> None:
        self._remembered = remembered
        self._in_fhir = in_fhir
        self.asked: list[list[str]] = []

    def remembered(self, user_id: str) -> Record | None:
        if user_id not in self._remembered:
            return None
        return Record(user_id, self._remembered[user_id])

    async def ask(self, user_ids: Sequence[str]) -> list[Record]:
        self.asked.append(list(user_ids))
        return [Record(u, self._in_fhir.get(u)) for u in user_ids]


class Fhir:
    """Answers transactions as HAPI would; refuses entries for ``refused`` audit ids (one
    bad entry fails the whole transaction; ``refused_with`` a status per id, else 422), or
    everything with ``status``."""

    def __init__(self) -> None:
        self.bundles: list[dict[str, Any]] = []
        self.refused: set[str] = set()
        self.refused_with: dict[str, int] = {}
        self.status: int | None = None
        self.searches: list[tuple[str, Any]] = []

    async def transaction_json(self, bundle: dict[str, Any]) -> dict[str, Any]:
        self.bundles.append(bundle)
        if self.status is not None:
            error = FhirTransientError if self.status >= 500 else FhirPermanentError
            raise error("transaction failed", status=self.status, outcome=SECRET)
        ids = {audit_id_of(e) for e in bundle["entry"]}
        if ids & self.refused:
            status = min(self.refused_with.get(i, 422) for i in ids & self.refused)
            raise FhirPermanentError("transaction failed", status=status, outcome=SECRET)
        return {
            "resourceType": "Bundle",
            "entry": [{"response": {"status": "201 Created"}} for _ in bundle["entry"]],
        }

    async def search_json(self, resource_type: str, params: Any) -> list[dict[str, Any]]:
        self.searches.append((resource_type, params))
        return [{"resourceType": "CareTeam", "id": "12", "subject": {"reference": "Patient/5"}}]


def audit_id_of(entry: dict[str, Any]) -> str:
    return entry["request"]["ifNoneExist"].partition("|")[2]


def decision(at: int, **fields: Any) -> Decision:
    return Decision(
        kind=fields.pop("kind", DecisionKind.ACCESS_REFUSED),
        outcome=fields.pop("outcome", Outcome.REFUSED),
        recorded_ms=at,
        **fields,
    )


def shipper_with(
    txn: sqlite3.Cursor, fhir: Fhir, clock: Clock, persons: Persons | None = None, **config: Any
) -> AuditShipper:
    return AuditShipper(
        ShipApi(txn),  # type: ignore[arg-type]
        fhir,  # type: ignore[arg-type]
        AuditConfig(enabled=True, **config),
        service_user_id=SERVICE,
        persons=persons or Persons({}, {}),
        now_ms=clock,
    )


@pytest_twisted.ensureDeferred
async def test_rows_go_oldest_first_in_batches_of_conditional_creates(
    txn: sqlite3.Cursor,
) -> None:
    rows = [decision(i, user_id=f"@u{i}:a.org", reason="not_in_care_team") for i in range(5)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    shipper = shipper_with(txn, fhir, clock, batch_size=2)
    assert await shipper.ship() == 5
    assert [len(b["entry"]) for b in fhir.bundles] == [2, 2, 1]
    assert all(b["type"] == "transaction" for b in fhir.bundles)
    sent = [e for b in fhir.bundles for e in b["entry"]]
    assert [audit_id_of(e) for e in sent] == [r.audit_id for r in rows]
    assert all(
        e["request"]["ifNoneExist"] == f"_tag={AUDIT_ID_SYSTEM}|{audit_id_of(e)}" for e in sent
    )
    assert store.count_unshipped(txn) == (0, None)
    assert await shipper.ship() == 0  # nothing left: no transaction
    assert len(fhir.bundles) == 3


@pytest_twisted.ensureDeferred
async def test_an_entry_fhir_refuses_is_set_aside_with_its_status_and_the_rest_go(
    txn: sqlite3.Cursor,
) -> None:
    rows = [decision(i, user_id=f"@u{i}:a.org") for i in range(4)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    fhir.refused = {rows[2].audit_id}
    shipper = shipper_with(txn, fhir, clock)
    assert await shipper.ship() == 3
    assert store.count_unshipped(txn) == (0, None)
    assert store.count_refused(txn) == 1
    txn.execute(
        f"SELECT audit_id, failure, shipped_ms FROM {store.TABLE} WHERE refused_ms IS NOT NULL"
    )
    assert txn.fetchall() == [(rows[2].audit_id, "HTTP 422", None)]
    # FHIR's diagnostics (which can quote what was sent) are not kept.
    txn.execute(f"SELECT failure FROM {store.TABLE}")
    assert all(SECRET not in (f or "") for (f,) in txn.fetchall())
    assert (await shipper.counts()).refused == 1
    # Once the cause is fixed, an operator puts it back; it ships.
    fhir.refused = set()
    store.retry_refused(txn)
    assert await shipper.ship() == 1


@pytest_twisted.ensureDeferred
async def test_an_entry_fhir_refuses_is_checked_then_and_its_failure_names_the_field(
    txn: sqlite3.Cursor, monkeypatch: pytest.MonkeyPatch
) -> None:
    import synapse_fhir_module.audit.shipper as shipper_module

    broken = decision(1, user_id="@u:a.org")
    store.insert_decisions(txn, [broken])
    real = shipper_module.audit_event

    def without_recorded(*args: Any, **kwargs: Any) -> dict[str, Any]:
        event = dict(real(*args, **kwargs))
        del event["recorded"]  # (a mapping bug: R4 requires it)
        return event

    monkeypatch.setattr(shipper_module, "audit_event", without_recorded)
    fhir, clock = Fhir(), Clock()
    fhir.refused = {broken.audit_id}
    assert await shipper_with(txn, fhir, clock).ship() == 0
    txn.execute(f"SELECT failure FROM {store.TABLE}")
    assert txn.fetchall() == [
        ("HTTP 422; not valid FHIR: recorded: model_field_validation.missing",)
    ]


@pytest.mark.parametrize("status", [503, 401, None])
@pytest_twisted.ensureDeferred
async def test_fhir_away_or_refusing_the_module_keeps_the_rows_and_backs_off(
    txn: sqlite3.Cursor, status: int | None
) -> None:
    rows = [decision(i, user_id="@u:a.org", detail=f"try{i}") for i in range(3)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    fhir.status = status or 503
    if status is None:

        async def unreachable(bundle: dict[str, Any]) -> dict[str, Any]:
            raise FhirTransientError("FHIR unreachable")

        fhir.transaction_json = unreachable  # type: ignore[method-assign]
    shipper = shipper_with(txn, fhir, clock)
    assert await shipper.ship() == 0
    assert store.count_unshipped(txn)[0] == 3
    row = store.unshipped(txn, 1)[0]
    assert row.attempts == 1
    assert row.failure == (f"HTTP {status}" if status else "FHIR unreachable")
    tries = len(fhir.bundles)
    assert await shipper.ship() == 0  # within the backoff: not even tried
    assert len(fhir.bundles) == tries
    fhir = Fhir()
    shipper._fhir = fhir  # type: ignore[assignment]
    clock.now += 60_000  # past the longest first backoff (1 s, jittered)
    assert await shipper.ship() == 3
    assert store.count_unshipped(txn) == (0, None)
    assert store.count_refused(txn) == 0


@pytest_twisted.ensureDeferred
async def test_agents_and_patients_are_resolved_when_shipped(txn: sqlite3.Cursor) -> None:
    store.insert_decisions(
        txn,
        [
            decision(
                1,
                kind=DecisionKind.MEMBER_INVITED,
                outcome=Outcome.SUCCESS,
                user_id="@anna:a.org",
                actor_id=SERVICE,
                care_team="CareTeam/12",
            ),
            decision(2, user_id="@olga:a.org", care_team="CareTeam/12"),
            decision(3, user_id="@mallory:b.org"),
        ],
    )
    fhir, clock = Fhir(), Clock()
    persons = Persons({"@anna:a.org": "Practitioner/7"}, {"@olga:a.org": "RelatedPerson/3"})
    shipper = shipper_with(txn, fhir, clock, persons)
    assert await shipper.ship() == 3
    # Anna was remembered; Mallory is another server's user: never looked up.
    assert persons.asked == [["@olga:a.org"]]
    assert fhir.searches == [("CareTeam", [("_id", "12"), ("_elements", "subject")])]
    invited, refused, remote = (e["resource"] for e in fhir.bundles[0]["entry"])
    assert [a["who"].get("reference") for a in invited["agent"]] == [None, "Practitioner/7"]
    assert invited["agent"][0]["who"]["type"] == "Device"
    assert refused["agent"][0]["who"]["reference"] == "RelatedPerson/3"
    assert remote["agent"][0]["who"].get("reference") is None
    assert invited["entity"][0]["what"] == {"reference": "Patient/5", "type": "Patient"}
    # The team's subject is remembered: the next batch does not ask again.
    store.insert_decisions(txn, [decision(4, user_id="@olga:a.org", care_team="CareTeam/12")])
    await shipper.ship()
    assert len(fhir.searches) == 1


@pytest_twisted.ensureDeferred
async def test_pruning_keeps_what_fhir_lacks_unless_audit_is_off(txn: sqlite3.Cursor) -> None:
    day = 86_400_000
    old_shipped, old_waiting, old_refused, recent = (decision(i * 10) for i in range(4))
    recent = attr.evolve(recent, recorded_ms=40 * day)
    store.insert_decisions(txn, [old_shipped, old_waiting, old_refused, recent])
    store.mark_shipped(txn, [old_shipped.audit_id], 5)
    store.mark_refused(txn, old_refused.audit_id, "HTTP 422", 5)
    clock = Clock()
    clock.now = 41 * day
    shipper = shipper_with(txn, Fhir(), clock, retention=30 * 86_400.0)
    # (A row set aside stays until it is retried and shipped.)
    assert await shipper.prune() == 1
    txn.execute(f"SELECT audit_id FROM {store.TABLE} ORDER BY recorded_ms")
    assert [r[0] for r in txn.fetchall()] == [
        old_waiting.audit_id,
        old_refused.audit_id,
        recent.audit_id,
    ]
    off = AuditShipper(
        ShipApi(txn),  # type: ignore[arg-type]
        Fhir(),  # type: ignore[arg-type]
        AuditConfig(enabled=False, retention=30 * 86_400.0),
        service_user_id=SERVICE,
        persons=Persons({}, {}),
        now_ms=clock,
    )
    assert await off.prune() == 2
    txn.execute(f"SELECT audit_id FROM {store.TABLE}")
    assert [r[0] for r in txn.fetchall()] == [recent.audit_id]


@pytest_twisted.ensureDeferred
async def test_a_wake_during_a_pass_runs_another_and_wakes_do_not_pile_up(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = ShipApi(txn), Clock()
    fhir = Fhir()
    shipper = AuditShipper(
        api,  # type: ignore[arg-type]
        fhir,  # type: ignore[arg-type]
        AuditConfig(enabled=True),
        service_user_id=SERVICE,
        persons=Persons({}, {}),
        now_ms=clock,
    )
    store.insert_decisions(txn, [decision(1)])
    shipper.wake()
    shipper.wake()
    assert [m for m, _ in api.calls] == [0]
    await api.run_calls()
    assert store.count_unshipped(txn) == (0, None)


@pytest_twisted.ensureDeferred
async def test_decisions_arriving_one_by_one_are_shipped_together_at_most_once_a_gap(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = ShipApi(txn), Clock()
    fhir = Fhir()
    shipper = AuditShipper(
        api,  # type: ignore[arg-type]
        fhir,  # type: ignore[arg-type]
        AuditConfig(enabled=True),
        service_user_id=SERVICE,
        persons=Persons({}, {}),
        now_ms=clock,
    )
    store.insert_decisions(txn, [decision(1)])
    shipper.wake()
    assert [m for m, _ in api.calls] == [0]  # the first at once
    await api.run_calls()
    for i in range(4):  # a refusal every 200 ms
        clock.now += 200
        store.insert_decisions(txn, [decision(10 + i)])
        shipper.wake()
    # One pass, SHIP_GAP_MS after the last one began, for all four.
    assert [m for m, _ in api.calls] == [SHIP_GAP_MS - 200]
    await api.run_calls()
    assert store.count_unshipped(txn) == (0, None)
    assert len(fhir.bundles) == 2


def test_refusal_spam_is_bounded_per_user_and_per_remote_server() -> None:
    clock = Clock()
    journal = AuditJournal(
        ShipApi(None),  # type: ignore[arg-type]
        now_ms=clock,
        max_refusals_per_minute=3,
        is_local=lambda user: user.endswith(":a.org"),
    )

    def refuse(user: str, room: str) -> None:
        journal.note(
            DecisionKind.ACCESS_REFUSED,
            Outcome.REFUSED,
            user_id=user,
            actor_id=user,
            room_id=room,
            reason="not_in_care_team",
        )

    for i in range(10):
        refuse("@spam:a.org", f"!r{i}:a.org")  # different rooms: not the same decision
    refuse("@olga:a.org", "!r0:a.org")  # someone else is still heard
    for i in range(40):
        refuse(f"@bot{i}:evil.org", "!r0:a.org")  # made-up users of one server
    journal.note(DecisionKind.MEMBER_INVITED, Outcome.SUCCESS, user_id="@anna:a.org")
    noted = [(d.kind, d.user_id) for d in journal._pending]
    assert noted.count((DecisionKind.ACCESS_REFUSED, "@spam:a.org")) == 3
    assert (DecisionKind.ACCESS_REFUSED, "@olga:a.org") in noted
    assert sum(1 for _, u in noted if u and u.endswith(":evil.org")) == 30  # ten times three
    assert (DecisionKind.MEMBER_INVITED, "@anna:a.org") in noted  # changes are never bounded
    assert journal.suppressed == 7 + 10
    clock.now += REFUSAL_WINDOW_MS  # a new minute
    refuse("@spam:a.org", "!again:a.org")
    assert journal._pending[-1].room_id == "!again:a.org"


# -- persons: remote users never looked up, the shared directory never grown ------------


class DirectoryFhir:
    """FHIR for a real PersonDirectory: knows nobody; records what was searched."""

    def __init__(self) -> None:
        self.searched: list[str] = []

    async def search_json(self, resource_type: str, params: Any) -> list[dict[str, Any]]:
        self.searched.append(repr(params))
        return []


@pytest_twisted.ensureDeferred
async def test_remote_users_are_never_looked_up_and_unknown_local_ones_do_not_grow_the_directory(
    txn: sqlite3.Cursor,
) -> None:
    directory_fhir = DirectoryFhir()
    directory = PersonDirectory(directory_fhir)  # type: ignore[arg-type]
    flood = MAX_PERSONS_REMEMBERED + 500
    store.insert_decisions(
        txn,
        [decision(i, user_id=f"@new{i}:a.org", detail=f"d{i}") for i in range(flood)]
        + [decision(flood + i, user_id=f"@bot{i}:evil.org") for i in range(300)],
    )
    fhir, clock = Fhir(), Clock()
    shipper = AuditShipper(
        ShipApi(txn),  # type: ignore[arg-type]
        fhir,  # type: ignore[arg-type]
        AuditConfig(enabled=True, batch_size=1000),
        service_user_id=SERVICE,
        persons=directory,
        now_ms=clock,
    )
    assert await shipper.ship() == flood + 300
    # Every local user was asked about (FHIR knows none of them)...
    assert any("@new0:a.org" in s for s in directory_fhir.searched)
    # ...no remote one ever was, and the directory account validity re-asks about
    # remembers none of them; the shipper's own memory is bounded.
    assert not any("evil.org" in s for s in directory_fhir.searched)
    assert directory.remembered_users() == []
    assert len(shipper._persons_seen) == MAX_PERSONS_REMEMBERED
    # The remote users' AuditEvents name them by Matrix id only.
    remote = [
        e["resource"]
        for b in fhir.bundles
        for e in b["entry"]
        if e["resource"]["agent"][0].get("altId", "").endswith(":evil.org")
    ]
    assert len(remote) == 300
    assert all("reference" not in e["agent"][0]["who"] for e in remote)


@pytest_twisted.ensureDeferred
async def test_a_local_user_asked_about_is_remembered_by_the_shipper_for_a_while(
    txn: sqlite3.Cursor,
) -> None:
    persons = Persons({}, {"@olga:a.org": "Practitioner/3"})
    fhir, clock = Fhir(), Clock()
    shipper = shipper_with(txn, fhir, clock, persons)
    store.insert_decisions(txn, [decision(1, user_id="@olga:a.org")])
    await shipper.ship()
    clock.now += SHIP_GAP_MS
    store.insert_decisions(txn, [decision(2, user_id="@olga:a.org")])
    await shipper.ship()
    assert persons.asked == [["@olga:a.org"]]  # the second batch did not ask
    assert all(
        e["resource"]["agent"][0]["who"]["reference"] == "Practitioner/3"
        for b in fhir.bundles
        for e in b["entry"]
    )
    clock.now += PERSON_MEMORY_MS
    store.insert_decisions(txn, [decision(3, user_id="@olga:a.org")])
    await shipper.ship()
    assert persons.asked == [["@olga:a.org"], ["@olga:a.org"]]  # forgotten: asked again


# -- FHIR refusing every entry alike is FHIR unable, not bad entries -------------------


def failures(txn: sqlite3.Cursor) -> list[tuple[str | None, int]]:
    return [(r.failure, r.attempts) for r in store.unshipped(txn, 1000)]


@pytest.mark.parametrize("status", [400, 404, 412, 413])
@pytest_twisted.ensureDeferred
async def test_fhir_refusing_every_entry_alike_sets_one_aside_per_pass_and_the_rows_wait(
    txn: sqlite3.Cursor, status: int
) -> None:
    rows = [decision(i, user_id="@u:a.org", detail=f"try{i}") for i in range(8)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    # The first four go; from the fifth on FHIR refuses each (a gateway's 404, no
    # conditional create on _tag, ...).
    fhir.refused = {r.audit_id for r in rows[4:]}
    fhir.refused_with = {r.audit_id: status for r in rows[4:]}
    shipper = shipper_with(txn, fhir, clock, batch_size=8)
    unable = AUDIT_FAILED.labels(kind="unable")._value.get()
    assert await shipper.ship() == 4  # what FHIR took before is shipped
    # The second refusal alike said it was FHIR: the first is set aside all the same (the
    # queue moves by one a pass), the rest waits.
    assert store.count_refused(txn) == 1
    assert failures(txn) == [(f"HTTP {status} (every entry refused)", 1)] * 3
    assert AUDIT_FAILED.labels(kind="unable")._value.get() == unable + 3
    tries = len(fhir.bundles)
    assert await shipper.ship() == 0  # backing off: not even tried
    assert len(fhir.bundles) == tries
    # Still refused after the backoff: FHIR again; one more set aside.
    clock.now += 60_000
    assert await shipper.ship() == 0
    assert store.count_refused(txn) == 2
    assert [a for _, a in failures(txn)] == [2] * 2
    # FHIR fixed: everything waiting goes, and an admin's retry brings the rest.
    fhir.refused = set()
    clock.now += 120_000
    assert await shipper.ship() == 2
    assert await shipper.retry_refused() == 2
    assert await shipper.ship() == 2
    assert store.count_unshipped(txn) == (0, None)
    assert store.count_refused(txn) == 0


@pytest_twisted.ensureDeferred
async def test_entries_refused_alike_at_the_head_never_hold_up_the_queue(
    txn: sqlite3.Cursor,
) -> None:
    # Two (or more) entries FHIR itself refuses alike (e.g. they name a Practitioner a FHIR
    # writer deleted) at the head of the queue: each pass sets one aside at least.
    rows = [decision(i, user_id="@u:a.org", detail=f"try{i}") for i in range(5)]
    fresh = decision(10, user_id="@v:a.org")
    store.insert_decisions(txn, [*rows, fresh])
    fhir, clock = Fhir(), Clock()
    fhir.refused = {r.audit_id for r in rows}
    shipper = shipper_with(txn, fhir, clock, batch_size=1)
    for _ in range(5):
        await shipper.ship()
        clock.now += 120_000
    assert store.count_refused(txn) == 5
    assert store.count_unshipped(txn) == (0, None)  # the fresh one went too
    assert fresh.audit_id in {audit_id_of(e) for b in fhir.bundles for e in b["entry"]}


@pytest_twisted.ensureDeferred
async def test_more_refusals_in_a_pass_than_the_bound_is_fhir_unable(
    txn: sqlite3.Cursor,
) -> None:
    rows = [decision(i, user_id="@u:a.org", detail=f"try{i}") for i in range(6)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    fhir.refused = {r.audit_id for r in rows}
    statuses = [400, 404, 409, 410, 412, 422]  # all different
    fhir.refused_with = {r.audit_id: s for r, s in zip(rows, statuses, strict=True)}
    shipper = shipper_with(txn, fhir, clock, batch_size=1)
    assert await shipper.ship() == 0
    # The bound's worth, and the one that showed FHIR unable (each pass moves by one).
    assert store.count_refused(txn) == MAX_SET_ASIDE_PER_PASS + 1
    assert store.count_unshipped(txn)[0] == 6 - MAX_SET_ASIDE_PER_PASS - 1


@pytest_twisted.ensureDeferred
async def test_refused_rows_retried_go_back_in_the_queue_and_ship(txn: sqlite3.Cursor) -> None:
    rows = [decision(i, user_id="@u:a.org", detail=f"try{i}") for i in range(3)]
    store.insert_decisions(txn, rows)
    fhir, clock = Fhir(), Clock()
    fhir.refused = {rows[1].audit_id}
    shipper = shipper_with(txn, fhir, clock)
    assert await shipper.ship() == 2
    assert (await shipper.counts()).refused == 1
    fhir.refused = set()
    assert await shipper.retry_refused() == 1
    # The figures are counted afresh after a retry (not the cached ones).
    assert (await shipper.counts()).refused == 0
    assert (await shipper.counts()).pending == 1
    assert await shipper.ship() == 1
    assert await shipper.retry_refused() == 0


def test_the_refused_rows_are_counted_from_their_own_index(txn: sqlite3.Cursor) -> None:
    txn.execute(
        f"EXPLAIN QUERY PLAN SELECT COUNT(*) FROM {store.TABLE} WHERE refused_ms IS NOT NULL"
    )
    assert any(f"{store.TABLE}_refused" in str(step) for step in txn.fetchall())


# -- /health's figures: counted at most every COUNTS_INTERVAL_MS ------------------------


class CountingApi(ShipApi):
    """Counts the database round trips; holds the counts until ``gate`` fires."""

    def __init__(self, txn: sqlite3.Cursor) -> None:
        super().__init__(txn)
        self.counted = 0
        self.gate: defer.Deferred | None = None

    async def run_db_interaction(self, desc: str, func: Any, *args: Any) -> Any:
        if desc == "fhir_audit_count":
            self.counted += 1
            if self.gate is not None:
                await self.gate
        return await super().run_db_interaction(desc, func, *args)


@pytest_twisted.ensureDeferred
async def test_health_counts_are_cached_and_requests_meanwhile_share_one_count(
    txn: sqlite3.Cursor,
) -> None:
    api, clock = CountingApi(txn), Clock()
    shipper = AuditShipper(
        api,  # type: ignore[arg-type]
        Fhir(),  # type: ignore[arg-type]
        AuditConfig(enabled=True),
        service_user_id=SERVICE,
        persons=Persons({}, {}),
        now_ms=clock,
    )
    store.insert_decisions(txn, [decision(500)])
    first = await shipper.counts()
    assert (first.pending, api.counted) == (1, 1)
    store.insert_decisions(txn, [decision(600)])
    clock.now += COUNTS_INTERVAL_MS - 1
    later = await shipper.counts()
    assert (later.pending, api.counted) == (1, 1)  # cached...
    assert later.oldest_age_seconds == first.oldest_age_seconds + (COUNTS_INTERVAL_MS - 1) / 1000
    clock.now += 1
    assert (await shipper.counts()).pending == 2  # ...for COUNTS_INTERVAL_MS
    assert api.counted == 2
    # Requests arriving while a count runs wait for it: one count for all.
    clock.now += COUNTS_INTERVAL_MS
    api.gate = defer.Deferred()
    waiting = [defer.ensureDeferred(shipper.counts()) for _ in range(5)]
    assert not any(w.called for w in waiting)
    api.gate.callback(None)
    answers = [await w for w in waiting]
    assert {a.pending for a in answers} == {2}
    assert api.counted == 3
