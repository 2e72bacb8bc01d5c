"""Access as Synapse runs it, on every instance: registration, account validity and the
care-team rules registered as Synapse's callbacks, and what the module forgets when FHIR
says a resource changed."""

from __future__ import annotations

from typing import Any

from synapse.module_api import NOT_SPAM, ModuleApi
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.callback_safety import never_raises
from synapse_fhir_module.config import EncryptedRoomsPolicy, ModuleConfig
from synapse_fhir_module.enforcement.account_validity import AccountValidity
from synapse_fhir_module.enforcement.callback_guard import access_decision
from synapse_fhir_module.enforcement.gate import CareTeamGate, RemoveMember
from synapse_fhir_module.enforcement.registration_gate import RegistrationGate
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.conventions import PERSON_TYPES
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts

PERSON_PREFIXES = tuple(f"{kind}/" for kind in PERSON_TYPES)


def register_accounts(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    persons: PersonDirectory,
    accounts: RegisteredAccounts,
    exempt: frozenset[str],
    journal: AuditJournal,
) -> AccountValidity | None:
    """Registration only for people FHIR knows (``registration.require_fhir_identity``),
    and accounts that expire while their person is inactive (``account_validity``)."""
    if config.registration.require_fhir_identity:
        gate = RegistrationGate(api, persons, accounts, exempt_users=exempt, journal=journal)
        api.register_spam_checker_callbacks(
            check_registration_for_spam=access_decision(
                gate.check_registration_for_spam,
                fail_closed=True,
                allow=RegistrationBehaviour.ALLOW,
            )
        )
        # Registered before account validity's: the new account's person is recorded by
        # the time validity looks the account up.
        api.register_account_validity_callbacks(
            on_user_registration=never_raises(gate.on_user_registration, fallback=None)
        )
    if not config.account_validity.enabled:
        return None
    validity = AccountValidity(
        api, persons, exempt_users=exempt, expire_unmapped=config.account_validity.expire_unmapped
    )
    api.register_account_validity_callbacks(
        is_user_expired=never_raises(validity.is_user_expired, fallback=None),
        on_user_registration=never_raises(validity.on_user_registration, fallback=None),
    )
    # Every instance answers requests from its own memory, so each one refreshes it.
    api.looping_background_call(
        validity.refresh_known,
        config.enforcement.cache_ttl * 1000,
        desc="fhir_refresh_persons",
        run_on_all_instances=True,
    )
    return validity


def register_care_team_rules(
    api: ModuleApi,
    config: ModuleConfig,
    *,
    bindings: RoomBindings,
    teams: CareTeamDirectory,
    accounts: RegisteredAccounts,
    service_user_id: str,
    exempt: frozenset[str],
    remove_member_soon: RemoveMember,
    journal: AuditJournal,
) -> None:
    """Only the current care team joins, reads and acts in its rooms (``enforcement``)."""
    if not config.enforcement.enabled:
        return
    fail_closed = config.enforcement.fail_closed
    gate = CareTeamGate(
        bindings,
        teams,
        accounts=accounts,
        service_user_id=service_user_id,
        exempt_users=exempt,
        fail_closed=fail_closed,
        is_local=api.is_mine,
        remove_member_soon=remove_member_soon,
        forbid_encryption=config.communication.encrypted_rooms is EncryptedRoomsPolicy.FORBID,
        journal=journal,
    )

    def decision(callback: Any, allow: Any = NOT_SPAM) -> Any:
        return access_decision(callback, fail_closed=fail_closed, allow=allow)

    api.register_spam_checker_callbacks(
        user_may_invite=decision(gate.user_may_invite),
        user_may_join_room=decision(gate.user_may_join_room),
        user_may_create_room=decision(gate.user_may_create_room),
        check_event_for_spam=decision(gate.check_event_for_spam),
    )
    api.register_third_party_rules_callbacks(
        check_event_allowed=decision(gate.check_event_allowed, allow=(True, None)),
    )


class Forgetting:
    """What the module forgets when FHIR says a resource changed; the next decision asks
    FHIR again."""

    def __init__(
        self,
        teams: CareTeamDirectory,
        bindings: RoomBindings,
        persons: PersonDirectory,
        validity: AccountValidity | None,
    ) -> None:
        self._teams = teams
        self._bindings = bindings
        self._persons = persons
        self._validity = validity

    async def forget(self, reference: str) -> None:
        """``reference`` (``CareTeam/12``, ...) changed."""
        if reference.startswith("CareTeam/"):
            await self._teams.invalidate_team(reference)
        if reference.startswith("CommunicationRequest/"):
            self._bindings.forget_all()
        await self._teams.invalidate_resource(reference)
        if self._validity is not None and reference.startswith(PERSON_PREFIXES):
            # (A scan of every remembered user: only for the resources that can be persons.)
            for user_id in self._persons.users_of_person(reference):
                self._validity.look_up_soon(user_id)
