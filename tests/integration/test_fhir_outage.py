"""When HAPI is down or hangs: health turns degraded, the client fails fast and transiently,
and everything recovers when HAPI is back (with its H2 file database intact)."""

from __future__ import annotations

import os
import signal
import time
from collections.abc import Callable

import pytest
import pytest_twisted
import requests
from fhir.resources.R4B.patient import Patient

from devstack.hapi import HapiDevServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirTransientError


def health(server: SynapseServer) -> dict:
    return requests.get(server.url("/_synapse/client/fhir/health"), timeout=10).json()


def test_health_is_degraded_but_answers_200_while_hapi_is_stopped_and_recovers(
    hapi_running: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    synapse = start_synapse(module_config(hapi_running.base_url))
    assert health(synapse)["status"] == "ok"

    hapi_running.stop()
    degraded = wait_until(
        lambda: (h := health(synapse))["status"] == "degraded" and h,
        timeout=30,
        what="health turning degraded after HAPI stopped",
    )
    assert degraded["fhir"] == {"reachable": False}
    # What Kubernetes' probes see (deploy/k8s): both still 200, so a FHIR outage neither
    # restarts Synapse (liveness: /health) nor takes it out of its Service (readiness: the
    # module's health).
    module_health = requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=10)
    assert module_health.status_code == 200
    assert requests.get(synapse.url("/health"), timeout=10).status_code == 200

    hapi_running.start()
    recovered = wait_until(
        lambda: (h := health(synapse))["status"] == "ok" and h,
        timeout=30,
        what="health back to ok after HAPI restarted",
    )
    assert recovered["fhir"] == {"reachable": True}


@pytest_twisted.ensureDeferred
async def test_stopped_hapi_is_a_transient_error_and_data_survives_restart(
    hapi_running: HapiDevServer,
) -> None:
    fhir = FhirClient(FhirConfig(base_url=hapi_running.base_url, timeout=30.0))
    patient = await fhir.create(Patient.model_validate({"resourceType": "Patient", "active": True}))

    hapi_running.stop()
    with pytest.raises(FhirTransientError) as caught:
        await fhir.read("Patient", patient.id)
    assert caught.value.status is None
    # Refused at once, not waited out: a timeout would say "timed out".
    assert "unreachable" in str(caught.value)
    assert "timed out" not in str(caught.value)

    hapi_running.start()
    # The H2 file database kept what was written before the stop.
    assert (await fhir.read("Patient", patient.id)).id == patient.id


@pytest_twisted.ensureDeferred
async def test_hanging_hapi_is_a_transient_error_within_the_timeout(
    hapi_running: HapiDevServer,
) -> None:
    fhir = FhirClient(FhirConfig(base_url=hapi_running.base_url, timeout=2.0))
    # A frozen JVM: the kernel still accepts connections, but nothing ever answers.
    os.kill(hapi_running.process.pid, signal.SIGSTOP)
    try:
        started = time.monotonic()
        with pytest.raises(FhirTransientError) as caught:
            await fhir.capabilities()
        waited = time.monotonic() - started
    finally:
        os.kill(hapi_running.process.pid, signal.SIGCONT)
    assert "timed out" in str(caught.value)
    # It waited for the configured deadline, and the wait ended (how promptly is not this
    # test's business: a loaded machine may be late).
    assert waited >= 1.9, waited
