"""The entry class Synapse loads from ``homeserver.yaml``; it wires the parts together."""

from __future__ import annotations

import logging
from typing import Any

from synapse.module_api import ModuleApi

from synapse_fhir_module.config import ModuleConfig, parse_module_config
from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.health import HEALTH_PATH, FhirReachability, HealthResource
from synapse_fhir_module.service_user import ensure_service_user

logger = logging.getLogger(__name__)

SERVICE_USER_RETRY_MS = 30_000


class FhirModule:
    """Care-team rooms on Matrix, backed by a FHIR server (see DESIGN.md)."""

    def __init__(self, config: ModuleConfig, api: ModuleApi) -> None:
        self._api = api
        self._config = config
        self._fhir = FhirClient(config.fhir)
        # Background work (registration, outbox, reconcile) runs on exactly one instance.
        self._runs_background_work = api.worker_name == config.worker

        api.register_web_resource(HEALTH_PATH, HealthResource(FhirReachability(self._fhir)))

        if self._runs_background_work:
            api.delayed_background_call(0, self._register_service_user, desc="fhir_service_user")

    @staticmethod
    def parse_config(config: dict[str, Any]) -> ModuleConfig:
        return parse_module_config(config)

    async def _register_service_user(self) -> None:
        try:
            await ensure_service_user(self._api, self._config.service_user)
        except Exception:
            logger.exception("Could not register the service user; trying again in 30 s")
            self._api.delayed_background_call(
                SERVICE_USER_RETRY_MS, self._register_service_user, desc="fhir_service_user"
            )
