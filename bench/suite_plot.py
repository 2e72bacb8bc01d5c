"""The suite's plot: one PNG, a panel per question, readable at a glance."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display

import matplotlib.pyplot as plt
from matplotlib.axes import Axes
from matplotlib.ticker import NullFormatter

RATE = re.compile(r"at (\d+(?:\.\d+)?) msg/s, (p\d+)$")
MET, MISSED, NEUTRAL = "#2e7d32", "#c62828", "#607d8b"


def write_plot(result: dict[str, Any], path: Path) -> Path:
    figure, axes = plt.subplots(2, 3, figsize=(22, 15))
    panels = [targets, send_arms, latency_by_rate, outbox_depth, membership_arms, databases]
    for panel, ax in zip(panels, axes.flat, strict=True):
        if not panel(ax, result):
            ax.set_axis_off()
            ax.text(0.5, 0.5, f"{panel.__name__}: not run", ha="center", transform=ax.transAxes)
    title = f"synapse-fhir-module benchmark suite, {result['date']}"
    if result["smoke"]:
        title += " (smoke sizes: not judged)"
    figure.suptitle(title)
    figure.tight_layout()
    figure.savefig(path, dpi=90, bbox_inches="tight")
    plt.close(figure)
    return path


def _rows(result: dict[str, Any], number: int) -> list[dict[str, Any]]:
    return [r for row in result["rows"] if row["row"] == number for r in row["table"]]


def targets(ax: Axes, result: dict[str, Any]) -> bool:
    """Every target as a share of its limit: a bar left of 1 is met."""
    rows = [r for row in result["rows"] for r in row["table"] if r["target"]]
    if not rows:
        return False
    shares, labels, colors = [], [], []
    for r in rows:
        share = _share_of_target(r)
        if share is None:
            continue
        shares.append(share)
        labels.append(f"{r['measure'].strip()} [{r['database']}]")
        colors.append(MET if r["target_met"] else MISSED)
    ax.barh(range(len(shares)), shares, color=colors)
    ax.set_yticks(range(len(shares)), labels, fontsize=6)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("share of target (≤ 1: met)")
    ax.set_title("Targets")
    return True


def _share_of_target(row: dict[str, Any]) -> float | None:
    text = row["target"]
    match = re.match(r"([≤≥]) ([+-]?[\d.]+)", text)
    if not match:
        return None
    sign, limit = match.group(1), float(match.group(2))
    if text.endswith("x"):
        measured = row["ratio"]
    elif "vs baseline" in text:
        if row["baseline_median"] is None:
            return None
        measured = row["median"] - row["baseline_median"]
    else:
        measured = row["median"]
    if measured is None or limit == 0:
        return None
    if sign == "≤":
        return max(measured, 0.0) / limit
    return limit / measured if measured > 0 else float("inf")


def send_arms(ax: Axes, result: dict[str, Any]) -> bool:
    """Row 1: throughput per arm, with min-max."""
    rows = [r for r in _rows(result, 1) if r["unit"] == "msg/s"]
    if not rows:
        return False
    _bars(ax, rows, color_by_target=True)
    ax.set_xlabel("messages per second, median with min-max (higher is better)")
    ax.set_title("1. Synapse send throughput")
    return True


def latency_by_rate(ax: Axes, result: dict[str, Any]) -> bool:
    """Row 2: p50/p95/p99 against send rate, the module and a direct write."""
    series: dict[str, dict[float, float]] = {}
    for r in _rows(result, 2):
        match = RATE.search(r["measure"])
        if not match or "readable" not in r["measure"]:
            continue
        who = "module" if r["measure"].startswith("message") else "direct write"
        series.setdefault(f"{who} {match.group(2)}", {})[float(match.group(1))] = r["median"]
    if not series:
        return False
    for name, points in sorted(series.items()):
        rates = sorted(points)
        style = "-" if name.startswith("module") else "--"
        ax.plot(rates, [points[x] for x in rates], style, marker="o", label=name)
    ax.axhline(100, color=MET, linewidth=0.8, linestyle=":", label="targets at 50 msg/s")
    ax.axhline(300, color=MET, linewidth=0.8, linestyle=":")
    ax.set_xlabel("messages per second")
    ax.set_ylabel("ms until readable in HAPI")
    ax.set_title("2. Message → Communication (SQLite)")
    ax.legend(fontsize=7)
    return True


def outbox_depth(ax: Axes, result: dict[str, Any]) -> bool:
    """Row 2: the outbox's pending rows over the first run at each rate."""
    drawn = False
    for part in result["benchmarks"]:
        if part["bench"] != "communication_latency" or part["synapse_database"] != "sqlite":
            continue
        for rate, details in (part["details"].get("by_rate") or {}).items():
            runs = details.get("module_runs") or []
            samples = runs[0]["outbox_pending"]["samples"] if runs else []
            if samples:
                ax.plot([t for t, _ in samples], [n for _, n in samples], label=f"{rate} msg/s")
                drawn = True
    if drawn:
        ax.set_xlabel("seconds into the run")
        ax.set_ylabel("outbox rows pending")
        ax.set_title("2. Outbox depth over time")
        ax.legend(fontsize=7)
    return drawn


def membership_arms(ax: Axes, result: dict[str, Any]) -> bool:
    """Row 5: CareTeam change → invite, per arm (log scale)."""
    rows = [r for r in _rows(result, 5) if not r["measure"].startswith(" ") and r["unit"] == "ms"]
    if not rows:
        return False
    _bars(ax, rows, color_by_target=True)
    ax.set_xscale("log")
    ax.xaxis.set_minor_formatter(NullFormatter())  # (the minor labels overlap)
    ax.set_xlabel("ms from the PUT to the invite on /sync (log)")
    ax.set_title("5. CareTeam change → member invited")
    return True


def databases(ax: Axes, result: dict[str, Any]) -> bool:
    """Row 7: PostgreSQL against SQLite, as ratios."""
    rows = [r for r in _rows(result, 7) if r["ratio"] is not None and "vs SQLite" in r["measure"]]
    if not rows:
        return False
    ax.barh(range(len(rows)), [r["ratio"] for r in rows], color=NEUTRAL)
    ax.set_yticks(
        range(len(rows)), [r["measure"].replace(": PostgreSQL vs SQLite", "") for r in rows]
    )
    ax.tick_params(axis="y", labelsize=7)
    ax.invert_yaxis()
    ax.axvline(1.0, color="black", linewidth=1)
    ax.set_xlabel("PostgreSQL / SQLite (median)")
    ax.set_title("7. Synapse on PostgreSQL vs SQLite")
    return True


def _bars(ax: Axes, rows: list[dict[str, Any]], *, color_by_target: bool) -> None:
    medians = [r["median"] for r in rows]
    low = [r["median"] - r["min"] for r in rows]
    high = [r["max"] - r["median"] for r in rows]
    colors = [
        NEUTRAL
        if not color_by_target or r["target_met"] is None
        else (MET if r["target_met"] else MISSED)
        for r in rows
    ]
    ax.barh(range(len(rows)), medians, xerr=[low, high], color=colors, capsize=3)
    ax.set_yticks(range(len(rows)), [_wrap(r["measure"].strip(), 30) for r in rows], fontsize=7)
    ax.invert_yaxis()


def _wrap(text: str, width: int = 22) -> str:
    words, lines, line = text.split(), [], ""
    for word in words:
        if line and len(line) + len(word) + 1 > width:
            lines.append(line)
            line = word
        else:
            line = f"{line} {word}".strip()
    return "\n".join([*lines, line])
