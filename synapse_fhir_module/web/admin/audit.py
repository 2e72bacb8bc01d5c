"""``POST …/admin/api/audit/retry-refused``: put the AuditEvents FHIR refused (the journal
rows set aside, counted as ``audit.refused`` in the health section) back in the queue,
once what FHIR refused them for is fixed. Answers ``{"requeued": n}``. The shipping
instance takes them on its next pass (at once when it is this one)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from synapse.module_api import DirectServeJsonResource, ModuleApi, SynapseRequest

from synapse_fhir_module.web.admin.access import require_admin


class RetryRefusedAuditResource(DirectServeJsonResource):
    def __init__(self, api: ModuleApi, retry_refused: Callable[[], Awaitable[int]]) -> None:
        super().__init__()
        self._api = api
        self._retry_refused = retry_refused

    async def _async_render_POST(self, request: SynapseRequest) -> tuple[int, dict]:
        await require_admin(self._api, request)
        return 200, {"requeued": await self._retry_refused()}
