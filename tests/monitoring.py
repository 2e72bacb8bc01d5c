"""What the monitoring tests share: the deploy/ files, Prometheus' own binaries (Debian's
``prometheus`` package), the metric names the module exports, and the metric names a
PromQL expression reads."""

from __future__ import annotations

import importlib
import re
import subprocess
from pathlib import Path

import yaml
from prometheus_client import REGISTRY

from devstack.tools import ToolNotInstalled, find_tool

ROOT = Path(__file__).resolve().parents[1]
RULES = ROOT / "deploy" / "prometheus" / "synapse-fhir.rules.yml"
RULE_TESTS = sorted((ROOT / "deploy" / "prometheus" / "tests").glob("*.yml"))
DASHBOARD = ROOT / "deploy" / "grafana" / "synapse-fhir.dashboard.json"
MONITORING_DOC = ROOT / "docs" / "monitoring.md"

# Every file of the module that defines Prometheus metrics.
METRICS_MODULES = (
    "synapse_fhir_module.recording.metrics",
    "synapse_fhir_module.sync.metrics",
    "synapse_fhir_module.unread.tasks",
    "synapse_fhir_module.web.metrics",
)
# Not the module's: the Synapse process's own (prometheus_client's process collector, on
# the same metrics listener as the module's). The dashboard shows them beside the module's;
# the integration test finds them on a real Synapse's listener.
PROCESS_METRICS = frozenset({"process_resident_memory_bytes", "process_cpu_seconds_total"})

_SUFFIXES = {
    "counter": ("_total",),
    "histogram": ("_bucket", "_sum", "_count"),
    "gauge": ("",),
}


def tool(name: str) -> str:
    """The path of ``name`` (``promtool``, ``prometheus``); a missing one fails the test."""
    try:
        return find_tool(name)
    except ToolNotInstalled as missing:
        raise AssertionError(str(missing)) from None


def promtool(*args: str | Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [tool("promtool"), *map(str, args)], capture_output=True, text=True, timeout=120
    )


def exported_metric_names() -> set[str]:
    """The series names the module's metrics appear under on Synapse's metrics listener
    (a counter ``x`` as ``x_total``, a histogram as ``x_bucket``, ``x_sum``, ``x_count``)."""
    for module in METRICS_MODULES:
        importlib.import_module(module)
    names = set()
    for family in REGISTRY.collect():
        if family.name.startswith("synapse_fhir_"):
            names.update(family.name + suffix for suffix in _SUFFIXES[family.type])
    return names


_KEYWORDS = frozenset(
    {"and", "or", "unless", "by", "without", "on", "ignoring", "group_left", "group_right"}
    | {"offset", "bool", "inf", "nan"}
)


def metric_names_in(expr: str) -> set[str]:
    """The metric names an expression reads: its identifiers, less strings, label
    matchers, grouping labels, ranges, functions and keywords."""
    text = re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)
    text = re.sub(r"\{[^}]*\}", " ", text)
    text = re.sub(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", " ", text)
    text = re.sub(r"\[[^\]]*\]", " ", text)
    names = set()
    for match in re.finditer(r"[A-Za-z_:][A-Za-z0-9_:]*", text):
        following = text[match.end() :].lstrip()
        if following.startswith("(") or match.group() in _KEYWORDS:
            continue  # a function or aggregation, or a keyword
        before = text[match.start() - 1] if match.start() else " "
        if before.isdigit() or before == ".":
            continue  # a number's tail (1e3)
        names.add(match.group())
    return names


def load_rules() -> dict:
    return yaml.safe_load(RULES.read_text())


def alerting_rules() -> list[dict]:
    return [rule for group in load_rules()["groups"] for rule in group["rules"] if "alert" in rule]
