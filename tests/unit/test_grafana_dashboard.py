"""deploy/grafana: every query of the dashboard parses as PromQL (``promtool check rules``
on the queries written as recording rules) and reads only metrics the module exports, or
the Synapse process's own resident memory and CPU time."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import yaml

from tests.monitoring import (
    DASHBOARD,
    PROCESS_METRICS,
    exported_metric_names,
    metric_names_in,
    promtool,
)

# What Grafana puts in place of its variables before a query reaches Prometheus.
GRAFANA_VARIABLES = {
    "$__rate_interval": "1m",
    "$__interval": "15s",
    "$__range": "6h",
    "$job": ".*",
    "$instance": ".*",
}


def dashboard() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    found = []
    for panel in dashboard()["panels"]:
        found.append(panel)
        found.extend(panel.get("panels", []))  # (a collapsed row holds its panels)
    return found


def queries() -> list[tuple[str, str]]:
    """(panel title, expression) of every panel target, Grafana's variables in place."""
    found = []
    for panel in panels():
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in GRAFANA_VARIABLES.items():
                expr = expr.replace(variable, value)
            found.append((panel["title"], expr))
    return found


def test_the_dashboard_has_queries_and_no_variable_is_left_unreplaced() -> None:
    assert len(queries()) >= 20
    for title, expr in queries():
        assert "$" not in expr, (title, expr)


def test_every_query_parses_as_promql(tmp_path: Path) -> None:
    rules = {
        "groups": [
            {
                "name": "dashboard",
                "rules": [
                    {"record": f"dashboard:query_{n}", "expr": expr}
                    for n, (_title, expr) in enumerate(queries())
                ],
            }
        ]
    }
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(yaml.safe_dump(rules))
    result = promtool("check", "rules", path)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(queries())} rules found" in result.stdout


def test_promtool_would_refuse_a_broken_query(tmp_path: Path) -> None:
    """(The check above means something: a query with a syntax error fails it.)"""
    path = tmp_path / "broken.yml"
    broken = {"record": "dashboard:broken", "expr": "sum by (le (rate(x[1m]))"}
    path.write_text(yaml.safe_dump({"groups": [{"name": "d", "rules": [broken]}]}))
    assert promtool("check", "rules", path).returncode != 0


def test_every_metric_is_one_the_module_exports_or_the_synapse_processs_own() -> None:
    allowed = exported_metric_names() | PROCESS_METRICS
    used: set[str] = set()
    for title, expr in queries():
        names = metric_names_in(expr)
        assert names, (title, expr)
        assert names <= allowed, f"{title!r} reads {names - allowed}"
        used |= names
    # ... and the variables' queries too: label_values(<series selector>, <label>).
    for variable in dashboard()["templating"]["list"]:
        if variable["type"] == "query":
            selector = re.fullmatch(r"label_values\((.+),\s*\w+\)", variable["definition"])
            assert selector is not None, variable["definition"]
            assert metric_names_in(selector.group(1)) <= allowed, variable["name"]


def test_the_datasource_is_a_variable_every_panel_uses() -> None:
    variables = {v["name"]: v for v in dashboard()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    for panel in panels():
        if panel["type"] == "row":
            continue
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == "${datasource}", panel["title"]


def test_each_panel_has_a_unique_id_and_a_place() -> None:
    ids = [panel["id"] for panel in panels()]
    assert len(ids) == len(set(ids))
    assert dashboard()["schemaVersion"] >= 39
    for panel in panels():
        grid = panel["gridPos"]
        assert 0 <= grid["x"] and grid["x"] + grid["w"] <= 24, panel["title"]
