"""Batched vs one-by-one Communication writes on the same HAPI, in the same run (issue 4).

    python -m bench.communication_batching [--smoke] [--messages 500] [--rounds 5]

Writes are what the module writes for real messages (``communication_mapping.
message_write``: text, notices, replies to earlier messages, files), with fresh event
ids, so every conditional create really creates. Arms, through the module's own
``FhirClient`` (treq, one connection pool):

- batched: ``CommunicationWriter`` — one ``transaction`` Bundle of conditional creates per
  ``--batch-size`` messages, one batch at a time (what the outbox drain does);
- one-by-one (baseline): one conditional create (``POST`` + ``If-None-Exist``) per
  message, the next after the previous answered;
- one-by-one, ``--concurrency`` in flight: the same with several requests at once.

Each round runs every arm on ``--messages`` messages, in an order that changes every
round; a warm-up round comes first and is not counted. Throughput = messages / wall time.
"""

from __future__ import annotations

import argparse
import functools
import random
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fhir.resources.R4B.communication import Communication
from twisted.internet import defer, task

from bench._common import Row, Stack, Target, add_stack_arguments, message_body, report, stack
from devstack.fhir_seed import FhirSeeder
from synapse_fhir_module.communication_mapping import (
    CommunicationWrite,
    RoomContext,
    message_write,
)
from synapse_fhir_module.communication_writer import CommunicationWriter
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.fhir_client import FhirClient
from tests.integration.care_network import CareNetwork

NAME = "communication_batching"
Writes = list[tuple[str, CommunicationWrite]]


class MessageMaker:
    """Realistic writes for one care-team room: mostly text, some notices, replies and files."""

    def __init__(self, room: RoomContext, senders: Sequence[str], parents: Sequence[str]) -> None:
        self._room = room
        self._senders = senders
        self._parents = parents
        self._random = random.Random(4)
        self._n = 0

    def writes(self, count: int) -> Writes:
        return [self._one() for _ in range(count)]

    def _one(self) -> tuple[str, CommunicationWrite]:
        self._n += 1
        n = self._n
        event_id = f"$bench-{uuid.uuid4().hex}"
        kind = self._random.random()
        content: dict[str, Any]
        if kind < 0.1 and self._parents:
            content = {
                "msgtype": "m.text",
                "body": message_body(n),
                "m.relates_to": {"m.in_reply_to": {"event_id": self._random.choice(self._parents)}},
            }
        elif kind < 0.2:
            content = {
                "msgtype": "m.file",
                "body": f"wound-photo-{n}.jpg",
                "url": f"mxc://example.org/{uuid.uuid4().hex}",
                "info": {"mimetype": "image/jpeg", "size": 200_000 + n},
            }
        elif kind < 0.3:
            content = {"msgtype": "m.notice", "body": message_body(n)}
        else:
            content = {"msgtype": "m.text", "body": message_body(n)}
        event = {
            "type": "m.room.message",
            "event_id": event_id,
            "origin_server_ts": int(time.time() * 1000),
            "content": content,
        }
        return event_id, message_write(event, self._room, self._random.choice(self._senders))


async def timed(call: Callable[[], Awaitable[None]], count: int) -> float:
    """Messages per second for one call that writes ``count`` messages."""
    started = time.perf_counter()
    await call()
    return count / (time.perf_counter() - started)


async def run_async(
    fhir_url: str, *, messages: int, rounds: int, batch: int, concurrency: int
) -> dict[str, Any]:
    network = CareNetwork(uuid.uuid4().hex[:8])
    seeder = FhirSeeder(fhir_url)
    network.seed(seeder)
    thread_id = f"thread-{network.tag}"
    seeder.put(
        {
            "resourceType": "CommunicationRequest",
            "id": thread_id,
            "status": "active",
            "subject": {"reference": network.ref("Patient", "patient")},
            "recipient": [{"reference": network.team}],
        }
    )
    room = RoomContext(
        thread=f"CommunicationRequest/{thread_id}",
        care_team=network.team,
        patient=network.ref("Patient", "patient"),
    )
    senders = [network.ref("Practitioner", "gp"), network.ref("RelatedPerson", "daughter")]
    fhir = FhirClient(FhirConfig(base_url=fhir_url, timeout=120.0), pool_size=concurrency)
    writer = CommunicationWriter(fhir)

    # Messages replies point at, written first (a reply's parent exists before the reply).
    parents = MessageMaker(room, senders, []).writes(10)
    await writer.write(parents)
    maker = MessageMaker(room, senders, [event_id for event_id, _ in parents])

    async def batched(writes: Writes) -> None:
        for start in range(0, len(writes), batch):
            result = await writer.write(writes[start : start + batch])
            if result.dead:
                raise RuntimeError(f"HAPI refused {len(result.dead)} writes")

    async def one(write: CommunicationWrite) -> None:
        await fhir.create_if_none_exist(
            Communication.model_validate(write.resource), write.if_none_exist or ""
        )

    async def one_by_one(writes: Writes) -> None:
        for _, write in writes:
            await one(write)

    async def one_by_one_concurrent(writes: Writes) -> None:
        limit = defer.DeferredSemaphore(concurrency)
        await defer.gatherResults(
            [limit.run(one, w) for _, w in writes],
            consumeErrors=True,
        )

    arms: list[tuple[str, Callable[[Writes], Awaitable[None]]]] = [
        ("batched", batched),
        ("one_by_one", one_by_one),
        ("one_by_one_concurrent", one_by_one_concurrent),
    ]
    warmup = max(10, messages // 2)
    for _, arm in arms:  # HAPI's JIT and the connection pool settle first
        await arm(maker.writes(warmup))
    throughput: dict[str, list[float]] = {name: [] for name, _ in arms}
    for r in range(rounds):
        order = arms[r % len(arms) :] + arms[: r % len(arms)]
        for name, arm in order:
            writes = maker.writes(messages)
            throughput[name].append(await timed(functools.partial(arm, writes), messages))
    return {"throughput": throughput, "warmup": warmup}


def run(the_stack: Stack, *, messages: int, rounds: int, batch: int, concurrency: int) -> None:
    result: dict[str, Any] = {}

    async def go(reactor: Any) -> None:
        result.update(
            await run_async(
                the_stack.fhir_url,
                messages=messages,
                rounds=rounds,
                batch=batch,
                concurrency=concurrency,
            )
        )

    try:
        # react() ends with SystemExit: 0 on success, 1 when the run raised.
        task.react(lambda reactor: defer.ensureDeferred(go(reactor)))
    except SystemExit as e:
        if e.code:
            raise
    throughput = result["throughput"]
    baseline = Row("one-by-one conditional creates", "msg/s", throughput["one_by_one"])
    rows = [
        Row(
            f"batched: transaction of {batch} (CommunicationWriter)",
            "msg/s",
            throughput["batched"],
            baseline=baseline,
            target=Target(">=", 5, of_ratio=True),
        ),
        baseline,
        Row(
            f"one-by-one, {concurrency} in flight",
            "msg/s",
            throughput["one_by_one_concurrent"],
            baseline=baseline,
        ),
    ]
    report(
        NAME,
        f"Communication writes to HAPI: batched vs one-by-one, {messages} messages x {rounds} "
        "rounds",
        rows,
        the_stack=the_stack,
        parameters={
            "messages_per_round": messages,
            "rounds": rounds,
            "batch_size": batch,
            "concurrency": concurrency,
            "warmup_per_arm": result["warmup"],
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument("--messages", type=int, default=500, help="messages per arm and round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=50, help="the module's default")
    parser.add_argument("--concurrency", type=int, default=10, help="the client's pool size")
    args = parser.parse_args()
    if args.smoke:
        args.messages, args.rounds = 25, 1
    with stack(NAME, args) as the_stack:
        run(
            the_stack,
            messages=args.messages,
            rounds=args.rounds,
            batch=args.batch_size,
            concurrency=args.concurrency,
        )


if __name__ == "__main__":
    main()
