"""deploy/prometheus: the alert rules load (``promtool check rules``), behave as their unit
tests say (``promtool test rules``), read only metrics the module exports, and each says
how bad it is and where its runbook is."""

from __future__ import annotations

import re

import pytest
import yaml

from tests.monitoring import (
    MONITORING_DOC,
    RULE_TESTS,
    RULES,
    alerting_rules,
    exported_metric_names,
    metric_names_in,
    promtool,
)

ALERTS = [rule["alert"] for rule in alerting_rules()]


def test_promtool_accepts_the_rule_file() -> None:
    result = promtool("check", "rules", RULES)
    assert result.returncode == 0, result.stdout + result.stderr
    assert f"SUCCESS: {len(ALERTS)} rules found" in result.stdout


def test_the_rules_unit_tests_pass() -> None:
    assert RULE_TESTS, "no promtool tests in deploy/prometheus/tests"
    result = promtool("test", "rules", *RULE_TESTS)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "SUCCESS" in result.stdout


def test_a_broken_expectation_fails_the_unit_tests(tmp_path) -> None:
    """(promtool really compares: the same tests against rules that wait less fail.)"""
    hastier = RULES.read_text().replace("for: 2m", "for: 1m", 1)
    (tmp_path / RULES.name).write_text(hastier)
    tests = tmp_path / "tests"
    tests.mkdir()
    for path in RULE_TESTS:
        (tests / path.name).write_text(path.read_text())
    result = promtool("test", "rules", *sorted(tests.glob("*.yml")))
    assert result.returncode != 0
    assert "SynapseFhirFhirUnreachable" in result.stdout + result.stderr


@pytest.mark.parametrize("alert", ALERTS)
def test_each_alert_is_shown_firing_and_not_firing_by_the_unit_tests(alert: str) -> None:
    outcomes = [
        bool(case["exp_alerts"])
        for path in RULE_TESTS
        for test in yaml.safe_load(path.read_text())["tests"]
        for case in test.get("alert_rule_test", [])
        if case["alertname"] == alert
    ]
    assert True in outcomes, f"no test shows {alert} firing"
    assert False in outcomes, f"no test shows {alert} not firing"


def test_the_rules_read_only_metrics_the_module_exports() -> None:
    exported = exported_metric_names()
    for rule in alerting_rules():
        unknown = metric_names_in(rule["expr"]) - exported
        assert not unknown, f"{rule['alert']} reads {unknown}, which the module does not export"


@pytest.mark.parametrize("rule", alerting_rules(), ids=ALERTS)
def test_each_alert_waits_has_a_severity_says_what_and_links_its_runbook(rule: dict) -> None:
    assert re.fullmatch(r"[0-9]+[smh]", rule["for"]), rule.get("for")
    assert rule["labels"]["severity"] in {"critical", "warning"}
    annotations = rule["annotations"]
    assert annotations["summary"] and annotations["description"]
    anchor = f"docs/monitoring.md#{rule['alert'].lower()}"
    assert annotations["runbook_url"] == anchor
    # The runbook section exists: a heading whose anchor is the alert's name.
    headings = re.findall(r"^#+ (.+)$", MONITORING_DOC.read_text(), flags=re.MULTILINE)
    assert rule["alert"] in [heading.strip().strip("`") for heading in headings]


def test_annotations_name_no_person_or_message() -> None:
    """Only the labels the rules group by (instance, job, action, reason) and the value."""
    for rule in alerting_rules():
        for text in rule["annotations"].values():
            used = set(re.findall(r"\$labels\.(\w+)", text))
            assert used <= {"instance", "job", "action", "reason"}, (rule["alert"], used)
