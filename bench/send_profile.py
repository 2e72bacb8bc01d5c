"""Where recording costs Synapse CPU: py-spy profiles of sequential sends, with the module
recording and without the module (suite row 1's profiler note).

    python -m bench.send_profile [--smoke] [--messages 400]

Two Synapses (module absent; module recording), each with the same care-team room,
pinned like every benchmark here. After a warm-up, the GP sends ``--messages`` messages
one after the other into each while py-spy samples that Synapse (``bench.py_profile``;
CPU samples only, every thread), until the recording arm's outbox is empty again.

Synapse's CPU per message comes from /proc (its process group, during the profiled
sends); py-spy's samples split it by function (inclusive). The table gives, per message:
Synapse's whole CPU (the module-absent Synapse is the baseline), the part under the
module's own code, the module's SQL (its transactions in Synapse's database threads), the
HTTP client to FHIR, Synapse's ``on_new_event`` dispatch to modules (it loads the room's
state for every event once a module listens there), and the functions whose CPU per
message grew the most, each with its module-absent figure in the note.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

from bench._common import (
    Row,
    Stack,
    add_stack_arguments,
    care_room,
    report,
    stack,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from bench.py_profile import MODULE_PATH, Profile, python_profile
from devstack.synapse import module_config

NAME = "send_profile"
ABSENT, RECORDING = "module absent", "module recording"
# (label, which functions it counts); a sample counts once per part.
PARTS: list[tuple[str, Callable[[str], bool]]] = [
    ("module code (its own Python frames)", lambda f: MODULE_PATH in f),
    ("module SQL (outbox_store, sync_store)", lambda f: "_store.py)" in f and MODULE_PATH in f),
    ("HTTP client to FHIR (treq, twisted.web)", lambda f: "(treq/" in f or "twisted/web/" in f),
    (
        "Synapse's on_new_event dispatch to modules",
        lambda f: ".on_new_event (synapse/module_api/callbacks/" in f,
    ),
]
GROWN = 8
ROOT_SHARE = 0.3  # a function on more of the stacks than this is too general to name


def run(the_stack: Stack, *, messages: int) -> None:
    profiles: dict[str, Profile] = {}
    cpu_ms: dict[str, float] = {}  # Synapse's CPU per message, from /proc
    for arm, config in ((ABSENT, None), (RECORDING, module_config(the_stack.fhir_url))):
        server = the_stack.start_synapse(arm.replace(" ", "-"), config)
        room = care_room(server, the_stack.fhir_url, module=config is not None)
        if config is not None:
            thread_of_event(the_stack.fhir_url, room.sender.send_text(room.room_id, "first"))
        for n in range(max(10, messages // 5)):  # warm-up: caches, connections, HAPI's JIT
            room.sender.send(room.room_id, text_message(n))
        if config is not None:
            wait_outbox_empty(server)
        path = the_stack.workdir / f"{arm.replace(' ', '-')}.txt"
        before = the_stack.cpu_seconds(server)
        with python_profile(server.process.pid, path) as profiles[arm]:
            for n in range(messages):
                room.sender.send(room.room_id, text_message(n))
            if config is not None:
                wait_outbox_empty(server)  # the drain's CPU belongs to these messages
        cpu_ms[arm] = (the_stack.cpu_seconds(server) - before) * 1000 / messages
        server.stop()

    absent, recording = profiles[ABSENT], profiles[RECORDING]

    def ms(arm: str, samples: float) -> float:
        """A share of the arm's samples as CPU milliseconds per message: py-spy says
        where, /proc says how much (py-spy's own sample count overstates CPU: a thread
        waiting inside C code can look busy to it)."""
        total = profiles[arm].samples
        return cpu_ms[arm] * samples / total if total else 0.0

    total_base = Row(f"Synapse CPU per message, {ABSENT}", "ms", [cpu_ms[ABSENT]])
    rows = [
        total_base,
        Row(
            f"Synapse CPU per message, {RECORDING}",
            "ms",
            [cpu_ms[RECORDING]],
            baseline=total_base,
            note="from /proc during the profiled sends; the rows below split it by py-spy",
        ),
    ]
    for label, counts in PARTS:
        rows.append(
            Row(
                f"  {label}",
                "ms",
                [ms(RECORDING, recording.part_samples(counts))],
                note=f"module absent: {ms(ABSENT, absent.part_samples(counts)):.2f} ms",
            )
        )

    def grown(function: str) -> float:
        return ms(RECORDING, recording.inclusive[function]) - ms(ABSENT, absent.inclusive[function])

    # Frames on most stacks (the reactor loop, thread bootstraps) only say "everything".
    specific = [
        f
        for f in set(recording.inclusive) | set(absent.inclusive)
        if recording.inclusive[f] < ROOT_SHARE * recording.samples
        and absent.inclusive[f] < ROOT_SHARE * absent.samples
    ]
    for function in sorted(specific, key=grown, reverse=True)[:GROWN]:
        rows.append(
            Row(
                f"  grew most: {function}",
                "ms",
                [ms(RECORDING, recording.inclusive[function])],
                note=f"module absent: {ms(ABSENT, absent.inclusive[function]):.2f} ms",
            )
        )
    report(
        NAME,
        f"Synapse CPU per message, {messages} sequential sends per arm (py-spy + /proc)",
        rows,
        the_stack=the_stack,
        parameters={
            "messages": messages,
            "samples": {arm: p.samples for arm, p in profiles.items()},
            "rate_hz": recording.rate,
        },
        details={
            arm: {
                "hot_functions": p.hot_functions(40),
                "hot_module_functions": p.hot_functions(20, module_only=True),
            }
            for arm, p in profiles.items()
        },
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    add_stack_arguments(parser)
    parser.add_argument("--messages", type=int, default=400)
    args = parser.parse_args()
    if args.smoke:
        args.messages = 20
    with stack(NAME, args) as the_stack:
        run(the_stack, messages=args.messages)


if __name__ == "__main__":
    main()
