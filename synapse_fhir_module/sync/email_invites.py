"""Invitations by email (``identity.invite_by_email``): a care-team member with no Matrix
account and exactly one address gets one mail saying which server to join and where.

The mail goes through Synapse's own mailer (its ``email:`` settings). It names the server
and the join page, never the patient, the team or anything clinical: mail leaves the
hospital's hands. At most one per address per ``identity.invite_interval``, remembered in
``email_invite_store`` across restarts. Nothing is mailed to an address several persons
carry (the account it would lead to is nobody's), nor to one an account already holds.

Once the person registers with that address verified, identity by email makes the new
account theirs and the sync invites it (``email_identity``).
"""

from __future__ import annotations

import html
import logging
import time
from collections.abc import Callable, Collection

from synapse.module_api import ModuleApi

from synapse_fhir_module.config import IdentityConfig
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.persons import is_active, matrix_ids_of
from synapse_fhir_module.identity.verified_emails import VerifiedEmails
from synapse_fhir_module.sync import email_invite_store
from synapse_fhir_module.sync.metrics import EMAIL_INVITES

logger = logging.getLogger(__name__)

# Mails per team sync at most (a FHIR writer filling a team with persons must not make
# the server a mail cannon); the rest go at later syncs.
MAX_PER_SYNC = 20


def _now_ms() -> int:
    return int(time.time() * 1000)


def invitation(server_name: str, join_url: str, address: str) -> tuple[str, str, str]:
    """The mail's subject, plain text and HTML: the server and how to join, nothing else."""
    subject = f"Your invitation to {server_name}"
    text = (
        "Hello,\n\n"
        f"You have been invited to the secure messaging service {server_name}.\n\n"
        f"To join, open {join_url} and create an account with this email address "
        f"({address}); you will be asked to confirm it. Your conversations are there as "
        "soon as you have.\n\n"
        "If you did not expect this message, you can ignore it.\n"
    )
    server, url, to = (html.escape(v, quote=True) for v in (server_name, join_url, address))
    body = (
        "<p>Hello,</p>"
        f"<p>You have been invited to the secure messaging service {server}.</p>"
        f'<p>To join, open <a href="{url}">{url}</a> and create an account with this email '
        f"address ({to}); you will be asked to confirm it. Your conversations are there as "
        "soon as you have.</p>"
        "<p>If you did not expect this message, you can ignore it.</p>"
    )
    return subject, text, body


class EmailInvites:
    def __init__(
        self,
        api: ModuleApi,
        config: IdentityConfig,
        persons: PersonDirectory,
        emails: VerifiedEmails,
        *,
        now_ms: Callable[[], int] = _now_ms,
    ) -> None:
        assert config.join_url is not None  # (parse_config requires it with invite_by_email)
        self._api = api
        self._join_url = config.join_url
        self._interval_ms = int(config.invite_interval * 1000)
        self._persons = persons
        self._emails = emails
        self._now_ms = now_ms
        self._table_exists = False

    async def invite(self, persons: Collection[str]) -> int:
        """Mail those of ``persons`` (``Practitioner/12``, ...) who may be invited and were
        not lately; how many mails went out. FHIR errors propagate (the sync retries);
        a mail that fails is counted and tried again at a later sync."""
        if not persons:
            return 0
        sent = 0
        for reference, person in sorted((await self._persons.read_persons(persons)).items()):
            if not is_active(person) or matrix_ids_of(person):
                continue
            addresses = self._persons.emails_of(person)
            if len(addresses) != 1:
                continue  # none, or several: which one would be theirs is a guess
            (address,) = addresses
            if sent >= MAX_PER_SYNC:
                logger.info("Invitations by email: %d sent this sync, the rest wait", sent)
                break
            await self._create_table()
            if await self._api.run_db_interaction(
                "fhir_email_invite_recent",
                email_invite_store.mailed_since,
                address,
                self._now_ms() - self._interval_ms,
            ):
                continue  # (checked before asking FHIR anything about the address)
            if await self._emails.accounts_with([address]):
                continue  # an account holds it already (whoever's it turns out to be)
            carriers = (await self._persons.persons_carrying([address]))[address]
            if set(carriers) != {reference}:
                continue  # several persons carry it: an account with it would be nobody's
            if await self._mail(reference, address):
                sent += 1
        return sent

    async def _mail(self, reference: str, address: str) -> bool:
        await self._create_table()
        now = self._now_ms()
        previous = await self._api.run_db_interaction(
            "fhir_email_invite_claim",
            email_invite_store.claim,
            address,
            now,
            self._interval_ms,
        )
        if previous is None:
            return False  # mailed within the interval
        subject, text, body = invitation(self._api.server_name, self._join_url, address)
        try:
            await self._api.send_mail(address, subject, body, text)
        except Exception as e:
            EMAIL_INVITES.labels("failed").inc()
            # (Synapse's mailer errors may quote the address: only the type is logged.)
            logger.warning(
                "Could not mail %s an invitation (%s); trying again later",
                reference,
                type(e).__name__,
            )
            await self._api.run_db_interaction(
                "fhir_email_invite_release", email_invite_store.release, address, now, previous
            )
            return False
        EMAIL_INVITES.labels("sent").inc()
        logger.info("Mailed %s an invitation to join", reference)
        return True

    async def _create_table(self) -> None:
        if not self._table_exists:
            await self._api.run_db_interaction(
                "fhir_email_invites_schema", email_invite_store.create_schema
            )
            self._table_exists = True
