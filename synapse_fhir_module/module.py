"""The entry class Synapse loads from ``homeserver.yaml``: a table of contents of the
module, in the order its parts are built and registered. Each part registers its own
callbacks, loops and resources; where it runs is decided here, once."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from synapse.module_api import EventBase, ModuleApi, StateMap
from twisted.internet import reactor

from synapse_fhir_module.audit.wiring import register_journal, register_shipping
from synapse_fhir_module.config import ModuleConfig, parse_module_config
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.enforcement.wiring import (
    Forgetting,
    register_accounts,
    register_care_team_rules,
)
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.identity.wiring import register_people
from synapse_fhir_module.recording import fault_hooks, outbox_store
from synapse_fhir_module.recording.recent_writes import RecentWrites
from synapse_fhir_module.recording.recorder import now_ms
from synapse_fhir_module.recording.wiring import register_recording
from synapse_fhir_module.service_user import register_service_user_soon
from synapse_fhir_module.storage import Migration, SchemaUpgrade
from synapse_fhir_module.sync.wiring import SyncPart
from synapse_fhir_module.unread.tasks import note_messages_txn, note_relayed_txn
from synapse_fhir_module.unread.wiring import register_unread
from synapse_fhir_module.web.webhook import Notification
from synapse_fhir_module.web.wiring import register_resources


def _first_release(txn: object) -> None:
    """Nothing to do: each part creates its own tables when it starts."""


# The module's tables, version by version: append a step, never change one (docs/operations.md).
MIGRATIONS = (
    Migration(1, "the tables of the first release", _first_release),
    Migration(
        2,
        "the outbox keeps a message's failures while FHIR answers (a restart kept none)",
        outbox_store.add_failed_answering,
    ),
)


class FhirModule:
    """Care-team rooms on Matrix, backed by a FHIR server (see docs/design.md)."""

    def __init__(self, config: ModuleConfig, api: ModuleApi) -> None:
        # Background work (recording, the sync, the unread Tasks) runs on exactly one
        # instance, `worker`; callbacks and resources run wherever Synapse serves them.
        background = api.worker_name == config.worker
        fault_hooks.warn_if_armed()
        # (Migrated where background work runs, before recording starts; checked elsewhere.)
        schema = SchemaUpgrade(
            api, MIGRATIONS, runs_here=background, now_ms=now_ms, stop=_stop_synapse
        )
        schema.start()
        fhir = FhirClient(config.fhir)
        service_user = api.get_qualified_user_id(config.service_user)
        exempt = frozenset({service_user, *config.enforcement.exempt_users})

        # Every refusal and every change the module makes, on whichever instance decides.
        journal = register_journal(
            api, now_ms=now_ms, max_refusals_per_minute=config.audit.max_refusals_per_minute
        )
        people = register_people(api, config, fhir)
        teams = CareTeamDirectory(
            api, fhir, ttl=config.enforcement.cache_ttl, resolver=people.identity.resolver_for
        )
        bindings = RoomBindings(api, fhir, service_user)
        validity = register_accounts(
            api,
            config,
            persons=people.persons,
            accounts=people.accounts,
            exempt=exempt,
            journal=journal,
        )
        unread = register_unread(
            api, config, fhir=fhir, bindings=bindings, teams=teams, runs_here=background
        )
        # What the recorder wrote, so the sync skips the shim's echo of it without a read.
        self._recent_writes = RecentWrites()
        recording = register_recording(
            api,
            config,
            fhir=fhir,
            bindings=bindings,
            teams=teams,
            persons=people.persons,
            service_user_id=service_user,
            recent_writes=self._recent_writes,
            runs_here=background,
            note_messages=note_messages_txn if unread else None,
            first=_in_turn(schema.ready, unread.tasks.start if unread else None),
        )
        self._sync = SyncPart(
            api,
            config,
            fhir=fhir,
            teams=teams,
            bindings=bindings,
            persons=people.persons,
            accounts=people.accounts,
            emails=people.emails,
            identity=people.identity,
            service_user_id=service_user,
            exempt=exempt,
            runs_here=background,
            invalidate=Forgetting(teams, bindings, people.persons, validity).forget,
            note_relayed=note_relayed_txn if unread else None,
            now_ms=now_ms,
            journal=journal,
        )
        # The journal to FHIR as AuditEvents (audit.enabled), and pruned, in the background.
        audit = register_shipping(
            api,
            config,
            journal=journal,
            fhir=fhir,
            persons=people.persons,
            service_user_id=service_user,
            runs_here=background,
            now_ms=now_ms,
        )
        register_care_team_rules(
            api,
            config,
            bindings=bindings,
            teams=teams,
            accounts=people.accounts,
            service_user_id=service_user,
            exempt=exempt,
            remove_member_soon=self._sync.remove_member_soon,
            journal=journal,
        )
        register_resources(
            api,
            config,
            fhir=fhir,
            teams=teams,
            keep=exempt,
            recording=recording,
            sync_counts=self._sync.counts,
            identity_counts=people.counts,
            audit_counts=audit.counts,
            retry_refused_audit=audit.retry_refused,
            on_notification=self._on_notification,
        )

        # Every part that looks at events, in this order (bindings first: what they knew
        # about the room may be stale).
        self._listeners: list[Callable[[EventBase], None]] = [
            bindings.forget_for_event,
            self._sync.on_event,
        ]
        if unread is not None:
            self._listeners.append(unread.on_event)
        if recording is not None and recording.on_event is not None:
            self._listeners.append(recording.on_event)
        if config.enforcement.enabled or recording is not None:
            # (Synapse loads a room's state for every event once any module listens here:
            # register only when needed.)
            api.register_third_party_rules_callbacks(on_new_event=self._on_new_event)
        if background:
            register_service_user_soon(api, config.service_user)

    @staticmethod
    def parse_config(config: dict[str, Any]) -> ModuleConfig:
        return parse_module_config(config)

    def _on_notification(self, notification: Notification) -> None:
        """A FHIR resource changed (the webhook answers at once; the work is queued)."""
        if notification.reference in self._recent_writes:
            return  # the shim's echo of a message the recorder just wrote: nothing to do
        self._sync.push(notification.reference)

    async def _on_new_event(self, event: EventBase, state_events: StateMap[EventBase]) -> None:
        if event.internal_metadata.is_soft_failed():
            # Refused (e.g. by check_event_for_spam: a remote non-member's message) and kept
            # out of the room, yet Synapse still reports it here: not part of the
            # conversation, so neither recorded nor a binding change.
            return
        fault_hooks.in_callback(event.content)  # (test-only: inert unless armed)
        for listener in self._listeners:
            listener(event)


def _in_turn(*steps: Callable[[], Awaitable[None]] | None) -> Callable[[], Awaitable[None]]:
    async def run() -> None:
        for step in steps:
            if step is not None:
                await step()

    return run


def _stop_synapse() -> None:
    reactor.stop()
