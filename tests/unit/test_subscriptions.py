"""Which Subscriptions to create, change and delete so that FHIR holds exactly the wanted ones."""

from __future__ import annotations

from typing import Any

from synapse_fhir_module.sync.subscriptions import (
    SEND_DELETE_MESSAGES,
    is_up_to_date,
    plan_subscriptions,
    wanted_subscription,
)

ENDPOINT = "https://matrix.example.org/_synapse/client/fhir/notify"


def wanted(resource_type: str, secret: str = "s3cret", endpoint: str = ENDPOINT) -> dict[str, Any]:
    return wanted_subscription(
        resource_type, endpoint=endpoint, secret=secret, server_name="example.org"
    )


def stored(subscription_id: str, subscription: dict[str, Any], **changes: Any) -> dict[str, Any]:
    """As FHIR answers it: an id, active, HAPI's own tag added."""
    result = {**subscription, "id": subscription_id, "status": "active", **changes}
    result["meta"] = {"tag": [*subscription["meta"]["tag"], {"system": "urn:hapi", "code": "x"}]}
    return result


def test_the_wanted_subscription() -> None:
    subscription = wanted("CareTeam")
    assert subscription["criteria"] == "CareTeam?"
    assert subscription["status"] == "requested"
    assert subscription["channel"] == {
        "extension": [{"url": SEND_DELETE_MESSAGES, "valueBoolean": True}],
        "type": "rest-hook",
        "endpoint": ENDPOINT,
        "payload": "application/fhir+json",
        "header": ["Authorization: Bearer s3cret"],
    }
    tags = subscription["meta"]["tag"]
    assert {"system": "urn:synapse-fhir-module:origin", "code": "matrix"} in tags
    assert {"system": "urn:synapse-fhir-module:server", "code": "example.org"} in tags


def test_nothing_there_creates_one_per_type() -> None:
    plan = plan_subscriptions([], [wanted("CareTeam"), wanted("Patient")])
    assert [s["criteria"] for s in plan.create] == ["CareTeam?", "Patient?"]
    assert (plan.update, plan.delete) == ([], [])


def test_up_to_date_subscriptions_are_left_alone() -> None:
    existing = [stored("1", wanted("CareTeam")), stored("2", wanted("Patient"), status="requested")]
    assert plan_subscriptions(existing, [wanted("CareTeam"), wanted("Patient")]).empty


def test_a_changed_secret_endpoint_or_status_is_updated_in_place() -> None:
    existing = [
        stored("1", wanted("CareTeam", secret="old")),
        stored("2", wanted("Patient", endpoint="http://old.example.org/notify")),
        stored("3", wanted("Communication"), status="off"),
    ]
    new = [wanted("CareTeam"), wanted("Patient"), wanted("Communication")]
    plan = plan_subscriptions(existing, new)
    assert [(s["id"], s["criteria"]) for s in plan.update] == [
        ("1", "CareTeam?"),
        ("2", "Patient?"),
        ("3", "Communication?"),
    ]
    assert all(is_up_to_date(s, w) for s, w in zip(plan.update, new, strict=True))
    assert (plan.create, plan.delete) == ([], [])


def test_without_the_delete_extension_it_is_not_up_to_date() -> None:
    subscription = stored("1", wanted("CareTeam"))
    subscription["channel"] = {**subscription["channel"], "extension": []}
    assert not is_up_to_date(subscription, wanted("CareTeam"))


def test_duplicates_and_types_no_longer_synced_are_deleted_keeping_a_right_one() -> None:
    existing = [
        stored("1", wanted("CareTeam", secret="old")),
        stored("2", wanted("CareTeam")),
        stored("3", wanted("CareTeam")),
        stored("4", wanted("Observation")),
    ]
    plan = plan_subscriptions(existing, [wanted("CareTeam")])
    assert plan.create == [] and plan.update == []
    assert sorted(plan.delete) == ["1", "3", "4"]
