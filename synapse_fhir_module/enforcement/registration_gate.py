"""Registration only for people in the care record (``registration.require_fhir_identity``).

A registration must identify exactly one active FHIR person, consistently, through its
username and its *verified* email address (``registration_rule``). The spam check runs
before the account exists, so the decision is held in memory, keyed by the Matrix id it
was made for, and written to ``synapse_fhir_accounts`` by ``on_user_registration``,
which Synapse calls in the same process right after it stored the user.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attr
from synapse.module_api import ModuleApi
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.enforcement.denials import Denied, Reason
from synapse_fhir_module.enforcement.registration_rule import (
    Candidate,
    Identified,
    Refusal,
    identify,
)
from synapse_fhir_module.fhir.errors import FhirError
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.persons import (
    is_active,
    matrix_ids_of,
    normalise_email,
)
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts

logger = logging.getLogger(__name__)

# How long a decision waits for its registration to complete. Synapse stores the user
# moments after the check; a registration that failed in between leaves its decision
# behind until then.
PENDING_SECONDS = 60.0


class RegistrationGate:
    def __init__(
        self,
        api: ModuleApi,
        persons: PersonDirectory,
        accounts: RegisteredAccounts,
        *,
        exempt_users: Collection[str],
        monotonic: Callable[[], float] = time.monotonic,
        journal: AuditJournal | None = None,
    ) -> None:
        self._api = api
        self._persons = persons
        self._accounts = accounts
        self._exempt = frozenset(exempt_users)
        self._monotonic = monotonic
        self._journal = journal
        # Matrix id → (the person its registration identified, when that was decided).
        self._pending: dict[str, tuple[Identified, float]] = {}

    async def check_registration_for_spam(
        self,
        email_threepid: dict[str, Any] | None,
        username: str | None,
        request_info: Collection[tuple[str, str]],
        auth_provider_id: str | None = None,
    ) -> RegistrationBehaviour:
        """Allow a registration that identifies exactly one active person; refuse the
        rest with ``no_fhir_identity`` (``directory_unavailable`` when FHIR can't say)."""
        if username is None:
            # (A guest, or a username Synapse would make up: no account to tie to anyone.)
            logger.info("Refusing a registration without a username")
            raise self._refused(Reason.NO_FHIR_IDENTITY, None)
        user_id = self._api.get_qualified_user_id(username)
        if user_id in self._exempt:
            if request_info:
                # A client (it has a user agent and an address) asking for the service
                # user's or an exempt account's name: only the module and Synapse's admin
                # APIs make those (they pass none).
                logger.warning("Refusing a client's registration of an exempt account's name")
                raise self._refused(Reason.NO_FHIR_IDENTITY, user_id)
            return RegistrationBehaviour.ALLOW
        email = verified_email(email_threepid)
        try:
            named_by = [
                Candidate(reference, is_active(person), names_an_account=True)
                for reference, person in (await self._persons.persons_naming(user_id)).items()
            ]
            carriers = None if email is None else await self._persons_carrying(email)
            if carriers is not None and len(carriers) == 1 and not named_by:
                (carrier,) = carriers
                if await self._accounts.accounts_of(carrier.reference):
                    carriers = [attr.evolve(carrier, has_recorded_account=True)]
        except FhirError as e:
            logger.warning(
                "Refusing a registration: FHIR could not be asked (%s, HTTP %s)",
                type(e).__name__,
                e.status,
            )
            raise self._refused(Reason.DIRECTORY_UNAVAILABLE, user_id) from None
        decision = identify(named_by, carriers)
        if isinstance(decision, Refusal):
            # Resource ids and counts only: never the username or the address.
            involved = sorted({c.reference for c in [*named_by, *(carriers or [])]})
            logger.info(
                "Refusing a registration%s: %s (persons involved: %s)",
                f" through {auth_provider_id}" if auth_provider_id else "",
                decision.value,
                ", ".join(involved) or "none",
            )
            raise self._refused(Reason.NO_FHIR_IDENTITY, user_id)
        self._hold(user_id, decision)
        self._note(Outcome.SUCCESS, user_id, reason=None, detail=decision.established_by.value)
        logger.info(
            "Allowing a registration as %s (%s)", decision.person, decision.established_by.value
        )
        return RegistrationBehaviour.ALLOW

    async def on_user_registration(self, user_id: str) -> None:
        """The account exists now: record the person its registration identified."""
        held = self._pending.pop(user_id, None)
        if held is None:
            return  # exempt, or made without the spam check (e.g. an appservice)
        decision, _ = held
        await self._accounts.record(user_id, decision.person, decision.established_by.value)
        logger.info("Recorded a new account as %s", decision.person)

    def _hold(self, user_id: str, decision: Identified) -> None:
        now = self._monotonic()
        for stale in [u for u, (_, at) in self._pending.items() if now - at > PENDING_SECONDS]:
            del self._pending[stale]
        held = self._pending.get(user_id)
        if held is not None and held[0].person != decision.person:
            # Two registrations of one free username for different people at once: the
            # account that comes of it could not be told apart. The later one waits.
            logger.info(
                "Refusing a registration as %s: one as %s is under way for the same username",
                decision.person,
                held[0].person,
            )
            raise self._refused(Reason.NO_FHIR_IDENTITY, user_id)
        self._pending[user_id] = (decision, now)

    def _refused(self, reason: Reason, user_id: str | None) -> Denied:
        """The refusal to raise, noted in the audit journal."""
        self._note(Outcome.REFUSED, user_id, reason=reason.value, detail=None)
        return Denied(reason)

    def _note(
        self, outcome: Outcome, user_id: str | None, *, reason: str | None, detail: str | None
    ) -> None:
        if self._journal is not None:
            self._journal.note(
                DecisionKind.REGISTRATION,
                outcome,
                user_id=user_id,
                actor_id=user_id,
                reason=reason,
                detail=detail,
            )

    async def _persons_carrying(self, email: str) -> list[Candidate]:
        carriers = (await self._persons.persons_carrying([email]))[normalise_email(email)]
        return [
            Candidate(reference, is_active(person), names_an_account=bool(matrix_ids_of(person)))
            for reference, person in sorted(carriers.items())
        ]


def verified_email(email_threepid: Mapping[str, Any] | None) -> str | None:
    """The address of the email a registration validated (Synapse's
    ``m.login.email.identity`` stage), else None."""
    if not email_threepid or email_threepid.get("medium") != "email":
        return None
    address = email_threepid.get("address")
    # Synapse sets validated_at once the address was proven; without it, nothing was.
    if not isinstance(address, str) or not address.strip():
        return None
    if not email_threepid.get("validated_at"):
        return None
    return address
