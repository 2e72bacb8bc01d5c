"""Synapse send throughput and latency with the module recording vs the module absent
(issue 4).

    python -m bench.send_throughput [--smoke] [--messages 250] [--concurrent 200]
        [--deliveries 50] [--rounds 6]

Three Synapse subprocesses side by side (five with ``--database postgres``), same version,
same config but for the module,
each with the same room shape (a space bound to a CareTeam, a room the space lists, and
five members of the team joined: the GP, the nurse, the daughter, the patient and the
pharmacist), all talking to the same HAPI:

- module absent (the baseline of every comparison): ``modules: []``; the space and room
  are built by a plain user called like the service user, so the rooms hold the same
  state;
- module, recording off: enforcement and account validity on, ``communication.enabled:
  false`` — to tell what recording costs from what enforcement costs;
- module, recording on: the default config; every message becomes a Communication.
- module, recording on, drain on a worker (``--database postgres`` only: Synapse workers
  need PostgreSQL): the main process plus one generic worker, ``background``, replicating
  through Redis, and the module config's ``worker: background`` — the enqueue (on the
  worker's ``on_new_event``, fed by replication) and the drain (outbox reads, the HTTP
  writes to FHIR) run on the worker; the senders talk to the main process as in every other
  arm. The worker and Redis are pinned to HAPI's CPU, not Synapse's: the send path keeps its
  own CPU, as it would in a deployment that gives background work a worker (PostgreSQL,
  shared by both processes, stays on the Synapse CPU, so the drain's queries still land
  there). Synapse's own background tasks stay on the main process in this arm too.
- module absent, with a worker (``--database postgres`` only): the same main process +
  worker + Redis, pinned the same way, ``modules: []`` — the control that tells what the
  worker topology itself (replication through Redis) costs the main process from what the
  module costs.

Measured per arm and round:

- sequential throughput: the GP sends ``--messages`` text messages one after the other
  (each after the previous answered); messages / wall time;
- per-send latency p50 and p99: the duration of each of those sequential requests, the
  percentiles (nearest rank) of the round;
- concurrent throughput: ``SENDERS`` threads, each with its own HTTP session, each sending
  one after the other, ``--concurrent`` messages in all; the threads are spread over the
  five members (the same member in two threads each); messages / wall time from all
  threads starting together until the last answer;
- send → /sync delivery p50 and p99: the nurse runs an incremental /sync long-poll loop
  (30 s timeout, a filter keeping only this room's messages, always from an incremental
  token: the initial /sync is done once before any timing, and Synapse would serve a
  repeated one from its cache) while the GP sends ``--deliveries`` messages one at a time;
  for each, the time from the send request starting until the /sync answer carrying its
  event id arrived; the next one is sent only after that delivery;
- Synapse's CPU time per sequential message (user + system, from /proc, with its
  PostgreSQL's when it has one, and the worker's and Redis's in the worker arm), for the
  recording arms until their outbox is empty again — what each arm costs, less sensitive
  than throughput to whatever else the machine runs; and of it, the main process's and
  PostgreSQL's (the rest, in the worker arm, is the worker's and Redis's).

A row's samples are one value per round; the table shows their median, min and max.
Measures run one after the other (sequential, concurrent, delivery), and for each the
arms take turns, in an order that rotates every round; before every measurement the
recording arms' outboxes are drained (their FHIR writes would otherwise load the next
arm's CPU). A warm-up round (smaller) comes first and is not counted. At the end every
message sent in a recording arm, by every measure, must be in HAPI once.
"""

from __future__ import annotations

import argparse
import json
import os
import threading
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from functools import partial
from typing import Any
from urllib.parse import quote

import requests

from bench._common import (
    CareRoom,
    Row,
    Stack,
    Target,
    add_stack_arguments,
    care_room,
    count_communications,
    percentile,
    process_group_cpu_seconds,
    report,
    stack,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from devstack.matrix_client import MatrixUser, register_user
from devstack.synapse import module_config
from devstack.waiting import wait_until

NAME = "send_throughput"
ABSENT, NO_RECORDING, RECORDING = "module absent", "module, recording off", "module, recording on"
ON_WORKER = "module, recording on, drain on a worker"
ABSENT_WORKER = "module absent, with a worker"
WORKER = "background"  # the worker's instance name, and the module config's `worker`
SENDERS = 10  # threads of the concurrent measure
# Members of the seeded CareTeam (see tests/integration/care_network.py): the GP (the
# CareRoom's sender), the nurse (through a PractitionerRole), the daughter (a
# RelatedPerson), the patient, the pharmacist (through the nested pharmacy team).
MEMBERS = ("anna", "bram", "carla", "henk", "piet")
RECEIVER = "bram"  # the /sync side of the delivery measure
SYNC_TIMEOUT_MS = 30_000
DELIVERY_DEADLINE = 30.0  # seconds a message may take to show up in /sync
WAKE_TYPE = "org.synapse_fhir.bench.wake"  # account data that ends a /sync long poll


class SyncClient:
    """/sync for one user over a session of its own (long polls outlast MatrixUser's
    request timeout), filtered to one room's messages plus the wake-up account data."""

    def __init__(self, user: MatrixUser, room_id: str) -> None:
        self.user = user
        self.room_id = room_id
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {user.access_token}"
        self._filter = json.dumps(
            {
                "presence": {"not_types": ["*"]},
                "account_data": {"types": [WAKE_TYPE]},
                "room": {
                    "rooms": [room_id],
                    "timeline": {"types": ["m.room.message"], "limit": 100},
                    "state": {"not_types": ["*"]},
                    "ephemeral": {"not_types": ["*"]},
                    "account_data": {"not_types": ["*"]},
                },
            }
        )
        self._wakes = 0

    def sync(self, since: str | None, timeout_ms: int) -> dict[str, Any]:
        params = {"filter": self._filter, "timeout": str(timeout_ms)}
        if since is not None:
            params["since"] = since
        response = self._session.get(
            self.user.server.url("/_matrix/client/v3/sync"),
            params=params,
            timeout=timeout_ms / 1000 + 30,
        )
        response.raise_for_status()
        body: dict[str, Any] = response.json()
        return body

    def event_ids(self, body: dict[str, Any]) -> list[str]:
        room = body.get("rooms", {}).get("join", {}).get(self.room_id, {})
        return [event["event_id"] for event in room.get("timeline", {}).get("events", [])]

    def wake(self) -> None:
        """End the user's pending long poll (new account data of the filtered type)."""
        self._wakes += 1
        path = f"/_matrix/client/v3/user/{quote(self.user.user_id)}/account_data/{WAKE_TYPE}"
        self.user.request("PUT", path, {"n": self._wakes})


class SyncLoop:
    """A thread long-polling /sync from ``since`` and noting when each event id of the
    room first arrived (``time.perf_counter``)."""

    def __init__(self, client: SyncClient, since: str) -> None:
        self.client = client
        self.since = since
        self._arrived: dict[str, float] = {}
        self._changed = threading.Condition()
        self._stop = threading.Event()
        self._error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, name="sync-loop", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            while not self._stop.is_set():
                body = self.client.sync(self.since, SYNC_TIMEOUT_MS)
                now = time.perf_counter()
                self.since = str(body["next_batch"])
                with self._changed:
                    for event_id in self.client.event_ids(body):
                        self._arrived.setdefault(event_id, now)
                    self._changed.notify_all()
        except BaseException as e:  # handed to the waiting thread
            with self._changed:
                self._error = e
                self._changed.notify_all()

    def arrival(self, event_id: str, timeout: float) -> float:
        """When ``event_id`` arrived through /sync, waiting up to ``timeout`` seconds."""
        with self._changed:
            self._changed.wait_for(
                lambda: event_id in self._arrived or self._error is not None, timeout
            )
            if event_id in self._arrived:
                return self._arrived[event_id]
            if self._error is not None:
                raise RuntimeError(f"the /sync loop failed: {self._error!r}") from self._error
        raise TimeoutError(f"a message not delivered through /sync within {timeout:.0f} s")

    def stop(self) -> str:
        """Stop the loop (waking its pending long poll) and return the latest token."""
        self._stop.set()
        self.client.wake()
        self._thread.join(timeout=SYNC_TIMEOUT_MS / 1000 + 35)
        if self._thread.is_alive():
            raise RuntimeError("the /sync loop did not stop")
        return self.since


@dataclass
class Arm:
    room: CareRoom
    senders: list[MatrixUser]  # one session per concurrent sender thread
    receiver: SyncClient
    since: str  # the receiver's latest /sync token


def set_up_arm(room: CareRoom) -> Arm:
    """The other members registered, invited by the GP and joined; the receiver's first
    (initial) /sync, done here, before any timing."""
    members = [room.sender]
    for name in MEMBERS[1:]:
        user = register_user(room.server, room.network.localpart(name))
        room.sender.invite(room.room_id, user.user_id)
        user.join(room.room_id)
        members.append(user)
    senders = [
        MatrixUser(user.server, user.user_id, user.access_token)
        for user in (members[i % len(members)] for i in range(SENDERS))
    ]
    receiver = SyncClient(members[MEMBERS.index(RECEIVER)], room.room_id)
    since = str(receiver.sync(None, 0)["next_batch"])
    return Arm(room, senders, receiver, since)


def send_sequentially(room: CareRoom, count: int, first: int) -> tuple[float, list[float]]:
    """Messages per second for ``count`` sends, each after the previous one answered, and
    each send's duration (seconds)."""
    durations = []
    started = time.perf_counter()
    for n in range(first, first + count):
        clock = time.perf_counter()
        room.sender.send(room.room_id, text_message(n))
        durations.append(time.perf_counter() - clock)
    return count / (time.perf_counter() - started), durations


def send_concurrently(senders: Sequence[MatrixUser], room_id: str, count: int, first: int) -> float:
    """Messages per second for ``count`` sends by ``len(senders)`` threads, each sending
    one after the other over its own session, all starting together."""
    start = threading.Barrier(len(senders) + 1, timeout=60)

    def sender(i: int) -> None:
        start.wait()
        for n in range(first + i, first + count, len(senders)):
            senders[i].send(room_id, text_message(n))

    with ThreadPoolExecutor(max_workers=len(senders), thread_name_prefix="sender") as pool:
        futures = [pool.submit(sender, i) for i in range(len(senders))]
        start.wait()
        started = time.perf_counter()
        for future in futures:
            future.result()
        return count / (time.perf_counter() - started)


def measure_delivery(arm: Arm, count: int, first: int) -> list[float]:
    """For each of ``count`` messages sent one at a time: ms from the send request starting
    until the receiver's /sync long poll carried its event id."""
    # Catch up (incrementally) with what earlier measures sent, then long-poll from there.
    arm.since = str(arm.receiver.sync(arm.since, 0)["next_batch"])
    loop = SyncLoop(arm.receiver, arm.since)
    latencies = []
    try:
        for n in range(first, first + count):
            clock = time.perf_counter()
            event_id = arm.room.sender.send(arm.room.room_id, text_message(n))
            arrived = loop.arrival(event_id, DELIVERY_DEADLINE)
            latencies.append((arrived - clock) * 1000)
    finally:
        arm.since = loop.stop()
    return latencies


def _experiment() -> dict[str, Any]:
    """``communication`` keys for the recording arm from ``BENCH_RECORDING_CONFIG`` (JSON,
    e.g. ``{"batch_linger": "100ms"}``): to weigh a setting; the suite sets none."""
    return dict(json.loads(os.environ.get("BENCH_RECORDING_CONFIG", "{}")))


def run(the_stack: Stack, *, messages: int, concurrent: int, deliveries: int, rounds: int) -> None:
    fhir_url = the_stack.fhir_url
    configs: dict[str, dict[str, Any] | None] = {
        ABSENT: None,
        NO_RECORDING: module_config(fhir_url, communication={"enabled": False}),
        RECORDING: module_config(fhir_url, communication=_experiment()),
    }
    if the_stack.database == "postgres":
        configs[ON_WORKER] = module_config(fhir_url, worker=WORKER)
        configs[ABSENT_WORKER] = None
    arms: dict[str, Arm] = {}
    for i, (name, config) in enumerate(configs.items()):
        worker = WORKER if name in (ON_WORKER, ABSENT_WORKER) else None
        server = the_stack.start_synapse(f"synapse-{i}", config, worker=worker)
        arms[name] = set_up_arm(care_room(server, fhir_url, module=config is not None))
    recording_arms = [name for name in (RECORDING, ON_WORKER) if name in arms]
    # The first message opens each recording room's thread: not timed.
    threads = {
        name: thread_of_event(
            fhir_url, arms[name].room.sender.send_text(arms[name].room.room_id, "first")
        )
        for name in recording_arms
    }
    recorded = dict.fromkeys(recording_arms, 1)

    def wait_outboxes_empty() -> None:
        for name in recording_arms:
            wait_outbox_empty(arms[name].room.server)

    names = list(arms)
    sent = 0
    throughput: dict[str, list[float]] = {name: [] for name in names}
    concurrent_throughput: dict[str, list[float]] = {name: [] for name in names}
    send_p50: dict[str, list[float]] = {name: [] for name in names}
    send_p99: dict[str, list[float]] = {name: [] for name in names}
    delivery_p50: dict[str, list[float]] = {name: [] for name in names}
    delivery_p99: dict[str, list[float]] = {name: [] for name in names}
    # CPU per message: what an arm costs whatever else the machine runs meanwhile.
    cpu_ms: dict[str, list[float]] = {name: [] for name in names}
    # ... and where it went: the main process (which serves the sends) and PostgreSQL.
    main_cpu_ms: dict[str, list[float]] = {name: [] for name in names}
    postgres_cpu_ms: dict[str, list[float]] = {name: [] for name in names}

    def postgres_cpu_seconds() -> float:
        pg = the_stack.postgres
        return 0.0 if pg is None else process_group_cpu_seconds(pg.process.pid)

    warmup = {
        "sequential": max(10, messages // 5),
        "concurrent": max(2 * SENDERS, concurrent // 5),
        "delivery": max(3, deliveries // 5),
    }
    for r in range(-1, rounds):  # round -1 warms up
        order = names[r % len(names) :] + names[: r % len(names)]
        counted = r >= 0

        for name in order:
            arm = arms[name]
            wait_outboxes_empty()
            count = messages if counted else warmup["sequential"]
            cpu_before = the_stack.cpu_seconds(arm.room.server)
            main_before = process_group_cpu_seconds(arm.room.server.process.pid)
            postgres_before = postgres_cpu_seconds()
            rate, durations = send_sequentially(arm.room, count, sent)
            if name in recorded:
                # The Communications of this round are written before it counts as done.
                wait_outbox_empty(arm.room.server)
                recorded[name] += count
            cpu_used = the_stack.cpu_seconds(arm.room.server) - cpu_before
            main_used = process_group_cpu_seconds(arm.room.server.process.pid) - main_before
            postgres_used = postgres_cpu_seconds() - postgres_before
            sent += count
            if counted:
                throughput[name].append(rate)
                cpu_ms[name].append(cpu_used * 1000 / count)
                main_cpu_ms[name].append(main_used * 1000 / count)
                postgres_cpu_ms[name].append(postgres_used * 1000 / count)
                send_p50[name].append(percentile(durations, 50) * 1000)
                send_p99[name].append(percentile(durations, 99) * 1000)

        for name in order:
            arm = arms[name]
            wait_outboxes_empty()
            count = concurrent if counted else warmup["concurrent"]
            rate = send_concurrently(arm.senders, arm.room.room_id, count, sent)
            sent += count
            if name in recorded:
                recorded[name] += count
            if counted:
                concurrent_throughput[name].append(rate)

        for name in order:
            arm = arms[name]
            wait_outboxes_empty()
            count = deliveries if counted else warmup["delivery"]
            latencies = measure_delivery(arm, count, sent)
            sent += count
            if name in recorded:
                recorded[name] += count
            if counted:
                delivery_p50[name].append(percentile(latencies, 50))
                delivery_p99[name].append(percentile(latencies, 99))

    # Correctness: exactly the recorded messages are in HAPI, once each.
    def all_written(name: str) -> bool:
        return count_communications(fhir_url, threads[name]) == recorded[name]

    for name in recording_arms:
        wait_until(
            partial(all_written, name),
            timeout=120,
            what=f"{recorded[name]} Communications in the thread of the arm {name!r}",
            interval=0.2,
        )

    def per_arm(
        measure: str,
        unit: str,
        samples: dict[str, list[float]],
        target: Target | None = None,
        note: str = "",
    ) -> list[Row]:
        """One row per arm, the module-absent one the baseline of the others; ``target``
        and ``note`` on the recording arms' rows."""
        baseline = Row(f"{measure}, {ABSENT}", unit, samples[ABSENT])
        rows = [baseline]
        for name in names[1:]:
            recording = name in recorded
            rows.append(
                Row(
                    f"{measure}, {name}",
                    unit,
                    samples[name],
                    baseline=baseline,
                    target=target if recording else None,
                    note=note.replace("{recorded}", str(recorded[name])) if recording else "",
                )
            )
        return rows

    rows = [
        *per_arm(
            "sequential throughput",
            "msg/s",
            throughput,
            Target(">=", 0.97, of_ratio=True),
            "all {recorded} messages of this arm (every measure) found in HAPI once",
        ),
        *per_arm(
            f"{SENDERS} concurrent senders, throughput",
            "msg/s",
            concurrent_throughput,
            Target(">=", 0.97, of_ratio=True),
        ),
        *per_arm("send latency p50", "ms", send_p50),
        *per_arm("send latency p99", "ms", send_p99),
        *per_arm(
            "send → /sync delivery p50",
            "ms",
            delivery_p50,
            Target("<=", 2, of_difference=True),
        ),
        *per_arm("send → /sync delivery p99", "ms", delivery_p99),
        *per_arm("Synapse CPU per sequential message", "ms", cpu_ms),
        *per_arm("main process CPU per sequential message", "ms", main_cpu_ms),
        *(
            per_arm("PostgreSQL CPU per sequential message", "ms", postgres_cpu_ms)
            if the_stack.postgres is not None
            else []
        ),
    ]
    report(
        NAME,
        f"Synapse sends, {rounds} rounds per arm: {messages} sequential, {concurrent} by "
        f"{SENDERS} concurrent senders, {deliveries} timed to /sync delivery",
        rows,
        the_stack=the_stack,
        parameters={
            "messages_per_round": messages,
            "concurrent_messages_per_round": concurrent,
            "concurrent_senders": SENDERS,
            "concurrent_members": len(MEMBERS),
            "deliveries_per_round": deliveries,
            "sync_timeout_ms": SYNC_TIMEOUT_MS,
            "rounds": rounds,
            "warmup": warmup,
            "messages_recorded": recorded,
            "worker_arm": (
                {
                    "worker": WORKER,
                    "pinned": "worker and Redis on HAPI's CPU; main process and PostgreSQL"
                    " on Synapse's",
                    "run_background_tasks_on": "main (Synapse's own tasks not moved)",
                }
                if ON_WORKER in arms
                else None
            ),
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument(
        "--messages", type=int, default=250, help="sequential messages per arm and round"
    )
    parser.add_argument(
        "--concurrent",
        type=int,
        default=200,
        help=f"messages per arm and round by {SENDERS} concurrent senders",
    )
    parser.add_argument(
        "--deliveries", type=int, default=50, help="messages per arm and round timed to /sync"
    )
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.concurrent, args.deliveries, args.rounds = 10, 20, 5, 1
    with stack(NAME, args) as the_stack:
        run(
            the_stack,
            messages=args.messages,
            concurrent=args.concurrent,
            deliveries=args.deliveries,
            rounds=args.rounds,
        )


if __name__ == "__main__":
    main()
