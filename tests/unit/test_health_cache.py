"""FhirReachability remembers the last probe for a few seconds (no load on FHIR from polling),
and each probe's answer is the ``synapse_fhir_fhir_up`` gauge."""

from __future__ import annotations

from typing import Any

import pytest_twisted
from prometheus_client import REGISTRY

from synapse_fhir_module.fhir.errors import FhirTransientError
from synapse_fhir_module.web.health import FhirReachability


class CountingFhir:
    """Stands in for FhirClient.capabilities; this is a unit test of the cache only."""

    base_url = "http://127.0.0.1:1/fhir"

    def __init__(self) -> None:
        self.calls = 0
        self.up = True

    async def capabilities(self, *, timeout: float | None = None) -> dict[str, Any]:
        self.calls += 1
        if not self.up:
            raise FhirTransientError("down")
        return {"resourceType": "CapabilityStatement"}


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest_twisted.ensureDeferred
async def test_probe_is_cached_then_repeated() -> None:
    fhir, clock = CountingFhir(), FakeClock()
    reachability = FhirReachability(fhir, cache_for=5.0, clock=clock)  # type: ignore[arg-type]

    assert await reachability.is_reachable() is True
    fhir.up = False
    clock.now += 4.9
    assert await reachability.is_reachable() is True  # still the cached answer
    assert fhir.calls == 1

    clock.now += 0.2
    assert await reachability.is_reachable() is False
    assert fhir.calls == 2


def fhir_up() -> float | None:
    return REGISTRY.get_sample_value("synapse_fhir_fhir_up")


@pytest_twisted.ensureDeferred
async def test_the_gauge_follows_each_probe_and_not_the_cached_answers() -> None:
    fhir, clock = CountingFhir(), FakeClock()
    reachability = FhirReachability(fhir, cache_for=5.0, clock=clock)  # type: ignore[arg-type]

    await reachability.probe()
    assert fhir_up() == 1.0
    fhir.up = False
    clock.now += 1.0
    await reachability.probe()  # within the cache: no probe, the gauge stays
    assert (fhir.calls, fhir_up()) == (1, 1.0)
    clock.now += 5.0
    await reachability.probe()
    assert (fhir.calls, fhir_up()) == (2, 0.0)
    fhir.up = True
    clock.now += 5.0
    assert await reachability.is_reachable() is True  # /health's probe moves it too
    assert fhir_up() == 1.0
