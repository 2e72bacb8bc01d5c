"""Who is who, as Synapse runs it on every instance: the accounts the registration gate
let in, verified addresses, the one person ↔ account resolution the rest of the module
asks, and the callbacks and endpoints that keep them current."""

from __future__ import annotations

import attr
from synapse.module_api import ModuleApi

from synapse_fhir_module.callback_safety import never_raises
from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.identity.counts import IdentityCounts
from synapse_fhir_module.identity.directory import AddressDirectory
from synapse_fhir_module.identity.email_identity import EmailIdentity
from synapse_fhir_module.identity.openid_userinfo import OpenIdUserInfo
from synapse_fhir_module.identity.records import IdentityRecords
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts
from synapse_fhir_module.identity.service import (
    IDENTITY_PATH,
    IdentityServiceResource,
    usable_account,
)
from synapse_fhir_module.identity.token_bucket import TokenBuckets
from synapse_fhir_module.identity.verified_emails import VerifiedEmails


@attr.s(frozen=True, auto_attribs=True)
class People:
    accounts: RegisteredAccounts  # whose each gated registration was
    emails: VerifiedEmails
    persons: PersonDirectory
    identity: EmailIdentity  # the same resolution, person → accounts, for care teams
    email_on: bool

    def counts(self) -> IdentityCounts:
        return IdentityCounts(
            email=self.email_on, ambiguous_emails=len(self.persons.ambiguous_emails)
        )


def register_people(api: ModuleApi, config: ModuleConfig, fhir: FhirClient) -> People:
    identity_config = config.identity
    accounts = RegisteredAccounts(api)
    emails = VerifiedEmails(
        api, enabled=identity_config.email, trust_sso=identity_config.trust_sso_emails
    )
    persons = PersonDirectory(
        fhir,
        recorded_persons=accounts.persons_of,
        emails=emails,
        email_identifier_systems=identity_config.email_identifier_systems,
    )
    identity = EmailIdentity(
        api, persons, accounts, emails, lookup_person_types=identity_config.lookup_person_types
    )
    if identity_config.email:
        # Which accounts single sign-on makes (their addresses are the provider's word).
        api.register_spam_checker_callbacks(
            check_registration_for_spam=emails.check_registration_for_spam
        )
        # (Wherever the request that changes an address is served.)
        api.register_third_party_rules_callbacks(
            on_add_user_third_party_identifier=never_raises(
                identity.on_add_user_third_party_identifier, fallback=None
            ),
            on_remove_user_third_party_identifier=never_raises(
                identity.on_remove_user_third_party_identifier, fallback=None
            ),
        )
    if identity_config.lookup:
        _register_lookups(api, config, identity)
    return People(accounts, emails, persons, identity, email_on=identity_config.email)


def _register_lookups(api: ModuleApi, config: ModuleConfig, identity: EmailIdentity) -> None:
    """The Identity Service API's lookups on this listener (every instance answers;
    tokens and the pepper are in the database, the address index in each one's memory)."""
    lookup = config.identity
    records = IdentityRecords(api, token_lifetime=lookup.lookup_token_lifetime)
    directory = AddressDirectory(
        identity,
        records.pepper,
        usable_account=lambda user_id: usable_account(api, user_id),
        run_in_background=lambda rebuild: api.run_as_background_process(
            "fhir_identity_index", rebuild
        ),
    )
    openid = OpenIdUserInfo(lookup.lookup_homeserver_url or api.public_baseurl)
    buckets = TokenBuckets(lookup.lookup_burst, lookup.lookup_per_second)
    api.register_web_resource(
        IDENTITY_PATH, IdentityServiceResource(api, records, openid, directory, buckets)
    )
