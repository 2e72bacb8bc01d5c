"""Monitoring as an operator runs it: a real Prometheus (Debian's) scrapes a real Synapse
with the module and evaluates deploy/prometheus/synapse-fhir.rules.yml; while HAPI is
stopped and messages wait, Prometheus's own API shows the FHIR-unreachable and the
recording-lag alerts pending, then firing, and once HAPI is back, neither.

The rule file waits minutes (``for: 2m``, a lag of 300 s for 5m): right for a pager, too
slow for a test. So the test loads a copy of the file in which, for those two alerts only,
``for:`` and the lag threshold are shorter, and nothing else differs (checked below, and
again in what Prometheus says it loaded). Every other rule is loaded as written, and none
of them may be active while all is well.
"""

from __future__ import annotations

import copy
import re
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import requests
import yaml

from devstack.hapi import HapiDevServer
from devstack.prometheus import PrometheusServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.test_communication_recording import (
    care_room,
    first_written,
    health,
    wait_for_empty_outbox,
)
from tests.monitoring import PROCESS_METRICS, exported_metric_names, load_rules

UNREACHABLE = "SynapseFhirFhirUnreachable"
LAGGING = "SynapseFhirRecordingLagging"
# The file's lag threshold (seconds), and the test's: both as the expression writes them.
FILE_LAG_THRESHOLD = " > 300"
TEST_LAG_THRESHOLD = " > 5"
# Long enough that a poll every 0.2 s cannot miss an alert's pending state.
TEST_FOR = "15s"
TEST_FOR_SECONDS = 15.0


def rules_for_the_test() -> dict[str, Any]:
    """The rule file with only the two alerts' ``for:`` and the lag threshold shortened."""
    original = load_rules()
    rules = copy.deepcopy(original)
    by_alert = by_alert_of(rules)
    lagging = by_alert[LAGGING]
    assert lagging["expr"].count(FILE_LAG_THRESHOLD) == 1, lagging["expr"]
    lagging["expr"] = lagging["expr"].replace(FILE_LAG_THRESHOLD, TEST_LAG_THRESHOLD)
    by_alert[UNREACHABLE]["for"] = lagging["for"] = TEST_FOR

    # Nothing else differs from the file.
    undone = copy.deepcopy(rules)
    undone_by_alert = by_alert_of(undone)
    undone_by_alert[LAGGING]["expr"] = lagging["expr"].replace(
        TEST_LAG_THRESHOLD, FILE_LAG_THRESHOLD
    )
    for alert in (UNREACHABLE, LAGGING):
        undone_by_alert[alert]["for"] = by_alert_of(original)[alert]["for"]
    assert undone == original
    return rules


def by_alert_of(rules: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {rule["alert"]: rule for group in rules["groups"] for rule in group["rules"]}


def seconds(duration: str) -> float:
    number, unit = re.fullmatch(r"([0-9]+)([smh])", duration).groups()  # type: ignore[union-attr]
    return int(number) * {"s": 1, "m": 60, "h": 3600}[unit]


def timestamp(rfc3339: str) -> float:
    """Prometheus's times (nanoseconds) as Python reads them (microseconds)."""
    trimmed = re.sub(r"(\.[0-9]{6})[0-9]*", r"\1", rfc3339).replace("Z", "+00:00")
    return datetime.fromisoformat(trimmed).timestamp()


@pytest.fixture
def prometheus_for(run_dir: Path, tmp_path: Path) -> Iterator[Callable[..., PrometheusServer]]:
    started: list[PrometheusServer] = []

    def start(server: SynapseServer, rules: dict[str, Any]) -> PrometheusServer:
        assert server.metrics_port is not None
        rule_file = tmp_path / "synapse-fhir.rules.yml"
        rule_file.write_text(yaml.safe_dump(rules, sort_keys=False))
        prometheus = PrometheusServer(
            run_dir, [f"127.0.0.1:{server.metrics_port}"], [rule_file], interval="1s"
        )
        SERVER_LOGS.append(prometheus.process.log_path)
        started.append(prometheus)
        prometheus.start()
        return prometheus

    yield start
    for prometheus in started:
        prometheus.stop()


def states(prometheus: PrometheusServer, alert: str) -> set[str]:
    return {a["state"] for a in prometheus.alerts() if a["labels"]["alertname"] == alert}


def test_fhir_unreachable_and_recording_lag_alerts_go_pending_then_firing_then_resolve(
    hapi_running: HapiDevServer,
    start_synapse: Callable[..., SynapseServer],
    prometheus_for: Callable[..., PrometheusServer],
) -> None:
    server = start_synapse(module_config(hapi_running.base_url), metrics=True)
    rules = rules_for_the_test()
    prometheus = prometheus_for(server, rules)

    # What Prometheus loaded: every rule of the file, each waiting as the copy says.
    loaded = {
        rule["name"]: rule
        for group in prometheus.rule_groups()
        for rule in group["rules"]
        if rule["type"] == "alerting"
    }
    expected = by_alert_of(rules)
    assert set(loaded) == set(expected)
    for alert, rule in loaded.items():
        assert rule["duration"] == seconds(expected[alert]["for"]), alert
    assert loaded[UNREACHABLE]["duration"] == loaded[LAGGING]["duration"] == TEST_FOR_SECONDS

    # All is well: Synapse scraped, FHIR up, a message recorded, and no alert active once
    # the rules have been evaluated on that.
    _network, _service, room, gp = care_room(server, hapi_running.base_url)
    first_written(hapi_running, gp, room, "before the outage")
    wait_until(prometheus.targets_up, timeout=30, what="Prometheus scraping Synapse")
    wait_until(
        lambda: [r["value"][1] for r in prometheus.query("synapse_fhir_fhir_up")] == ["1"],
        timeout=30,
        what="synapse_fhir_fhir_up = 1 in Prometheus",
    )
    # (Prometheus's clock: the scalar time() is [t, "t"].)
    healthy_since = float(prometheus.api("query", query="time()")["result"][0])
    wait_until(
        lambda: all(
            timestamp(group["lastEvaluation"]) > healthy_since + 2
            for group in prometheus.rule_groups()
        ),
        timeout=30,
        what="the rules evaluated twice on a healthy Synapse",
    )
    assert prometheus.alerts() == []

    # FHIR goes away; messages keep coming and wait in memory.
    hapi_running.stop()
    for n in range(3):
        gp.send_text(room, f"during the outage {n}")
    wait_until(
        lambda: health(server)["outbox"]["pending"] == 3,
        timeout=30,
        what="3 messages waiting for FHIR",
    )

    seen: dict[str, list[str]] = {UNREACHABLE: [], LAGGING: []}

    def observed(state: str) -> bool:
        for alert, history in seen.items():
            for now in sorted(states(prometheus, alert)):
                if not history or history[-1] != now:
                    history.append(now)
        return all(state in history for history in seen.values())

    wait_until(
        lambda: observed("firing"),
        timeout=120,
        what="both alerts firing while HAPI is stopped",
        interval=0.2,
    )
    # Each was pending (its `for:` running) before it fired.
    assert seen == {UNREACHABLE: ["pending", "firing"], LAGGING: ["pending", "firing"]}
    firing = {a["labels"]["alertname"]: a for a in prometheus.alerts()}
    assert set(firing) == {UNREACHABLE, LAGGING}, firing.keys()
    metrics_target = f"127.0.0.1:{server.metrics_port}"
    assert firing[UNREACHABLE]["labels"] == {
        "alertname": UNREACHABLE,
        "instance": metrics_target,
        "job": "synapse",
        "severity": "critical",
    }
    assert float(firing[UNREACHABLE]["value"]) == 0.0
    assert firing[LAGGING]["labels"]["severity"] == "warning"
    assert float(firing[LAGGING]["value"]) > 5.0  # seconds the oldest message has waited
    assert firing[LAGGING]["annotations"]["runbook_url"] == (
        "docs/monitoring.md#synapsefhirrecordinglagging"
    )

    # FHIR is back: the messages are written and both alerts resolve.
    hapi_running.start()
    wait_for_empty_outbox(server)
    wait_until(
        lambda: prometheus.alerts() == [],
        timeout=60,
        what="no alert active once HAPI is back and the messages written",
    )


def test_synapses_metrics_listener_serves_the_names_the_rules_and_dashboard_use(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """The names in tests/monitoring.py (the module's registry, with prometheus_client's
    suffixes) are what a real Synapse serves, and so are the process metrics."""
    server = start_synapse(module_config(hapi.base_url), metrics=True)
    assert server.metrics_url is not None
    text = requests.get(server.metrics_url, timeout=10).text
    types = dict(re.findall(r"^# TYPE (\S+) (\S+)$", text, flags=re.MULTILINE))
    samples = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", text, flags=re.MULTILINE))

    served = set()
    for name, kind in types.items():
        if not name.startswith("synapse_fhir_"):
            continue
        if kind == "histogram":
            served.update(name + suffix for suffix in ("_bucket", "_sum", "_count"))
        else:  # (a counter's TYPE line already names it ..._total)
            assert kind == "gauge" or name.endswith("_total"), (name, kind)
            served.add(name)
    assert served == exported_metric_names()
    # Where samples are served already (unlabelled metrics), they carry those names.
    assert {s for s in samples if s.startswith("synapse_fhir_")} <= served
    assert PROCESS_METRICS <= samples
