"""The benchmark suite's report: how rows are judged, compared and written (issue 6)."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from bench._common import Row, Target
from bench.suite import assemble, merge_runs
from bench.suite_markdown import table, write_markdown
from bench.suite_plot import _share_of_target, write_plot

PINNING = {
    "hapi_cpus": [0],
    "local_cpus": [1],
    "method": "taskset",
    "hapi_pid": 1,
    "description": "HAPI (pid 1) on CPU [0]; Synapse + load generator on CPU [1]; via taskset",
}
MACHINE = {
    "cpus": 2,
    "cpu_model": "test",
    "memory_gib": 1.0,
    "kernel": "6",
    "python": "3.11",
    "packages": {},
    "java": None,
    "hapi": None,
    "postgresql": None,
    "loadavg_1m_at_start": 0.5,
}


def part(bench: str, database: str, rows: list[Row]) -> dict[str, Any]:
    return {
        "bench": bench,
        "synapse_database": database,
        "pinning": PINNING,
        "rows": [row.as_json() for row in rows],
        "details": {},
    }


def run(row: int, bench: str, database: str, rows: list[Row]) -> dict[str, Any]:
    return {
        "row": row,
        "bench": bench,
        "label": bench,
        "database": database,
        "argv": ["-m", f"bench.{bench}"],
        "exit_code": 0,
        "seconds": 1.0,
        "parts": [part(bench, database, rows)],
    }


def throughput_rows(absent: float, recording: float) -> list[Row]:
    baseline = Row("module absent", "msg/s", [absent, absent + 2, absent - 2])
    return [
        baseline,
        Row(
            "module, recording on",
            "msg/s",
            [recording, recording + 1, recording - 1],
            baseline=baseline,
            target=Target(">=", 0.97, of_ratio=True),
        ),
    ]


def test_a_ratio_target_is_judged_on_the_ratio_and_a_difference_target_on_the_difference():
    baseline = Row("absent", "ms", [10.0, 11.0, 12.0])
    slower = Row("on", "ms", [14.0], baseline=baseline, target=Target("<=", 2, of_difference=True))
    assert slower.difference == 3.0
    assert slower.target_met() is False
    assert Row("on", "ms", [12.5], baseline=baseline, target=slower.target).target_met() is True
    ratio = Row("on", "msg/s", [95.0], baseline=Row("b", "msg/s", [100.0]))
    ratio.target = Target(">=", 0.97, of_ratio=True)
    assert ratio.target_met() is False


def test_postgres_rows_are_compared_with_the_same_measure_on_sqlite():
    result = assemble(
        datetime.now(timezone.utc),
        MACHINE,
        [
            run(1, "send_throughput", "sqlite", throughput_rows(100.0, 90.0)),
            run(7, "send_throughput", "postgres", throughput_rows(60.0, 45.0)),
        ],
        smoke=False,
    )
    row7 = next(r for r in result["rows"] if r["row"] == 7)["table"]
    compared = {r["measure"]: r for r in row7 if r["database"] == "postgres vs sqlite"}
    # Only the headline (with a baseline or target): "module absent" has neither.
    assert list(compared) == ["module, recording on: PostgreSQL vs SQLite"]
    assert compared["module, recording on: PostgreSQL vs SQLite"]["ratio"] == 45.0 / 90.0
    # The PostgreSQL run's own rows stay in row 7, judged against its own baseline.
    own = [r for r in row7 if r["database"] == "postgres"]
    assert [r["target_met"] for r in own if r["target"]] == [False]


def test_the_report_shows_misses_pinning_and_failed_runs(tmp_path: Path):
    failed = run(3, "communication_batching", "sqlite", [])
    failed.update(exit_code=1, parts=[])
    result = assemble(
        datetime.now(timezone.utc),
        MACHINE | {"loadavg_1m_at_end": 0.5},
        [run(1, "send_throughput", "sqlite", throughput_rows(100.0, 80.0)), failed],
        smoke=True,
    )
    text = write_markdown(result, tmp_path / "r.md").read_text()
    assert "≥ 0.97x **missed**" in text
    assert "HAPI 0 / Synapse+load 1" in text
    assert "FAILED (exit 1)" in text
    assert "(no result: see Runs)" in text
    assert "Smoke run" in text
    headline = "\n".join(table(result, headline_only=True))
    assert "module, recording on" in headline
    assert "| 1 | module absent |" not in headline  # no baseline, no target: detail only
    png = write_plot(result, tmp_path / "r.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_share_of_target_is_below_one_exactly_when_the_target_is_met():
    def share(target: Target, median: float, baseline: float | None = None) -> float | None:
        base = Row("b", "ms", [baseline]) if baseline is not None else None
        row = Row("m", "ms", [median], baseline=base, target=target).as_json()
        return _share_of_target(
            {
                "target": row["target"],
                "median": row["median"],
                "ratio": row["ratio_vs_baseline"],
                "baseline_median": row["baseline_median"],
            }
        )

    assert share(Target("<=", 100), 50.0) == 0.5
    assert share(Target("<=", 100), 150.0) == 1.5
    assert share(Target(">=", 5, of_ratio=True), 20.0, baseline=10.0) == 2.5  # 2x of 5x
    assert share(Target(">=", 0.97, of_ratio=True), 99.0, baseline=100.0) < 1
    assert share(Target("<=", 2, of_difference=True), 13.0, baseline=10.0) == 1.5


def test_an_update_replaces_only_the_benchmarks_run_again():
    earlier = assemble(
        datetime.now(timezone.utc),
        MACHINE,
        [
            run(1, "send_throughput", "sqlite", throughput_rows(100.0, 80.0)),
            run(7, "send_throughput", "postgres", throughput_rows(60.0, 45.0)),
        ],
        smoke=False,
    )
    fresh = run(1, "send_throughput", "sqlite", throughput_rows(100.0, 99.0))
    merged = merge_runs(earlier, [fresh])
    assert [(r["bench"], r["database"]) for r in merged] == [
        ("send_throughput", "sqlite"),
        ("send_throughput", "postgres"),
    ]
    assert merged[0] is fresh
    kept = merged[1]["parts"]
    assert len(kept) == 1 and kept[0]["synapse_database"] == "postgres"
    again = assemble(datetime.now(timezone.utc), MACHINE, merged, smoke=False)
    row1 = next(r for r in again["rows"] if r["row"] == 1)["table"]
    assert [r["target_met"] for r in row1 if r["target"]] == [True]  # 0.99x now
