"""Synapse send throughput with the module recording vs the module absent (issue 4).

    python -m bench.send_throughput [--smoke] [--messages 250] [--rounds 6]

Three Synapse subprocesses side by side, same version, same config but for the module,
each with the same room shape (a space bound to a CareTeam, a room the space lists, the
GP joined), all talking to the same HAPI:

- module absent (baseline): ``modules: []``; the space and room are built by a plain user
  called like the service user, so the rooms hold the same state;
- module, recording off: enforcement and account validity on, ``communication.enabled:
  false`` — to tell what recording costs from what enforcement costs;
- module, recording on: the default config; every message becomes a Communication.

One client sends ``--messages`` text messages one after the other (each after the
previous answered) per arm and round; throughput = messages / wall time. Arms take
turns, in an order that rotates every round; before every round the recording arm's
outbox is drained (its FHIR writes of the previous round would otherwise load the next
arm's CPU). A warm-up round comes first and is not counted. At the end every recorded
message must be in HAPI once.

Also reported: Synapse's CPU time per message (user + system, from /proc, with its
PostgreSQL's when it has one), for the recording arm until its outbox is empty again —
what each arm costs, less sensitive than throughput to whatever else the machine runs.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from bench._common import (
    CareRoom,
    Row,
    Stack,
    Target,
    add_stack_arguments,
    care_room,
    count_communications,
    report,
    stack,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from devstack.synapse import module_config
from devstack.waiting import wait_until

NAME = "send_throughput"
ABSENT, NO_RECORDING, RECORDING = "module absent", "module, recording off", "module, recording on"


def send_sequentially(room: CareRoom, count: int, first: int) -> float:
    """Messages per second for ``count`` sends, each after the previous one answered."""
    started = time.perf_counter()
    for n in range(first, first + count):
        room.sender.send(room.room_id, text_message(n))
    return count / (time.perf_counter() - started)


def run(the_stack: Stack, *, messages: int, rounds: int) -> None:
    fhir_url = the_stack.fhir_url
    configs: dict[str, dict[str, Any] | None] = {
        ABSENT: None,
        NO_RECORDING: module_config(fhir_url, communication={"enabled": False}),
        RECORDING: module_config(fhir_url),
    }
    rooms: dict[str, CareRoom] = {}
    for i, (arm, config) in enumerate(configs.items()):
        server = the_stack.start_synapse(f"synapse-{i}", config)
        rooms[arm] = care_room(server, fhir_url, module=config is not None)
    recording = rooms[RECORDING]
    # The first message opens the room's thread: not timed.
    thread = thread_of_event(fhir_url, recording.sender.send_text(recording.room_id, "first"))
    recorded = 1

    arms = list(rooms)
    sent = 0
    throughput: dict[str, list[float]] = {arm: [] for arm in arms}
    # CPU per message: what an arm costs whatever else the machine runs meanwhile.
    cpu_ms: dict[str, list[float]] = {arm: [] for arm in arms}
    warmup = max(10, messages // 5)
    for r in range(-1, rounds):  # round -1 warms up
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for arm in order:
            wait_outbox_empty(recording.server)
            count = warmup if r < 0 else messages
            cpu_before = the_stack.cpu_seconds(rooms[arm].server)
            rate = send_sequentially(rooms[arm], count, sent)
            if arm == RECORDING:
                # The Communications of this round are written before it counts as done.
                wait_outbox_empty(recording.server)
            cpu_used = the_stack.cpu_seconds(rooms[arm].server) - cpu_before
            sent += count
            if arm == RECORDING:
                recorded += count
            if r >= 0:
                throughput[arm].append(rate)
                cpu_ms[arm].append(cpu_used * 1000 / count)

    # Correctness: exactly the recorded messages are in HAPI, once each.
    wait_until(
        lambda: count_communications(fhir_url, thread) == recorded,
        timeout=120,
        what=f"{recorded} Communications in the recording arm's thread",
        interval=0.2,
    )
    baseline = Row(ABSENT, "msg/s", throughput[ABSENT])
    rows = [
        baseline,
        Row(NO_RECORDING, "msg/s", throughput[NO_RECORDING], baseline=baseline),
        Row(
            RECORDING,
            "msg/s",
            throughput[RECORDING],
            baseline=baseline,
            target=Target(">=", 0.97, of_ratio=True),
            note=f"all {recorded} messages of this arm found in HAPI once",
        ),
    ]
    cpu_baseline = Row(f"Synapse CPU per message, {ABSENT}", "ms", cpu_ms[ABSENT])
    rows += [
        cpu_baseline,
        *(
            Row(f"Synapse CPU per message, {arm}", "ms", cpu_ms[arm], baseline=cpu_baseline)
            for arm in (NO_RECORDING, RECORDING)
        ),
    ]
    report(
        NAME,
        f"Synapse sequential sends, {messages} messages x {rounds} rounds per arm",
        rows,
        the_stack=the_stack,
        parameters={
            "messages_per_round": messages,
            "rounds": rounds,
            "warmup": warmup,
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument("--messages", type=int, default=250, help="messages per arm and round")
    parser.add_argument("--rounds", type=int, default=6)
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds = 10, 1
    with stack(NAME, args) as the_stack:
        run(the_stack, messages=args.messages, rounds=args.rounds)


if __name__ == "__main__":
    main()
