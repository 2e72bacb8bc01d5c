"""The access token the recorder reads Synapse's event stream with.

A device of the service user, made through ``ModuleApi.register_device`` once and kept in
the module's table (as sensitive as Synapse's own ``access_tokens`` rows: whoever reads
the database has both). A new one is made only when Synapse refuses the kept one — its
device deleted, or the token expired under ``session_lifetime``.
"""

from __future__ import annotations

import logging

from synapse.module_api import ModuleApi

from synapse_fhir_module.recording import position_store

logger = logging.getLogger(__name__)

DEVICE_ID = "SYNAPSE_FHIR_RECORDER"
DEVICE_NAME = "FHIR recorder (reads messages back after a restart)"


class RecordingSession:
    def __init__(self, api: ModuleApi, service_user_id: str) -> None:
        self._api = api
        self._user_id = service_user_id
        self._token: str | None = None

    def access_token(self) -> str | None:
        return self._token

    async def open(self) -> None:
        """The kept token, or a new one if none is kept."""
        row = await self._api.run_db_interaction("fhir_recording_session", position_store.load)
        if row.access_token:
            self._token = row.access_token
        else:
            await self.renew()

    async def renew(self) -> None:
        device_id, token, _expiry, _refresh = await self._api.register_device(
            self._user_id, DEVICE_ID, DEVICE_NAME
        )
        await self._api.run_db_interaction(
            "fhir_recording_session", position_store.save_session, device_id, token
        )
        self._token = token
        logger.info("Recording: a new access token for %s (device %s)", self._user_id, device_id)
