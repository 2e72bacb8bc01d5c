"""Registration only for people in the care record (``registration.require_fhir_identity``)."""

from __future__ import annotations

import logging
from collections.abc import Collection
from typing import Any

from synapse.module_api import ModuleApi
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.denials import Denied, Reason
from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.fhir_errors import FhirError
from synapse_fhir_module.identity import PERSON_TYPES, is_active
from synapse_fhir_module.person_directory import PersonDirectory

logger = logging.getLogger(__name__)


class RegistrationGate:
    def __init__(
        self,
        api: ModuleApi,
        fhir: FhirClient,
        persons: PersonDirectory,
        *,
        exempt_users: Collection[str],
    ) -> None:
        self._api = api
        self._fhir = fhir
        self._persons = persons
        self._exempt = frozenset(exempt_users)

    async def check_registration_for_spam(
        self,
        email_threepid: dict[str, Any] | None,
        username: str | None,
        request_info: Collection[tuple[str, str]],
        auth_provider_id: str | None = None,
    ) -> RegistrationBehaviour:
        """Allow when the username or the email address belongs to an active FHIR person."""
        try:
            if username is not None:
                user_id = self._api.get_qualified_user_id(username)
                if user_id in self._exempt:
                    return RegistrationBehaviour.ALLOW
                record = await self._persons.lookup(user_id)
                if record.mapped and record.active:
                    return RegistrationBehaviour.ALLOW
            email = (email_threepid or {}).get("address")
            if email_threepid and email_threepid.get("medium") == "email" and email:
                if await self._active_person_with_email(str(email)):
                    return RegistrationBehaviour.ALLOW
        except FhirError as e:
            logger.warning(
                "Refusing a registration: FHIR could not be asked (%s, HTTP %s)",
                type(e).__name__,
                e.status,
            )
            raise Denied(Reason.DIRECTORY_UNAVAILABLE) from None
        logger.info("Refusing a registration: no active FHIR person matches it")
        raise Denied(Reason.NO_FHIR_IDENTITY)

    async def _active_person_with_email(self, email: str) -> bool:
        for resource_type in PERSON_TYPES:
            for person in await self._fhir.search_json(resource_type, {"email": email}):
                if is_active(person):
                    return True
        return False
