"""Shared parts of the Communication-recording benchmarks (issue 4): the stack they run on
(HAPI, Synapse subprocesses, CPU pinning), a care-team room, an open-loop sender, and the
table + JSON every benchmark reports.

Pinning: HAPI gets one CPU, Synapse and the load generator (this process) the other, the
same way in every arm, so arms compete for the same cores. HAPI is started unpinned and
pinned once it answers (a JVM started on one CPU picks a different garbage collector).
A Synapse worker and its Redis, when an arm has them, go on HAPI's CPU (``pin_beside_hapi``):
the sending process keeps its CPU to itself, as in a deployment with a background worker.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import platform
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from concurrent.futures import wait as wait_futures
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.postgres import PostgresCluster
from devstack.redis import RedisServer
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.synapse import SynapseServer
from devstack.waiting import wait_until
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM
from tests.integration.care_network import CareNetwork

# The suite (bench.suite) points every benchmark of one run at a directory of its own.
RESULTS_DIR = Path(
    os.environ.get("BENCH_RESULTS_DIR") or Path(__file__).resolve().parent / "results"
)
HEALTH_PATH = "/_synapse/client/fhir/health"
NO_CACHE = {"Cache-Control": "no-cache"}


# --- CPU pinning -------------------------------------------------------------------------


@dataclass
class Pinning:
    """Where HAPI and Synapse + load generator run; None: not pinned."""

    hapi_cpus: list[int] | None
    local_cpus: list[int] | None
    method: str  # "taskset", "sched_setaffinity", or why nothing is pinned
    hapi_pid: int | None = None
    beside_hapi: list[str] = field(default_factory=list)  # what else runs on HAPI's CPU

    @classmethod
    def plan(cls, hapi_pid: int | None = None) -> Pinning:
        # A benchmark run by the suite starts on the CPU the suite gave it: the CPUs to
        # share out are its own and HAPI's.
        usable = set(os.sched_getaffinity(0))
        if hapi_pid is not None:
            usable |= os.sched_getaffinity(hapi_pid)
        cpus = sorted(usable)
        if len(cpus) < 2:
            return cls(None, None, f"not pinned: only CPU {cpus} available")
        method = "taskset" if shutil.which("taskset") else "sched_setaffinity (no taskset)"
        return cls([cpus[0]], [cpus[1]], method)

    def pin_hapi(self, pid: int | None) -> None:
        self.hapi_pid = pid
        if pid is not None and self.hapi_cpus is not None:
            _pin(pid, self.hapi_cpus, self.method)

    def pin_local(self, pid: int) -> None:
        """Synapse subprocesses and this process (all their threads)."""
        if self.local_cpus is not None:
            _pin(pid, self.local_cpus, self.method)

    def pin_beside_hapi(self, pid: int, what: str) -> None:
        """A process that must not take the Synapse CPU (a background worker, its Redis)."""
        if self.hapi_cpus is not None:
            _pin(pid, self.hapi_cpus, self.method)
            if what not in self.beside_hapi:
                self.beside_hapi.append(what)

    def unpin(self, pid: int) -> None:
        """Back on every CPU the plan shares out (e.g. this process, before it starts a
        JVM that would otherwise inherit one CPU)."""
        if self.hapi_cpus is not None and self.local_cpus is not None:
            _pin(pid, sorted({*self.hapi_cpus, *self.local_cpus}), self.method)

    def short(self) -> str:
        if self.local_cpus is None:
            return "unpinned"
        hapi = "?" if self.hapi_pid is None else ",".join(map(str, self.hapi_cpus or []))
        return f"hapi:{hapi} syn+load:{','.join(map(str, self.local_cpus))}"

    def describe(self) -> str:
        if self.local_cpus is None:
            return self.method
        hapi = (
            f"HAPI (pid {self.hapi_pid}) on CPU {self.hapi_cpus}"
            if self.hapi_pid is not None
            else "HAPI not pinned (external server, pid unknown)"
        )
        beside = f" with {' and '.join(self.beside_hapi)}" if self.beside_hapi else ""
        return (
            f"{hapi}{beside}; Synapse + load generator on CPU {self.local_cpus}; via {self.method}"
        )


def _pin(pid: int, cpus: Sequence[int], method: str) -> None:
    cpu_list = ",".join(map(str, cpus))
    if method == "taskset":
        # -a: every thread the process has now; threads it starts later inherit it.
        subprocess.run(
            ["taskset", "-a", "-p", "-c", cpu_list, str(pid)], check=True, capture_output=True
        )
        return
    for tid in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(ProcessLookupError):
            os.sched_setaffinity(int(tid), set(cpus))


# --- The stack: HAPI (shared or own) and Synapse subprocesses -------------------------------


@dataclass
class Stack:
    fhir_url: str
    pinning: Pinning
    workdir: Path
    smoke: bool
    database: str  # Synapse's: "sqlite" or "postgres"
    servers: list[SynapseServer] = field(default_factory=list)
    postgres: PostgresCluster | None = None
    # One per Synapse with a worker: Synapse names its Redis channels after server_name,
    # the same for every Synapse here, so two homeservers must never share a Redis.
    redis_servers: list[RedisServer] = field(default_factory=list)

    def start_synapse(
        self, name: str, fhir_module: dict[str, Any] | None, *, worker: str | None = None
    ) -> SynapseServer:
        """``worker``: a generic worker of that name beside the main process (PostgreSQL
        only), it and a Redis of its own pinned beside HAPI."""
        if worker is not None and self.database != "postgres":
            raise ValueError("a Synapse worker needs --database postgres")
        database = None
        if self.database == "postgres":
            if self.postgres is None:
                self.postgres = PostgresCluster(self.workdir)
                self.postgres.start()
                # Synapse's database works for Synapse: on its CPU (backends inherit it).
                self.pinning.pin_local(self.postgres.process.pid)
            database = self.postgres.create_database(f"bench_{uuid.uuid4().hex[:12]}")
        redis = None
        if worker is not None:
            redis = RedisServer(self.workdir)
            self.redis_servers.append(redis)
            redis.start()
            self.pinning.pin_beside_hapi(redis.process.pid, "Redis")
        server = SynapseServer(
            self.workdir / name, fhir_module, postgres=database, redis=redis, worker=worker
        )
        self.servers.append(server)
        server.start()
        self.pinning.pin_local(server.process.pid)
        if server.worker_process is not None:
            self.pinning.pin_beside_hapi(server.worker_process.pid, "the Synapse worker")
        return server

    def cpu_seconds(self, server: SynapseServer) -> float:
        """CPU time Synapse (and its PostgreSQL, when it has one; its worker and Redis,
        when it has a worker) has used so far."""
        used = process_group_cpu_seconds(server.process.pid)
        if self.postgres is not None:
            used += process_group_cpu_seconds(self.postgres.process.pid)
        if server.worker_process is not None:
            used += process_group_cpu_seconds(server.worker_process.pid)
            if server.redis is not None:
                used += process_group_cpu_seconds(server.redis.process.pid)
        return used

    def result_name(self, name: str) -> str:
        return name if self.database == "sqlite" else f"{name}-{self.database}"


def proc_stats() -> Iterator[tuple[int, list[str]]]:
    """Every live process's ``/proc/<pid>/stat`` fields after the command name (state,
    ppid, pgrp, ...), by pid; a process gone meanwhile is skipped."""
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:  # gone meanwhile
            continue
        yield int(entry.name), fields


def process_group_cpu_seconds(pgid: int) -> float:
    """User + system CPU time of a server we started (it leads a process group): the live
    processes of its group, its live children wherever they are (a PostgreSQL backend
    leads a session of its own: ``setsid`` in every postmaster child), and the children it
    has already reaped (its cutime + cstime)."""
    ticks = 0
    for pid, fields in proc_stats():
        # utime (14th field), stime (15th), cutime, cstime.
        if int(fields[2]) == pgid or int(fields[1]) == pgid:
            ticks += int(fields[11]) + int(fields[12])
        if pid == pgid:
            ticks += int(fields[13]) + int(fields[14])
    return ticks / os.sysconf("SC_CLK_TCK")


def add_stack_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--fhir", help="use this FHIR base URL instead of starting HAPI")
    parser.add_argument("--hapi-pid", type=int, help="pid of the HAPI behind --fhir, to pin it")
    parser.add_argument(
        "--database",
        choices=("sqlite", "postgres"),
        default="sqlite",
        help="Synapse's database (postgres: a throwaway cluster, see devstack.postgres)",
    )


@contextlib.contextmanager
def stack(name: str, args: argparse.Namespace) -> Iterator[Stack]:
    """HAPI (started here unless --fhir), CPUs pinned, a work directory; all stopped after."""
    pinning = Pinning.plan(args.hapi_pid)
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{name}-"))
    hapi: HapiDevServer | None = None
    ok = False
    the_stack: Stack | None = None
    try:
        fhir_url = args.fhir
        hapi_pid = args.hapi_pid
        if fhir_url is None:
            hapi = HapiDevServer(workdir)
            hapi.start()
            fhir_url, hapi_pid = hapi.base_url, hapi.process.pid
        pinning.pin_hapi(hapi_pid)
        pinning.pin_local(os.getpid())
        the_stack = Stack(fhir_url, pinning, workdir, bool(args.smoke), args.database)
        yield the_stack
        ok = True
    finally:
        for server in the_stack.servers if the_stack else []:
            server.stop()
        if the_stack is not None and the_stack.postgres is not None:
            the_stack.postgres.stop()
        for redis in the_stack.redis_servers if the_stack else []:
            redis.stop()
        if hapi is not None:
            hapi.stop()
        if ok:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(server logs kept in {workdir})")


# --- A care-team room ----------------------------------------------------------------------


@dataclass
class CareRoom:
    server: SynapseServer
    network: CareNetwork
    room_id: str
    sender: MatrixUser  # the GP, a member of the care team
    space_id: str = ""  # the space bound to the team, listing the room
    service: MatrixUser | None = None  # who made them (the service user, with the module)


def care_room(server: SynapseServer, fhir_url: str, *, module: bool) -> CareRoom:
    """A space bound to a seeded CareTeam, a room it lists, and the GP joined to it.

    Without the module the same shape is built by a plain user called like the service
    user, so both arms send into rooms with the same state.
    """
    network = CareNetwork(uuid.uuid4().hex[:8])
    if module:
        network.seed(FhirSeeder(fhir_url))
        service = service_session(register_user(server, network.localpart("root"), admin=True))
    else:
        service = register_user(server, "fhir")
    space_id = create_bound_space(service, network.team)
    room_id = create_room_in_space(service, space_id)
    sender = register_user(server, network.localpart("anna"))
    service.invite(room_id, sender.user_id)
    sender.join(room_id)
    return CareRoom(server, network, room_id, sender, space_id, service)


def message_body(n: int) -> str:
    """Clinical-looking text of varying length (never printed or logged)."""
    note = f"Observation {n}: BP {110 + n % 50}/{70 + n % 25}, pulse {55 + n % 40}."
    return note + " Patient reports feeling well; no change in medication." * (n % 4)


def text_message(n: int) -> dict[str, Any]:
    return {"msgtype": "m.text", "body": message_body(n)}


class PerThreadUser:
    """One HTTP session per thread for the same logged-in user (requests.Session is not
    meant to be shared between threads)."""

    def __init__(self, user: MatrixUser) -> None:
        self._user = user
        self._local = threading.local()

    def get(self) -> MatrixUser:
        user = getattr(self._local, "user", None)
        if user is None:
            user = self._local.user = MatrixUser(
                self._user.server, self._user.user_id, self._user.access_token
            )
        return user


# --- HAPI and the module's health endpoint ---------------------------------------------------


def outbox_pending(server: SynapseServer) -> int:
    health = requests.get(server.url(HEALTH_PATH), timeout=10).json()
    return int(health["outbox"]["pending"])


def wait_outbox_empty(server: SynapseServer, timeout: float = 120.0) -> None:
    wait_until(
        lambda: outbox_pending(server) == 0,
        timeout=timeout,
        what="the module's outbox empty",
        interval=0.1,
    )


def find_communications(
    session: requests.Session, fhir_url: str, event_ids: Sequence[str]
) -> dict[str, str]:
    """Event id → ``meta.lastUpdated`` of its Communication, for those HAPI has now.

    One POST ``_search`` per 200 ids (an OR over identifiers; a form body, so no URL length
    limit), only the identifier element, bypassing HAPI's search cache.
    """
    found: dict[str, str] = {}
    for start in range(0, len(event_ids), 200):
        chunk = event_ids[start : start + 200]
        response = session.post(
            f"{fhir_url}/Communication/_search",
            data={
                "identifier": ",".join(f"{EVENT_ID_SYSTEM}|{e}" for e in chunk),
                "_elements": "identifier",
                "_count": str(len(chunk) * 2),
            },
            headers=NO_CACHE,
            timeout=30,
        )
        response.raise_for_status()
        for entry in response.json().get("entry", []):
            resource = entry["resource"]
            for identifier in resource.get("identifier", []):
                if identifier.get("system") == EVENT_ID_SYSTEM:
                    found[identifier["value"]] = resource["meta"]["lastUpdated"]
    return found


def count_communications(fhir_url: str, thread: str) -> int:
    """How many Communications are part of ``thread`` (``CommunicationRequest/<id>``)."""
    response = requests.get(
        f"{fhir_url}/Communication",
        params={"part-of": thread, "_summary": "count"},
        headers=NO_CACHE,
        timeout=30,
    )
    response.raise_for_status()
    return int(response.json()["total"])


def thread_of_event(fhir_url: str, event_id: str, timeout: float = 60.0) -> str:
    """Wait for the event's Communication and return its thread (``partOf``)."""

    def thread() -> str | None:
        bundle = requests.get(
            f"{fhir_url}/Communication",
            params={"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"},
            headers=NO_CACHE,
            timeout=30,
        ).json()
        entries = bundle.get("entry", [])
        return str(entries[0]["resource"]["partOf"][0]["reference"]) if entries else None

    return wait_until(thread, timeout=timeout, what="the first message written to FHIR")


def fhir_instant_seconds(value: str) -> float:
    """A FHIR instant (``2026-01-02T03:04:05.678+00:00``) as Unix time."""
    return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()


# --- Open-loop sending -----------------------------------------------------------------------


@dataclass
class Sent:
    index: int
    due: float  # Unix time the schedule gave this send
    started: float  # Unix time the request started
    seconds: float  # how long the request took
    result: str | None  # an event id
    error: str | None = None


def open_loop(
    action: Callable[[int], str],
    *,
    rate: float,
    count: int,
    on_done: Callable[[Sent], None] | None = None,
    workers: int = 32,
) -> list[Sent]:
    """Start ``action(i)`` at ``rate`` per second whatever the earlier ones are doing (an
    open loop: a slow answer does not delay the next send), on a pool of threads."""
    results: list[Sent] = []
    lock = threading.Lock()

    def one(index: int, due: float) -> None:
        started = time.time()
        clock = time.perf_counter()
        try:
            sent = Sent(index, due, started, 0.0, action(index))
        except Exception as e:  # kept per send, never with a message body
            sent = Sent(index, due, started, 0.0, None, f"{type(e).__name__}: {e}"[:200])
        sent.seconds = time.perf_counter() - clock
        with lock:
            results.append(sent)
        if on_done is not None:
            on_done(sent)

    with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="sender") as pool:
        first_due = time.time() + 0.05
        futures = []
        for i in range(count):
            due = first_due + i / rate
            pause = due - time.time()
            if pause > 0:
                time.sleep(pause)  # the load generator's clock: pacing, not waiting for a result
            futures.append(pool.submit(one, i, due))
        _done, not_done = wait_futures(futures, timeout=120 + count / rate)
        if not_done:
            raise RuntimeError(f"{len(not_done)} sends did not finish within the deadline")
    return sorted(results, key=lambda s: s.index)


# --- Figures ---------------------------------------------------------------------------------


def percentile(values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    rank = max(1, min(len(ordered), round(q / 100 * len(ordered) + 0.5)))
    return ordered[rank - 1]


@dataclass
class Target:
    op: str  # "<=" or ">="
    limit: float
    of_ratio: bool = False  # the target is on the ratio vs baseline, not the value
    of_difference: bool = False  # ... on the difference from the baseline (median - median)

    def text(self, unit: str) -> str:
        sign = "≤" if self.op == "<=" else "≥"
        if self.of_ratio:
            return f"{sign} {self.limit:g}x"
        if self.of_difference:
            return f"{sign} {self.limit:+g} {unit} vs baseline"
        return f"{sign} {self.limit:g} {unit}"

    def met(self, value: float) -> bool:
        return value <= self.limit if self.op == "<=" else value >= self.limit


@dataclass
class Row:
    """One measure: a sample per run (or round); the table shows median, min and max."""

    measure: str
    unit: str
    samples: list[float]
    baseline: Row | None = None
    target: Target | None = None
    note: str = ""

    @property
    def median(self) -> float:
        return statistics.median(self.samples)

    @property
    def p95(self) -> float:
        return percentile(self.samples, 95)

    @property
    def ratio(self) -> float | None:
        if self.baseline is None or not self.baseline.median:
            return None
        return self.median / self.baseline.median

    @property
    def difference(self) -> float | None:
        return None if self.baseline is None else self.median - self.baseline.median

    def target_met(self) -> bool | None:
        if self.target is None:
            return None
        if self.target.of_ratio:
            value = self.ratio
        elif self.target.of_difference:
            value = self.difference
        else:
            value = self.median
        return None if value is None else self.target.met(value)

    def as_json(self) -> dict[str, Any]:
        return {
            "measure": self.measure,
            "unit": self.unit,
            "median": self.median,
            "p95": self.p95,
            "min": min(self.samples),
            "max": max(self.samples),
            "samples": self.samples,
            "baseline": self.baseline.measure if self.baseline else None,
            "baseline_median": self.baseline.median if self.baseline else None,
            "ratio_vs_baseline": self.ratio,
            "difference_vs_baseline": self.difference,
            "target": self.target.text(self.unit) if self.target else None,
            "target_met": self.target_met(),
            "note": self.note,
        }


def format_number(value: float | None, *, grouped: bool = False) -> str:
    """Three significant-ish digits; ``grouped``: thousands separated (1,234)."""
    if value is None or value != value:  # None or NaN
        return "-"
    if abs(value) >= 100:
        return f"{value:,.0f}" if grouped else f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.2f}"


def report(
    name: str,
    title: str,
    rows: Sequence[Row],
    *,
    the_stack: Stack,
    parameters: dict[str, Any],
    details: dict[str, Any] | None = None,
    show_p95: bool = False,
) -> Path:
    """Print the table and write ``bench/results/<name>-<date>.json``.

    ``show_p95``: a p95 column (nearest rank) after the median."""
    header = ["measure", "unit", "median", "min", "max", "vs baseline", "target", "pinned"]
    if show_p95:
        header.insert(3, "p95")
    table = [header]
    for row in rows:
        ratio = row.ratio
        met = row.target_met()
        target = row.target.text(row.unit) if row.target else ""
        if met is not None:
            target += " ok" if met else " MISSED"
        cells = [
            row.measure,
            row.unit,
            format_number(row.median),
            format_number(min(row.samples)),
            format_number(max(row.samples)),
            "" if ratio is None else f"{ratio:.2f}x",
            target,
            the_stack.pinning.short(),
        ]
        if show_p95:
            cells.insert(3, format_number(row.p95))
        table.append(cells)
    widths = [max(len(r[i]) for r in table) for i in range(len(header))]
    print(f"\n{title}")
    database = the_stack.database + (
        " (its server on the Synapse CPU)" if the_stack.database == "postgres" else ""
    )
    print(f"pinning: {the_stack.pinning.describe()}; Synapse database: {database}")
    for i, line in enumerate(table):
        print(
            "  ".join(
                cell.ljust(w) if j == 0 else cell.rjust(w)
                for j, (cell, w) in enumerate(zip(line, widths, strict=True))
            ).rstrip()
        )
        if i == 0:
            print("  ".join("-" * w for w in widths))
    for row in rows:
        if row.note:
            print(f"  · {row.measure}: {row.note}")
    now = datetime.now(timezone.utc)
    result = {
        "bench": name,
        "title": title,
        "date": now.isoformat(timespec="seconds"),
        "smoke": the_stack.smoke,
        "host": {
            "cpus": os.cpu_count(),
            "loadavg_1m_at_end": os.getloadavg()[0],
            "python": platform.python_version(),
        },
        "synapse_database": the_stack.database,
        "pinning": asdict(the_stack.pinning) | {"description": the_stack.pinning.describe()},
        "parameters": parameters,
        "rows": [row.as_json() for row in rows],
        "details": details or {},
    }
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    path = RESULTS_DIR / f"{the_stack.result_name(name)}-{now.strftime('%Y-%m-%dT%H%M%S')}.json"
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"results: {os.path.relpath(path)}")
    return path
