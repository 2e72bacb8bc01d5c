"""Send latency while FHIR stalls every request vs while it answers at once (issue 4).

    python -m bench.send_fhir_stall [--smoke] [--stall 10] [--rate 20] [--seconds 20]

One Synapse with the module (recording and enforcement on) reaches HAPI through a
``devstack.stalling_proxy.StallingProxy``: in the healthy phases it passes requests
straight through; in the stalled phases it holds every FHIR request ``--stall`` seconds
before forwarding it (``fhir.timeout`` is raised above that, so FHIR is slow rather than
failing; with a shorter timeout the drain would retry instead — the send path is the same).

In each phase an open-loop sender sends at ``--rate`` messages per second for
``--seconds`` into a bound care-team room; a send's latency is its PUT /send request.
Phases alternate healthy/stalled (ABBA over rounds), warm: the room's thread and the
team's membership are in place before the first phase. After a stalled phase the proxy
passes through again (held requests go on) and the outbox drains before the next phase.
At the end every message sent must be in HAPI once. Also reported: Synapse's CPU time
per message in each mode (with its PostgreSQL's, when it has one).
"""

from __future__ import annotations

import argparse
from typing import Any
from urllib.parse import urlsplit

from bench._common import (
    PerThreadUser,
    Row,
    Sent,
    Stack,
    Target,
    add_stack_arguments,
    care_room,
    count_communications,
    open_loop,
    outbox_pending,
    percentile,
    report,
    stack,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from devstack.stalling_proxy import StallingProxy
from devstack.synapse import module_config
from devstack.waiting import wait_until

NAME = "send_fhir_stall"
HEALTHY, STALLED = "healthy", "stalled"


def run(the_stack: Stack, *, stall: float, rate: float, seconds: float, rounds: int) -> None:
    fhir_url = the_stack.fhir_url
    parts = urlsplit(fhir_url)
    proxy = StallingProxy(f"{parts.scheme}://{parts.netloc}")
    proxy.start()
    try:
        proxied_fhir = proxy.url(parts.path)
        config = module_config(proxied_fhir, fhir={"base_url": proxied_fhir, "timeout": "60s"})
        server = the_stack.start_synapse("synapse", config)
        room = care_room(server, fhir_url, module=True)
        thread = thread_of_event(fhir_url, room.sender.send_text(room.room_id, "first"))
        senders = PerThreadUser(room.sender)
        count = max(2, int(rate * seconds))
        sent_total = 1

        def send(n: int) -> str:
            return senders.get().send(room.room_id, text_message(n))

        held_max = 0

        def note_held(_: Sent) -> None:
            nonlocal held_max
            held_max = max(held_max, proxy.held)

        open_loop(send, rate=rate, count=max(10, count // 5))  # warm-up, not counted
        sent_total += max(10, count // 5)
        latencies: dict[str, list[list[float]]] = {HEALTHY: [], STALLED: []}
        # Synapse's CPU per message sent during the phase (the drain's catch-up after a
        # stalled phase is not in it): tells work done from time spent waiting.
        cpu_ms: dict[str, list[float]] = {HEALTHY: [], STALLED: []}
        backlog: list[int] = []
        for r in range(rounds):
            modes = [HEALTHY, STALLED] if r % 2 == 0 else [STALLED, HEALTHY]
            for mode in modes:
                wait_outbox_empty(server)
                proxy.stall(stall if mode == STALLED else 0)
                cpu_before = the_stack.cpu_seconds(server)
                sends = open_loop(send, rate=rate, count=count, on_done=note_held)
                cpu_ms[mode].append((the_stack.cpu_seconds(server) - cpu_before) * 1000 / count)
                sent_total += count
                failed = [s for s in sends if s.error]
                if failed:
                    raise RuntimeError(f"{len(failed)} sends failed, e.g. {failed[0].error}")
                latencies[mode].append([s.seconds * 1000 for s in sends])
                if mode == STALLED:
                    # (The health endpoint's FHIR probe is stalled too: it answers after 2 s.)
                    backlog.append(outbox_pending(server))
                proxy.stall(0)
        wait_until(
            lambda: count_communications(fhir_url, thread) == sent_total,
            timeout=120,
            what=f"all {sent_total} messages in HAPI",
            interval=0.2,
        )
        forwarded = proxy.forwarded
    finally:
        proxy.stop()

    def per_round(mode: str, q: float) -> list[float]:
        return [percentile(samples, q) for samples in latencies[mode]]

    def pooled(mode: str, q: float) -> float:
        return percentile([x for samples in latencies[mode] for x in samples], q)

    healthy_p50 = Row("send p50, FHIR healthy", "ms", per_round(HEALTHY, 50))
    healthy_p99 = Row("send p99, FHIR healthy", "ms", per_round(HEALTHY, 99))
    healthy_cpu = Row("Synapse CPU per message, FHIR healthy", "ms", cpu_ms[HEALTHY])
    rows = [
        healthy_p50,
        Row(
            f"send p50, FHIR stalling {stall:g} s per request",
            "ms",
            per_round(STALLED, 50),
            baseline=healthy_p50,
        ),
        healthy_p99,
        Row(
            f"send p99, FHIR stalling {stall:g} s per request",
            "ms",
            per_round(STALLED, 99),
            baseline=healthy_p99,
            # The issue asks for "not slowed"; 1.2x is this bench's reading of that.
            target=Target("<=", 1.2, of_ratio=True),
            note=(
                f"outbox pending at the end of each stalled phase: {backlog}; up to "
                f"{held_max} FHIR requests held at once; all {sent_total} messages then "
                "written once"
            ),
        ),
        healthy_cpu,
        Row(
            f"Synapse CPU per message, FHIR stalling {stall:g} s",
            "ms",
            cpu_ms[STALLED],
            baseline=healthy_cpu,
        ),
    ]
    details: dict[str, Any] = {
        "pooled_ms": {
            mode: {"p50": pooled(mode, 50), "p99": pooled(mode, 99), "max": pooled(mode, 100)}
            for mode in (HEALTHY, STALLED)
        },
        "outbox_pending_after_stalled_phase": backlog,
        "fhir_requests_held_max": held_max,
        "fhir_requests_forwarded": forwarded,
        "messages_written": sent_total,
    }
    report(
        NAME,
        f"Send latency, FHIR healthy vs stalling {stall:g} s per request, {rate:g} msg/s, "
        f"{count} messages x {rounds} phases each",
        rows,
        the_stack=the_stack,
        parameters={
            "stall_seconds": stall,
            "rate": rate,
            "messages_per_phase": count,
            "rounds": rounds,
            "fhir_timeout": "60s",
        },
        details=details,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument("--stall", type=float, default=10.0, help="seconds each request waits")
    parser.add_argument("--rate", type=float, default=20.0, help="messages per second")
    parser.add_argument("--seconds", type=float, default=20.0, help="length of each phase")
    parser.add_argument("--rounds", type=int, default=3, help="phases per mode")
    args = parser.parse_args()
    if args.smoke:
        args.stall, args.rate, args.seconds, args.rounds = 1.0, 10.0, 1.5, 1
    with stack(NAME, args) as the_stack:
        run(the_stack, stall=args.stall, rate=args.rate, seconds=args.seconds, rounds=args.rounds)


if __name__ == "__main__":
    main()
