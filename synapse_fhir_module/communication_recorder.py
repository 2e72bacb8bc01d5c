"""Records care-team messages as FHIR Communications through the outbox.

``on_new_event`` only enqueues (one small write into Synapse's database) and wakes the
drain; everything that needs the network — which room belongs to which team, the
sender's FHIR person, the thread, the FHIR write itself — happens in the drain, a
background process on the one instance that runs background work. With workers, the
main process enqueues (it stores the events: a worker that is down would miss those sent
meanwhile) and only the background worker drains.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import attr
from fhir.resources.R4B.communicationrequest import CommunicationRequest
from synapse.module_api import EventBase, ModuleApi

from synapse_fhir_module import outbox_store, sync_store
from synapse_fhir_module.communication_mapping import (
    EVENT_ID_SYSTEM,
    ORIGIN_TAG,
    ROOM_ID_SYSTEM,
    CommunicationWrite,
    NotRecorded,
    RoomContext,
    message_write,
    redacted_write,
    reply_target,
)
from synapse_fhir_module.communication_writer import CommunicationWriter
from synapse_fhir_module.config import CommunicationConfig, RecordedRooms
from synapse_fhir_module.fhir_client import FhirClient
from synapse_fhir_module.fhir_errors import FhirError, FhirTransientError
from synapse_fhir_module.health import OutboxCounts
from synapse_fhir_module.outbox_metrics import (
    COMMUNICATION_LAG,
    COMMUNICATIONS_FAILED,
    COMMUNICATIONS_WRITTEN,
    OUTBOX_DEAD,
    OUTBOX_PENDING,
    WRITE_RETRIES,
)
from synapse_fhir_module.person_directory import PersonDirectory
from synapse_fhir_module.recent_writes import RecentWrites
from synapse_fhir_module.relay_content import source_of
from synapse_fhir_module.room_bindings import THREAD_STATE, RoomBindings
from synapse_fhir_module.team_directory import CareTeamDirectory, DirectoryUnavailable

logger = logging.getLogger(__name__)

RECORDED_TYPES = frozenset({"m.room.message", "m.room.encrypted", "m.room.redaction"})
RETRY_CAP_MS = 10_000
MAX_REMEMBERED_THREADS = 100_000
GAUGE_REFRESH_S = 1.0


class _Retry(Exception):
    """Something the drain needs is unreachable for now: try the batch again later."""


class _Dead(Exception):
    """This row can never be written as it is (the reason is kept with it)."""


class CommunicationRecorder:
    def __init__(
        self,
        api: ModuleApi,
        config: CommunicationConfig,
        fhir: FhirClient,
        bindings: RoomBindings,
        teams: CareTeamDirectory,
        persons: PersonDirectory,
        *,
        service_user_id: str,
        recent_writes: RecentWrites,
        drains: bool = True,
    ) -> None:
        self._api = api
        self._drains = drains  # False: this instance only enqueues
        self._recent_writes = recent_writes
        self._config = config
        self._fhir = fhir
        self._bindings = bindings
        self._teams = teams
        self._persons = persons
        self._writer = CommunicationWriter(fhir)
        self._service_user_id = service_user_id
        self._all_rooms = config.rooms is RecordedRooms.ALL
        # Threads opened but not bound in room state (the service user is not in the room).
        self._opened_threads: dict[str, str] = {}
        self._draining = False
        self._again = False
        self._schema_ready = False
        self._counted_at = 0.0

    async def start(self) -> None:
        """Create the outbox table if needed, then write whatever a restart left pending."""
        await self._api.run_db_interaction("fhir_outbox_schema", outbox_store.create_schema)
        if self._drains:
            # (The relay's table too: the drain asks it which messages came from FHIR.)
            await self._api.run_db_interaction("fhir_sync_schema", sync_store.create_schema)
        self._schema_ready = True
        self.wake()

    async def on_new_event(self, event: EventBase) -> None:
        """Enqueue a message of a (possibly) care-team room. No network I/O here."""
        if event.type not in RECORDED_TYPES or event.sender == self._service_user_id:
            return
        if not self._schema_ready:
            return  # the table is not there yet (start-up)
        if not self._all_rooms and self._bindings.remembered(event.room_id) is None:
            return  # a room known to be ordinary
        row = {
            "event_id": event.event_id,
            "room_id": event.room_id,
            "type": event.type,
            "sender": event.sender,
            "origin_server_ts": event.origin_server_ts,
            "content": dict(event.content),
            "redacts": event.redacts,
        }
        await self._api.run_db_interaction(
            "fhir_outbox_enqueue", outbox_store.enqueue, row, now_ms()
        )
        self.wake()

    async def counts(self) -> OutboxCounts:
        try:
            pending, dead = await self._api.run_db_interaction(
                "fhir_outbox_counts", outbox_store.counts
            )
        except Exception:  # e.g. the background instance has not created the table yet
            logger.debug("Outbox counts unavailable", exc_info=True)
            return OutboxCounts()
        OUTBOX_PENDING.set(pending)
        OUTBOX_DEAD.set(dead)
        return OutboxCounts(pending=pending, dead=dead)

    def wake(self) -> None:
        """Drain now (or again right after the drain under way)."""
        if not self._drains:
            return  # the background instance's 1 s wake-up finds the rows
        if self._draining:
            self._again = True
            return
        self._draining = True
        self._api.run_as_background_process("fhir_outbox_drain", self._drain)

    async def _drain(self) -> None:
        worked = False
        try:
            while True:
                self._again = False
                rows = await self._api.run_db_interaction(
                    "fhir_outbox_due", outbox_store.due_rows, now_ms(), self._config.batch_size
                )
                if rows:
                    worked = True
                    if not await self._write_rows(rows):
                        return  # backing off; the periodic wake-up tries again
                # A short batch took everything that was due; ask again only if an
                # enqueue came in meanwhile (each query costs the send path CPU).
                if len(rows) < self._config.batch_size and not self._again:
                    break
            if worked and time.monotonic() - self._counted_at >= GAUGE_REFRESH_S:
                # Refresh the gauges after work, at most once a second: a count per
                # message would cost the send path too.
                self._counted_at = time.monotonic()
                await self.counts()
        except Exception:
            logger.exception("Outbox drain failed; it runs again on the next wake-up")
        finally:
            self._draining = False

    async def _write_rows(self, rows: list[outbox_store.OutboxRow]) -> bool:
        """Write one batch; False when FHIR is unreachable (rows rescheduled)."""
        writes: list[tuple[str, CommunicationWrite]] = []
        done: list[str] = []
        dead: dict[str, str] = {}
        messages = [row for row in rows if row.event["type"] != "m.room.redaction"]
        redactions = [row for row in rows if row.event["type"] == "m.room.redaction"]
        try:
            for row in messages:
                try:
                    write = await self._write_for(row)
                except NotRecorded:
                    done.append(row.event_id)  # not a care-team message: nothing to write
                    continue
                except _Dead as e:
                    dead[row.event_id] = str(e)
                    continue
                except (_Retry, FhirTransientError):
                    raise
                except Exception as e:
                    # A row the module cannot handle must not hold up every row behind it.
                    logger.warning(
                        "Outbox: %s could not be mapped (%s)", row.event_id, type(e).__name__
                    )
                    dead[row.event_id] = f"could not be mapped: {type(e).__name__}"
                    continue
                writes.append((row.event_id, write))
            result = await self._writer.write(writes)
            # Redactions after the messages: the original may be in this very batch.
            redaction_writes = []
            for row in redactions:
                redaction = await self._redaction_for(row)
                if redaction is None:
                    done.append(row.event_id)  # the redacted event was never recorded
                else:
                    redaction_writes.append((row.event_id, redaction))
            redacted = await self._writer.write(redaction_writes)
            result.written.extend(redacted.written)
            result.dead.update(redacted.dead)
        except (_Retry, FhirTransientError) as e:
            # Capped low: after an outage the backlog should flow within seconds.
            delay = outbox_store.retry_delay_ms(rows[0].attempts, cap_ms=RETRY_CAP_MS)
            logger.warning("FHIR unreachable for the outbox (%s); retrying in %d ms", e, delay)
            WRITE_RETRIES.inc()
            await self._api.run_db_interaction(
                "fhir_outbox_retry",
                outbox_store.mark_retry,
                [row.event_id for row in rows],
                now_ms() + delay,
                str(e),
            )
            return False
        dead.update(result.dead)
        self._recent_writes.add_all(result.locations)
        await self._api.run_db_interaction(
            "fhir_outbox_done", outbox_store.mark_written, [*done, *result.written]
        )
        committed_ms = now_ms()
        by_id = {row.event_id: row for row in rows}
        for event_id in result.written:
            COMMUNICATIONS_WRITTEN.inc()
            sent_ms = by_id[event_id].event.get("origin_server_ts")
            if isinstance(sent_ms, int):
                COMMUNICATION_LAG.observe(max(0.0, (committed_ms - sent_ms) / 1000))
        COMMUNICATIONS_FAILED.inc(len(dead))
        for event_id, reason in dead.items():
            logger.warning("Outbox: %s cannot be written to FHIR; kept as a dead letter", event_id)
            await self._api.run_db_interaction(
                "fhir_outbox_dead", outbox_store.mark_dead, event_id, reason
            )
        return True

    async def _write_for(self, row: outbox_store.OutboxRow) -> CommunicationWrite:
        if await self._is_relayed(row):
            raise NotRecorded("posted from a FHIR Communication: FHIR has it already")
        try:
            team_ref = await self._bindings.care_team_of(row.room_id)
            if team_ref is None and not self._all_rooms:
                raise NotRecorded("not a care-team room")
            patient = (await self._teams.membership(team_ref)).subject if team_ref else None
            person = await self._sender_person(row.event["sender"])
            thread = await self._thread_of(row.room_id, team_ref, patient)
        except DirectoryUnavailable as e:
            raise _Retry(str(e)) from e
        room = RoomContext(thread=thread, care_team=team_ref, patient=patient)
        return message_write(
            row.event,
            room,
            person,
            encrypted_policy=self._config.encrypted_rooms.value,
            parent_source=await self._parent_source(row),
        )

    async def _parent_source(self, row: outbox_store.OutboxRow) -> str | None:
        """For a reply to a message posted from FHIR: the resource it came from."""
        content = row.event.get("content")
        parent = reply_target(content) if isinstance(content, dict) else None
        if parent is None:
            return None
        source = await self._api.run_db_interaction(
            "fhir_relay_source", sync_store.source_of_event, parent
        )
        return str(source) if source else None

    async def _is_relayed(self, row: outbox_store.OutboxRow) -> bool:
        content = row.event.get("content")
        source = source_of(content) if isinstance(content, dict) else None
        if source is None:
            return False
        # The claim is checked, not the content: anyone can put the key in a message.
        return bool(
            await self._api.run_db_interaction(
                "fhir_relay_check",
                sync_store.is_relay_event,
                source,
                row.room_id,
                row.event_id,
                str(row.event.get("sender")),
            )
        )

    async def _redaction_for(self, row: outbox_store.OutboxRow) -> CommunicationWrite | None:
        """The redacted message's Communication marked entered-in-error, if it has one."""
        original = row.event.get("redacts")
        if not isinstance(original, str):
            return None
        if not self._all_rooms and await self._bindings.care_team_of(row.room_id) is None:
            return None
        stored = await self._fhir.search_json(
            "Communication", {"identifier": f"{EVENT_ID_SYSTEM}|{original}"}
        )
        return redacted_write(stored[0], original) if stored else None

    async def _sender_person(self, user_id: str) -> str:
        record = self._persons.remembered(user_id)
        if record is None or not record.mapped:
            try:
                record = await self._persons.lookup(user_id)
            except FhirTransientError as e:
                raise _Retry(str(e)) from e
        if record.person is None:
            raise _Dead("the sender has no (single) FHIR person")
        return record.person

    async def _thread_of(self, room_id: str, team_ref: str | None, patient: str | None) -> str:
        bound = await self._bindings.thread_of(room_id)
        if bound:
            return bound
        if room_id not in self._opened_threads:
            if len(self._opened_threads) >= MAX_REMEMBERED_THREADS:
                self._opened_threads.clear()
            self._opened_threads[room_id] = await self._open_thread(room_id, team_ref, patient)
        return self._opened_threads[room_id]

    async def _open_thread(self, room_id: str, team_ref: str | None, patient: str | None) -> str:
        """Create the room's CommunicationRequest (once: keyed by the room id) and bind it."""
        request: dict[str, Any] = {
            "resourceType": "CommunicationRequest",
            "meta": {"tag": [dict(ORIGIN_TAG)]},
            "identifier": [{"system": ROOM_ID_SYSTEM, "value": room_id}],
            "status": "active",
        }
        if team_ref:
            request["recipient"] = [{"reference": team_ref, "type": "CareTeam"}]
        if patient:
            request["subject"] = {"reference": patient, "type": "Patient"}
        try:
            stored, _ = await self._fhir.create_if_none_exist(
                CommunicationRequest.model_validate(request),
                f"identifier={ROOM_ID_SYSTEM}|{room_id}",
            )
        except FhirTransientError as e:
            raise _Retry(str(e)) from e
        except FhirError as e:
            raise _Dead(f"could not open a thread for the room: {e.detail}") from e
        thread = f"CommunicationRequest/{stored.id}"
        if team_ref is None:
            # An ordinary room stays unbound: a thread binding would make it a care-team
            # room whose request names no team, which nobody may use.
            return thread
        recorded = await self._bindings.recorded(room_id)
        if recorded is not None:
            # A room the module bound (e.g. a team's space): its record gains the thread,
            # so the state below is what the module bound, not an incident.
            await self._bindings.record(attr.evolve(recorded, thread=thread), now_ms())
        try:
            await self._api.create_and_send_event_into_room(
                {
                    "type": THREAD_STATE,
                    "state_key": "",
                    "room_id": room_id,
                    "sender": self._service_user_id,
                    "content": {"reference": thread},
                }
            )
        except Exception as e:  # the service user may not be in the room: the CR still serves
            logger.warning("Could not bind %s to %s: %s", room_id, thread, type(e).__name__)
        logger.info("Opened %s for %s", thread, room_id)
        return thread


def now_ms() -> int:
    return int(time.time() * 1000)
