"""The whole benchmark suite (issue 6): every benchmark, one report.

    python -m bench.suite [--smoke] [--only ROW ...] [--publish]

``make bench`` runs it; ``make bench-smoke`` runs it with ``--smoke`` (tiny sizes, in CI,
so the suite never rots; those numbers are not judged).

It starts one HAPI dev server, pins it to one CPU and itself to the other, and runs each
benchmark in a process of its own against that HAPI (Synapse, its PostgreSQL and the
load generator inherit the second CPU). ``membership_sync`` needs HAPIs configured its
own way and starts them itself, with the same split. Each benchmark measures its
baseline in the same run and repeats its measurement (rounds or runs: the table's ``n``);
the table shows the median with min and max over those repetitions.

Writes ``bench/results/<date>.json`` (every benchmark's rows, parameters, details and
pinning, plus machine facts), ``<date>.md`` (the table) and ``<date>.png`` (the plot).
``--publish`` also copies the table and plot into README.md's Performance section and
``docs/performance.png``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._common import Pinning
from bench.machine import machine_facts
from bench.suite_markdown import publish, write_markdown
from bench.suite_plot import write_plot
from devstack.hapi import HapiDevServer

RESULTS = Path(__file__).resolve().parent / "results"

# The rows, in its order.
ROW_TITLES = {
    1: "Synapse sends: module absent vs loaded with recording off / on",
    2: "Message → Communication readable in HAPI, by send rate",
    3: "Communication writes: one conditional create at a time vs batched transactions",
    4: "Care-team decision in the callback: cached vs cold; is_user_expired",
    5: "CareTeam change → member invited: shim vs Subscription vs polling",
    6: "Scale: 10,000 CareTeams x 10 members",
    7: "Synapse on PostgreSQL vs SQLite (rows 1 and 2)",
    8: "Send latency while FHIR stalls 10 s per request vs healthy FHIR",
    9: "Period end → member removed, no FHIR write (issue 11)",
    10: "Identity by email: address → account from memory; decisions (issue 12)",
    11: "Unread markers as FHIR Tasks: sends with unread_tasks off vs on; Task lags",
    12: "Footprint: memory and CPU idle and at 50 msg/s, Synapse ± module, PostgreSQL, HAPI",
    13: "Audit trail: sends with audit.enabled off vs on while decisions are made; audit lag",
}


@dataclass
class Step:
    row: int
    bench: str
    database: str = "sqlite"
    arguments: list[str] = field(default_factory=list)
    smoke_arguments: list[str] = field(default_factory=list)
    shared_hapi: bool = True  # False: the benchmark starts (and pins) HAPIs of its own

    @property
    def label(self) -> str:
        return self.bench if self.database == "sqlite" else f"{self.bench} ({self.database})"


STEPS = [
    Step(4, "membership_decision"),
    Step(1, "send_throughput"),
    Step(1, "send_profile"),  # where the recording arm's extra CPU goes (py-spy)
    Step(2, "communication_latency"),
    Step(
        3,
        "communication_batching",
        arguments=["--profile-hapi"],
        smoke_arguments=["--profile-hapi"],
    ),
    Step(8, "send_fhir_stall"),
    # Five arms on PostgreSQL (two with a worker): fewer rounds, so the suite stays ~30 min.
    Step(7, "send_throughput", "postgres", ["--rounds", "3"]),
    Step(7, "communication_latency", "postgres", ["--rates", "50"], ["--rates", "50"]),
    Step(5, "membership_sync", shared_hapi=False),
    # A HAPI of its own: 10,000 teams would slow whatever runs after it on the shared one,
    # and its reconcile sweeps everything there (other benchmarks' threads and messages).
    Step(6, "scale", shared_hapi=False),
    Step(9, "access_in_time"),
    Step(10, "identity_resolution"),
    # --smoke: 10 messages and 2 timed read markers (the Tasks follow every 2 s).
    Step(11, "unread_tasks"),
    # --smoke: 10 messages a round, one round, decisions at the default rate.
    Step(13, "audit_cost"),
    # A HAPI of its own (its memory is this benchmark's alone) and nothing pinned: a footprint
    # is what a process takes, which one CPU each would cap. SQLite and PostgreSQL in one run
    # (~5 min); --smoke: windows of a few seconds.
    Step(12, "footprint", shared_hapi=False),
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes (CI)")
    parser.add_argument("--only", type=int, nargs="+", choices=sorted(ROW_TITLES))
    parser.add_argument(
        "--publish", action="store_true", help="copy table and plot into README.md and docs/"
    )
    parser.add_argument(
        "--update",
        type=Path,
        metavar="RESULT.json",
        help="run the --only rows again and replace their benchmarks in this earlier report",
    )
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULT.json",
        help="run nothing: write this report's table and plot again (and --publish them)",
    )
    args = parser.parse_args()
    if args.render:
        render(json.loads(args.render.read_text()), args.render.with_suffix(""), args.publish)
        return
    steps = [s for s in STEPS if args.only is None or s.row in args.only]
    earlier = json.loads(args.update.read_text()) if args.update else None
    if earlier is not None and bool(earlier["smoke"]) != args.smoke:
        parser.error("--update: the earlier report and this run differ in --smoke")

    started = datetime.now(timezone.utc)
    stamp = started.strftime("%Y-%m-%dT%H%M") + ("-smoke" if args.smoke else "")
    if earlier is not None:
        started = datetime.fromisoformat(earlier["date"])
        stamp = args.update.stem
    parts_dir = RESULTS / f"{stamp}.parts"
    shutil.rmtree(parts_dir, ignore_errors=True)
    parts_dir.mkdir(parents=True)
    workdir = Path(tempfile.mkdtemp(prefix="bench-suite-"))

    all_cpus = sorted(os.sched_getaffinity(0))
    hapi = HapiDevServer(workdir)
    runs: list[dict[str, Any]] = []
    try:
        hapi.start()
        pinning = Pinning.plan()
        pinning.pin_hapi(hapi.process.pid)
        pinning.pin_local(os.getpid())  # what runs on the shared HAPI inherits this
        machine = machine_facts(hapi.base_url)
        print(f"HAPI ready in {hapi.start_seconds:.0f} s; {pinning.describe()}", flush=True)
        for step in steps:
            runs.append(run_step(step, hapi, parts_dir, smoke=args.smoke, all_cpus=all_cpus))
    finally:
        hapi.stop()

    if earlier is not None:
        runs = merge_runs(earlier, runs)
        machine = earlier["machine"] | {"updated_with_loadavg": machine["loadavg_1m_at_start"]}
    result = assemble(started, machine, runs, smoke=args.smoke)
    if earlier is not None:
        result["updated"] = earlier.get("updated", []) + [
            {"date": datetime.now(timezone.utc).isoformat(timespec="seconds"), "rows": args.only}
        ]
    json_path = RESULTS / f"{stamp}.json"
    json_path.write_text(json.dumps(result, indent=2) + "\n")
    shutil.rmtree(parts_dir, ignore_errors=True)
    render(result, RESULTS / stamp, args.publish)
    failed = [r["label"] for r in runs if r["exit_code"] != 0]
    if failed:
        print(f"HAPI log kept: {hapi.process.log_path}")
        raise SystemExit(f"failed: {', '.join(failed)}")
    shutil.rmtree(workdir, ignore_errors=True)


def render(result: dict[str, Any], stem: Path, publish_too: bool) -> None:
    """``<stem>.md`` and ``<stem>.png`` from a report (and into README.md if asked)."""
    markdown_path = write_markdown(result, stem.with_suffix(".md"))
    plot_path = write_plot(result, stem.with_suffix(".png"))
    print(f"\nreport: {_rel(stem.with_suffix('.json'))}, {_rel(markdown_path)}, {_rel(plot_path)}")
    if publish_too:
        publish(result, plot_path)
        print("published: README.md (Performance), docs/performance.png")


def merge_runs(earlier: dict[str, Any], fresh: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The earlier report's runs (with their benchmarks' results), the fresh ones in place
    of those they repeat."""
    by_step = {(r["bench"], r["database"]): r for r in fresh}
    steps = {(r["bench"], r["database"]) for r in earlier["runs"]}

    def step_of(part: dict[str, Any]) -> tuple[str, str]:
        key = (part["bench"], part.get("synapse_database", "sqlite"))
        # A benchmark that measures both databases in one run (footprint) is one step.
        return key if key in steps else (part["bench"], "sqlite")

    merged = []
    for run in earlier["runs"]:
        key = (run["bench"], run["database"])
        if key in by_step:
            merged.append(by_step.pop(key))
            continue
        parts = [part for part in earlier["benchmarks"] if step_of(part) == key]
        merged.append(run | {"parts": parts})
    return merged + list(by_step.values())


def run_step(
    step: Step, hapi: HapiDevServer, parts_dir: Path, *, smoke: bool, all_cpus: list[int]
) -> dict[str, Any]:
    """Run one benchmark; its JSON result lands in a directory of its own."""
    out = parts_dir / f"{len(list(parts_dir.iterdir())):02d}-{step.bench}-{step.database}"
    out.mkdir()
    argv = [sys.executable, "-m", f"bench.{step.bench}"]
    if step.shared_hapi:
        argv += ["--fhir", hapi.base_url, "--hapi-pid", str(hapi.process.pid)]
        argv += ["--database", step.database]
        preexec = None
    else:

        def preexec() -> None:
            # It plans its own pinning over every CPU, like the suite does.
            os.sched_setaffinity(0, all_cpus)

    argv += [*step.smoke_arguments, "--smoke"] if smoke else step.arguments
    print(f"\n=== row {step.row}: {step.label}", flush=True)
    clock = time.monotonic()
    env = os.environ | {"BENCH_RESULTS_DIR": str(out)}
    exit_code = subprocess.run(argv, env=env, preexec_fn=preexec, check=False).returncode
    seconds = time.monotonic() - clock
    print(f"=== {step.label}: exit {exit_code}, {seconds:.0f} s", flush=True)
    parts = [json.loads(p.read_text()) for p in sorted(out.glob("*.json"))]
    if exit_code == 0 and not parts:
        exit_code = -1  # finished without reporting anything: a broken benchmark
    return {
        "row": step.row,
        "bench": step.bench,
        "label": step.label,
        "database": step.database,
        "argv": argv[1:],
        "exit_code": exit_code,
        "seconds": round(seconds, 1),
        "parts": parts,
    }


def assemble(
    started: datetime,
    machine: dict[str, Any],
    runs: list[dict[str, Any]],
    *,
    smoke: bool,
) -> dict[str, Any]:
    rows: dict[int, list[dict[str, Any]]] = {n: [] for n in ROW_TITLES}
    for run in runs:
        for part in run["parts"]:
            for row in part["rows"]:
                rows[run["row"]].append(_table_row(row, part, run))
    rows[7] = compare_databases(runs) + rows[7]
    return {
        "date": started.isoformat(timespec="seconds"),
        "finished": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "smoke": smoke,
        "machine": machine | {"loadavg_1m_at_end": os.getloadavg()[0]},
        "rows": [
            {"row": n, "title": title, "table": rows[n]}
            for n, title in ROW_TITLES.items()
            if rows[n] or any(r["row"] == n for r in runs)
        ],
        "runs": [{k: v for k, v in run.items() if k != "parts"} for run in runs],
        "benchmarks": [part for run in runs for part in run["parts"]],
    }


def _table_row(row: dict[str, Any], part: dict[str, Any], run: dict[str, Any]) -> dict[str, Any]:
    return {
        "measure": row["measure"],
        "unit": row["unit"],
        "n": len(row["samples"]),
        "median": row["median"],
        "min": row["min"],
        "max": row["max"],
        "baseline": row["baseline"],
        "baseline_median": row.get("baseline_median"),
        "ratio": row["ratio_vs_baseline"],
        "target": row["target"],
        "target_met": row["target_met"],
        "note": row["note"],
        "bench": run["label"],
        "database": part.get("synapse_database", "sqlite"),
        "pinning": part["pinning"]["description"],
        "pinning_short": _pinning_short(part["pinning"]),
    }


def compare_databases(runs: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Row 7: each headline measure on PostgreSQL against the same on SQLite, same run."""
    by_database: dict[tuple[str, str], dict[str, Any]] = {}
    for run in runs:
        for part in run["parts"]:
            for row in part["rows"]:
                by_database[(run["bench"] + "|" + row["measure"], run["database"])] = row | {
                    "pinning": part["pinning"]
                }
    compared = []
    for (key, database), row in by_database.items():
        sqlite = by_database.get((key, "sqlite"))
        # The headline measures: those with a baseline or a target of their own.
        if database != "postgres" or sqlite is None or not (row["baseline"] or row["target"]):
            continue
        compared.append(
            {
                "measure": f"{row['measure']}: PostgreSQL vs SQLite",
                "unit": row["unit"],
                "n": len(row["samples"]),
                "median": row["median"],
                "min": row["min"],
                "max": row["max"],
                "baseline": f"{row['measure']} on SQLite",
                "baseline_median": sqlite["median"],
                "ratio": row["median"] / sqlite["median"] if sqlite["median"] else None,
                "target": None,
                "target_met": None,
                "note": "",
                "bench": key.split("|", 1)[0],
                "database": "postgres vs sqlite",
                "pinning": row["pinning"]["description"],
                "pinning_short": _pinning_short(row["pinning"]),
            }
        )
    return compared


def _pinning_short(pinning: dict[str, Any]) -> str:
    if not pinning.get("local_cpus"):
        return "unpinned"
    hapi = ",".join(map(str, pinning.get("hapi_cpus") or [])) or "?"
    return f"HAPI {hapi} / Synapse+load {','.join(map(str, pinning['local_cpus']))}"


def _rel(path: Path) -> str:
    return os.path.relpath(path)


if __name__ == "__main__":
    main()
