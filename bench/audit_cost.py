"""The audit trail's cost on the send path, and its lag: ``audit.enabled`` off vs on while
access decisions are made at a steady rate (suite row 13).

    python -m bench.audit_cost [--smoke] [--messages 250] [--rate 5] [--rounds 4]

(Default sizes: under 4 minutes on 2 cores, starting HAPI included.)

Two Synapse subprocesses side by side, same version, same module config but for one key,
both talking to the same HAPI (SQLite: the lag is read from the journal table in the
measured Synapse's database file):

- audit off (the baseline of every comparison): ``audit.enabled: false`` — the journal is
  still written (it always is: the operator console reads it), nothing goes to FHIR;
- audit on (measured): ``audit.enabled: true``, every journal row shipped to FHIR as an
  AuditEvent, in transactions of conditional creates, by the same process.

Both arms: ``audit.max_refusals_per_minute: 10000`` (the flood bound would otherwise drop
most of the refusals made here: every decision is journaled, and in the measured arm
shipped), recording on as by default. Each has the room shape of row 1: a space bound to a
seeded CareTeam, a room the space lists, the GP joined; plus ``OUTSIDERS`` accounts FHIR
does not know and ``ROOMS`` more rooms in the space.

Measured per round, the arms taking turns in an order that rotates every round; during an
arm's turn a thread makes decisions in that arm at ``--rate`` a second, open loop (each at
its due time, whatever the last one took): in turn an outsider's refused join and the
GP's refused invite of an outsider, spread over the outsiders and rooms so that no two
are the same decision within the journal's 2 s (it would count them once):

- sequential throughput: the GP sends ``--messages`` text messages one after the other
  (each after the previous answered), the way row 1 does; messages / wall time; each
  send's duration, p50 and p99 (nearest rank) per round;
- audit lag (measured arm): for each decision of the round, from the decision
  (``recorded_ms``: when the module refused) to FHIR having its AuditEvent (``shipped_ms``:
  when FHIR answered the transaction that created it; an upper bound on when it became
  readable), p50 and p99 per round.

Before each turn both arms are quiet (outbox empty, and in the measured arm nothing left to
ship). A row's samples are one value per round; the table shows their median, min and max.
A warm-up round (smaller) comes first and is not counted. At the end every decision of the
measured arm must be in HAPI exactly once (counted by its audit-id tag), and none of the
baseline's.
"""

from __future__ import annotations

import argparse
import sqlite3
import threading
import time
from dataclasses import dataclass, field
from functools import partial

import requests

from bench._common import (
    NO_CACHE,
    CareRoom,
    Row,
    Stack,
    Target,
    add_stack_arguments,
    care_room,
    percentile,
    report,
    stack,
    wait_outbox_empty,
)
from bench.send_throughput import send_sequentially
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_room_in_space
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.audit import journal_store
from synapse_fhir_module.fhir.conventions import AUDIT_ID_SYSTEM

NAME = "audit_cost"
OFF, ON = "audit off", "audit on"
OUTSIDERS = 4
MIN_DECISIONS = 4  # in a turn, however short
ROOMS = 4  # besides the GP's room: the outsiders' refused joins go to these too


@dataclass
class Arm:
    room: CareRoom
    rooms: list[str]  # bound rooms the decisions are about
    outsiders: list[MatrixUser]
    inviter: MatrixUser  # the GP, on a session of the decision thread's own
    decisions: int = 0
    audit_ids: list[str] = field(default_factory=list)


def set_up_arm(room: CareRoom) -> Arm:
    server, service = room.server, room.service
    assert service is not None
    rooms = [room.room_id, *(create_room_in_space(service, room.space_id) for _ in range(ROOMS))]
    outsiders = [
        register_user(server, room.network.localpart(f"outsider{i}")) for i in range(OUTSIDERS)
    ]
    inviter = MatrixUser(server, room.sender.user_id, room.sender.access_token)
    return Arm(room, rooms, outsiders, inviter)


def decide(arm: Arm, n: int) -> None:
    """Decision ``n``: a refused join or a refused invite (each must be refused)."""
    outsider = arm.outsiders[n % len(arm.outsiders)]
    room = arm.rooms[(n // len(arm.outsiders)) % len(arm.rooms)]
    try:
        if n % 2:
            arm.inviter.invite(room, outsider.user_id)
        else:
            outsider.join(room)
    except MatrixError as e:
        if e.status != 403:
            raise
    else:
        raise AssertionError(f"decision {n} was not a refusal")
    arm.decisions += 1


class Decisions:
    """Makes decisions in ``arm`` at ``rate`` a second until stopped, open loop."""

    def __init__(self, arm: Arm, rate: float, first: int) -> None:
        self._arm = arm
        self._rate = rate
        self._first = first
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="decisions", daemon=True)
        self.made = 0

    def __enter__(self) -> Decisions:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._error is not None:
            raise self._error

    def _run(self) -> None:
        started = time.perf_counter()
        try:
            while not self._stop.is_set():
                due = started + self.made / self._rate
                # Pacing (the rate is the load), not a wait for a result.
                if self._stop.wait(max(0.0, due - time.perf_counter())):
                    return
                decide(self._arm, self._first + self.made)
                self.made += 1
        except BaseException as e:  # (raised in the main thread on exit)
            self._error = e


def journal_rows(server: SynapseServer, since_ms: int) -> list[tuple[str, int, int | None]]:
    """(audit_id, recorded_ms, shipped_ms) of the refusals journaled since ``since_ms``."""
    connection = sqlite3.connect(f"file:{server.workdir / 'homeserver.db'}?mode=ro", uri=True)
    try:
        cursor = connection.cursor()
        cursor.execute(
            f"SELECT audit_id, recorded_ms, shipped_ms FROM {journal_store.TABLE}"
            " WHERE recorded_ms >= ? AND kind = 'access_refused' ORDER BY recorded_ms",
            (since_ms,),
        )
        return [(str(a), int(r), None if s is None else int(s)) for a, r, s in cursor.fetchall()]
    finally:
        connection.close()


def journaled_at_least(server: SynapseServer, since_ms: int, count: int) -> bool:
    return len(journal_rows(server, since_ms)) >= count


def audit_pending(server: SynapseServer) -> int:
    """Rows the measured Synapse has not shipped yet, from its database (``/health``'s
    figure is up to 5 s old: it is cached)."""
    connection = sqlite3.connect(f"file:{server.workdir / 'homeserver.db'}?mode=ro", uri=True)
    try:
        pending, _ = journal_store.count_unshipped(connection.cursor())
        return pending
    finally:
        connection.close()


def wait_quiet(arm: Arm, *, audited: bool) -> None:
    wait_outbox_empty(arm.room.server)
    if audited:
        wait_until(
            lambda: audit_pending(arm.room.server) == 0,
            timeout=120,
            what="nothing left to ship",
            interval=0.1,
        )


def audit_events_of(fhir_url: str, audit_id: str) -> int:
    response = requests.get(
        f"{fhir_url}/AuditEvent",
        params={"_tag": f"{AUDIT_ID_SYSTEM}|{audit_id}", "_summary": "count"},
        headers=NO_CACHE,
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["total"])


def run(the_stack: Stack, *, messages: int, rate: float, rounds: int) -> None:
    arms: dict[str, Arm] = {}
    for i, (name, on) in enumerate(((OFF, False), (ON, True))):
        config = module_config(
            the_stack.fhir_url,
            audit={"enabled": on, "max_refusals_per_minute": 10_000, "poll_interval": "1s"},
        )
        server = the_stack.start_synapse(f"synapse-{i}", config)
        arms[name] = set_up_arm(care_room(server, the_stack.fhir_url, module=True))

    names = list(arms)
    throughput: dict[str, list[float]] = {name: [] for name in names}
    send_p50: dict[str, list[float]] = {name: [] for name in names}
    send_p99: dict[str, list[float]] = {name: [] for name in names}
    decision_rate: dict[str, list[float]] = {name: [] for name in names}
    lag_p50: list[float] = []
    lag_p99: list[float] = []
    lags_pooled: list[float] = []
    warmup = max(10, messages // 5)
    sent = 0
    clock = time.monotonic()
    for r in range(-1, rounds):  # round -1 warms up
        order = names[r % len(names) :] + names[: r % len(names)]
        counted = r >= 0
        for name in order:
            arm = arms[name]
            for other_name, other in arms.items():
                wait_quiet(other, audited=other_name == ON)
            count = messages if counted else warmup
            since_ms = int(time.time() * 1000)
            turn = time.perf_counter()
            with Decisions(arm, rate, arm.decisions) as decisions:
                throughput_now, durations = send_sequentially(arm.room, count, sent)
                # (A short turn — the smoke run's — still makes a few decisions to time.)
                wait_until(
                    lambda: decisions.made >= MIN_DECISIONS,
                    timeout=60,
                    what=f"{MIN_DECISIONS} decisions made",
                    interval=0.05,
                )
            made = decisions.made
            decided_for = time.perf_counter() - turn  # (the sends' time, not the waits after)
            sent += count
            # The journal writes what it noted within 200 ms; then nothing may be left.
            wait_until(
                partial(journaled_at_least, arm.room.server, since_ms, made),
                timeout=60,
                what=f"{made} decisions journaled",
                interval=0.05,
            )
            wait_quiet(arm, audited=name == ON)
            if not counted:
                continue
            throughput[name].append(throughput_now)
            send_p50[name].append(percentile(durations, 50) * 1000)
            send_p99[name].append(percentile(durations, 99) * 1000)
            decision_rate[name].append(made / decided_for)
            journaled = journal_rows(arm.room.server, since_ms)
            arm.audit_ids.extend(a for a, _, _ in journaled)
            if name == ON:
                lags = [(shipped - recorded) for _, recorded, shipped in journaled if shipped]
                if len(lags) != len(journaled):
                    raise AssertionError(f"{len(journaled) - len(lags)} decisions not shipped")
                lag_p50.append(percentile(lags, 50))
                lag_p99.append(percentile(lags, 99))
                lags_pooled.extend(lags)
    seconds = time.monotonic() - clock

    # Correctness: each decision of the measured arm in HAPI exactly once, none of the other.
    for audit_id in arms[ON].audit_ids:
        found = audit_events_of(the_stack.fhir_url, audit_id)
        if found != 1:
            raise AssertionError(f"{found} AuditEvents for the decision {audit_id}")
    for audit_id in arms[OFF].audit_ids[:50]:
        if audit_events_of(the_stack.fhir_url, audit_id):
            raise AssertionError("a decision of the audit-off arm reached FHIR")

    def per_arm(
        measure: str,
        unit: str,
        samples: dict[str, list[float]],
        target: Target | None = None,
        note: str = "",
    ) -> list[Row]:
        baseline = Row(f"{measure}, {OFF}", unit, samples[OFF])
        on = Row(f"{measure}, {ON}", unit, samples[ON], baseline=baseline, target=target)
        on.note = note
        return [baseline, on]

    rows = [
        *per_arm(
            "sequential throughput",
            "msg/s",
            throughput,
            Target(">=", 0.97, of_ratio=True),
            f"while {rate:g} refusals a second are decided in the same Synapse; every "
            f"decision of the measured arm found in HAPI once ({len(arms[ON].audit_ids)})",
        ),
        *per_arm("send latency p50", "ms", send_p50),
        *per_arm("send latency p99", "ms", send_p99),
        *per_arm("decisions made during the sends", "1/s", decision_rate),
        Row(
            "audit lag, decision → AuditEvent in FHIR, p50",
            "ms",
            lag_p50,
            note="journal recorded_ms → shipped_ms (FHIR answered the transaction); includes "
            "the journal's 200 ms batching",
        ),
        Row("audit lag, decision → AuditEvent in FHIR, p99", "ms", lag_p99),
    ]
    report(
        NAME,
        f"Audit off vs on, {rounds} rounds: {messages} sequential messages per arm while "
        f"{rate:g} decisions a second are made",
        rows,
        the_stack=the_stack,
        parameters={
            "messages_per_round": messages,
            "decisions_per_second": rate,
            "rounds": rounds,
            "warmup_messages": warmup,
            "outsiders": OUTSIDERS,
            "rooms": ROOMS + 1,
            "audit": {"max_refusals_per_minute": 10_000, "poll_interval": "1s"},
            "decisions_journaled": {name: len(arm.audit_ids) for name, arm in arms.items()},
            "measured_seconds": round(seconds, 1),
        },
        details={
            "audit_lag_ms_pooled": {f"p{q}": percentile(lags_pooled, q) for q in (50, 90, 99)}
            | {"max": max(lags_pooled), "n": len(lags_pooled)},
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument(
        "--messages", type=int, default=250, help="sequential messages per arm and round"
    )
    parser.add_argument("--rate", type=float, default=5.0, help="decisions a second")
    parser.add_argument("--rounds", type=int, default=4)
    args = parser.parse_args()
    if args.database != "sqlite":
        parser.error("the audit lag is read from the journal in Synapse's SQLite file")
    if args.smoke:
        args.messages, args.rounds = 10, 1
    with stack(NAME, args) as the_stack:
        run(the_stack, messages=args.messages, rate=args.rate, rounds=args.rounds)


if __name__ == "__main__":
    main()
