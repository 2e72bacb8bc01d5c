"""The module's own Matrix account, which owns spaces and rooms and relays FHIR."""

from __future__ import annotations

import logging

from synapse.module_api import ModuleApi
from synapse.module_api.errors import Codes, SynapseError

logger = logging.getLogger(__name__)

DISPLAY_NAME = "Care network (FHIR)"


async def ensure_service_user(api: ModuleApi, localpart: str) -> str:
    """Register the service user if it does not exist yet; return its user id."""
    user_id = api.get_qualified_user_id(localpart)
    if await api.get_userinfo_by_id(user_id) is not None:
        return user_id
    try:
        await api.register_user(localpart, displayname=DISPLAY_NAME)
        logger.info("Registered the service user %s", user_id)
    except SynapseError as e:
        # Another instance may have registered it in the meantime.
        if e.errcode != Codes.USER_IN_USE:
            raise
    return user_id


RETRY_MS = 30_000


def register_service_user_soon(api: ModuleApi, localpart: str) -> None:
    """In the background, until it works (the database may not be ready at start-up)."""

    async def register() -> None:
        try:
            await ensure_service_user(api, localpart)
        except Exception:
            logger.exception("Could not register the service user; trying again in 30 s")
            api.delayed_background_call(RETRY_MS, register, desc="fhir_service_user")

    api.delayed_background_call(0, register, desc="fhir_service_user")
