"""Loading many teams with one search (what a batch of the sync does) gives the same
answers as loading each team alone, against the real HAPI: nested teams, a cycle,
PractitionerRoles, ended and inactive participants included."""

from __future__ import annotations

import uuid
from typing import Any

import pytest_twisted
from twisted.internet import defer

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from tests.integration.care_network import CareNetwork


class CacheApi:
    """The ModuleApi members a CareTeamDirectory uses (its cache; no Synapse needed)."""

    server_name = "test"

    def register_cached_function(self, cached_func: Any) -> None:
        pass

    async def invalidate_cache(self, cached_func: Any, keys: tuple[Any, ...]) -> None:
        cached_func.invalidate(keys)

    def run_as_background_process(self, desc: str, func: Any, *args: Any) -> Any:
        return defer.ensureDeferred(func(*args))


class CountingFhir(FhirClient):
    searches = 0

    async def search_json(self, *args: Any, **kwargs: Any) -> list[dict[str, Any]]:
        self.searches += 1
        return await super().search_json(*args, **kwargs)


@pytest_twisted.ensureDeferred
async def test_a_batched_load_answers_exactly_like_one_load_per_team(
    hapi: HapiDevServer, fhir: FhirClient
):
    networks = [CareNetwork(uuid.uuid4().hex[:8]) for _ in range(2)]
    for network in networks:
        network.seed(FhirSeeder(hapi.base_url))
    teams = [t for n in networks for t in (n.team, n.ref("CareTeam", "pharmacy"))]
    teams.append("CareTeam/never-existed")

    one_by_one = CareTeamDirectory(CacheApi(), fhir, ttl=3600.0)  # type: ignore[arg-type]
    alone = {team: await one_by_one.membership(team) for team in teams}

    counting = CountingFhir(FhirConfig(base_url=hapi.base_url, timeout=30.0))
    batched = CareTeamDirectory(CacheApi(), counting, ttl=3600.0)  # type: ignore[arg-type]
    await batched.prefetch(teams)
    assert counting.searches == 1
    together = {team: await batched.membership(team) for team in teams}
    assert counting.searches == 1  # every answer came from the one search

    assert together == alone
    home = alone[networks[0].team]
    assert networks[0].user_id("anna") in home.members  # (the comparison means something)
    assert networks[0].user_id("piet") in home.members  # through the nested pharmacy team
    assert alone["CareTeam/never-existed"].status == "missing"
    # Each answer depends on its own network's people only, not on the whole batch.
    gp_of_first = networks[0].ref("Practitioner", "gp")
    assert batched._dependents[gp_of_first] == one_by_one._dependents[gp_of_first]
    assert not batched._dependents[gp_of_first] & {networks[1].team}
