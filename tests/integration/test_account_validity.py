"""``account_validity.expire_unmapped`` through a real Synapse: an account no FHIR person
names is expired when it is on, and left alone (the default) when it is off."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import register_user
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.integration.care_network import CareNetwork
from tests.integration.matrix_views import expired_error

WITHIN = 30.0


def test_expire_unmapped_expires_accounts_no_person_names_and_only_those(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    strict = start_synapse(
        module_config(hapi.base_url, account_validity={"enabled": True, "expire_unmapped": True})
    )
    gp = register_user(strict, network.localpart("anna"))  # named by a Practitioner
    stranger = register_user(strict, f"stranger_{network.tag}")  # named by nobody
    wait_until(lambda: expired_error(stranger), timeout=WITHIN, what="the unmapped account expired")
    # The mapped account was looked up in the same way, and stays usable.
    assert gp.whoami() == gp.user_id


def test_without_expire_unmapped_an_account_no_person_names_stays_usable(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    lenient = start_synapse(module_config(hapi.base_url))
    stranger = register_user(lenient, f"stranger_{network.tag}")
    inactive = register_user(lenient, network.localpart("ivo"))  # an inactive Practitioner
    # Looked up in the order they registered: once the inactive practitioner's account is
    # expired, the stranger's lookup is done too.
    wait_until(
        lambda: expired_error(inactive), timeout=WITHIN, what="the inactive person's account"
    )
    assert stranger.whoami() == stranger.user_id
