"""Footprint: resident memory and CPU at idle and at 50 msg/s (suite row 12, issue 15), the
figures Kubernetes resource requests are derived from.

    python -m bench.footprint [--smoke] [--databases sqlite postgres] [--rate 50]
        [--warmup-seconds 10] [--idle-seconds 30] [--load-seconds 30] [--hapi-heap 512m]

One HAPI dev server (H2, started here: its history is this run's alone) and, per Synapse
database, two Synapse subprocesses side by side, same version, same config but for the module:

- module absent (the baseline): ``modules: []``;
- module loaded, recording on (the default config): every message becomes a Communication.

Each gets a care-team room (a space bound to a seeded CareTeam, a room it lists; without the
module the same shape built by a plain user) with five members joined. On PostgreSQL both
Synapses use databases of one throwaway cluster (``devstack.postgres``).

Per database: a warm-up (each arm in turn, ``--rate`` msg/s for ``--warmup-seconds``, not
measured); then the **idle** window (``--idle-seconds``, nothing sent, the module's outbox
empty; both arms measured in the same window); then the **load** window for each arm in turn:
the five members send text messages into the room, ``--rate`` per second in all, open loop
(a slow answer does not delay the next send), for ``--load-seconds``. After the module arm's
window its outbox must empty and every message it was sent must be in HAPI once.

Measured over each window, per process (by PID: ``devstack`` runs Synapse and HAPI as the
process it starts, ``setpriv`` execs into PostgreSQL's postmaster):

- memory, sampled every second: Synapse and HAPI ``VmRSS`` (``/proc/<pid>/status``; their
  process group, which is one process each); PostgreSQL the sum of ``Pss`` over the
  postmaster and its children (``/proc/<pid>/smaps_rollup``: each backend maps the shared
  buffers, so a sum of RSS would count them once per backend). The table: the median, min and
  max of those samples;
- CPU, in cores: user + system time (``/proc/<pid>/stat``, children reaped included) used per
  interval of 5 s / the interval's length. The table: median, min and max over the intervals.

Nothing is pinned: pinning (as the other rows do, to compare arms on equal terms) would cap
a process at one CPU and hide what it needs. Load generator, HAPI, PostgreSQL and Synapse
share the machine's CPUs; when a window's sends fall behind ``--rate`` (the machine is out
of CPU), its note says so and its CPU figure is a lower bound. Also recorded for HAPI
(``details``): its JVM heap after each window and, at the end, after a full GC (the live
set; ``jcmd GC.heap_info``), and its maximum heap (JVM ergonomics: a quarter of the RAM;
``--hapi-heap`` sets it, to see HAPI keep up within a heap a container would give it).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from bench._common import (
    PerThreadUser,
    Pinning,
    Row,
    Stack,
    care_room,
    count_communications,
    open_loop,
    proc_stats,
    process_group_cpu_seconds,
    report,
    text_message,
    thread_of_event,
    wait_outbox_empty,
)
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until

NAME = "footprint"
ABSENT, MODULE = "module absent", "module, recording on"
# Members of the seeded CareTeam (tests/integration/care_network.py) who send: the GP (the
# CareRoom's sender), the nurse, the daughter, the patient, the pharmacist.
MEMBERS = ("anna", "bram", "carla", "henk", "piet")
MiB = 1024 * 1024
NOT_PINNED = (
    "not pinned: a footprint is what each process takes; a CPU of its own would cap it"
    " (load generator, HAPI, PostgreSQL and Synapse share the machine's CPUs)"
)


# --- Reading /proc ---------------------------------------------------------------------------


def group_pids(leader: int) -> list[int]:
    """The live processes of a server we started (it leads a process group): the leader,
    its group and its children wherever they are (PostgreSQL backends lead sessions of
    their own)."""
    return [
        pid
        for pid, fields in proc_stats()
        if pid == leader or int(fields[2]) == leader or int(fields[1]) == leader
    ]


def _status_kib(path: str, key: str) -> int:
    """A ``key:  123 kB`` line of a /proc file, in KiB (0 if the process is gone)."""
    try:
        with open(path) as f:
            for line in f:
                if line.startswith(key):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def memory_bytes(pids: list[int], *, proportional: bool) -> int:
    """VmRSS summed over a server's processes, or (``proportional``) their Pss: memory
    several of them map (PostgreSQL's shared buffers) counted once in all."""
    total = 0
    for pid in pids:
        if proportional:
            total += _status_kib(f"/proc/{pid}/smaps_rollup", "Pss:")
        else:
            total += _status_kib(f"/proc/{pid}/status", "VmRSS:")
    return total * 1024


def machine_busy_seconds() -> float:
    """CPU time every CPU of the machine spent on anything but idling (``/proc/stat``), in
    seconds: whether a window had CPU to spare."""
    with open("/proc/stat") as f:
        ticks = [int(n) for n in f.readline().split()[1:]]
    idle = ticks[3] + ticks[4]  # idle, iowait
    return (sum(ticks[:8]) - idle) / os.sysconf("SC_CLK_TCK")


# --- Sampling a window -------------------------------------------------------------------


@dataclass
class Watched:
    """One server to measure: ``key`` names it in the samples."""

    key: str
    pid: int
    proportional: bool = False  # memory as Pss over its processes (PostgreSQL)


@dataclass
class Series:
    memory_mib: list[float] = field(default_factory=list)  # one per sample tick
    cores: list[float] = field(default_factory=list)  # one per CPU interval
    processes: int = 0  # the most processes seen at once
    cpu_seconds: float = 0.0  # over the whole window
    seconds: float = 0.0

    @property
    def mean_cores(self) -> float:
        return self.cpu_seconds / self.seconds if self.seconds else 0.0

    def summary(self) -> dict[str, Any]:
        return {
            "memory_mib_mean": round(statistics.fmean(self.memory_mib), 1),
            "memory_mib_max": round(max(self.memory_mib), 1),
            "cores_mean": round(self.mean_cores, 4),
            "cores_max_interval": round(max(self.cores), 4),
            "processes_max": self.processes,
            "seconds": round(self.seconds, 1),
        }


class Sampler:
    """Memory of each watched server every ``tick`` seconds and its CPU per ``interval``,
    on a thread of its own, from ``start`` to ``stop``."""

    def __init__(self, watched: list[Watched], *, tick: float, interval: float) -> None:
        self.watched = watched
        self.tick = tick
        self.interval = interval
        self.series = {w.key: Series() for w in watched}
        self.machine_cores = 0.0  # the machine's CPUs busy over the window, on average
        self.generator_cores = 0.0  # ... of which this process (the load generator)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="footprint-sampler", daemon=True)
        self._error: BaseException | None = None

    def _cpu(self) -> dict[str, float]:
        return {w.key: process_group_cpu_seconds(w.pid) for w in self.watched}

    def _sample_memory(self) -> None:
        for w in self.watched:
            series = self.series[w.key]
            pids = group_pids(w.pid)
            series.memory_mib.append(memory_bytes(pids, proportional=w.proportional) / MiB)
            series.processes = max(series.processes, len(pids))

    def _run(self) -> None:
        try:
            started = interval_start = time.monotonic()
            first = interval_cpu = self._cpu()
            machine, generator = machine_busy_seconds(), _own_cpu_seconds()
            next_tick = started
            while True:
                self._sample_memory()
                now = time.monotonic()
                if now - interval_start >= self.interval:
                    cpu = self._cpu()
                    for key, used in cpu.items():
                        seconds = now - interval_start
                        self.series[key].cores.append((used - interval_cpu[key]) / seconds)
                    interval_start, interval_cpu = now, cpu
                next_tick += self.tick
                # The sampling clock, not a wait for a result.
                if self._stop.wait(max(0.0, next_tick - time.monotonic())):
                    break
            ended = time.monotonic()
            last = self._cpu()
            self.machine_cores = (machine_busy_seconds() - machine) / (ended - started)
            self.generator_cores = (_own_cpu_seconds() - generator) / (ended - started)
            for key, series in self.series.items():
                series.cpu_seconds = last[key] - first[key]
                series.seconds = ended - started
                if not series.cores:  # shorter than one interval
                    series.cores.append(series.mean_cores)
        except BaseException as e:  # handed to stop()
            self._error = e

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> dict[str, Series]:
        self._stop.set()
        self._thread.join(timeout=60)
        if self._error is not None:
            raise RuntimeError(f"sampling failed: {self._error!r}") from self._error
        if self._thread.is_alive():
            raise RuntimeError("the sampler did not stop")
        return self.series


def _own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


@contextlib.contextmanager
def window(watched: list[Watched], *, tick: float, interval: float) -> Iterator[Sampler]:
    sampler = Sampler(watched, tick=tick, interval=interval)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()


# --- HAPI's JVM heap ---------------------------------------------------------------------------

_HEAP = re.compile(r"heap\s+total (\d+)K, used (\d+)K")
_MAX_HEAP = re.compile(r"-XX:MaxHeapSize=(\d+)")


def parse_heap_info(text: str) -> dict[str, float] | None:
    """``jcmd <pid> GC.heap_info``'s first heap line: committed and used, in MiB."""
    match = _HEAP.search(text)
    if match is None:
        return None
    return {
        "committed_mib": round(int(match.group(1)) / 1024, 1),
        "used_mib": round(int(match.group(2)) / 1024, 1),
    }


def parse_max_heap(text: str) -> float | None:
    """``jcmd <pid> VM.flags``: the maximum heap, in MiB."""
    match = _MAX_HEAP.search(text)
    return None if match is None else round(int(match.group(1)) / MiB, 1)


def jcmd(pid: int, *command: str) -> str:
    jcmd_path = shutil.which("jcmd")
    if jcmd_path is None:
        return ""  # a JRE without the JDK tools: the heap figures are left out
    done = subprocess.run(
        [jcmd_path, str(pid), *command], capture_output=True, text=True, timeout=60, check=False
    )
    return done.stdout


# --- The arms ----------------------------------------------------------------------------------


@dataclass
class Arm:
    name: str
    server: SynapseServer
    room_id: str
    senders: list[PerThreadUser]
    thread: str | None = None  # the module arm's Communication thread in HAPI
    recorded: int = 0  # messages the module arm was sent (the thread's first one included)
    sent: int = 0
    load: dict[str, Any] = field(default_factory=dict)  # what the load window achieved


def set_up_arm(the_stack: Stack, name: str, index: int) -> Arm:
    module = name == MODULE
    config = module_config(the_stack.fhir_url) if module else None
    server = the_stack.start_synapse(f"synapse-{the_stack.database}-{index}", config)
    room = care_room(server, the_stack.fhir_url, module=module)
    members: list[MatrixUser] = [room.sender]
    for member in MEMBERS[1:]:
        user = register_user(server, room.network.localpart(member))
        room.sender.invite(room.room_id, user.user_id)
        user.join(room.room_id)
        members.append(user)
    arm = Arm(name, server, room.room_id, [PerThreadUser(m) for m in members])
    if module:
        # The first message opens the room's thread in HAPI.
        arm.thread = thread_of_event(
            the_stack.fhir_url, room.sender.send_text(room.room_id, "first")
        )
        arm.recorded = 1
    return arm


def send_at_rate(arm: Arm, rate: float, seconds: float) -> dict[str, Any]:
    """``rate`` messages a second for ``seconds``, the members taking turns; open loop."""
    count = max(1, round(rate * seconds))
    first = arm.sent

    def action(i: int) -> str:
        user = arm.senders[i % len(arm.senders)].get()
        return user.send(arm.room_id, text_message(first + i))

    started = time.monotonic()
    sends = open_loop(action, rate=rate, count=count)
    elapsed = time.monotonic() - started
    arm.sent += count
    if arm.thread is not None:
        arm.recorded += sum(1 for s in sends if s.error is None)
    errors = [s.error for s in sends if s.error is not None]
    late = sorted(s.started - s.due for s in sends)
    return {
        "sent": count,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "achieved_msg_per_s": round((count - len(errors)) / elapsed, 2),
        "start_late_p99_ms": round(late[int(0.99 * (len(late) - 1))] * 1000, 1),
        "send_ms_p50": round(statistics.median(s.seconds for s in sends) * 1000, 1),
        "send_ms_p99": round(sorted(s.seconds for s in sends)[int(0.99 * (count - 1))] * 1000, 1),
    }


def wait_recorded(the_stack: Stack, arm: Arm) -> None:
    """The module arm quiet again: outbox empty, every message in HAPI once."""
    if arm.thread is None:
        return
    wait_outbox_empty(arm.server, timeout=180)
    thread = arm.thread

    def all_written() -> bool:
        return count_communications(the_stack.fhir_url, thread) == arm.recorded

    wait_until(
        all_written,
        timeout=180,
        what=f"{arm.recorded} Communications in the module arm's thread",
        interval=0.5,
    )


@dataclass
class Sizes:
    rate: float
    warmup: float
    idle: float
    load: float
    tick: float
    interval: float


def measure_database(
    the_stack: Stack, hapi: HapiDevServer, sizes: Sizes, heap: dict[str, Any]
) -> tuple[list[Row], dict[str, Any]]:
    arms = [set_up_arm(the_stack, name, i) for i, name in enumerate((ABSENT, MODULE))]
    for arm in arms:
        send_at_rate(arm, sizes.rate, sizes.warmup)
        wait_recorded(the_stack, arm)

    def watched(arm: Arm | None) -> list[Watched]:
        found = [Watched("hapi", hapi.process.pid)]
        if the_stack.postgres is not None:
            found.append(Watched("postgres", the_stack.postgres.process.pid, proportional=True))
        if arm is None:
            found += [Watched(a.name, a.server.process.pid) for a in arms]
        else:
            found.append(Watched(arm.name, arm.server.process.pid))
        return found

    database = the_stack.database
    with window(watched(None), tick=sizes.tick, interval=sizes.interval) as sampler:
        time.sleep(sizes.idle)  # the idle window's length: nothing is sent meanwhile
    idle = sampler.series
    machine = {"idle": _machine(sampler)}
    heap[f"{database}: after idle"] = parse_heap_info(jcmd(hapi.process.pid, "GC.heap_info"))

    loaded: dict[str, dict[str, Series]] = {}
    for arm in arms:
        with window(watched(arm), tick=sizes.tick, interval=sizes.interval) as sampler:
            arm.load = send_at_rate(arm, sizes.rate, sizes.load)
        loaded[arm.name] = sampler.series
        machine[f"load, {arm.name}"] = _machine(sampler)
        arm.load["machine_cores_busy"] = round(sampler.machine_cores, 2)
        wait_recorded(the_stack, arm)
        heap[f"{database}: after load, {arm.name}"] = parse_heap_info(
            jcmd(hapi.process.pid, "GC.heap_info")
        )

    rows = synapse_rows(arms, idle, loaded, sizes)
    if the_stack.postgres is not None:
        rows += server_rows("PostgreSQL", "postgres", "PSS", idle, loaded)
    rows += hapi_rows(idle, loaded[MODULE], sizes)
    details = {
        "idle": {key: series.summary() for key, series in idle.items()},
        "load": {
            name: {key: s.summary() for key, s in series.items()} | {"sends": arm_load}
            for (name, series), arm_load in zip(loaded.items(), (a.load for a in arms), strict=True)
        },
        "messages_recorded": arms[1].recorded,
        "machine_cores_busy": machine,
    }
    return rows, details


def _machine(sampler: Sampler) -> dict[str, float]:
    return {
        "all_processes": round(sampler.machine_cores, 3),
        "load_generator": round(sampler.generator_cores, 3),
        "cpus": float(os.cpu_count() or 0),
    }


def _load_note(load: dict[str, Any], rate: float) -> str:
    note = (
        f"{load['achieved_msg_per_s']:g} msg/s achieved of {rate:g}, {load['errors']} errors,"
        f" send p99 {load['send_ms_p99']:g} ms; the machine's CPUs busy:"
        f" {load['machine_cores_busy']:g} of {os.cpu_count()}"
    )
    if load["achieved_msg_per_s"] < 0.95 * rate:
        note += " (sends fell behind: the machine was out of CPU; CPU figure a lower bound)"
    return note


def synapse_rows(
    arms: list[Arm], idle: dict[str, Series], loaded: dict[str, dict[str, Series]], sizes: Sizes
) -> list[Row]:
    rows: list[Row] = []
    rate = f"at {sizes.rate:g} msg/s"
    for what, unit, pick in (
        ("Synapse RSS", "MiB", lambda s: s.memory_mib),
        ("Synapse CPU", "cores", lambda s: s.cores),
    ):
        base_idle = Row(f"{what} idle, {ABSENT}", unit, pick(idle[ABSENT]))
        base_load = Row(
            f"{what} {rate}, {ABSENT}",
            unit,
            pick(loaded[ABSENT][ABSENT]),
            note=_load_note(arms[0].load, sizes.rate),
        )
        rows += [
            base_idle,
            Row(f"{what} idle, {MODULE}", unit, pick(idle[MODULE]), baseline=base_idle),
            base_load,
            Row(
                f"{what} {rate}, {MODULE}",
                unit,
                pick(loaded[MODULE][MODULE]),
                baseline=base_load,
                note=_load_note(arms[1].load, sizes.rate)
                + f"; all {arms[1].recorded} messages of this arm found in HAPI once",
            ),
        ]
    return rows


def server_rows(
    title: str, key: str, memory: str, idle: dict[str, Series], loaded: dict[str, dict[str, Series]]
) -> list[Row]:
    """A server both arms share (PostgreSQL): idle, then under each arm's load (the module
    arm's against the absent arm's)."""
    rows: list[Row] = []
    for what, unit, pick in (
        (f"{title} {memory}", "MiB", lambda s: s.memory_mib),
        (f"{title} CPU", "cores", lambda s: s.cores),
    ):
        base = Row(f"{what}, load on {ABSENT}", unit, pick(loaded[ABSENT][key]))
        rows += [
            Row(f"{what} idle", unit, pick(idle[key])),
            base,
            Row(f"{what}, load on {MODULE}", unit, pick(loaded[MODULE][key]), baseline=base),
        ]
    return rows


def hapi_rows(idle: dict[str, Series], load: dict[str, Series], sizes: Sizes) -> list[Row]:
    """HAPI (H2, in memory) idle, and while the module arm records ``rate`` msg/s into it."""
    rows: list[Row] = []
    for what, unit, pick in (
        ("HAPI RSS", "MiB", lambda s: s.memory_mib),
        ("HAPI CPU", "cores", lambda s: s.cores),
    ):
        base = Row(f"{what} idle", unit, pick(idle["hapi"]))
        rows += [
            base,
            Row(
                f"{what}, recording {sizes.rate:g} msg/s",
                unit,
                pick(load["hapi"]),
                baseline=base,
            ),
        ]
    return rows


# --- The run -------------------------------------------------------------------------------


def run(args: argparse.Namespace, sizes: Sizes) -> None:
    clock = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{NAME}-"))
    pinning = Pinning(None, None, NOT_PINNED)
    # Every CPU for what runs here (the suite starts a benchmark on all of them).
    cleanups: list[Callable[[], None]] = []
    ok = False
    try:
        java_options = [f"-Xmx{args.hapi_heap}"] if args.hapi_heap else []
        hapi = HapiDevServer(workdir, java_options=java_options)
        cleanups.append(hapi.stop)
        hapi.start()
        print(f"HAPI ready in {hapi.start_seconds:.0f} s", flush=True)
        heap: dict[str, Any] = {}
        results = []
        for database in args.databases:
            the_stack = Stack(hapi.base_url, pinning, workdir / database, args.smoke, database)
            cleanups.append(partial(_stop_stack, the_stack))
            rows, details = measure_database(the_stack, hapi, sizes, heap)
            results.append((the_stack, rows, details))
            # This database's Synapses and PostgreSQL stop before the next one's start.
            _stop_stack(the_stack)
        jcmd(hapi.process.pid, "GC.run")
        heap["after a full GC at the end (live set)"] = parse_heap_info(
            jcmd(hapi.process.pid, "GC.heap_info")
        )
        max_heap = parse_max_heap(jcmd(hapi.process.pid, "VM.flags"))
        parameters = {
            "rate_msg_per_s": sizes.rate,
            "senders": len(MEMBERS),
            "warmup_seconds": sizes.warmup,
            "idle_seconds": sizes.idle,
            "load_seconds": sizes.load,
            "memory_sample_every_s": sizes.tick,
            "cpu_interval_s": sizes.interval,
            "hapi": "dev server (H2 in memory), "
            + (f"-Xmx{args.hapi_heap}" if args.hapi_heap else "JVM ergonomics (no -Xmx)"),
        }
        for the_stack, rows, details in results:
            report(
                NAME,
                f"Footprint on {the_stack.database}: idle {sizes.idle:g} s, then "
                f"{sizes.rate:g} msg/s for {sizes.load:g} s per arm",
                rows,
                the_stack=the_stack,
                parameters=parameters,
                details=details | {"hapi_heap": heap, "hapi_max_heap_mib": max_heap},
            )
        print(f"HAPI heap (jcmd GC.heap_info): {heap}; max heap {max_heap} MiB")
        print(f"{NAME}: {time.monotonic() - clock:.0f} s")
        ok = True
    finally:
        for cleanup in reversed(cleanups):
            cleanup()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(server logs kept in {workdir})")


def _stop_stack(the_stack: Stack) -> None:
    for server in the_stack.servers:
        server.stop()
    the_stack.servers.clear()
    if the_stack.postgres is not None:
        the_stack.postgres.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument(
        "--databases", nargs="+", choices=("sqlite", "postgres"), default=["sqlite", "postgres"]
    )
    parser.add_argument("--rate", type=float, default=50.0, help="messages per second")
    parser.add_argument("--warmup-seconds", type=float, default=10.0)
    parser.add_argument("--idle-seconds", type=float, default=30.0)
    parser.add_argument(
        "--hapi-heap", help="HAPI's maximum heap (-Xmx, e.g. 512m); default: the JVM's choice"
    )
    parser.add_argument("--load-seconds", type=float, default=30.0)
    args = parser.parse_args()
    sizes = Sizes(args.rate, args.warmup_seconds, args.idle_seconds, args.load_seconds, 1.0, 5.0)
    if args.smoke:
        sizes = Sizes(args.rate, 2.0, 3.0, 3.0, 0.5, 1.0)
    run(args, sizes)


if __name__ == "__main__":
    main()
