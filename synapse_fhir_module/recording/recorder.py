"""Records care-team messages as FHIR Communications, from Synapse's own event stream.

Synapse stores every message durably; the module keeps only its place in that stream
(``recording.message_log``). On the one instance that runs background work, ``on_new_event``
hands the message to memory (no I/O, no database: the send path pays nothing more) and
wakes the drain, which writes from memory to FHIR. Everything that needs the network —
which room belongs to which team, the sender's FHIR person, the thread, the FHIR write
itself — happens in the drain. About once a second the stream is read from the saved
position (``stream_follower``); once FHIR holds every message before the read's end,
that end is saved. After a crash, a restart or a long FHIR outage the recorder reads on
from the saved position, and FHIR's conditional creates (keyed by the event id) make a
message written twice a no-op. The outbox table keeps the exceptions only: dead letters,
and messages that must wait (an edit whose original FHIR does not have yet, and its
room's later messages behind it).

A batch writes its new messages first, as one transaction; then its edits and redactions
one by one, each to its original's stored Communication (``recording.amendments``), or,
while the original is still in the outbox, to the original's row.

A reply names its parent (``inResponseTo``) only when the parent is this room's: written
in the same transaction, posted into the room from FHIR, or recorded in FHIR as part of the
room's thread. Otherwise — never recorded, or another room's message — it is written
without the relation: a reference FHIR cannot resolve would refuse it for good, and one to
another room's record would tie it to another patient's thread.

A room's thread is the request bound to it, or the one the module opens for it under the
room's id. A request that FHIR already holds under that id is taken only when it is one the
module opens (``mapping.communication.unadoptable``): anyone who writes FHIR can create one
naming another team or patient. Otherwise the room's messages become dead letters. Edits
and redactions look further: a recorded message is in a thread under the room's id, so any
such request counts for them (the one the module opened may no longer pass that test).

A sender without a (single) FHIR person makes a dead letter, to be retried once FHIR names
one (a person missing only for now must not lose the message). With
``communication.profile: ozo`` what is written meets the OZO profiles
(``mapping.profile``), and a message the service user sent (not a relay from FHIR),
which can never have a person, is not written: counted (``/health``
``recording.not_written_profile``, Prometheus) and logged with its event and room ids —
as is one an exempt account (``enforcement.exempt_users``) without a person sent. A
thread that cannot meet OZOCommunicationRequest (the team names no patient) is not opened:
the room's messages become dead letters, to be retried once FHIR has what is missing.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

import attr
from fhir.resources.R4B.communicationrequest import CommunicationRequest
from synapse.module_api import EventBase, ModuleApi, StateMap
from twisted.internet import reactor
from twisted.internet.interfaces import IDelayedCall, IReactorTime

from synapse_fhir_module.config import CommunicationConfig, CommunicationProfile, RecordedRooms
from synapse_fhir_module.enforcement.room_bindings import THREAD_STATE, RoomBindings
from synapse_fhir_module.fhir.client import FhirClient, to_json
from synapse_fhir_module.fhir.conventions import ROOM_ID_SYSTEM, reference_of
from synapse_fhir_module.fhir.errors import FhirError, FhirPermanentError, FhirTransientError
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory, DirectoryUnavailable
from synapse_fhir_module.mapping.communication import (
    WITHDRAWN,
    CommunicationWrite,
    NotRecorded,
    Redaction,
    RoomContext,
    communication_reference,
    edit_payload,
    identifier_search,
    message_write,
    replaced_event,
    reply_target,
    thread_request,
    unadoptable,
)
from synapse_fhir_module.mapping.profile import request_problems
from synapse_fhir_module.mapping.relay_content import resource_of_key, source_of
from synapse_fhir_module.mapping.unread import LatestMessage
from synapse_fhir_module.recording import fault_hooks, outbox_store, position_store
from synapse_fhir_module.recording.amendments import (
    Amended,
    CommunicationAmender,
    StillConflicting,
    Unchanged,
    edited,
    edited_event,
    erased_error,
    erased_event,
    in_thread,
    in_threads,
    redaction_counts,
    same_author,
    withdrawn,
)
from synapse_fhir_module.recording.counts import OutboxCounts
from synapse_fhir_module.recording.figures import read_counts
from synapse_fhir_module.recording.message_log import Candidate, PendingEvent, RecordingLog
from synapse_fhir_module.recording.metrics import (
    COMMUNICATION_LAG,
    COMMUNICATIONS_FAILED,
    COMMUNICATIONS_NOT_WRITTEN,
    COMMUNICATIONS_REPLAYED,
    COMMUNICATIONS_WRITTEN,
    OUTBOX_DEAD,
    OUTBOX_PENDING,
    POSITION_AGE,
    RECORDING_BEHIND,
    WRITE_RETRIES,
)
from synapse_fhir_module.recording.recent_writes import RecentWrites
from synapse_fhir_module.recording.session import RecordingSession
from synapse_fhir_module.recording.stream_follower import StreamFollower
from synapse_fhir_module.recording.stream_reader import (
    StreamReader,
    StreamUnavailable,
    TokenRejected,
)
from synapse_fhir_module.recording.writer import CommunicationWriter, invalid_fhir
from synapse_fhir_module.service_user import ensure_service_user
from synapse_fhir_module.storage import Cursor
from synapse_fhir_module.sync import store as sync_store

logger = logging.getLogger(__name__)

# (cursor, [(room id, message)]) → None, run inside the outbox's transaction.
NoteMessages = Callable[[Cursor, list[tuple[str, LatestMessage]]], None]

MESSAGE_TYPES = frozenset({"m.room.message", "m.room.encrypted"})
RECORDED_TYPES = MESSAGE_TYPES | {"m.room.redaction"}
RETRY_CAP_MS = 10_000
MAX_REMEMBERED_THREADS = 100_000
# How often the outbox table's figures are read again (they change only on exceptions).
TABLE_REFRESH_S = 5.0
# FHIR refusing the module itself (credentials, a policy): never one message's fault.
AUTHORISATION_STATUSES = frozenset({401, 403, 407})
# A new access token for reading the stream at most this often.
RENEW_INTERVAL_S = 60.0
# Failed batches in a row before the recorder asks whether FHIR answers at all.
STUCK_AFTER = 5
# Failures while FHIR answered after which a message alone in the table becomes a dead
# letter (about five minutes at RETRY_CAP_MS apart).
DEAD_AFTER = 30
# Reading the stream failed: say so in the log at most this often.
STREAM_WARNING_INTERVAL_S = 60.0
ROOM_CREATE = ("m.room.create", "")
# Why communication.profile: ozo leaves a message unwritten (the metric's label), and the
# log's words for it: fixed texts, never the message or who sent it. (A sender without a
# person is a dead letter instead: FHIR may name one later.)
NOT_WRITTEN_REASONS = {
    "service_user": "sent by the service user, not a person",
    "exempt_user": "sent by an account exempt from the care-team rules, with no person",
}


class _Retry(Exception):
    """Something the drain needs is unreachable for now: try the batch again later."""


class _NotYet(Exception):
    """This row cannot be applied yet (its original is not in FHIR, or others kept changing
    it): it waits, and the rows of its room after it with it; other rooms go on."""


class _Dead(Exception):
    """This row can never be written as it is (the reason is kept with it)."""


class _NotWritten(Exception):
    """The profile cannot hold this message: it is not written, only counted."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason  # a key of NOT_WRITTEN_REASONS


@attr.s(auto_attribs=True)
class _Outcome:
    """What became of some rows of a batch."""

    written: list[str] = attr.Factory(list)  # FHIR has them now (counted as written)
    already_there: set[str] = attr.Factory(set)  # of those, FHIR had before (a replay)
    done: list[str] = attr.Factory(list)  # nothing (more) to write for them
    dead: dict[str, str] = attr.Factory(dict)  # event id -> why it can never be written
    not_written: dict[str, str] = attr.Factory(dict)  # event id -> NOT_WRITTEN_REASONS key
    locations: list[str] = attr.Factory(list)  # "Communication/<id>" written
    # New messages FHIR has now, by room (for the unread Tasks).
    messages: list[tuple[str, LatestMessage]] = attr.Factory(list)


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
        exempt_users: Collection[str] = (),
        recent_writes: RecentWrites,
        note_messages: NoteMessages | None = None,
        reader: StreamReader | None = None,
        clock: IReactorTime = reactor,
    ) -> None:
        self._api = api
        self._clock = clock  # (the linger's and the backoff's: tests pass their own)
        self._recent_writes = recent_writes
        # Told, in the outbox's own transaction, of each message FHIR now has.
        self._note_messages = note_messages
        self._config = config
        self._fhir = fhir
        self._bindings = bindings
        self._teams = teams
        self._persons = persons
        self._writer = CommunicationWriter(fhir)
        self._amender = CommunicationAmender(fhir)
        self._service_user_id = service_user_id
        self._exempt = frozenset(exempt_users)
        self._all_rooms = config.rooms is RecordedRooms.ALL
        self._ozo = config.profile is CommunicationProfile.OZO
        # Since start, on this (draining) instance; None: the base profile counts nothing.
        self._not_written: int | None = 0 if self._ozo else None
        # Threads opened but not bound in room state (the service user is not in the room).
        self._opened_threads: dict[str, str] = {}
        self._draining = False
        self._schema_ready = False
        # Between Synapse's stream and FHIR (only where the drain runs).
        self._log = RecordingLog(config.max_pending)
        self._session = RecordingSession(api, service_user_id)
        self._reader = reader or StreamReader(
            config.client_url or api.public_baseurl, self._session.access_token
        )
        self._follower = StreamFollower(self._log, self._reader, RECORDED_TYPES)
        self._position: str | None = None  # saved: FHIR has every message before it
        self._confirmed_ms = now_ms()  # when a read last found everything before it in FHIR
        # (Settled a little before a read and not in it: behind the position, or in a room
        # the service user is not in; forgotten once the read is saved.)
        self._saved_margin_ms = int(2 * config.checkpoint_interval * 1000)
        self._stepping = False
        self._renewed_at = -RENEW_INTERVAL_S
        self._stream_warned_at = -STREAM_WARNING_INTERVAL_S
        self._notes: list[tuple[str, LatestMessage]] = []  # for the unread Tasks
        self._reported: tuple[int, int] | None = None
        # The outbox table's exceptions, as last read (pending rows, their rooms).
        self._table_pending = 0
        self._table_dead = 0
        self._rooms_waiting: set[str] = set()
        self._parked_ms = 0
        self._parks = 0  # (counts parkings: a table read that overlaps one is not taken)
        # A table batch that failed is retried one row at a time: a row that keeps
        # failing must not hold other rooms' rows with it.
        self._table_limit = config.batch_size
        self._table_read_at = 0.0
        self._failures = 0
        self._backoff_until = 0.0
        self._linger_s = config.batch_linger
        self._lingering: IDelayedCall | None = None
        self._offered_at = -1e9  # (monotonic time of the last message handed over)
        # Smaller after batches failed while FHIR answers: one message FHIR (or a lookup
        # for it) keeps failing on must not hold back the others.
        self._batch_limit = config.batch_size

    async def start(self) -> None:
        """Create the tables if needed, then write whatever a restart left: the messages
        after the saved stream position, and the table's pending rows."""
        await self._api.run_db_interaction("fhir_outbox_schema", outbox_store.create_schema)
        await self._api.run_db_interaction("fhir_recording_schema", position_store.create_schema)
        # (The relay's table too: the drain asks it which messages came from FHIR.)
        await self._api.run_db_interaction("fhir_sync_schema", sync_store.create_schema)
        # (Its device is made below: the account must exist first.)
        await ensure_service_user(self._api, self._service_user_id[1:].split(":", 1)[0])
        row = await self._api.run_db_interaction("fhir_recording_position", position_store.load)
        self._position = row.stream_token
        _warn_if_exposed(self._config.client_url, self._api.public_baseurl)
        await self._read_table()
        await self._session.open()
        self._schema_ready = True
        self.wake()

    def on_new_event(self, event: EventBase) -> None:
        """Hand a message of a (possibly) care-team room to the drain: memory only."""
        if event.type not in RECORDED_TYPES:
            return
        if not self._recordable(event.sender, event.type, event.room_id):
            self._log.settle_now(event.event_id, now_ms())
            return
        row = {
            "event_id": event.event_id,
            "room_id": event.room_id,
            "type": event.type,
            "sender": event.sender,
            "origin_server_ts": event.origin_server_ts,
            "content": dict(event.content),
            "redacts": event.redacts,
        }
        if self._log.offer(row, now_ms()):
            self._wake_soon()

    def _recordable(self, sender: str, event_type: str, room_id: str) -> bool:
        """False for a message known, without I/O, to have nothing to write."""
        if sender == self._service_user_id and event_type != "m.room.redaction" and not self._ozo:
            # (Its redactions are a moderator's, made through it: communication.redactions.
            # Under the OZO profile its messages go on too, for the drain to count those
            # that are not relays from FHIR.)
            return False
        # (An unknown room is looked up by the drain.)
        return self._all_rooms or self._bindings.remembered(room_id) != ()

    async def counts(self) -> OutboxCounts:
        """``pending``: messages read from Synapse (or handed over) that FHIR does not
        have yet, and the table's waiting rows; ``dead``: dead letters."""
        oldest = self._log.oldest_ms()
        behind = 0 if oldest is None else max(0, now_ms() - oldest)
        return await read_counts(
            self._api, held=(self._log.pending, behind), not_written=self._not_written
        )

    def _wake_soon(self) -> None:
        """Drain now, or, when a message comes closer than ``batch_linger`` after the
        one before (any room), at the end of a wait the first of them started: messages
        arriving meanwhile share one FHIR exchange (cheaper for Synapse than one each),
        a lone message is not kept waiting, and a flood delays none by more than that."""
        now = self._clock.seconds()
        close = now - self._offered_at < self._linger_s
        self._offered_at = now
        if self._draining:
            pass  # (the drain under way takes it: it runs until memory is empty)
        elif not close:
            self.wake()
        elif self._lingering is None or not self._lingering.active():
            self._lingering = self._clock.callLater(self._linger_s, self.wake)

    def wake(self) -> None:
        """Drain now (or again right after the drain under way)."""
        if not self._schema_ready:
            return
        if self._clock.seconds() < self._backoff_until:
            return  # FHIR was unreachable: the periodic wake-up tries again in time
        if self._draining:
            return  # (the drain under way runs until nothing is left)
        if self._lingering is not None and self._lingering.active():
            self._lingering.cancel()  # (this drain takes what it waited for)
        self._draining = True
        self._api.run_as_background_process("fhir_outbox_drain", self._drain)

    def table_changed(self) -> None:
        """Dead letters were made pending again (the admin's retry): drain them now."""
        self._table_pending = max(self._table_pending, 1)
        self.wake()

    async def step(self) -> None:
        """Read on in Synapse's stream and save the position FHIR has everything before
        (with the notes for the unread Tasks), about once a second."""
        if not self._schema_ready or self._stepping:
            return
        self._stepping = True
        try:
            if time.monotonic() - self._table_read_at >= TABLE_REFRESH_S:
                await self._read_table()  # (also while the stream cannot be read)
            await self._spill_held()
            candidate = None
            if self._position is None:
                # The first start: from now on (an earlier version's outbox rows drain).
                candidate = Candidate(await self._reader.now(), now_ms())
                self._log.caught_up()
            else:
                candidate = await self._follower.step(self._position, now_ms())
            if self._log.pending:
                self.wake()
            await self._save(candidate)
        except TokenRejected as e:
            self._follower.restart()
            if time.monotonic() - self._renewed_at >= RENEW_INTERVAL_S:
                self._renewed_at = time.monotonic()
                logger.warning("Recording: %s; making a new one", e)
                await self._session.renew()
        except StreamUnavailable as e:
            self._follower.restart()
            if time.monotonic() - self._stream_warned_at >= STREAM_WARNING_INTERVAL_S:
                self._stream_warned_at = time.monotonic()
                logger.warning("Recording: cannot read Synapse's event stream (%s)", e)
        except Exception:
            self._follower.restart()
            logger.exception("Recording: reading Synapse's event stream failed")
        finally:
            self._stepping = False

    async def _spill_held(self) -> None:
        spilled = self._log.spill(now_ms())
        if not spilled:
            return
        logger.warning(
            "Recording: %d messages held while Synapse's stream was being read go to"
            " the outbox table (the stream is slow to answer, or FHIR was away for long)",
            len(spilled),
        )
        try:
            await self._park(
                [_row(entry) for entry in spilled], "held while the stream was read", 0
            )
        except Exception:
            self._log.hold_again(spilled)  # (nothing is settled until the table has it)
            raise

    async def _save(self, candidate: Candidate | None) -> None:
        """One transaction, only when something changed: the unread notes, the new
        position, and the figures other instances answer ``/health`` with."""
        notes, self._notes = self._notes, []
        oldest = self._log.oldest_ms()
        now = now_ms()
        if candidate is not None:
            self._confirmed_ms = now
            if candidate.token == self._position:
                self._log.saved(candidate, margin_ms=self._saved_margin_ms)
                candidate = None  # (nothing new in the stream: nothing to save)
        POSITION_AGE.set(max(0, now - self._confirmed_ms) / 1000)
        figures = (self._log.pending, 0 if oldest is None else max(0, now - oldest))
        report = figures != self._reported
        if not notes and candidate is None and not report:
            return
        note = self._note_messages

        def save(txn: Cursor) -> None:
            if notes and note is not None:
                note(txn, notes)
            if candidate is not None:
                position_store.save_position(txn, candidate.token, now)
            if report:
                position_store.report(txn, figures[0], figures[1], now)

        try:
            await self._api.run_db_interaction("fhir_recording_save", save)
        except Exception:
            self._notes = notes + self._notes
            raise
        self._reported = figures
        if candidate is not None:
            self._position = candidate.token
            # (Settled before the read and not in it: behind the position, or a room
            # the service user is not in.)
            self._log.saved(candidate, margin_ms=self._saved_margin_ms)
        if report:
            OUTBOX_PENDING.set(self._table_pending + figures[0])
            RECORDING_BEHIND.set(figures[1] / 1000)

    async def _read_table(self) -> None:
        self._table_read_at = time.monotonic()
        parks = self._parks
        pending, dead = await self._api.run_db_interaction(
            "fhir_outbox_counts", outbox_store.counts
        )
        rooms = (
            await self._api.run_db_interaction("fhir_outbox_rooms", outbox_store.rooms_waiting)
            if pending
            else set()
        )
        if self._parks != parks:
            return  # (rows were parked meanwhile: these figures miss them; read again later)
        self._table_pending, self._table_dead, self._rooms_waiting = pending, dead, rooms
        OUTBOX_PENDING.set(pending + self._log.pending)
        OUTBOX_DEAD.set(dead)

    async def _drain(self) -> None:
        try:
            while True:
                rows, from_table = await self._next_rows()
                if not rows:
                    break
                if not await self._write_rows(rows, from_table):
                    return  # backing off; the periodic wake-up tries again
                if from_table:
                    self._table_limit = min(self._config.batch_size, self._table_limit * 2)
                else:
                    self._failures = 0
                    # (Back up gently: a message that keeps failing stays ahead.)
                    self._batch_limit = min(self._config.batch_size, self._batch_limit * 2)
        except Exception:
            logger.exception("Outbox drain failed; it runs again on the next wake-up")
        finally:
            self._draining = False

    async def _next_rows(self) -> tuple[list[outbox_store.OutboxRow], bool]:
        """The table's due rows first (they are older), else the oldest in memory; a
        message of a room with a waiting row joins it in the table."""
        if self._table_pending:
            rows = await self._api.run_db_interaction(
                "fhir_outbox_due", outbox_store.due_rows, now_ms(), self._table_limit
            )
            if rows:
                return rows, True
        while True:
            taken = self._log.take(self._batch_limit)
            behind = [entry for entry in taken if entry.room_id in self._rooms_waiting]
            if not behind:
                return [_row(entry) for entry in taken], False
            await self._park([_row(entry) for entry in behind], "behind a waiting message", 0)

    async def _park(self, rows: list[outbox_store.OutboxRow], why: str, delay_ms: int) -> None:
        """Messages from memory that must wait: into the table (their rooms with them)."""
        next_attempt = now_ms() + delay_ms
        # The table orders a room's rows by this time: strictly after every row parked
        # before (a room's messages come here in their order, even within a millisecond).
        order = []
        for row in rows:
            self._parked_ms = max(row.enqueued_ms, self._parked_ms + 1)
            order.append(self._parked_ms)

        def add(txn: Cursor) -> None:
            for row, enqueued_ms in zip(rows, order, strict=True):
                outbox_store.add(
                    txn,
                    row.event,
                    enqueued_ms,
                    state=outbox_store.PENDING,
                    next_attempt_ms=next_attempt,
                    error=why,
                )

        self._parks += 1
        await self._api.run_db_interaction("fhir_outbox_park", add)
        self._parks += 1
        self._table_pending += len(rows)
        self._rooms_waiting.update(row.room_id for row in rows)
        self._log.settle([row.event_id for row in rows], now_ms())

    async def _write_rows(self, rows: list[outbox_store.OutboxRow], from_table: bool) -> bool:
        """Write one batch; False when FHIR is unreachable (rows rescheduled)."""
        messages = [row for row in rows if not _amends_a_message(row)]
        amendments = [row for row in rows if _amends_a_message(row)]
        try:
            outcome = await self._write_messages(messages)
        except (_Retry, FhirTransientError) as e:
            await self._retry_later(rows, e, from_table)
            return False
        fault_hooks.after_fhir_commit(
            row.event
            for row in messages
            if row.event_id in outcome.written and row.event_id not in outcome.already_there
        )
        await self._settle(outcome, rows, from_table)
        # Edits and redactions after the messages are committed: each needs its original
        # as stored, which may be in this very batch. One at a time: they are rare.
        waiting_rooms: set[str] = set()
        for index, row in enumerate(amendments):
            if row.room_id in waiting_rooms:
                continue  # (held back by the row waiting before it: due_rows keeps order)
            try:
                outcome = await self._amend(row)
            except _NotYet as e:
                waiting_rooms.add(row.room_id)
                if from_table:
                    await self._retry_later([row], e, from_table)
                else:
                    await self._park([row], str(e), RETRY_CAP_MS // 10)
                continue
            except (_Retry, FhirTransientError) as e:
                await self._retry_later(
                    [r for r in amendments[index:] if r.room_id not in waiting_rooms],
                    e,
                    from_table,
                )
                return False
            await self._settle(outcome, [row], from_table)
        if from_table:
            await self._read_table()  # (which rooms still wait)
        return True

    async def _write_messages(self, rows: list[outbox_store.OutboxRow]) -> _Outcome:
        """New messages, as one transaction."""
        outcome = _Outcome()
        writes: list[tuple[str, CommunicationWrite]] = []
        in_batch: dict[str, str] = {}  # event id -> room id, of the writes so far
        for row in rows:
            try:
                if not self._recordable(
                    str(row.event.get("sender")), str(row.event.get("type")), row.room_id
                ):
                    raise NotRecorded("known to have nothing to write")  # (a read-back)
                read_after_redaction = await self._redacted_before_read(row)
                if read_after_redaction is not None:
                    row = read_after_redaction
                write = await self._write_for(row, in_batch)
                if read_after_redaction is not None:
                    # Created only: a record FHIR holds is never changed by this, whoever
                    # redacted (the redaction itself follows, under the redaction policy).
                    write = attr.evolve(
                        write,
                        method="POST",
                        url="Communication",
                        if_none_exist=identifier_search(row.event_id),
                    )
            except NotRecorded:
                outcome.done.append(row.event_id)  # not a care-team message: nothing to write
                continue
            except _NotWritten as e:
                outcome.not_written[row.event_id] = e.reason
                continue
            except _Dead as e:
                outcome.dead[row.event_id] = str(e)
                continue
            except (_Retry, FhirTransientError):
                raise
            except Exception as e:
                # A row the module cannot handle must not hold up every row behind it.
                logger.warning(
                    "Outbox: %s could not be mapped (%s)", row.event_id, type(e).__name__
                )
                outcome.dead[row.event_id] = f"could not be mapped: {type(e).__name__}"
                continue
            writes.append((row.event_id, write))
            if invalid_fhir(write) is None:
                # (One the writer will refuse cannot be a reply's parent in this batch.)
                in_batch[row.event_id] = row.room_id
        result = await self._writer.write(writes)
        outcome.written.extend(result.written)
        outcome.already_there.update(result.already_there)
        outcome.dead.update(result.dead)
        outcome.locations.extend(result.locations)
        by_id = {row.event_id: row for row in rows}
        for event_id, write in writes:
            location = result.location_of.get(event_id)
            row = by_id[event_id]
            if location is None or WITHDRAWN in row.event:
                continue  # (a message withdrawn before FHIR had it is nothing to read)
            # (When it reached this server: its origin_server_ts is the sender's to choose.)
            message = LatestMessage(
                event_id,
                row.enqueued_ms,
                str(row.event.get("sender")),
                location,
                author=reference_of(write.resource.get("sender")),
            )
            outcome.messages.append((row.room_id, message))
        return outcome

    async def _redacted_before_read(
        self, row: outbox_store.OutboxRow
    ) -> outbox_store.OutboxRow | None:
        """A message read back from Synapse's stream after its redaction (a restart, an
        outage) comes without its content: if FHIR does not have it yet, it is written
        withdrawn — with the moderator note when its sender did not redact it — since what
        it said is gone. None for any other message. (``unsigned`` is Synapse's own: the
        stream reader keeps nothing else of it, and a callback's row has none.)"""
        unsigned = row.event.get("unsigned")
        because = unsigned.get("redacted_because") if isinstance(unsigned, Mapping) else None
        if not isinstance(because, Mapping) or WITHDRAWN in row.event:
            return None
        redacter = str(because.get("sender"))
        moderator = None
        if redacter != row.event.get("sender"):
            ts = because.get("origin_server_ts")
            moderator = Redaction(
                redacter, await self._person_of(redacter), ts if isinstance(ts, int) else 0
            )
        return attr.evolve(row, event=erased_event(row.event, moderator))

    async def _fhir_answers(self) -> bool:
        try:
            await self._fhir.capabilities(timeout=2.0)
        except FhirError:
            return False
        return True

    async def _given_up(self, rows: list[outbox_store.OutboxRow], error: Exception) -> bool:
        """A message alone in the table that failed DEAD_AFTER times while FHIR answered
        becomes a dead letter (kept, with the reason; the admin's retry brings it back), so
        its room's later messages go on. Failures while FHIR was away do not count, nor do
        a redaction's (given up, it would leave the withdrawn text in FHIR: it waits)."""
        redaction = rows[0].event["type"] == "m.room.redaction"
        if len(rows) != 1 or redaction or not await self._fhir_answers():
            return False
        event_id = rows[0].event_id
        # (Counted in the row: a restart does not start the count again.)
        failures = await self._api.run_db_interaction(
            "fhir_outbox_failed", outbox_store.failed_answering, event_id
        )
        if failures < DEAD_AFTER:
            return False
        reason = f"kept failing while FHIR answered: {_without_outcome(error)}"
        await self._api.run_db_interaction(
            "fhir_outbox_dead", outbox_store.mark_dead, event_id, reason
        )
        logger.warning(
            "Recording: %s kept failing while FHIR answered; now a dead letter", event_id
        )
        await self._read_table()  # (its room no longer waits; the figures move)
        return True

    async def _retry_later(
        self, rows: list[outbox_store.OutboxRow], error: Exception, from_table: bool
    ) -> None:
        # Capped low: after an outage the backlog should flow within seconds.
        WRITE_RETRIES.inc()
        if not from_table:
            # (They stay in memory; Synapse's stream holds them should memory fill.)
            self._failures += 1
            if self._failures >= STUCK_AFTER and await self._fhir_answers():
                # FHIR answers, yet this batch keeps failing: halve it until the message
                # that fails is alone, then let it wait in the table (with its room).
                self._failures = 0
                if len(rows) > 1:
                    self._batch_limit = max(1, len(rows) // 2)
                else:
                    await self._park(rows, _without_outcome(error), RETRY_CAP_MS)
                    self._batch_limit = self._config.batch_size
                    logger.warning(
                        "Recording: %s keeps failing while FHIR answers; it waits in the"
                        " outbox table",
                        rows[0].event_id,
                    )
                    return
            delay = outbox_store.retry_delay_ms(self._failures, cap_ms=RETRY_CAP_MS)
            self._backoff_until = self._clock.seconds() + delay / 1000
            # (Not left to the checkpoint, which may come far later than the delay.)
            self._clock.callLater(delay / 1000, self.wake)
            logger.warning(
                "Recording: %d messages wait %d ms (%s)", len(rows), delay, _without_outcome(error)
            )
            return
        self._table_limit = 1
        if await self._given_up(rows, error):
            return
        delay = outbox_store.retry_delay_ms(rows[0].attempts, cap_ms=RETRY_CAP_MS)
        logger.warning("Outbox: %d rows wait %d ms (%s)", len(rows), delay, _without_outcome(error))
        await self._api.run_db_interaction(
            "fhir_outbox_retry",
            outbox_store.mark_retry,
            [row.event_id for row in rows],
            now_ms() + delay,
            str(error),
        )

    async def _settle(
        self, outcome: _Outcome, rows: list[outbox_store.OutboxRow], from_table: bool
    ) -> None:
        """Record what became of the rows: in memory (their notes saved with the next
        position), dead letters in the table; the table's own rows there."""
        self._recent_writes.add_all(outcome.locations)
        finished = [*outcome.done, *outcome.written, *outcome.not_written]
        note = self._note_messages
        by_id = {row.event_id: row for row in rows}
        if not from_table:
            if outcome.dead:
                await self._keep_dead(outcome.dead, by_id)
            if note is not None:
                self._notes.extend(outcome.messages)
            self._log.settle([*finished, *outcome.dead], now_ms())
        elif finished and note is not None and outcome.messages:
            messages = outcome.messages

            def done_and_noted(txn: Cursor) -> None:
                outbox_store.mark_written(txn, finished)
                note(txn, messages)

            await self._api.run_db_interaction("fhir_outbox_done", done_and_noted)
        elif finished:
            await self._api.run_db_interaction(
                "fhir_outbox_done", outbox_store.mark_written, finished
            )
        committed_ms = now_ms()
        COMMUNICATIONS_REPLAYED.inc(len(outcome.already_there))
        for event_id in outcome.written:
            if event_id in outcome.already_there:
                continue  # (read again after a crash: FHIR had it, nothing was written)
            COMMUNICATIONS_WRITTEN.inc()
            sent_ms = by_id[event_id].event.get("origin_server_ts")
            if isinstance(sent_ms, int):
                COMMUNICATION_LAG.observe(max(0.0, (committed_ms - sent_ms) / 1000))
        for event_id, reason in outcome.not_written.items():
            self._not_written = (self._not_written or 0) + 1
            COMMUNICATIONS_NOT_WRITTEN.labels(reason=reason).inc()
            # Event and room ids only: the sender's id can name a patient.
            logger.info(
                "Outbox: %s in %s not written (communication.profile: ozo): %s",
                event_id,
                by_id[event_id].room_id,
                NOT_WRITTEN_REASONS[reason],
            )
        COMMUNICATIONS_FAILED.inc(len(outcome.dead))
        for event_id, reason in outcome.dead.items():
            logger.warning("Outbox: %s cannot be written to FHIR; kept as a dead letter", event_id)
            if from_table:
                await self._api.run_db_interaction(
                    "fhir_outbox_dead", outbox_store.mark_dead, event_id, reason
                )

    async def _keep_dead(
        self, dead: Mapping[str, str], by_id: Mapping[str, outbox_store.OutboxRow]
    ) -> None:
        """Dead letters from memory into the table, before they count as settled."""
        now = now_ms()

        def add(txn: Cursor) -> None:
            for event_id, reason in dead.items():
                row = by_id[event_id]
                outbox_store.add(
                    txn,
                    row.event,
                    row.enqueued_ms,
                    state=outbox_store.DEAD,
                    next_attempt_ms=now,
                    error=reason,
                )

        await self._api.run_db_interaction("fhir_outbox_dead", add)
        self._table_dead += len(dead)

    async def _amend(self, row: outbox_store.OutboxRow) -> _Outcome:
        """Apply an edit or a redaction; raises what means "try later"."""
        try:
            if row.event["type"] == "m.room.redaction":
                return await self._apply_redaction(row)
            return await self._apply_edit(row)
        except StillConflicting as e:
            raise _NotYet(str(e)) from e
        except (_Retry, _NotYet, FhirTransientError):
            raise
        except _Dead as e:
            logger.warning("Outbox: %s cannot be applied; kept as a dead letter", row.event_id)
            return _Outcome(dead={row.event_id: str(e)})
        except FhirPermanentError as e:
            logger.warning(
                "Outbox: FHIR refused the change of %s (HTTP %s)", row.event_id, e.status
            )
            reason = f"HTTP {e.status}: {e.outcome or e}" if e.status else str(e)
            return _Outcome(dead={row.event_id: reason})
        except Exception as e:
            logger.warning("Outbox: %s could not be applied (%s)", row.event_id, type(e).__name__)
            return _Outcome(dead={row.event_id: f"could not be applied: {type(e).__name__}"})

    async def _apply_edit(self, row: outbox_store.OutboxRow) -> _Outcome:
        """An edit changes its original's payload, if the editor is its sender."""
        content = row.event.get("content") or {}
        original = replaced_event(content)
        if original is None or not await self._recorded_room(row.room_id):
            return _Outcome(done=[row.event_id])
        try:
            payload = edit_payload(content)
        except NotRecorded:
            logger.info("Outbox: edit %s of %s holds nothing to record", row.event_id, original)
            return _Outcome(done=[row.event_id])
        editor = await self._person_of(str(row.event.get("sender")))
        threads = await self._threads_to_amend(row.room_id, original)
        profile = self._config.profile
        result = await self._amender.amend(
            original,
            lambda stored: (
                edited(stored, editor, payload, profile=profile)
                if in_threads(stored, threads)
                else Unchanged("the original is another room's")
            ),
        )
        if result is None:
            return await self._edit_in_outbox(row, original, editor)
        return self._amended(row, original, result)

    async def _edit_in_outbox(
        self, row: outbox_store.OutboxRow, original: str, editor: str | None
    ) -> _Outcome:
        """An edit of a message FHIR does not have (yet)."""
        stored = await self._api.run_db_interaction(
            "fhir_outbox_row", outbox_store.row_of, original
        )
        if stored is None and self._log.is_pending(original):
            raise _NotYet(f"the message edited by {row.event_id} is not in FHIR yet")
        if stored is None:
            # Never recorded (not a care-team message, or posted from FHIR): nothing to do.
            return _Outcome(done=[row.event_id])
        if stored.room_id != row.room_id:
            return self._amended(row, original, Unchanged("the original is another room's"))
        if stored.state == outbox_store.PENDING:
            # Normally written before its edit (a room's rows go in order): soon, then.
            raise _NotYet(f"the message edited by {row.event_id} is not in FHIR yet")
        # A dead letter: the edit goes into it, so a retry writes what its author said last.
        editor_id = str(row.event.get("sender"))
        sender_id = str(stored.event.get("sender"))
        sender = None if editor_id == sender_id else await self._person_of(sender_id)
        if not same_author(editor_id, editor, sender_id, sender):
            return self._amended(row, original, Unchanged("edited by someone else"))
        changed = edited_event(stored.event, row.event.get("content") or {})
        if isinstance(changed, Unchanged):
            return self._amended(row, original, changed)
        await self._api.run_db_interaction(
            "fhir_outbox_rewrite", outbox_store.rewrite, original, changed, stored.last_error
        )
        logger.info("Outbox: edit %s applied to the dead letter %s", row.event_id, original)
        return _Outcome(done=[row.event_id])

    async def _apply_redaction(self, row: outbox_store.OutboxRow) -> _Outcome:
        """A redaction withdraws its original, if ``communication.redactions`` lets the
        redacter."""
        original = row.event.get("redacts")
        if not isinstance(original, str) or not await self._recorded_room(row.room_id):
            return _Outcome(done=[row.event_id])
        redacter = str(row.event.get("sender"))
        redaction = Redaction(
            redacter, await self._person_of(redacter), int(row.event["origin_server_ts"])
        )
        if self._log.is_pending(original):
            # (Read back from the stream after its redaction came: it goes first.)
            raise _NotYet(f"the message redacted by {row.event_id} is not in FHIR yet")
        stored = await self._api.run_db_interaction(
            "fhir_outbox_row", outbox_store.row_of, original
        )
        if stored is not None and stored.state == outbox_store.PENDING:
            if await self._amender.stored(original) is not None:
                # Parked while FHIR took it too (a spill during a write): FHIR's record is
                # the one the redaction applies to, under the redaction policy, below.
                await self._api.run_db_interaction(
                    "fhir_outbox_drop", outbox_store.mark_written, [original]
                )
                stored = None
        if stored is not None:
            if stored.room_id != row.room_id:
                return self._amended(row, original, Unchanged("the original is another room's"))
            return await self._redact_in_outbox(row, original, stored, redaction)
        policy = self._config.redactions
        profile = self._config.profile
        local = self._api.is_mine(redacter)
        threads = await self._threads_to_amend(row.room_id, original)
        result = await self._amender.amend(
            original,
            lambda stored: (
                withdrawn(stored, redaction, policy, by_local_user=local, profile=profile)
                if in_threads(stored, threads)
                else Unchanged("the original is another room's")
            ),
        )
        if result is None:
            return _Outcome(done=[row.event_id])  # never recorded: nothing to withdraw
        if isinstance(result, Amended):
            await self._drop_edits_of(row.room_id, original)
        return self._amended(row, original, result)

    async def _redact_in_outbox(
        self,
        row: outbox_store.OutboxRow,
        original: str,
        stored: outbox_store.StoredRow,
        redaction: Redaction,
    ) -> _Outcome:
        """A redaction of a message still waiting in the outbox, or a dead letter: its
        content (and any error that may quote it) is erased there, and it is written
        withdrawn."""
        if stored.event.get("type") not in MESSAGE_TYPES or WITHDRAWN in stored.event:
            # (A redaction of a redaction, or of a message withdrawn already.)
            return _Outcome(done=[row.event_id])
        sender_id = str(stored.event.get("sender"))
        sender = None if sender_id == redaction.user_id else await self._person_of(sender_id)
        by_sender = same_author(redaction.user_id, redaction.person, sender_id, sender)
        if not redaction_counts(
            self._config.redactions,
            by_sender=by_sender,
            by_local_user=self._api.is_mine(redaction.user_id),
        ):
            return self._amended(row, original, Unchanged("redacted by someone else"))
        content = stored.event.get("content")
        if isinstance(content, Mapping) and (
            replaced_event(content) is not None or await self._is_relayed(stored.event)
        ):
            # An edit that never reached FHIR, or a message FHIR had first: nothing of it
            # is to be written, so nothing of it stays.
            await self._api.run_db_interaction(
                "fhir_outbox_drop", outbox_store.mark_written, [original]
            )
        else:
            await self._api.run_db_interaction(
                "fhir_outbox_rewrite",
                outbox_store.rewrite,
                original,
                erased_event(stored.event, None if by_sender else redaction),
                erased_error(stored.last_error),
            )
            await self._drop_edits_of(row.room_id, original)
        logger.info("Outbox: redaction %s erased %s, still in the outbox", row.event_id, original)
        return _Outcome(done=[row.event_id])

    async def _threads_to_amend(self, room_id: str, original: str) -> frozenset[str]:
        """Every thread a message of the room may be recorded in, for its edits and
        redactions: bound, opened by this instance, or any request under the room's id —
        not only one the module would take today, so a message recorded in its thread stays
        editable and withdrawable after the team's patient changes or the request is edited.
        (A request under this room's id holds only this room's messages: the module writes
        another room's into another request.) Raises _Dead when none is found though FHIR
        holds the original: it waits, rather than being left as it was unnoticed."""
        threads = {await self._bindings.thread_of(room_id), self._opened_threads.get(room_id)}
        if not any(c in room_id for c in ",|$\\"):
            for request in await self._fhir.search_json(
                "CommunicationRequest", {"identifier": f"{ROOM_ID_SYSTEM}|{room_id}"}
            ):
                if request.get("resourceType") == "CommunicationRequest" and request.get("id"):
                    threads.add(f"CommunicationRequest/{request['id']}")
        found = frozenset(thread for thread in threads if thread)
        if not found and await self._amender.stored(original) is not None:
            raise _Dead("no thread found for the room (its request is gone from FHIR?)")
        return found

    async def _room_thread(self, room_id: str) -> str | None:
        """The room's thread (``CommunicationRequest/<id>``) if it has one: bound in room
        state, opened by this instance, or opened for it before (found by its room id, and
        only one the module would open: see ``unadoptable``)."""
        thread = await self._bindings.thread_of(room_id) or self._opened_threads.get(room_id)
        if thread is not None or any(c in room_id for c in ",|$\\"):
            return thread
        try:
            teams = await self._bindings.care_teams_of(room_id)
            patient = await self._patient_of(teams[0]) if teams else None
        except DirectoryUnavailable as e:
            raise _Retry(str(e)) from e
        for request in await self._fhir.search_json(
            "CommunicationRequest", {"identifier": f"{ROOM_ID_SYSTEM}|{room_id}"}
        ):
            if (
                request.get("resourceType") == "CommunicationRequest"
                and request.get("id")
                and unadoptable(request, teams, patient) is None
            ):
                return f"CommunicationRequest/{request['id']}"
        return None

    async def _drop_edits_of(self, room_id: str, original: str) -> None:
        """A withdrawn message's edits still in the outbox (waiting, or refused by FHIR)
        can never apply: their text goes with it."""

        def edits_original(event: dict[str, Any]) -> bool:
            content = event.get("content")
            return isinstance(content, Mapping) and replaced_event(content) == original

        edits = await self._api.run_db_interaction(
            "fhir_outbox_edits", outbox_store.event_ids_in_room, room_id, edits_original
        )
        if edits:
            await self._api.run_db_interaction("fhir_outbox_drop", outbox_store.mark_written, edits)
            logger.info("Outbox: %d edits of the withdrawn %s dropped", len(edits), original)

    def _amended(
        self, row: outbox_store.OutboxRow, original: str, result: Amended | Unchanged
    ) -> _Outcome:
        if isinstance(result, Unchanged):
            # Event ids and the fixed reason only: never what the message said.
            logger.info("Outbox: %s leaves %s as it was: %s", row.event_id, original, result.reason)
            return _Outcome(done=[row.event_id])
        return _Outcome(written=[row.event_id], locations=[result.location])

    async def _recorded_room(self, room_id: str) -> bool:
        if self._all_rooms:
            return True
        try:
            return await self._bindings.care_team_of(room_id) is not None
        except DirectoryUnavailable as e:
            raise _Retry(str(e)) from e

    async def _write_for(
        self, row: outbox_store.OutboxRow, in_batch: Mapping[str, str]
    ) -> CommunicationWrite:
        """``in_batch``: the messages written before it in the same transaction (event id
        -> room id)."""
        if await self._is_relayed(row.event):
            raise NotRecorded("posted from a FHIR Communication: FHIR has it already")
        try:
            teams = await self._bindings.care_teams_of(row.room_id)
            team_ref = teams[0] if teams else None
            if team_ref is None and not self._all_rooms:
                raise NotRecorded("not a care-team room")
            patient = await self._patient_of(team_ref) if team_ref else None
            sender = str(row.event["sender"])
            if self._ozo and sender == self._service_user_id:
                raise _NotWritten("service_user")  # (never a person; relays left above)
            person = await self._sender_person(sender, self._ozo and sender in self._exempt)
            thread = await self._thread_of(row.room_id, teams, patient, person)
        except DirectoryUnavailable as e:
            cause = e.__cause__
            if isinstance(cause, FhirPermanentError) and cause.status not in AUTHORISATION_STATUSES:
                # FHIR refuses for good what this message needs (its team, its thread):
                # this one waits as a dead letter; the rest of the batch goes on.
                # (Not an authorisation refusal: that is the module's credentials, for all.)
                raise _Dead(f"FHIR refused a lookup it needs: {_without_outcome(cause)}") from e
            raise _Retry(str(e)) from e
        room = RoomContext(
            thread=thread, care_team=team_ref, patient=patient, further_teams=teams[1:]
        )
        return message_write(
            row.event,
            room,
            person,
            encrypted_policy=self._config.encrypted_rooms.value,
            parent=await self._reply_parent(row, thread, in_batch),
            profile=self._config.profile,
        )

    async def _patient_of(self, team_ref: str) -> str | None:
        """The team's patient, as FHIR says now (raises DirectoryUnavailable)."""
        return (await self._teams.membership(team_ref)).subject

    async def _reply_parent(
        self, row: outbox_store.OutboxRow, thread: str, in_batch: Mapping[str, str]
    ) -> str | None:
        """What a reply's ``inResponseTo`` names (see ``message_write``): its parent only
        where that is this room's — posted into it from FHIR, written before it in this
        transaction, or recorded in FHIR as part of its thread. None otherwise: a room
        member chooses the parent's id, and FHIR could never resolve one never recorded."""
        content = row.event.get("content")
        if row.event.get("type") != "m.room.message" or not isinstance(content, Mapping):
            return None
        parent = reply_target(content)
        if parent is None or WITHDRAWN in row.event:
            return None  # (a withdrawn message keeps nothing of the reply it was)
        source = await self._api.run_db_interaction(
            "fhir_relay_source", sync_store.source_of_event, parent, row.room_id
        )
        if source:
            # (Any part of a relayed payload stands for its resource.)
            return resource_of_key(str(source))
        if in_batch.get(parent) == row.room_id:
            return communication_reference(parent)
        stored = await self._amender.stored(parent)
        if stored is not None and in_thread(stored, thread):
            return f"Communication/{stored['id']}"
        # Event and room ids only: the parent's id is whatever the client sent.
        logger.info(
            "Outbox: %s in %s replies to no message recorded in its thread;"
            " written without inResponseTo",
            row.event_id,
            row.room_id,
        )
        return None

    async def _is_relayed(self, event: Mapping[str, Any]) -> bool:
        content = event.get("content")
        source = source_of(content) if isinstance(content, Mapping) else None
        if source is None:
            return False
        # The claim is checked, not the content: anyone can put the key in a message.
        return bool(
            await self._api.run_db_interaction(
                "fhir_relay_check",
                sync_store.is_relay_event,
                source,
                str(event.get("room_id")),
                str(event.get("event_id")),
                str(event.get("sender")),
            )
        )

    async def _sender_person(self, user_id: str, exempt: bool = False) -> str:
        """The sender's person (``Practitioner``, ``RelatedPerson`` or ``Patient``, as OZO
        needs too); a dead letter while there is none: FHIR may name one later (a record
        not updated yet, an address briefly shared), and a retry then writes it.
        ``exempt``: an account the operator keeps outside the care-team rules (an audit
        bot): without a person its messages are not written, only counted, rather than
        piling up as dead letters that no retry will ever write."""
        person = await self._person_of(user_id)
        if person is None and exempt:
            raise _NotWritten("exempt_user")
        if person is None:
            raise _Dead("the sender has no (single) FHIR person")
        return person

    async def _person_of(self, user_id: str) -> str | None:
        """The FHIR person of a Matrix account; None when no single person names it."""
        record = self._persons.remembered(user_id)
        if record is None or not record.mapped:
            try:
                record = await self._persons.lookup(user_id)
            except FhirTransientError as e:
                raise _Retry(_without_outcome(e)) from e
            except FhirPermanentError as e:
                if e.status in AUTHORISATION_STATUSES:  # (the module's credentials: for all)
                    raise _Retry(_without_outcome(e)) from e
                raise
        return record.person

    async def _thread_of(
        self, room_id: str, teams: Sequence[str], patient: str | None, sender_person: str
    ) -> str:
        bound = await self._bindings.thread_of(room_id)
        if bound:
            return bound
        if room_id not in self._opened_threads:
            if len(self._opened_threads) >= MAX_REMEMBERED_THREADS:
                self._opened_threads.clear()
            self._opened_threads[room_id] = await self._open_thread(
                room_id, teams, patient, sender_person
            )
        return self._opened_threads[room_id]

    async def _open_thread(
        self, room_id: str, teams: Sequence[str], patient: str | None, sender_person: str
    ) -> str:
        """Create the room's CommunicationRequest (once: keyed by the room id) and bind it.

        ``sender_person``: the person whose message opens it (OZO's requester when the
        room's creator has no person). A request FHIR holds under the room's id already is
        taken only if it is one the module opens (``unadoptable``); otherwise the room has
        no thread to write into, and its messages are dead letters."""
        team_ref = teams[0] if teams else None
        requester = None
        if self._ozo:
            if patient is None or not patient.startswith("Patient/"):
                # Nothing to name as OZOCommunicationRequest.subject. Kept as dead letters,
                # the messages are written once the CareTeam names its patient (retry).
                raise _Dead(
                    "no OZO thread for the room: its CareTeam names no Patient "
                    "(OZOCommunicationRequest.subject is required)"
                )
            requester = await self._requester(room_id, sender_person)
        request = thread_request(
            room_id, team_ref, patient, requester=requester, profile=self._config.profile
        )
        unmet = request_problems(request) if self._ozo else []
        if unmet:
            raise _Dead("no OZO thread for the room: " + "; ".join(unmet))
        try:
            stored, created = await self._fhir.create_if_none_exist(
                CommunicationRequest.model_validate(request),
                f"identifier={ROOM_ID_SYSTEM}|{room_id}",
            )
        except FhirTransientError as e:
            raise _Retry(str(e)) from e
        except FhirError as e:
            raise _Dead(f"could not open a thread for the room: {e.detail}") from e
        thread = f"CommunicationRequest/{stored.id}"
        foreign = None if created else unadoptable(to_json(stored), teams, patient)
        if foreign is not None:
            # Never written into, never bound: the room's messages wait as dead letters
            # until FHIR no longer holds that request under the room's id.
            logger.warning("Not recording %s into %s: %s", room_id, thread, foreign)
            raise _Dead(
                f"no thread for the room: {thread} carries the room's id, but {foreign};"
                " take the room's id off it in FHIR, then retry"
            )
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

    async def _requester(self, room_id: str, sender_person: str) -> str:
        """Who opens a room's thread under the OZO profile: the person of whoever created
        the room (its ``m.room.create`` sender), or — when that is the service user or an
        account without a person — the person whose message opens the thread."""
        state: StateMap[EventBase] = await self._api.get_room_state(room_id, [ROOM_CREATE])
        create = state.get(ROOM_CREATE)
        creator = create.sender if create is not None else None
        if creator and creator != self._service_user_id:
            person = await self._person_of(creator)
            if person is not None:
                return person
        return sender_person


def now_ms() -> int:
    return int(time.time() * 1000)


def _warn_if_exposed(client_url: str | None, public_baseurl: str) -> None:
    """The service user's access token goes wherever the stream is read: say so when that
    is plain HTTP off this host."""
    url = urlsplit(client_url or public_baseurl)
    host = (url.hostname or "").lower()
    if url.scheme == "http" and host not in ("localhost", "127.0.0.1", "::1"):
        logger.warning(
            "Recording reads Synapse's stream over plain HTTP at %s%s: the service user's"
            " access token travels with each read; point communication.client_url at a"
            " listener on this host or use https",
            host,
            "" if client_url else " (public_baseurl; communication.client_url is not set)",
        )


def _row(entry: PendingEvent) -> outbox_store.OutboxRow:
    return outbox_store.OutboxRow(entry.event_id, entry.room_id, entry.arrived_ms, entry.event, 0)


def _amends_a_message(row: outbox_store.OutboxRow) -> bool:
    """An edit or a redaction: it changes a message recorded before it."""
    if row.event["type"] == "m.room.redaction":
        return True
    content = row.event.get("content")
    return (
        row.event["type"] == "m.room.message"
        and isinstance(content, Mapping)
        and replaced_event(content) is not None
    )


def _without_outcome(error: Exception) -> str:
    """An error for the log: FHIR's own diagnostics may quote a message, so not those."""
    if isinstance(error, FhirError):
        return str(error.args[0]) if error.args else type(error).__name__
    return str(error)
