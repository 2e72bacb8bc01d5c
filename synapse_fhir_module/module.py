"""The entry class Synapse loads from ``homeserver.yaml``; it wires the parts together."""

from __future__ import annotations

import logging
from typing import Any

from synapse.module_api import NOT_SPAM, EventBase, ModuleApi, StateMap
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.config import EncryptedRoomsPolicy, ModuleConfig, parse_module_config
from synapse_fhir_module.enforcement.account_validity import AccountValidity
from synapse_fhir_module.enforcement.binding_state import BINDING_STATE_TYPES
from synapse_fhir_module.enforcement.callback_guard import access_decision, never_raises
from synapse_fhir_module.enforcement.gate import CareTeamGate
from synapse_fhir_module.enforcement.registration_gate import RegistrationGate
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import PERSON_TYPES
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory, DirectoryUnavailable
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
from synapse_fhir_module.recording import fault_hooks
from synapse_fhir_module.recording.recent_writes import RecentWrites
from synapse_fhir_module.recording.recorder import (
    CommunicationRecorder,
    now_ms,
)
from synapse_fhir_module.service_user import ensure_service_user
from synapse_fhir_module.sync.care_rooms import CareRooms
from synapse_fhir_module.sync.change_queue import ChangeQueue
from synapse_fhir_module.sync.email_invites import EmailInvites
from synapse_fhir_module.sync.fhir_to_matrix import FhirSync
from synapse_fhir_module.sync.reconcile import Reconciler
from synapse_fhir_module.sync.subscriptions import SubscriptionRegistrar
from synapse_fhir_module.sync.team_boundaries import TeamBoundaries
from synapse_fhir_module.unread.tasks import INTERVAL_MS as UNREAD_INTERVAL_MS
from synapse_fhir_module.unread.tasks import SWEEP_INTERVAL_MS as UNREAD_SWEEP_INTERVAL_MS
from synapse_fhir_module.unread.tasks import UnreadTasks, note_messages_txn, note_relayed_txn
from synapse_fhir_module.web.dead_letters import (
    DEAD_LETTERS_PATH,
    RETRY_PATH,
    DeadLettersResource,
    RetryDeadLettersResource,
)
from synapse_fhir_module.web.health import (
    HEALTH_PATH,
    FhirReachability,
    HealthResource,
    IdentityCounts,
    SyncCounts,
    no_outbox,
)
from synapse_fhir_module.web.webhook import NOTIFY_PATH, Notification, NotifyResource

logger = logging.getLogger(__name__)

SERVICE_USER_RETRY_MS = 30_000
RECORDER_RETRY_MS = 5_000
BINDINGS_RETRY_MS = 5_000
# How often the syncing instance looks for accounts whose verified addresses changed.
IDENTITY_CHANGES_INTERVAL_MS = 1_000
PERSON_PREFIXES = tuple(f"{kind}/" for kind in PERSON_TYPES)


class FhirModule:
    """Care-team rooms on Matrix, backed by a FHIR server (see DESIGN.md)."""

    def __init__(self, config: ModuleConfig, api: ModuleApi) -> None:
        self._api = api
        self._config = config
        self._fhir = FhirClient(config.fhir)
        self._service_user_id = api.get_qualified_user_id(config.service_user)
        exempt = {self._service_user_id, *config.enforcement.exempt_users}
        self._exempt = frozenset(exempt)
        # Background work (registration, recording, reconcile) runs on exactly one
        # instance. (Recording reads Synapse's event stream from its saved position, so a
        # message stored while that instance was down is recorded once it is back.)
        self._runs_background_work = api.worker_name == config.worker
        fault_hooks.warn_if_armed()

        accounts = self._accounts = RegisteredAccounts(api)  # whose each gated registration was
        emails = VerifiedEmails(
            api, enabled=config.identity.email, trust_sso=config.identity.trust_sso_emails
        )
        self._persons = PersonDirectory(
            self._fhir,
            recorded_persons=accounts.persons_of,
            emails=emails,
            email_identifier_systems=config.identity.email_identifier_systems,
        )
        # The same resolution, person → accounts, for care teams.
        self._identity = EmailIdentity(
            api,
            self._persons,
            accounts,
            emails,
            lookup_person_types=config.identity.lookup_person_types,
        )
        self._teams = CareTeamDirectory(
            api,
            self._fhir,
            ttl=config.enforcement.cache_ttl,
            resolver=self._identity.resolver_for,
        )
        self._bindings = RoomBindings(api, self._fhir, self._service_user_id)
        self._validity: AccountValidity | None = None
        self._recorder: CommunicationRecorder | None = None
        # What the recorder wrote, so the sync skips the shim's echo of it without a read.
        self._recent_writes = RecentWrites()
        self._unread: UnreadTasks | None = None
        if config.communication.unread_tasks:
            self._unread = UnreadTasks(
                api, self._fhir, self._bindings, self._teams, profile=config.communication.profile
            )
        if config.communication.enabled:
            self._recorder = CommunicationRecorder(
                api,
                config.communication,
                self._fhir,
                self._bindings,
                self._teams,
                self._persons,
                service_user_id=self._service_user_id,
                exempt_users=config.enforcement.exempt_users,
                recent_writes=self._recent_writes,
                drains=self._runs_background_work,
                note_messages=note_messages_txn if self._unread is not None else None,
            )

        api.register_web_resource(
            HEALTH_PATH,
            HealthResource(
                FhirReachability(self._fhir),
                self._recorder.counts if self._recorder else no_outbox,
                self._sync_counts,
                self._identity_counts,
            ),
        )
        if self._recorder is not None:
            api.register_web_resource(DEAD_LETTERS_PATH, DeadLettersResource(api))
            # Only the background instance drains; elsewhere its 1 s wake-up finds the rows.
            wake = self._recorder.table_changed if self._runs_background_work else _do_nothing
            api.register_web_resource(RETRY_PATH, RetryDeadLettersResource(api, now_ms, wake))
        if config.enforcement.enabled or self._recorder is not None:
            # (Synapse loads a room's state for every event once any module listens here:
            # register only when needed.)
            api.register_third_party_rules_callbacks(on_new_event=self._on_new_event)

        if config.identity.email:
            # Which accounts single sign-on makes (their addresses are the provider's word).
            api.register_spam_checker_callbacks(
                check_registration_for_spam=emails.check_registration_for_spam
            )
            # (Wherever the request that changes an address is served.)
            api.register_third_party_rules_callbacks(
                on_add_user_third_party_identifier=never_raises(
                    self._identity.on_add_user_third_party_identifier, fallback=None
                ),
                on_remove_user_third_party_identifier=never_raises(
                    self._identity.on_remove_user_third_party_identifier, fallback=None
                ),
            )
        if self._unread is not None:
            self._register_unread_tasks(self._unread)
        if config.enforcement.enabled:
            self._register_enforcement(exempt)
        if config.registration.require_fhir_identity:
            gate = RegistrationGate(api, self._persons, accounts, exempt_users=exempt)
            api.register_spam_checker_callbacks(
                check_registration_for_spam=access_decision(
                    gate.check_registration_for_spam,
                    fail_closed=True,
                    allow=RegistrationBehaviour.ALLOW,
                )
            )
            # Registered before account validity's: the new account's person is recorded
            # by the time validity looks the account up.
            api.register_account_validity_callbacks(
                on_user_registration=never_raises(gate.on_user_registration, fallback=None)
            )
        if config.account_validity.enabled:
            self._register_account_validity(exempt)
        if config.identity.lookup:
            self._register_identity_lookups()

        # FHIR says what changed (DESIGN §5); the background instance makes Matrix match.
        api.register_web_resource(
            NOTIFY_PATH, NotifyResource(config.webhook.secret, self._on_notification)
        )
        self._sync: FhirSync | None = None
        self._changes: ChangeQueue | None = None
        self._boundaries = TeamBoundaries(api, self._check_team)
        if config.sync.enabled and self._runs_background_work:
            rooms = CareRooms(
                api, config.sync, service_user_id=self._service_user_id, exempt_users=exempt
            )
            invites = None
            if config.identity.invite_by_email:
                invites = EmailInvites(api, config.identity, self._persons, emails)
            self._sync = FhirSync(
                api,
                config.sync,
                self._fhir,
                self._teams,
                rooms,
                service_user_id=self._service_user_id,
                exempt_users=frozenset(exempt),
                bindings=self._bindings,
                persons=self._persons,
                boundaries=self._boundaries,
                now_ms=now_ms,
                accounts=accounts,
                invites=invites,
                note_relayed=note_relayed_txn if self._unread is not None else None,
            )
            self._changes = ChangeQueue(
                api, self._sync.apply, self.invalidate, prepare=self._sync.prepare
            )
            self._reconciler = Reconciler(api, self._fhir, self._changes)
        else:
            # (The background instance starts it with the sync's tables.)
            api.delayed_background_call(0, self._start_bindings, desc="fhir_bindings_start")

        if self._runs_background_work:
            api.delayed_background_call(0, self._register_service_user, desc="fhir_service_user")
            if self._recorder is not None:
                api.delayed_background_call(0, self._start_recorder, desc="fhir_outbox_start")
                # Rows waiting for a retry are picked up by this periodic wake-up. (The
                # module decides where background work runs — `worker` — so the loop must
                # not also depend on Synapse's own run_background_tasks_on.)
                api.looping_background_call(
                    self._recorder.wake, 1000, desc="fhir_outbox_wake", run_on_all_instances=True
                )
                # Where recording stands in Synapse's stream: read on, and saved.
                api.looping_background_call(
                    self._recorder.step,
                    int(config.communication.checkpoint_interval * 1000),
                    desc="fhir_recording_step",
                    run_on_all_instances=True,
                )
            if self._sync is not None:
                api.delayed_background_call(0, self._start_sync, desc="fhir_sync_start")

    @staticmethod
    def parse_config(config: dict[str, Any]) -> ModuleConfig:
        return parse_module_config(config)

    async def invalidate(self, reference: str) -> None:
        """Forget what the module knows about a FHIR resource (``CareTeam/12``, ...),
        because it changed; the next decision asks FHIR again."""
        if reference.startswith("CareTeam/"):
            await self._teams.invalidate_team(reference)
        if reference.startswith("CommunicationRequest/"):
            self._bindings.forget_all()
        await self._teams.invalidate_resource(reference)
        if self._validity is not None and reference.startswith(PERSON_PREFIXES):
            # (A scan of every remembered user: only for the resources that can be persons.)
            for user_id in self._persons.users_of_person(reference):
                self._validity.look_up_soon(user_id)

    def _on_notification(self, notification: Notification) -> None:
        """A FHIR resource changed (the webhook answers at once; the work is queued)."""
        reference = notification.reference
        if reference in self._recent_writes:
            return  # the shim's echo of a message the recorder just wrote: nothing to do
        if self._changes is not None:
            self._changes.push(reference)  # (invalidates the caches at once)
        else:
            self._api.run_as_background_process("fhir_notify", self.invalidate, reference)

    async def _start_sync(self) -> None:
        """Tables, then the first sweep (which makes the spaces FHIR has and Matrix lacks),
        then a sweep every ``sync.poll_interval``."""
        assert self._sync is not None and self._changes is not None
        try:
            await ensure_service_user(self._api, self._config.service_user)
            await self._sync.start()
        except Exception:
            logger.exception("Could not start the FHIR sync; trying again in 30 s")
            self._api.delayed_background_call(
                SERVICE_USER_RETRY_MS, self._start_sync, desc="fhir_sync_start"
            )
            return
        self._changes.open()
        if self._config.identity.email:
            self._api.looping_background_call(
                self._apply_identity_changes,
                IDENTITY_CHANGES_INTERVAL_MS,
                desc="fhir_identity_changes",
                run_on_all_instances=True,  # (gated by `worker`, as above)
            )
        if self._config.sync.subscription:  # in the background: FHIR may be away
            SubscriptionRegistrar(self._api, self._fhir, self._config).start()
        # The loops first: whatever the first sweep meets, the later ones still run.
        self._api.looping_background_call(
            self._reconciler.sweep,
            self._config.sync.poll_interval * 1000,
            desc="fhir_reconcile",
            run_on_all_instances=True,  # (gated by `worker`, as above)
        )
        self._api.looping_background_call(
            self._reconciler.full_reconcile,
            self._config.sync.full_reconcile_interval * 1000,
            desc="fhir_full_reconcile",
            run_on_all_instances=True,
        )
        await self._reconciler.sweep()
        # Boundaries live in memory: after a restart every team is synced (and scheduled).
        await self._reconciler.full_reconcile()

    async def _apply_identity_changes(self) -> None:
        """Re-sync the teams of accounts whose verified addresses changed (noted by
        whichever instance served the change)."""
        assert self._changes is not None
        try:
            await self._identity.apply_changes(self._changes.push, self._teams.teams_depending_on)
        except Exception as e:  # (the changes stay noted: the next round tries again)
            logger.info("Applying email changes failed (%s); trying again", type(e).__name__)

    def _identity_counts(self) -> IdentityCounts:
        return IdentityCounts(
            email=self._config.identity.email,
            ambiguous_emails=len(self._persons.ambiguous_emails),
        )

    async def _start_bindings(self) -> None:
        try:
            await self._bindings.start()
        except Exception as e:
            # Until the table is there, bindings come from room state alone.
            logger.warning("Could not open the binding record (%s); trying again in 5 s", e)
            self._api.delayed_background_call(
                BINDINGS_RETRY_MS, self._start_bindings, desc="fhir_bindings_start"
            )

    def _check_team(self, team_ref: str) -> None:
        """Make Matrix follow a team again, with no known change (a period boundary)."""
        if self._changes is not None:
            self._changes.check(team_ref)

    async def _sync_counts(self) -> SyncCounts:
        if self._sync is None or self._changes is None:
            return SyncCounts(running=False)
        return SyncCounts(
            running=True,
            queued=len(self._changes),
            retrying=self._changes.retrying,
            scheduled_boundaries=len(self._boundaries),
            binding_incidents=self._sync.binding_incidents,
        )

    async def _start_recorder(self) -> None:
        assert self._recorder is not None
        try:
            if self._unread is not None:
                # (The recorder notes messages into its tables in the outbox's transaction.)
                await self._unread.start()
            await self._recorder.start()
        except Exception as e:
            # Until the tables exist nothing is enqueued: keep trying.
            logger.warning("Could not start the outbox (%s); trying again in 5 s", e)
            self._api.delayed_background_call(
                RECORDER_RETRY_MS, self._start_recorder, desc="fhir_outbox_start"
            )

    def _register_unread_tasks(self, unread: UnreadTasks) -> None:
        """Read markers are noted wherever Synapse stores them; the background instance
        writes the Tasks."""
        self._api.register_account_data_callbacks(
            on_account_data_updated=never_raises(unread.on_account_data_updated, fallback=None)
        )
        self._api.delayed_background_call(0, self._start_unread, desc="fhir_unread_start")
        if self._runs_background_work:
            self._api.looping_background_call(
                unread.run,
                UNREAD_INTERVAL_MS,
                desc="fhir_unread_tasks",
                run_on_all_instances=True,  # (gated by `worker`, as above)
            )
            self._api.looping_background_call(
                unread.sweep,
                UNREAD_SWEEP_INTERVAL_MS,
                desc="fhir_unread_sweep",
                run_on_all_instances=True,
            )

    async def _start_unread(self) -> None:
        assert self._unread is not None
        try:
            await self._unread.start()
        except Exception as e:
            logger.warning("Could not open the unread-marker tables (%s); trying again in 5 s", e)
            self._api.delayed_background_call(
                RECORDER_RETRY_MS, self._start_unread, desc="fhir_unread_start"
            )

    def _register_enforcement(self, exempt: set[str]) -> None:
        config = self._config.enforcement
        gate = CareTeamGate(
            self._bindings,
            self._teams,
            accounts=self._accounts,
            service_user_id=self._service_user_id,
            exempt_users=exempt,
            fail_closed=config.fail_closed,
            is_local=self._api.is_mine,
            remove_member_soon=self._remove_member_soon,
            forbid_encryption=(
                self._config.communication.encrypted_rooms is EncryptedRoomsPolicy.FORBID
            ),
        )

        def decision(callback: Any, allow: Any = NOT_SPAM) -> Any:
            return access_decision(callback, fail_closed=config.fail_closed, allow=allow)

        self._api.register_spam_checker_callbacks(
            user_may_invite=decision(gate.user_may_invite),
            user_may_join_room=decision(gate.user_may_join_room),
            user_may_create_room=decision(gate.user_may_create_room),
            check_event_for_spam=decision(gate.check_event_for_spam),
        )
        self._api.register_third_party_rules_callbacks(
            check_event_allowed=decision(gate.check_event_allowed, allow=(True, None)),
        )

    def _register_account_validity(self, exempt: set[str]) -> None:
        validity = self._validity = AccountValidity(
            self._api,
            self._persons,
            exempt_users=exempt,
            expire_unmapped=self._config.account_validity.expire_unmapped,
        )
        self._api.register_account_validity_callbacks(
            is_user_expired=never_raises(validity.is_user_expired, fallback=None),
            on_user_registration=never_raises(validity.on_user_registration, fallback=None),
        )
        # Every instance answers requests from its own memory, so each one refreshes it.
        self._api.looping_background_call(
            validity.refresh_known,
            self._config.enforcement.cache_ttl * 1000,
            desc="fhir_refresh_persons",
            run_on_all_instances=True,
        )

    def _register_identity_lookups(self) -> None:
        """The Identity Service API's lookups on this listener (every instance answers;
        tokens and the pepper are in the database, the address index in each one's memory)."""
        config = self._config.identity
        records = IdentityRecords(self._api, token_lifetime=config.lookup_token_lifetime)
        directory = AddressDirectory(
            self._identity,
            records.pepper,
            usable_account=lambda user_id: usable_account(self._api, user_id),
            run_in_background=lambda rebuild: self._api.run_as_background_process(
                "fhir_identity_index", rebuild
            ),
        )
        openid = OpenIdUserInfo(config.lookup_homeserver_url or self._api.public_baseurl)
        buckets = TokenBuckets(config.lookup_burst, config.lookup_per_second)
        self._api.register_web_resource(
            IDENTITY_PATH, IdentityServiceResource(self._api, records, openid, directory, buckets)
        )

    def _remove_member_soon(self, room_id: str, user_id: str) -> None:
        self._api.run_as_background_process(
            "fhir_remove_member", self._remove_member, room_id, user_id
        )

    async def _remove_member(self, room_id: str, user_id: str) -> None:
        """The service user bans someone whose server let them into a care-team room.

        A ban, not a kick: under state resolution the other server would re-apply their
        earlier join after a kick, and keep showing them the room. The FHIR → Matrix sync
        lifts such a ban before inviting someone FHIR admits (the ban itself queues the
        team's check, ``_check_membership``).
        """
        try:
            await self._api.update_room_membership(
                self._service_user_id,
                user_id,
                room_id,
                "ban",
                {"reason": "Not a current member of this room's care team"},
            )
        except Exception as e:  # e.g. the room is gone: nothing to undo
            # (The user id is left out: it can name a patient.)
            logger.warning("Could not ban a non-member from %s: %s", room_id, type(e).__name__)

    async def _on_new_event(self, event: EventBase, state_events: StateMap[EventBase]) -> None:
        if event.internal_metadata.is_soft_failed():
            # Refused (e.g. by check_event_for_spam: a remote non-member's message) and kept
            # out of the room, yet Synapse still reports it here: not part of the
            # conversation, so neither recorded nor a binding change.
            return
        fault_hooks.in_callback(event.content)  # (test-only: inert unless armed)
        self._bindings.forget_for_event(event)
        if self._sync is not None and event.is_state() and event.type in BINDING_STATE_TYPES:
            self._api.run_as_background_process("fhir_binding_check", self._check_binding, event)
        if self._changes is not None and event.type == "m.room.member":
            self._api.run_as_background_process(
                "fhir_membership_check", self._check_membership, event
            )
        if self._unread is not None:
            self._unread.seen(event)
            if self._runs_background_work and event.type == "m.room.member":
                self._api.run_as_background_process(
                    "fhir_unread_members", self._unread.members_changed, event.room_id
                )
        if self._recorder is not None and self._runs_background_work:
            self._recorder.on_new_event(event)

    async def _check_membership(self, event: EventBase) -> None:
        """Membership that got past the callbacks — an event whose content hash failed
        (Synapse redacts it and skips the spam check), a state reset — or a ban of someone
        FHIR admits (refused while FHIR could not tell, on whichever instance): the team's
        sync makes the room match FHIR again."""
        assert self._changes is not None
        membership = event.content.get("membership")
        if membership not in ("invite", "join", "knock", "ban"):
            return
        try:
            team_refs = await self._bindings.care_teams_of(event.room_id)
        except DirectoryUnavailable:
            return
        if not team_refs or event.state_key in self._exempt:
            return
        team_ref = team_refs[0]  # (its sync follows every team of the room)
        try:
            teams = [await self._teams.membership(ref) for ref in team_refs]
        except DirectoryUnavailable:
            if membership == "ban" and event.sender == self._service_user_id:
                # Banned while FHIR cannot tell: the sync retries until FHIR answers, and
                # lifts the ban if the person is a member.
                self._changes.check(team_ref)
            return
        # (A thread addressed to several teams admits a member of any of them.)
        admitted = any(team.is_member(event.state_key) for team in teams)
        if membership == "ban" and admitted and event.sender == self._service_user_id:
            self._changes.check(team_ref)  # lift it
        elif membership != "ban" and not admitted:
            logger.warning(
                "%s let someone into %s whom %s does not list: removing",
                event.event_id,
                event.room_id,
                team_ref,
            )
            if membership == "join" and not self._api.is_mine(event.state_key):
                self._remove_member_soon(event.room_id, event.state_key)
            self._changes.check(team_ref)

    async def _check_binding(self, event: EventBase) -> None:
        """A bound room's binding state changed: if not to what the module bound, the
        incident is logged and counted, and the team's sync repairs it."""
        assert self._sync is not None
        team_ref = await self._sync.drift_of(event)
        if team_ref is not None and self._changes is not None:
            self._changes.check(team_ref)

    async def _register_service_user(self) -> None:
        try:
            await ensure_service_user(self._api, self._config.service_user)
        except Exception:
            logger.exception("Could not register the service user; trying again in 30 s")
            self._api.delayed_background_call(
                SERVICE_USER_RETRY_MS, self._register_service_user, desc="fhir_service_user"
            )


def _do_nothing() -> None:
    pass
