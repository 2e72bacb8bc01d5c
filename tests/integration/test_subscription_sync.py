"""FHIR drives Matrix through Subscriptions (issue 5, ``sync.subscription: true``): a real HAPI
*without* the shim, and a Synapse whose module registers rest-hook Subscriptions pointing at
itself at start-up; HAPI's deliveries then drive the members' invites and kicks.

Synapse reaches HAPI through a ``StallingProxy`` (pass-through unless a test makes FHIR hang);
HAPI reaches Synapse directly, and the tests read HAPI directly.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.ports import free_port
from devstack.stalling_proxy import StallingProxy
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.sync.fhir_to_matrix import SYNCED_TYPES
from synapse_fhir_module.sync.subscriptions import SEND_DELETE_MESSAGES
from tests.conftest import SERVER_LOGS
from tests.integration.matrix_views import Team, invited_space, member_invites, membership

SECRET = "test-webhook-secret"  # module_config's
ORIGIN_TAG = "urn:synapse-fhir-module:origin|matrix"
# HAPI feeds stored changes to its Subscription matcher every second in the dev server; then
# it delivers, and the module syncs.
APPLIED_WITHIN = 15.0
REGISTERED_WITHIN = 30.0
NO_CACHE = {"Cache-Control": "no-cache"}


class SubscriptionStack:
    """A HAPI without the shim, and a Synapse that subscribes to it."""

    def __init__(self, workdir: Path) -> None:
        self.hapi = HapiDevServer(workdir / "hapi")  # no notify_url: the shim stays off
        self.proxy = StallingProxy(f"http://127.0.0.1:{self.hapi.port}")
        synapse_port = free_port()
        self.synapse_base_url = f"http://127.0.0.1:{synapse_port}"
        self.endpoint = f"{self.synapse_base_url}/_synapse/client/fhir/notify"
        # A sweep every hour: whatever happens within a test came through a Subscription.
        self.synapse = SynapseServer(
            workdir / "synapse",
            module_config(
                self.proxy.url("/fhir"),
                sync={
                    "subscription": True,
                    "subscription_base_url": self.synapse_base_url,
                    "poll_interval": "1h",
                },
            ),
            port=synapse_port,
        )
        SERVER_LOGS.extend(
            [self.hapi.process.log_path, self.synapse.log_path, self.synapse.process.log_path]
        )

    def subscriptions(self) -> list[dict[str, Any]]:
        """The module's Subscriptions, as HAPI has them now."""
        bundle = requests.get(
            f"{self.hapi.base_url}/Subscription",
            params={"_tag": ORIGIN_TAG, "_count": "100"},
            headers=NO_CACHE,
            timeout=30,
        ).json()
        return [entry["resource"] for entry in bundle.get("entry", [])]

    def registered(self) -> dict[str, dict[str, Any]] | None:
        """Criteria → Subscription once exactly the wanted ones are there and active."""
        subscriptions = self.subscriptions()
        by_criteria = {s["criteria"]: s for s in subscriptions}
        if len(subscriptions) != len(SYNCED_TYPES) or set(by_criteria) != {
            f"{resource_type}?" for resource_type in SYNCED_TYPES
        }:
            return None
        for subscription in subscriptions:
            channel = subscription["channel"]
            if subscription["status"] != "active" or channel["endpoint"] != self.endpoint:
                return None
        return by_criteria


@pytest.fixture(scope="module")
def stack(run_dir: Path) -> Iterator[SubscriptionStack]:
    stack = SubscriptionStack(run_dir / "subscription-stack")
    stack.hapi.start()
    try:
        stack.proxy.start()
        try:
            stack.synapse.start()
            try:
                yield stack
            finally:
                stack.synapse.stop()
        finally:
            stack.proxy.stop()
    finally:
        stack.hapi.stop()


def test_one_subscription_per_type_kept_in_place_across_restarts(
    stack: SubscriptionStack,
) -> None:
    registered = wait_until(
        stack.registered, timeout=REGISTERED_WITHIN, what="one active Subscription per type"
    )
    for subscription in registered.values():
        channel = subscription["channel"]
        assert channel["type"] == "rest-hook"
        assert channel["payload"] == "application/fhir+json"
        assert channel["header"] == [f"Authorization: Bearer {SECRET}"]
        assert {"url": SEND_DELETE_MESSAGES, "valueBoolean": True} in channel["extension"]
    # The secret is never logged.
    assert SECRET not in stack.synapse.log_path.read_text(errors="replace")

    # While Synapse is down, one is pointed elsewhere and turned off, another deleted.
    stack.synapse.stop()
    try:
        tampered = registered["CareTeam?"]
        tampered["status"] = "off"
        tampered["channel"]["endpoint"] = "http://127.0.0.1:9/elsewhere"
        put = requests.put(
            f"{stack.hapi.base_url}/Subscription/{tampered['id']}", json=tampered, timeout=30
        )
        assert put.status_code == 200, put.text
        deleted = registered["Patient?"]["id"]
        assert requests.delete(f"{stack.hapi.base_url}/Subscription/{deleted}", timeout=30).ok
    finally:
        stack.synapse.start()

    after = wait_until(
        stack.registered, timeout=REGISTERED_WITHIN, what="the Subscriptions repaired"
    )
    # Repaired in place, the missing one made again, the others untouched: never duplicated.
    assert after["Patient?"]["id"] != deleted
    for criteria, subscription in registered.items():
        if criteria != "Patient?":
            assert after[criteria]["id"] == subscription["id"], criteria
    unchanged = [c for c in registered if c not in ("CareTeam?", "Patient?")]
    assert all(
        after[c]["meta"]["versionId"] == registered[c]["meta"]["versionId"] for c in unchanged
    )


def test_care_team_changes_reach_matrix_through_the_subscriptions(
    stack: SubscriptionStack,
) -> None:
    wait_until(stack.registered, timeout=REGISTERED_WITHIN, what="the Subscriptions active")
    team = Team(stack)
    team.seed()
    spaces = member_invites(team, timeout=APPLIED_WITHIN)
    assert len(set(spaces.values())) == 1, "one space per team"
    space = spaces["anna"]
    for name in ("mallory", "lena"):
        assert invited_space(team.users[name], team.network.team) is None
    anna, bram = team.users["anna"], team.users["bram"]
    anna.join(space)
    bram.join(space)

    # The nurse's participation is removed from the CareTeam: bram is kicked.
    nurse_role = team.network.ref("PractitionerRole", "nurse-role")
    care_team = team.care_team()
    care_team["participant"] = [
        p for p in care_team["participant"] if p["member"]["reference"] != nurse_role
    ]
    team.put_team(care_team)
    wait_until(
        lambda: membership(anna, space, bram.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="bram kicked",
    )
    assert membership(anna, space, anna.user_id) == "join"


def test_a_deleted_care_team_empties_its_space(stack: SubscriptionStack) -> None:
    """HAPI tells of deletes only with its send-delete-messages extension."""
    wait_until(stack.registered, timeout=REGISTERED_WITHIN, what="the Subscriptions active")
    team = Team(stack)
    team.seed()
    # A team of its own that nothing refers to (FHIR refuses to delete a referenced one).
    network = team.network
    small = network.care_team(network.participant(network.ref("Practitioner", "gp")))
    small["id"] = f"small-{network.tag}"
    team.fhir.put(small)
    small_ref = f"CareTeam/{small['id']}"
    anna = team.users["anna"]
    space = wait_until(
        lambda: invited_space(anna, small_ref),
        timeout=APPLIED_WITHIN,
        what="anna invited to the small team's space",
    )
    anna.join(space)

    response = requests.delete(f"{stack.hapi.base_url}/{small_ref}", timeout=30)
    assert response.ok, response.text
    wait_until(
        lambda: membership(anna, space, anna.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="anna removed from the deleted team's space",
    )


def test_fhir_away_at_start_up_delays_the_registration_not_the_sync(
    stack: SubscriptionStack,
) -> None:
    registered = wait_until(
        stack.registered, timeout=REGISTERED_WITHIN, what="the Subscriptions active"
    )
    stack.synapse.stop()
    try:
        for subscription in registered.values():
            url = f"{stack.hapi.base_url}/Subscription/{subscription['id']}"
            assert requests.delete(url, timeout=30).ok
        failures_before = registration_failures(stack)
        stack.proxy.stall(600)  # FHIR hangs: every request of the module times out (5 s)
    finally:
        stack.synapse.start()  # Synapse starts all the same
    try:
        wait_until(
            lambda: registration_failures(stack) > failures_before,
            timeout=REGISTERED_WITHIN,
            what="a failed registration logged",
        )
    finally:
        stack.proxy.stall(0)
    # Retried in the background once FHIR answers again (first retry after 5 s).
    after = wait_until(
        stack.registered, timeout=REGISTERED_WITHIN, what="the Subscriptions registered"
    )
    assert {s["id"] for s in after.values()}.isdisjoint(s["id"] for s in registered.values())
    assert SECRET not in stack.synapse.log_path.read_text(errors="replace")


def registration_failures(stack: SubscriptionStack) -> int:
    log = stack.synapse.log_path.read_text(errors="replace")
    return log.count("Could not register the FHIR Subscriptions")
