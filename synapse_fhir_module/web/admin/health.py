"""``GET …/admin/api/health``: what ``/health`` answers, and the lags behind it — how long
the oldest message not in FHIR yet has waited, when the oldest FHIR change not yet in
Matrix was queued (``web.health.HealthReport`` computes both, once)."""

from __future__ import annotations

from synapse.module_api import DirectServeJsonResource, ModuleApi, SynapseRequest

from synapse_fhir_module.web.admin.access import require_admin
from synapse_fhir_module.web.health import HealthReport


class AdminHealthResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi, report: HealthReport) -> None:
        super().__init__()
        self._api = api
        self._report = report

    async def _async_render_GET(self, request: SynapseRequest) -> tuple[int, dict]:
        await require_admin(self._api, request)
        health, lags = await self._report.with_lags()
        return 200, {"health": health, "lags": lags}
