"""bench/footprint.py's readings (issue 15): /proc memory and CPU of a process group, the
JVM heap figures, and its rows in the suite's report."""

from __future__ import annotations

import os
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

from bench._common import Row
from bench.footprint import (
    Sampler,
    Watched,
    group_pids,
    memory_bytes,
    parse_heap_info,
    parse_max_heap,
)
from bench.suite import assemble, merge_runs
from bench.suite_markdown import write_markdown
from devstack.waiting import wait_until
from tests.unit.test_bench_suite import MACHINE, part, run

HEAP_INFO = """12345:
 garbage-first heap   total 262144K, used 131072K [0x0000000681200000, 0x0000000800000000)
  region size 2048K, 40 young (81920K), 3 survivors (6144K)
 Metaspace       used 120000K, committed 121000K, reserved 1179648K
"""


def test_heap_figures_are_read_from_jcmd_output_in_mib():
    assert parse_heap_info(HEAP_INFO) == {"committed_mib": 256.0, "used_mib": 128.0}
    assert parse_heap_info("") is None
    flags = "12345:\n-XX:CICompilerCount=2 -XX:MaxHeapSize=6320816128 -XX:+UseG1GC\n"
    assert parse_max_heap(flags) == 6028.0
    assert parse_max_heap("") is None


def test_a_group_is_its_leader_and_children_and_its_memory_is_theirs():
    child = subprocess.Popen(
        [sys.executable, "-c", "import sys; sys.stdin.read()"],
        stdin=subprocess.PIPE,
        start_new_session=True,
    )
    try:
        assert group_pids(child.pid) == [child.pid]
        rss = memory_bytes([child.pid], proportional=False)
        pss = memory_bytes([child.pid], proportional=True)
        # An interpreter takes megabytes; its share of shared pages is at most its RSS.
        assert rss > 1024 * 1024
        assert 0 < pss <= rss
        # This process leads no group: its children count (the child above is one).
        assert child.pid in group_pids(os.getpid())
    finally:
        child.kill()
        child.wait()


def test_the_sampler_sees_a_busy_process_use_cpu_and_memory():
    busy = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True)
    try:
        sampler = Sampler([Watched("busy", busy.pid)], tick=0.05, interval=0.2)
        sampler.start()
        try:
            wait_until(
                lambda: len(sampler.series["busy"].cores) >= 2,
                timeout=30,
                what="two CPU intervals sampled",
                interval=0.05,
            )
        finally:
            series = sampler.stop()["busy"]
    finally:
        busy.kill()
        busy.wait()
    assert series.cpu_seconds > 0
    assert all(c >= 0 for c in series.cores)
    assert min(series.memory_mib) > 1
    assert series.processes == 1
    summary = series.summary()
    assert summary["memory_mib_max"] >= summary["memory_mib_mean"]


def footprint_rows() -> list[Row]:
    idle = Row("Synapse RSS idle, module absent", "MiB", [99.0, 101.0])
    return [idle, Row("Synapse RSS idle, module, recording on", "MiB", [120.0], baseline=idle)]


def test_footprint_rows_render_per_database_and_survive_an_update_of_other_rows(tmp_path: Path):
    footprint = run(12, "footprint", "sqlite", footprint_rows())
    footprint["parts"].append(part("footprint", "postgres", footprint_rows()))
    earlier = assemble(
        datetime.now(timezone.utc),
        MACHINE,
        [run(1, "send_throughput", "sqlite", []), footprint],
        smoke=False,
    )
    text = write_markdown(
        earlier | {"machine": MACHINE | {"loadavg_1m_at_end": 0}}, tmp_path / "r.md"
    )
    lines = text.read_text().splitlines()
    module = [line for line in lines if line.startswith("| 12 | Synapse RSS idle, module, rec")]
    assert len(module) == 2
    assert module[0].endswith("| sqlite |") and module[1].endswith("| postgres |")
    assert "| 1.20x |" in module[0]
    # The PostgreSQL part belongs to the footprint run, not to a run of its own.
    merged = merge_runs(earlier, [run(1, "send_throughput", "sqlite", [])])
    kept = next(r for r in merged if r["bench"] == "footprint")["parts"]
    assert [p["synapse_database"] for p in kept] == ["sqlite", "postgres"]
