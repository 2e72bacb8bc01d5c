"""Unread markers as FHIR Tasks (``communication.unread_tasks``): one per thread and member.

Nothing here runs on Synapse's event path. What a Task says comes from three notes kept in
Synapse's database (``unread.store``):

- a thread's newest message, noted when FHIR has its Communication — by the recorder, in
  the transaction that takes the message out of the outbox, or by the relay of a
  Communication from another system;
- an account's read marker: Synapse tells modules of ``m.fully_read`` (the marker Element
  and matrix-js-sdk set with the read receipt through ``/read_markers``) and of no
  receipt, so the marker is what counts. Events are placed by when this server got them
  (never by their ``origin_server_ts``, which the sender chooses): the marked event's
  arrival comes from the events this instance saw (a bounded memory); a marker on an event
  the module cannot place counts as not read;
- a membership change of a thread room, and every ``SWEEP_INTERVAL_MS`` each room with an
  open Task (a team can change with no event in the room).

Each note marks the room; every ``INTERVAL_MS`` the background instance works through the
marked rooms and writes the Tasks that must change in one FHIR transaction, each Task at
an id made from its thread and person, so a repeat after a crash changes nothing. A room
that cannot be done (its team unreadable, FHIR refusing its Tasks) stays marked and waits.
"""

from __future__ import annotations

import logging
import time
from collections import OrderedDict
from collections.abc import Mapping
from datetime import datetime, timezone
from typing import Any

import attr
from prometheus_client import Counter, Gauge
from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.enforcement.room_bindings import RoomBindings
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.dates import format_fhir_instant
from synapse_fhir_module.fhir.errors import FhirPermanentError, FhirTransientError
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.mapping.thread_status import ThreadMode
from synapse_fhir_module.mapping.unread import (
    LatestMessage,
    ReadMarker,
    TaskState,
    task_changes,
    task_entry,
)
from synapse_fhir_module.storage import Cursor
from synapse_fhir_module.sync import store as sync_store
from synapse_fhir_module.unread import store as unread_store

logger = logging.getLogger(__name__)

INTERVAL_MS = 2_000
SWEEP_INTERVAL_MS = 10 * 60_000
ROOMS_PER_ROUND = 50
# A transaction stops taking rooms at this many Tasks (the rest wait for the next round).
TASKS_PER_TRANSACTION = 200
MAX_SEEN_EVENTS = 50_000
MAX_BACKOFF_S = 60.0
# How long a room waits after its team could not be read, or FHIR refused its Tasks.
UNREADABLE_WAIT_MS = 30_000
REFUSED_WAIT_MS = 5 * 60_000
FULLY_READ = "m.fully_read"

TASKS_WRITTEN = Counter(
    "synapse_fhir_unread_tasks_written", "Unread-marker Tasks created or updated in FHIR"
)
TASKS_REFUSED = Counter(
    "synapse_fhir_unread_tasks_refused", "Rooms whose Task changes FHIR refused (retried later)"
)
ROOMS_MARKED = Gauge(
    "synapse_fhir_unread_rooms_marked", "Thread rooms whose Tasks wait to be looked at"
)


@attr.s(frozen=True, auto_attribs=True)
class _RoomPlan:
    room_id: str
    version: int  # of its mark, cleared only if nothing came since
    changes: dict[str, TaskState]  # person → what their Task becomes
    entries: list[dict[str, Any]]  # the transaction's entries for them


def latest_of(messages: list[tuple[str, LatestMessage]]) -> dict[str, LatestMessage]:
    """Room → its newest message among ``messages`` (room id, message)."""
    newest: dict[str, LatestMessage] = {}
    for room_id, message in messages:
        if room_id not in newest or message.arrived_ms >= newest[room_id].arrived_ms:
            newest[room_id] = message
    return newest


def note_messages_txn(txn: Cursor, messages: list[tuple[str, LatestMessage]]) -> None:
    """For the recorder's own transaction: these messages are in FHIR now."""
    unread_store.note_messages(txn, latest_of(messages))


def note_relayed_txn(txn: Cursor, room_id: str, message: LatestMessage) -> None:
    """For the relay's own transaction: a Communication from another system was posted."""
    unread_store.note_messages(txn, {room_id: message})


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
        # Event id → when this instance got it (to place read markers).
        self._seen: OrderedDict[str, int] = OrderedDict()
        self._ready = False
        self._running = False
        # After FHIR was unreachable: no round before this (monotonic seconds).
        self._resume_at = 0.0
        self._failures = 0

    async def start(self) -> None:
        await self._api.run_db_interaction("fhir_unread_schema", unread_store.create_schema)
        # (It reads the thread modes the sync keeps.)
        await self._api.run_db_interaction("fhir_sync_schema", sync_store.create_schema)
        self._ready = True

    def seen(self, event: EventBase) -> None:
        """Remember when this server got an event (memory only, the latest ones)."""
        self._seen[event.event_id] = self._api.get_current_time_msec()
        if len(self._seen) > MAX_SEEN_EVENTS:
            self._seen.popitem(last=False)

    async def on_account_data_updated(
        self, user_id: str, room_id: str | None, account_data_type: str, content: Any
    ) -> None:
        """A read marker moved: noted in the background (not while the client waits)."""
        if account_data_type != FULLY_READ or room_id is None or not self._ready:
            return
        event_id = content.get("event_id") if isinstance(content, Mapping) else None
        if isinstance(event_id, str):
            marker = ReadMarker(event_id, self._seen.get(event_id))
            self._api.run_as_background_process(
                "fhir_unread_marker", self._note_marker, user_id, room_id, marker
            )

    async def _note_marker(self, user_id: str, room_id: str, marker: ReadMarker) -> None:
        try:
            if await self._bindings.thread_of(room_id) is None:
                return  # (an ordinary room: nothing to mark)
            await self._api.run_db_interaction(
                "fhir_unread_marker", unread_store.note_marker, room_id, user_id, marker
            )
        except Exception as e:  # (the Task waits for the next marker)
            logger.warning("Could not note a read marker in %s: %s", room_id, type(e).__name__)

    async def members_changed(self, room_id: str) -> None:
        """Someone joined or left a room: if a thread's, its Tasks are looked at again."""
        if self._ready and await self._bindings.thread_of(room_id) is not None:
            await self._api.run_db_interaction(
                "fhir_unread_members", unread_store.mark_dirty, [room_id]
            )

    async def sweep(self) -> None:
        """Look again at every room with an open Task (the background instance, now and then)."""
        if not self._ready:
            return
        try:
            await self._api.run_db_interaction(
                "fhir_unread_sweep", unread_store.mark_rooms_with_open_tasks
            )
        except Exception as e:
            logger.warning("Could not mark the rooms with open Tasks: %s", type(e).__name__)

    async def run(self) -> None:
        """One round over the marked rooms (the background instance calls it periodically)."""
        if self._running or not self._ready or time.monotonic() < self._resume_at:
            return
        self._running = True
        try:
            await self._round()
            self._failures = 0
        except FhirTransientError as e:
            # The rooms stay marked; each failure waits longer.
            self._failures += 1
            delay = min(MAX_BACKOFF_S, 2.0**self._failures)
            self._resume_at = time.monotonic() + delay
            logger.warning("Unread Tasks wait %.0f s: FHIR unreachable (%s)", delay, e)
        except Exception:
            logger.exception("Writing unread Tasks failed; the rooms stay marked")
        finally:
            self._running = False

    async def _round(self) -> None:
        now = self._api.get_current_time_msec()
        rooms = await self._api.run_db_interaction(
            "fhir_unread_dirty", unread_store.dirty_rooms, now, ROOMS_PER_ROUND
        )
        planned: list[_RoomPlan] = []
        tasks = 0
        for room_id, version in rooms:
            if tasks >= TASKS_PER_TRANSACTION:
                break  # (the others stay marked: the next round)
            try:
                plan = await self._plan(room_id, version)
            except Exception as e:
                # This room waits; the others go on.
                logger.info("Unread Tasks of %s wait: %s", room_id, type(e).__name__)
                await self._postpone(room_id, now + UNREADABLE_WAIT_MS)
                continue
            planned.append(plan)
            tasks += len(plan.entries)
        if planned:
            try:
                await self._write([entry for plan in planned for entry in plan.entries])
            except FhirPermanentError:
                # One room's Tasks must not hold back the others': each on its own.
                for plan in planned:
                    await self._write_room(plan)
            else:
                await self._settle(planned)
        ROOMS_MARKED.set(
            await self._api.run_db_interaction("fhir_unread_marked", unread_store.marked_rooms)
        )

    async def _write_room(self, plan: _RoomPlan) -> None:
        try:
            await self._write(plan.entries)
        except FhirPermanentError as e:
            TASKS_REFUSED.inc()
            logger.warning(
                "FHIR refused the unread Tasks of %s (HTTP %s); trying again in %d s",
                plan.room_id,
                e.status,
                REFUSED_WAIT_MS // 1000,
            )
            await self._postpone(plan.room_id, self._api.get_current_time_msec() + REFUSED_WAIT_MS)
            return
        await self._settle([plan])

    async def _postpone(self, room_id: str, until_ms: int) -> None:
        await self._api.run_db_interaction(
            "fhir_unread_postpone", unread_store.postpone, room_id, until_ms
        )

    async def _write(self, entries: list[dict[str, Any]]) -> None:
        if entries:
            await self._fhir.transaction_json(
                {"resourceType": "Bundle", "type": "transaction", "entry": entries}
            )
            TASKS_WRITTEN.inc(len(entries))

    async def _settle(self, planned: list[_RoomPlan]) -> None:
        def settle(txn: Cursor) -> None:
            for plan in planned:
                unread_store.tasks_written(txn, plan.room_id, plan.changes)
            unread_store.clear_dirty(txn, [(plan.room_id, plan.version) for plan in planned])

        await self._api.run_db_interaction("fhir_unread_written", settle)

    async def _plan(self, room_id: str, version: int) -> _RoomPlan:
        """The Task changes a room needs."""
        thread = await self._bindings.thread_of(room_id)
        if thread is None:
            return _RoomPlan(room_id, version, {}, [])
        latest, markers, written = await self._api.run_db_interaction(
            "fhir_unread_room", unread_store.room_state, room_id
        )
        if latest is None:
            return _RoomPlan(room_id, version, {}, [])  # nothing FHIR holds yet to read
        mode = await self._api.run_db_interaction(
            "fhir_unread_mode", sync_store.thread_mode_of, room_id
        )
        accounts_by_person: dict[str, set[str]] = {}
        patient = None
        for team_ref in await self._bindings.care_teams_of(room_id):
            team = await self._teams.membership(team_ref)
            patient = patient or team.subject
            if mode == ThreadMode.EMPTIED.value or not team.admits_members:
                # (Entered in error, or a team that admits nobody: no one is to read it.)
                continue
            for member in team.current_members().values():
                accounts_by_person.setdefault(member.person, set()).add(member.user_id)
        changes = task_changes(latest, accounts_by_person, markers, written)
        modified = format_fhir_instant(datetime.now(timezone.utc))
        entries = [
            task_entry(thread, person, patient, state, modified=modified, profile=self._profile)
            for person, state in sorted(changes.items())
        ]
        return _RoomPlan(room_id, version, changes, entries)
