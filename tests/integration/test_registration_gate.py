"""registration.require_fhir_identity: only people in the care record get an account."""

from __future__ import annotations

import uuid
from collections.abc import Callable

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import register_publicly
from devstack.synapse import SynapseServer, module_config
from tests.integration.care_network import CareNetwork

OPEN_REGISTRATION = {
    "enable_registration": True,
    "enable_registration_without_verification": True,
}


def test_registration_needs_an_active_fhir_person_when_required(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    network = CareNetwork(uuid.uuid4().hex[:8])
    network.seed(FhirSeeder(hapi.base_url))
    server = start_synapse(
        module_config(hapi.base_url, registration={"require_fhir_identity": True}),
        extra_config=OPEN_REGISTRATION,
    )

    # Named by an active Practitioner (telecom form) / RelatedPerson (identifier form).
    for name in ("anna", "carla"):
        response = register_publicly(server, network.localpart(name))
        assert response.status_code == 200, response.text
        assert response.json()["user_id"] == network.user_id(name)

    # Nobody in FHIR, or only an inactive practitioner.
    for name in ("eve", "ivo"):
        response = register_publicly(server, network.localpart(name))
        assert response.status_code == 403, response.text
        body = response.json()
        assert body["errcode"] == "M_FORBIDDEN"
        assert body["org.synapse_fhir.reason"] == "no_fhir_identity"
        assert "care record" in body["error"]


def test_anyone_may_register_when_not_required(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    server = start_synapse(module_config(hapi.base_url), extra_config=OPEN_REGISTRATION)
    response = register_publicly(server, f"eve_{uuid.uuid4().hex[:8]}")
    assert response.status_code == 200, response.text
