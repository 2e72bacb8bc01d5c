"""Unread markers as FHIR Tasks (``communication.unread_tasks``): one per thread and member.

Nothing here runs on Synapse's event path. What a Task says comes from three notes kept in
Synapse's database (``unread_store``):

- a thread's newest message, noted when FHIR has its Communication — by the recorder, in
  the transaction that takes the message out of the outbox, or by the relay of a
  Communication from another system;
- an account's read marker: Synapse tells modules of ``m.fully_read`` (the marker Element
  and matrix-js-sdk set with the read receipt through ``/read_markers``) and of no
  receipt, so the marker is what counts. The marked event's time comes from the events
  this instance saw (a bounded memory); a marker on an event the module cannot place
  counts as not read;
- a membership change of a thread room (its Tasks are looked at again).

Each note marks the room; every ``INTERVAL_MS`` the background instance works through the
marked rooms and writes the Tasks that must change in one FHIR transaction of
conditional updates (by the Task's identifier), so a repeat after a crash changes nothing.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

from prometheus_client import Counter
from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module import sync_store, unread_store
from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.fhir_errors import FhirPermanentError, FhirTransientError
from synapse_fhir_module.fhir_time import format_fhir_instant
from synapse_fhir_module.outbox_store import Cursor
from synapse_fhir_module.room_bindings import RoomBindings
from synapse_fhir_module.team_directory import CareTeamDirectory, DirectoryUnavailable
from synapse_fhir_module.thread_status import ThreadMode
from synapse_fhir_module.unread_mapping import (
    LatestMessage,
    ReadMarker,
    TaskState,
    task_changes,
    task_entry,
)

logger = logging.getLogger(__name__)

INTERVAL_MS = 2_000
MAX_BACKOFF_S = 60.0
ROOMS_PER_ROUND = 50
MAX_SEEN_EVENTS = 50_000
FULLY_READ = "m.fully_read"

TASKS_WRITTEN = Counter(
    "synapse_fhir_unread_tasks_written", "Unread-marker Tasks created or updated in FHIR"
)
TASKS_REFUSED = Counter(
    "synapse_fhir_unread_tasks_refused", "Rooms whose Task changes FHIR refused for good"
)


def latest_of(messages: list[tuple[str, LatestMessage]]) -> dict[str, LatestMessage]:
    """Room → its newest message among ``messages`` (room id, message)."""
    newest: dict[str, LatestMessage] = {}
    for room_id, message in messages:
        if room_id not in newest or message.sent_ms >= newest[room_id].sent_ms:
            newest[room_id] = message
    return newest


def note_messages_txn(txn: Cursor, messages: list[tuple[str, LatestMessage]]) -> None:
    """For the recorder's own transaction: these messages are in FHIR now."""
    unread_store.note_messages(txn, latest_of(messages))


class UnreadTasks:
    def __init__(
        self,
        api: ModuleApi,
        fhir: FhirClient,
        bindings: RoomBindings,
        teams: CareTeamDirectory,
        *,
        profile: CommunicationProfile,
    ) -> None:
        self._api = api
        self._fhir = fhir
        self._bindings = bindings
        self._teams = teams
        self._profile = profile
        # Event id → origin_server_ts of recent events of care-team rooms (to place markers).
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._ready = False
        self._running = False
        # After FHIR was unreachable: no round before this (monotonic seconds).
        self._resume_at = 0.0
        self._failures = 0

    async def start(self) -> None:
        await self._api.run_db_interaction("fhir_unread_schema", unread_store.create_schema)
        self._ready = True

    def seen(self, event: EventBase) -> None:
        """Remember when an event of a care-team room was sent (memory only)."""
        if not self._bindings.remembered(event.room_id):
            return
        self._seen[event.event_id] = int(event.origin_server_ts)
        if len(self._seen) > MAX_SEEN_EVENTS:
            self._seen.popitem(last=False)

    async def on_account_data_updated(
        self, user_id: str, room_id: str | None, account_data_type: str, content: Any
    ) -> None:
        """Note an account's ``m.fully_read`` marker in a thread room."""
        if account_data_type != FULLY_READ or room_id is None or not self._ready:
            return
        event_id = content.get("event_id") if isinstance(content, Mapping) else None
        if not isinstance(event_id, str):
            return
        if await self._bindings.thread_of(room_id) is None:
            return  # (an ordinary room: nothing to mark)
        marker = ReadMarker(event_id, self._seen.get(event_id))
        await self._api.run_db_interaction(
            "fhir_unread_marker", unread_store.note_marker, room_id, user_id, marker
        )

    async def note_relayed(self, room_id: str, message: LatestMessage) -> None:
        """A Communication from another system was posted into the room."""
        await self._api.run_db_interaction(
            "fhir_unread_relayed", unread_store.note_messages, {room_id: message}
        )

    async def members_changed(self, room_id: str) -> None:
        """Someone joined or left a room: if a thread's, its Tasks are looked at again."""
        if self._ready and await self._bindings.thread_of(room_id) is not None:
            await self._api.run_db_interaction(
                "fhir_unread_members", unread_store.mark_dirty, [room_id]
            )

    async def run(self) -> None:
        """One round over the marked rooms (the background instance calls it periodically)."""
        if self._running or not self._ready or time.monotonic() < self._resume_at:
            return
        self._running = True
        try:
            await self._round()
            self._failures = 0
        except FhirTransientError as e:
            # The rooms stay marked; wait longer each time (the log says so once a round).
            self._failures += 1
            delay = min(MAX_BACKOFF_S, 2.0**self._failures)
            self._resume_at = time.monotonic() + delay
            logger.warning("Unread Tasks wait %.0f s: FHIR unreachable (%s)", delay, e)
        except Exception:
            logger.exception("Writing unread Tasks failed; the rooms stay marked")
        finally:
            self._running = False

    async def _round(self) -> None:
        rooms = await self._api.run_db_interaction(
            "fhir_unread_dirty", unread_store.dirty_rooms, ROOMS_PER_ROUND
        )
        planned: list[tuple[str, int, dict[str, TaskState], list[dict[str, Any]]]] = []
        for room_id, version in rooms:
            try:
                changes, entries = await self._plan(room_id)
            except (DirectoryUnavailable, FhirTransientError) as e:
                # The room stays marked: the next round tries again.
                logger.info("Unread Tasks of %s wait: %s", room_id, type(e).__name__)
                continue
            planned.append((room_id, version, changes, entries))
        if not planned:
            return
        try:
            await self._write([entry for *_, entries in planned for entry in entries])
        except FhirPermanentError:
            # One room's Tasks must not hold back the others': each on its own.
            for item in planned:
                await self._write_room(*item)
            return
        await self._settle(planned)

    async def _write_room(
        self,
        room_id: str,
        version: int,
        changes: dict[str, TaskState],
        entries: list[dict[str, Any]],
    ) -> None:
        try:
            await self._write(entries)
        except FhirPermanentError as e:
            TASKS_REFUSED.inc()
            logger.warning(
                "FHIR refused the unread Tasks of %s (HTTP %s); tried again at its next change",
                room_id,
                e.status,
            )
            await self._api.run_db_interaction(
                "fhir_unread_done", unread_store.clear_dirty, [(room_id, version)]
            )
            return
        await self._settle([(room_id, version, changes, entries)])

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            await self._fhir.transaction_json(
                {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            )
            TASKS_WRITTEN.inc(len(entries))

    async def _settle(
        self, planned: list[tuple[str, int, dict[str, TaskState], list[dict[str, Any]]]]
    ) -> None:
        def settle(txn: Cursor) -> None:
            for room_id, _, changes, _ in planned:
                unread_store.tasks_written(txn, room_id, changes)
            unread_store.clear_dirty(txn, [(room_id, version) for room_id, version, *_ in planned])

        await self._api.run_db_interaction("fhir_unread_written", settle)

    async def _plan(self, room_id: str) -> tuple[dict[str, TaskState], list[dict[str, Any]]]:
        """The Task changes a room needs: person → state, and their transaction entries."""
        thread = await self._bindings.thread_of(room_id)
        if thread is None:
            return {}, []
        latest, markers, written = await self._api.run_db_interaction(
            "fhir_unread_room", unread_store.room_state, room_id
        )
        if latest is None:
            return {}, []  # nothing FHIR holds yet: nothing to read
        mode = await self._api.run_db_interaction(
            "fhir_unread_mode", sync_store.thread_mode_of, room_id
        )
        accounts_by_person: dict[str, set[str]] = {}
        patient = None
        for team_ref in await self._bindings.care_teams_of(room_id):
            team = await self._teams.membership(team_ref)
            patient = patient or team.subject
            if mode == ThreadMode.EMPTIED.value:
                continue  # (entered in error: nobody is to read it, every Task cancelled)
            for member in team.current_members().values():
                accounts_by_person.setdefault(member.person, set()).add(member.user_id)
        changes = task_changes(latest, accounts_by_person, markers, written)
        modified = format_fhir_instant(datetime.now(timezone.utc))
        entries = [
            task_entry(thread, person, patient, state, modified=modified, profile=self._profile)
            for person, state in sorted(changes.items())
        ]
        return changes, entries
