"""Unread markers as FHIR Tasks: what ``communication.unread_tasks: true`` costs the
sending side, and how fast a member's Task follows a message and a read marker (suite
row 11).

    python -m bench.unread_tasks [--smoke] [--messages 250] [--lags 6] [--rounds 6]

(Default sizes: under 5 minutes on 2 cores, starting HAPI included.)

Two Synapse subprocesses side by side, same version, same module config but for one key,
both talking to the same HAPI:

- unread Tasks off (the baseline of every comparison): ``communication.unread_tasks:
  false``, messages recorded as Communications as usual;
- unread Tasks on (measured): ``communication.unread_tasks: true``.

Each has the room shape of row 1 (``bench.send_throughput``): a space bound to a seeded
CareTeam, a room the space lists (both made by the module's service user), and five members
of the team joined: the GP, the nurse, the daughter, the patient and the pharmacist. The
GP's first message, not timed, opens the room's thread: the module creates its
CommunicationRequest and, the service user being in the room, binds the room to it in room
state (Tasks exist only for rooms bound to a thread). Before any timing the bench checks
that binding in both rooms and, in the measured one, waits for the nurse's Task.

Measured per round, the arms taking turns in an order that rotates every round:

- sequential throughput: the GP sends ``--messages`` text messages one after the other
  (each after the previous answered); messages / wall time; and each send's duration, its
  p50 and p99 (nearest rank) per round. Before each arm's turn both rooms are quiet: their
  outboxes empty and, in the measured arm, the Tasks written for the last message (so
  neither arm's background work lands on the other's turn). The measured arm's Tasks are
  written while it sends, every 2 s, as they would be;
- Synapse's CPU time per sequential message (user + system, from /proc), from the first
  send until the arm is quiet again (the measured arm: its Tasks written) — what the key
  costs in all, less sensitive than throughput to whatever else the machine runs;
- the measured arm only, ``--lags`` times: the GP sends a message, the nurse marks it read
  (``POST /_matrix/client/v3/rooms/{room}/read_markers`` with ``m.fully_read`` and
  ``m.read`` on it, as Element does), each after a pause drawn uniformly from [0, 2 s)
  (the module writes Tasks every 2 s, and the step before ends just after such a write:
  without the pause every message and marker would arrive at the same point of the
  module's cycle). Polling HAPI, one request at a time, at most every 20 ms:

  - Task lag: from the send request starting until the poll that first answered with the
    nurse's Task (read by its id, ``unread_mapping.task_id``) focused on the message's
    Communication (found by its event-id identifier), status ``requested``;
  - message → Communication readable, the same messages (the poll that first found it):
    the baseline of the Task lag, i.e. what the Task adds to the recording;
  - read-marker lag: from the ``read_markers`` request starting until the poll that first
    answered with the nurse's Task ``completed``, focus unchanged.

  Each overstates the true lag by at most one poll cycle (the resolution, reported). Per
  round their p50 and p99 (nearest rank: with 6 samples a round, p99 is the round's
  largest); the details also hold the percentiles pooled over every round and HAPI's
  ``meta.lastUpdated`` of each Task write (stamped when HAPI starts the write: a lower
  bound).

A row's samples are one value per round; the table shows their median, min and max. A
warm-up round (smaller) comes first and is not counted. At the end every message of both
arms must be in HAPI once, the measured thread must hold one Task per member of the team
(five) and the baseline's none.
"""

from __future__ import annotations

import argparse
import random
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, fields
from functools import partial
from typing import Any, TypeVar
from urllib.parse import quote

import requests

from bench._common import (
    NO_CACHE,
    CareRoom,
    Row,
    Stack,
    Target,
    add_stack_arguments,
    care_room,
    count_communications,
    fhir_instant_seconds,
    percentile,
    report,
    stack,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from bench.send_throughput import MEMBERS, send_sequentially
from devstack.matrix_client import MatrixUser, register_user
from devstack.synapse import module_config
from devstack.waiting import NeverHappened, wait_until
from synapse_fhir_module.enforcement.binding_state import THREAD_STATE
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from synapse_fhir_module.mapping.unread import COMPLETED, REQUESTED, task_id
from synapse_fhir_module.unread.tasks import INTERVAL_MS

NAME = "unread_tasks"
OFF, ON = "unread Tasks off", "unread Tasks on"
READER = "bram"  # the nurse: whose Task is watched, who marks messages read
POLL_PERIOD = 0.02  # seconds: at most one HAPI request per this, one at a time
LAG_DEADLINE = 30.0  # seconds a Task may take to follow
CYCLE = INTERVAL_MS / 1000  # the module writes Tasks this often
SEED = 11  # of the pauses before each send and marker (the same every run)

T = TypeVar("T")


@dataclass
class Arm:
    room: CareRoom
    members: dict[str, MatrixUser]
    thread: str
    task: str | None  # the nurse's Task id (measured arm), None in the baseline
    last_event: str  # the newest message sent into the room
    recorded: int = 1  # messages in the thread (the first opened it)


@dataclass
class Lag:
    """One message and its read marker in the measured arm, in seconds."""

    readable: float  # send start → its Communication found
    task: float  # send start → the nurse's Task focused on it
    marker: float  # read_markers start → the Task completed
    send: float  # the send request itself
    marker_request: float  # the read_markers request itself
    task_stamped: float  # send start → the Task's meta.lastUpdated (a lower bound)
    completed_stamped: float  # read_markers start → the completed Task's lastUpdated


LAG_FIELDS = [f.name for f in fields(Lag)]


class Hapi:
    """What the bench reads from HAPI, over one session, bypassing its search cache."""

    def __init__(self, fhir_url: str) -> None:
        self.fhir_url = fhir_url
        self.session = requests.Session()

    def communication(self, event_id: str) -> str | None:
        """``Communication/<id>`` of the event, once HAPI has it."""
        response = self.session.get(
            f"{self.fhir_url}/Communication",
            params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}", "_elements": "identifier"},
            headers=NO_CACHE,
            timeout=30,
        )
        response.raise_for_status()
        entries = response.json().get("entry", [])
        return f"Communication/{entries[0]['resource']['id']}" if entries else None

    def task(self, task: str) -> dict[str, Any] | None:
        response = self.session.get(f"{self.fhir_url}/Task/{task}", timeout=30)
        if response.status_code in (404, 410):
            return None
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def task_in(self, task: str, status: str, focus: str) -> dict[str, Any] | None:
        """The Task, once it has this status and focus."""
        found = self.task(task)
        if found is None or found.get("focus", {}).get("reference") != focus:
            return None
        return found if found["status"] == status else None

    def tasks_of_thread(self, thread: str) -> list[dict[str, Any]]:
        response = self.session.get(
            f"{self.fhir_url}/Task",
            params={"based-on": thread, "_count": "100"},
            headers=NO_CACHE,
            timeout=30,
        )
        response.raise_for_status()
        return [entry["resource"] for entry in response.json().get("entry", [])]


class Poller:
    """Asks one question of HAPI until it has an answer: one request at a time, at most
    every ``POLL_PERIOD``, noting the cycles (time between consecutive polls of a wait)."""

    def __init__(self) -> None:
        self.cycles: list[float] = []

    def until(self, check: Callable[[], T | None], what: str) -> tuple[T, float]:
        """``check()``'s first answer, and when (``perf_counter``) the poll giving it
        answered."""
        deadline = time.perf_counter() + LAG_DEADLINE
        previous: float | None = None
        while True:
            started = time.perf_counter()
            if previous is not None:
                self.cycles.append(started - previous)
            previous = started
            result = check()
            answered = time.perf_counter()
            if result is not None:
                return result, answered
            if answered > deadline:
                raise NeverHappened(f"{what}: not within {LAG_DEADLINE:.0f} s")
            # Polling pace (a bound on the load on HAPI), not a wait for a result.
            time.sleep(max(0.0, POLL_PERIOD - (time.perf_counter() - started)))


def set_up_arm(room: CareRoom, hapi: Hapi, *, tasks: bool) -> Arm:
    """The other members joined; the first message opens and binds the room's thread; in
    the measured arm, the nurse's Task is there."""
    members = {MEMBERS[0]: room.sender}
    for name in MEMBERS[1:]:
        user = register_user(room.server, room.network.localpart(name))
        room.sender.invite(room.room_id, user.user_id)
        user.join(room.room_id)
        members[name] = user
    first = room.sender.send_text(room.room_id, "first")
    thread = thread_of_event(hapi.fhir_url, first)

    def bound() -> bool:
        state = room.sender.request(
            "GET", f"/_matrix/client/v3/rooms/{quote(room.room_id)}/state/{THREAD_STATE}"
        )
        return bool(state.get("reference") == thread)

    wait_until(bound, timeout=30, what=f"the room bound to {thread} in room state")
    nurse = room.network.ref("Practitioner", "nurse")
    arm = Arm(room, members, thread, task_id(thread, nurse) if tasks else None, first)
    wait_quiet(arm, hapi)
    return arm


def wait_quiet(arm: Arm, hapi: Hapi) -> None:
    """The arm's outbox empty and, in the measured arm, the Tasks written for its newest
    message (the nurse's focused on it: one transaction writes them all)."""
    wait_outbox_empty(arm.room.server)
    if arm.task is None:
        return
    task, event_id = arm.task, arm.last_event
    focus = wait_until(
        lambda: hapi.communication(event_id), timeout=60, what="the newest Communication"
    )
    wait_until(
        lambda: (hapi.task(task) or {}).get("focus", {}).get("reference") == focus,
        timeout=60,
        what="the Tasks written for the newest message",
        interval=0.1,
    )


def send_and_read(arm: Arm, hapi: Hapi, poller: Poller, n: int, pauses: random.Random) -> Lag:
    """The GP sends, the nurse's Task follows; the nurse marks the message read, her Task
    follows. Each after a pause within the module's cycle."""
    assert arm.task is not None
    task = arm.task
    time.sleep(pauses.uniform(0, CYCLE))  # a random point of the module's cycle
    wall = time.time()
    clock = time.perf_counter()
    event_id = arm.room.sender.send(arm.room.room_id, text_message(n))
    sent = time.perf_counter()
    arm.last_event = event_id
    arm.recorded += 1
    focus, readable = poller.until(
        lambda: hapi.communication(event_id), "the message's Communication"
    )
    requested, shown = poller.until(
        lambda: hapi.task_in(task, REQUESTED, focus), "the nurse's Task focused on the message"
    )

    time.sleep(pauses.uniform(0, CYCLE))
    marker_wall = time.time()
    marker_clock = time.perf_counter()
    arm.members[READER].request(
        "POST",
        f"/_matrix/client/v3/rooms/{quote(arm.room.room_id)}/read_markers",
        {"m.fully_read": event_id, "m.read": event_id},
    )
    marked = time.perf_counter()
    completed, done = poller.until(
        lambda: hapi.task_in(task, COMPLETED, focus), "the nurse's Task completed"
    )
    return Lag(
        readable=readable - clock,
        task=shown - clock,
        marker=done - marker_clock,
        send=sent - clock,
        marker_request=marked - marker_clock,
        task_stamped=fhir_instant_seconds(requested["meta"]["lastUpdated"]) - wall,
        completed_stamped=fhir_instant_seconds(completed["meta"]["lastUpdated"]) - marker_wall,
    )


def newest_message(arm: Arm) -> str:
    """The id of the GP's newest message in the room (``send_sequentially`` keeps none)."""
    chunk = arm.room.sender.request(
        "GET", f"/_matrix/client/v3/rooms/{quote(arm.room.room_id)}/messages?dir=b&limit=10"
    )["chunk"]
    for event in chunk:
        if event["type"] == "m.room.message" and event["sender"] == arm.room.sender.user_id:
            return str(event["event_id"])
    raise AssertionError("no message of the GP among the room's newest events")


def run(the_stack: Stack, *, messages: int, lags: int, rounds: int) -> None:
    hapi = Hapi(the_stack.fhir_url)
    arms: dict[str, Arm] = {}
    for i, (name, on) in enumerate(((OFF, False), (ON, True))):
        config = module_config(hapi.fhir_url, communication={"unread_tasks": on})
        server = the_stack.start_synapse(f"synapse-{i}", config)
        room = care_room(server, hapi.fhir_url, module=True)
        arms[name] = set_up_arm(room, hapi, tasks=on)

    names = list(arms)
    throughput: dict[str, list[float]] = {name: [] for name in names}
    send_p50: dict[str, list[float]] = {name: [] for name in names}
    send_p99: dict[str, list[float]] = {name: [] for name in names}
    cpu_ms: dict[str, list[float]] = {name: [] for name in names}
    round_lags: list[list[Lag]] = []
    resolution_ms: list[float] = []  # per round: the median poll cycle
    pauses = random.Random(SEED)
    warmup = {"sequential": max(10, messages // 5), "lags": max(1, lags // 3)}
    sent = 0
    clock = time.monotonic()
    for r in range(-1, rounds):  # round -1 warms up
        order = names[r % len(names) :] + names[: r % len(names)]
        counted = r >= 0
        for name in order:
            arm = arms[name]
            for each in arms.values():
                wait_quiet(each, hapi)
            count = messages if counted else warmup["sequential"]
            cpu_before = the_stack.cpu_seconds(arm.room.server)
            rate, durations = send_sequentially(arm.room, count, sent)
            arm.last_event = newest_message(arm)
            arm.recorded += count
            sent += count
            wait_quiet(arm, hapi)  # (its Communications, and Tasks, written)
            cpu_used = the_stack.cpu_seconds(arm.room.server) - cpu_before
            if counted:
                throughput[name].append(rate)
                send_p50[name].append(percentile(durations, 50) * 1000)
                send_p99[name].append(percentile(durations, 99) * 1000)
                cpu_ms[name].append(cpu_used * 1000 / count)

        for each in arms.values():
            wait_quiet(each, hapi)
        poller = Poller()
        count = lags if counted else warmup["lags"]
        measured = [send_and_read(arms[ON], hapi, poller, sent + i, pauses) for i in range(count)]
        sent += count
        if counted:
            round_lags.append(measured)
            resolution_ms.append(statistics.median(poller.cycles) * 1000)
    seconds = time.monotonic() - clock

    # Correctness: every message in HAPI once; one Task per member in the measured thread.
    for name, arm in arms.items():
        wait_until(
            partial(lambda a: count_communications(hapi.fhir_url, a.thread) == a.recorded, arm),
            timeout=120,
            what=f"{arm.recorded} Communications in the thread of the arm {name!r}",
            interval=0.2,
        )
    owners = [task["owner"]["reference"] for task in hapi.tasks_of_thread(arms[ON].thread)]
    if len(owners) != len(MEMBERS) or len(set(owners)) != len(owners):
        raise AssertionError(f"the measured thread holds Tasks of {sorted(owners)}")
    if hapi.tasks_of_thread(arms[OFF].thread):
        raise AssertionError("the baseline's thread holds Tasks")

    def per_round(key: str, q: float) -> list[float]:
        return [percentile([getattr(lag, key) for lag in one], q) * 1000 for one in round_lags]

    def pooled(key: str) -> dict[str, float]:
        everything = [getattr(lag, key) * 1000 for one in round_lags for lag in one]
        return {f"p{q}": percentile(everything, q) for q in (50, 90, 99)} | {"max": max(everything)}

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

    readable = {
        q: Row(f"message → Communication readable, p{q}", "ms", per_round("readable", q))
        for q in (50, 99)
    }
    lag_note = (
        f"resolution: one poll cycle, median {statistics.median(resolution_ms):.0f} ms; the "
        f"module writes Tasks every {CYCLE:g} s; {lags} a round, each after a pause drawn "
        f"from [0, {CYCLE:g} s)"
    )
    rows = [
        *per_arm(
            "sequential throughput",
            "msg/s",
            throughput,
            Target(">=", 0.97, of_ratio=True),
            f"all messages of both arms found in HAPI once ({arms[ON].recorded} in this arm); "
            f"one Task per member ({len(MEMBERS)}) in its thread, none in the baseline's",
        ),
        *per_arm("send latency p50", "ms", send_p50),
        *per_arm("send latency p99", "ms", send_p99),
        *per_arm(
            "Synapse CPU per sequential message",
            "ms",
            cpu_ms,
            note="until the arm is quiet again: outbox empty and, here, the Tasks written",
        ),
        Row(
            "message → nurse's Task focused on it, p50",
            "ms",
            per_round("task", 50),
            baseline=readable[50],
            note=lag_note,
        ),
        Row(
            "message → nurse's Task focused on it, p99",
            "ms",
            per_round("task", 99),
            baseline=readable[99],
        ),
        Row(
            "read marker → nurse's Task completed, p50",
            "ms",
            per_round("marker", 50),
            note=lag_note,
        ),
        Row("read marker → nurse's Task completed, p99", "ms", per_round("marker", 99)),
        *readable.values(),
        Row("poll cycle (resolution), p50", "ms", resolution_ms),
    ]
    report(
        NAME,
        f"Unread Tasks off vs on, {rounds} rounds: {messages} sequential messages per arm; "
        f"{lags} messages and read markers timed to the nurse's Task (Tasks on)",
        rows,
        the_stack=the_stack,
        parameters={
            "messages_per_round": messages,
            "lags_per_round": lags,
            "rounds": rounds,
            "warmup": warmup,
            "members": len(MEMBERS),
            "task_watched": "the nurse's (a Practitioner, member through a PractitionerRole)",
            "poll_period_min_ms": POLL_PERIOD * 1000,
            "module_task_interval_ms": INTERVAL_MS,
            "pause_before_each_send_and_marker_s": [0, CYCLE],
            "pause_seed": SEED,
            "messages_recorded": {name: arm.recorded for name, arm in arms.items()},
            "measured_seconds": round(seconds, 1),
        },
        details={
            "lags_ms_pooled_over_rounds": {key: pooled(key) for key in LAG_FIELDS},
            "lags_ms": [
                [{key: round(getattr(lag, key) * 1000, 1) for key in LAG_FIELDS} for lag in one]
                for one in round_lags
            ],
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument(
        "--messages", type=int, default=250, help="sequential messages per arm and round"
    )
    parser.add_argument(
        "--lags",
        type=int,
        default=6,
        help="messages and read markers timed to the nurse's Task per round (measured arm)",
    )
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.lags, args.rounds = 10, 2, 1
    with stack(NAME, args) as the_stack:
        run(the_stack, messages=args.messages, lags=args.lags, rounds=args.rounds)


if __name__ == "__main__":
    main()
