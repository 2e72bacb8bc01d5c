"""The suite's Markdown report, and publishing it into README.md."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

from bench._common import format_number

REPO = Path(__file__).resolve().parent.parent
README = REPO / "README.md"
PUBLISHED_PLOT = REPO / "docs" / "performance.png"
# The whole report beside it: every row, notes, pinning, runs (the README shows headlines).
PUBLISHED_REPORT = REPO / "docs" / "performance.md"
PUBLISHED_RESULT = REPO / "docs" / "performance.json"
BEGIN, END = "<!-- bench-suite:begin -->", "<!-- bench-suite:end -->"


def write_markdown(result: dict[str, Any], path: Path) -> Path:
    lines = [f"# Benchmark suite, {result['date']}", ""]
    if result["smoke"]:
        lines += ["**Smoke run**: tiny sizes, so the numbers are not judged.", ""]
    lines += [machine_line(result["machine"]), ""]
    lines += table(result, headline_only=False)
    lines += ["", "## Pinning", ""]
    pinnings = sorted({r["pinning"] for row in result["rows"] for r in row["table"]})
    lines += [f"- {p}" for p in pinnings]
    notes = [
        f"- row {row['row']}, {r['measure'].strip()}: {r['note']}"
        for row in result["rows"]
        for r in row["table"]
        if r["note"]
    ]
    if notes:
        lines += ["", "## Notes", "", *notes]
    lines += ["", "## Runs", ""]
    for run in result["runs"]:
        outcome = "ok" if run["exit_code"] == 0 else f"FAILED (exit {run['exit_code']})"
        command = " ".join(run["argv"])
        lines.append(f"- row {run['row']}, `{command}`: {outcome}, {run['seconds']} s")
    path.write_text("\n".join(lines) + "\n")
    return path


def machine_line(machine: dict[str, Any]) -> str:
    packages = machine["packages"]
    return (
        f"Machine: {machine['cpus']} CPUs ({machine['cpu_model']}), "
        f"{machine['memory_gib']} GiB, Linux {machine['kernel']}; Python {machine['python']}; "
        f"Synapse {packages.get('matrix-synapse')}, Twisted {packages.get('twisted')}, "
        f"treq {packages.get('treq')}; {machine['hapi']}; {machine['java']}; "
        f"{machine['postgresql']}; load average {machine['loadavg_1m_at_start']:.1f} at start, "
        f"{machine['loadavg_1m_at_end']:.1f} at end."
    )


def table(result: dict[str, Any], *, headline_only: bool) -> list[str]:
    """One line per measure, grouped by the issue's rows. Headline: the measures with a
    target (the whole report has every measure, each with its baseline)."""
    lines = [
        "| # | measure | n | median | min - max | baseline (same run) | ratio | target | "
        "pinned (CPUs) | Synapse DB |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in result["rows"]:
        shown = [r for r in row["table"] if not headline_only or r["target"]]
        lines.append(f"| **{row['row']}** | **{row['title']}** | | | | | | | | |")
        if not row["table"]:
            lines.append(f"| {row['row']} | (no result: see Runs) | | | | | | | | |")
        for r in shown:
            unit = r["unit"]
            baseline = ""
            if r["baseline"]:
                baseline = f"{r['baseline'].strip()}: {value(r['baseline_median'], unit)}"
            lines.append(
                "| "
                + " | ".join(
                    [
                        str(row["row"]),
                        r["measure"].strip(),
                        str(r["n"]),
                        f"**{value(r['median'], unit)}**",
                        f"{number(r['min'])} - {number(r['max'])}",
                        baseline,
                        "" if r["ratio"] is None else f"{r['ratio']:.2f}x",
                        target(r),
                        r["pinning_short"],
                        r["database"],
                    ]
                )
                + " |"
            )
    return lines


def target(row: dict[str, Any]) -> str:
    if not row["target"]:
        return ""
    met = row["target_met"]
    return f"{row['target']} " + ("met" if met else "**missed**" if met is False else "?")


def number(x: float | None) -> str:
    return format_number(x, grouped=True)


def value(x: float | None, unit: str) -> str:
    return f"{number(x)} {unit}"


def publish(result: dict[str, Any], plot: Path) -> None:
    """README.md's Performance section gets the headline table and the plot; docs/ gets
    the whole report and its JSON."""
    PUBLISHED_PLOT.parent.mkdir(exist_ok=True)
    shutil.copyfile(plot, PUBLISHED_PLOT)
    write_markdown(result, PUBLISHED_REPORT)
    PUBLISHED_RESULT.write_text(json.dumps(result, indent=1) + "\n")
    section = [
        BEGIN,
        f"Latest `make bench` ({result['date']}{', smoke sizes' if result['smoke'] else ''}"
        + "".join(
            f"; row{'s' if len(u['rows'] or []) != 1 else ''} "
            f"{', '.join(map(str, u['rows'] or []))} run again {u['date']}"
            for u in result.get("updated", [])
        )
        + "):",
        "",
        machine_line(result["machine"]),
        "",
        *table(result, headline_only=True),
        "",
        f"![Benchmark plot](docs/{PUBLISHED_PLOT.name})",
        "",
        f"Every row, with notes, pinning and runs: [docs/{PUBLISHED_REPORT.name}]"
        f"(docs/{PUBLISHED_REPORT.name}); the data: `docs/{PUBLISHED_RESULT.name}`.",
        END,
    ]
    text = README.read_text()
    pattern = re.compile(re.escape(BEGIN) + ".*?" + re.escape(END), re.DOTALL)
    if not pattern.search(text):
        raise SystemExit(f"README.md has no {BEGIN} … {END} section to publish into")
    README.write_text(pattern.sub(lambda _: "\n".join(section), text))
