"""The FHIR → Matrix sync as Synapse runs it: built on the instance that runs background
work, started in the background (FHIR or the database may be away at first), and fed by
the notify queue, the sweeps and the events the module sees.

Elsewhere only the room-binding record is opened, and period boundaries are not timed.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable

from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.audit.journal import AuditJournal
from synapse_fhir_module.config import ModuleConfig
from synapse_fhir_module.enforcement.binding_state import BINDING_STATE_TYPES
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory, DirectoryUnavailable
from synapse_fhir_module.identity.email_identity import EmailIdentity
from synapse_fhir_module.identity.registered_accounts import RegisteredAccounts
from synapse_fhir_module.identity.verified_emails import VerifiedEmails
from synapse_fhir_module.service_user import ensure_service_user
from synapse_fhir_module.sync.care_rooms import CareRooms
from synapse_fhir_module.sync.change_queue import ChangeQueue
from synapse_fhir_module.sync.counts import SyncCounts
from synapse_fhir_module.sync.email_invites import EmailInvites
from synapse_fhir_module.sync.fhir_to_matrix import FhirSync, NoteRelayed
from synapse_fhir_module.sync.reconcile import Reconciler
from synapse_fhir_module.sync.subscriptions import SubscriptionRegistrar
from synapse_fhir_module.sync.team_boundaries import TeamBoundaries

logger = logging.getLogger(__name__)

RETRY_MS = 30_000
BINDINGS_RETRY_MS = 5_000
# How often the syncing instance looks for accounts whose verified addresses changed.
IDENTITY_CHANGES_INTERVAL_MS = 1_000


class SyncPart:
    """What the rest of the module asks of the sync: a change to queue, an event to look
    at, a member to remove, and the figures for ``/health``."""

    def __init__(
        self,
        api: ModuleApi,
        config: ModuleConfig,
        *,
        fhir: FhirClient,
        teams: CareTeamDirectory,
        bindings: RoomBindings,
        persons: PersonDirectory,
        accounts: RegisteredAccounts,
        emails: VerifiedEmails,
        identity: EmailIdentity,
        service_user_id: str,
        exempt: frozenset[str],
        runs_here: bool,
        invalidate: Callable[[str], Awaitable[None]],
        note_relayed: NoteRelayed | None,
        now_ms: Callable[[], int],
        journal: AuditJournal | None = None,
    ) -> None:
        self._api = api
        self._config = config
        self._fhir = fhir
        self._teams = teams
        self._bindings = bindings
        self._identity = identity
        self._service_user_id = service_user_id
        self._exempt = exempt
        self._invalidate = invalidate
        self._journal = journal
        self.boundaries = TeamBoundaries(api, self._check_team)
        self._sync: FhirSync | None = None
        self._changes: ChangeQueue | None = None
        if not (config.sync.enabled and runs_here):
            # (The syncing instance opens it with the sync's tables.)
            api.delayed_background_call(0, self._start_bindings, desc="fhir_bindings_start")
            return
        rooms = CareRooms(
            api,
            config.sync,
            service_user_id=service_user_id,
            exempt_users=exempt,
            journal=journal,
        )
        invites = None
        if config.identity.invite_by_email:
            invites = EmailInvites(api, config.identity, persons, emails)
        self._sync = FhirSync(
            api,
            config.sync,
            fhir,
            teams,
            rooms,
            service_user_id=service_user_id,
            exempt_users=exempt,
            bindings=bindings,
            persons=persons,
            boundaries=self.boundaries,
            now_ms=now_ms,
            accounts=accounts,
            invites=invites,
            note_relayed=note_relayed,
        )
        self._changes = ChangeQueue(api, self._sync.apply, invalidate, prepare=self._sync.prepare)
        self._reconciler = Reconciler(api, fhir, self._changes)
        api.delayed_background_call(0, self._start, desc="fhir_sync_start")

    def push(self, reference: str) -> None:
        """FHIR says ``reference`` changed: forget it, and (where the sync runs) apply it."""
        if self._changes is not None:
            self._changes.push(reference)  # (invalidates the caches at once)
        else:
            self._api.run_as_background_process("fhir_notify", self._invalidate, reference)

    def on_event(self, event: EventBase) -> None:
        """A changed binding or membership may need the sync to make the room right."""
        if self._sync is not None and event.is_state() and event.type in BINDING_STATE_TYPES:
            self._api.run_as_background_process("fhir_binding_check", self._check_binding, event)
        if self._changes is not None and event.type == "m.room.member":
            self._api.run_as_background_process(
                "fhir_membership_check", self._check_membership, event
            )

    async def counts(self) -> SyncCounts:
        if self._sync is None or self._changes is None:
            return SyncCounts(running=False)
        oldest = self._changes.oldest_waiting
        return SyncCounts(
            running=True,
            queued=len(self._changes),
            retrying=self._changes.retrying,
            scheduled_boundaries=len(self.boundaries),
            binding_incidents=self._sync.binding_incidents,
            oldest_waiting_ms=None if oldest is None else int(oldest * 1000),
        )

    def remove_member_soon(self, room_id: str, user_id: str) -> None:
        self._api.run_as_background_process(
            "fhir_remove_member", self._remove_member, room_id, user_id
        )

    async def _start(self) -> None:
        """Tables, then the first sweep (which makes the spaces FHIR has and Matrix lacks),
        then a sweep every ``sync.poll_interval``."""
        assert self._sync is not None and self._changes is not None
        try:
            await ensure_service_user(self._api, self._config.service_user)
            await self._sync.start()
        except Exception:
            logger.exception("Could not start the FHIR sync; trying again in 30 s")
            self._api.delayed_background_call(RETRY_MS, self._start, desc="fhir_sync_start")
            return
        self._changes.open()
        if self._config.identity.email:
            self._api.looping_background_call(
                self._apply_identity_changes,
                IDENTITY_CHANGES_INTERVAL_MS,
                desc="fhir_identity_changes",
                # (The module decides where background work runs — `worker` — so its
                # loops must not also depend on Synapse's run_background_tasks_on.)
                run_on_all_instances=True,
            )
        if self._config.sync.subscription:  # in the background: FHIR may be away
            SubscriptionRegistrar(self._api, self._fhir, self._config).start()
        # The loops first: whatever the first sweep meets, the later ones still run.
        self._api.looping_background_call(
            self._reconciler.sweep,
            self._config.sync.poll_interval * 1000,
            desc="fhir_reconcile",
            run_on_all_instances=True,
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

    async def _start_bindings(self) -> None:
        try:
            await self._bindings.start()
        except Exception as e:
            # Until the table is there, bindings come from room state alone.
            logger.warning("Could not open the binding record (%s); trying again in 5 s", e)
            self._api.delayed_background_call(
                BINDINGS_RETRY_MS, self._start_bindings, desc="fhir_bindings_start"
            )

    async def _apply_identity_changes(self) -> None:
        """Re-sync the teams of accounts whose verified addresses changed (noted by
        whichever instance served the change)."""
        assert self._changes is not None
        try:
            await self._identity.apply_changes(self._changes.push, self._teams.teams_depending_on)
        except Exception as e:  # (the changes stay noted: the next round tries again)
            logger.info("Applying email changes failed (%s); trying again", type(e).__name__)

    def _check_team(self, team_ref: str) -> None:
        """Make Matrix follow a team again, with no known change (a period boundary)."""
        if self._changes is not None:
            self._changes.check(team_ref)

    async def _remove_member(self, room_id: str, user_id: str) -> None:
        """The service user bans someone whose server let them into a care-team room.

        A ban, not a kick: under state resolution the other server would re-apply their
        earlier join after a kick, and keep showing them the room. The sync lifts such a
        ban before inviting someone FHIR admits (the ban itself queues the team's check,
        ``_check_membership``).
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
            return
        if self._journal is not None:
            remembered = self._bindings.remembered(room_id)
            self._journal.note(
                DecisionKind.MEMBER_BANNED,
                Outcome.SUCCESS,
                user_id=user_id,
                actor_id=self._service_user_id,
                room_id=room_id,
                care_team=remembered[0] if remembered else None,
            )

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
                self.remove_member_soon(event.room_id, event.state_key)
            self._changes.check(team_ref)

    async def _check_binding(self, event: EventBase) -> None:
        """A bound room's binding state changed: if not to what the module bound, the
        incident is logged and counted, and the team's sync repairs it."""
        assert self._sync is not None
        team_ref = await self._sync.drift_of(event)
        if team_ref is not None and self._changes is not None:
            self._changes.check(team_ref)
