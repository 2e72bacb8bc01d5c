"""Follows Synapse's event stream from the saved position, so nothing is missed.

Each step reads from the saved position to the stream's end (``stream_reader``) and
holds that end as a ``Candidate``: once every event before it is settled, it is the next
position to save. Live, the read asks for event ids only — the callbacks have brought
the events — and an event whose callback has not come a few seconds after the read is
fetched on its own. Catching up (at start-up, or after memory filled), the read brings
the events themselves, into memory as it has room, each room's in stream order (a room
cut short by ``/sync`` is read forward through ``/messages`` first).
"""

from __future__ import annotations

import logging
from collections.abc import Collection

from synapse_fhir_module.recording.message_log import Candidate, RecordingLog
from synapse_fhir_module.recording.stream_reader import PAGE_LIMIT, Gap, StreamReader

logger = logging.getLogger(__name__)

# How long an event may be in the stream before its callback comes (then it is fetched).
CALLBACK_GRACE_MS = 5_000
# More missing than this: read them all back (catch up) rather than one by one.
MAX_FETCHED = 100


class StreamFollower:
    def __init__(self, log: RecordingLog, reader: StreamReader, types: Collection[str]) -> None:
        self._log = log
        self._reader = reader
        self._types = frozenset(types)
        self._candidate: Candidate | None = None
        self._full = False  # whether the candidate's read brings events (catching up)

    async def step(self, position: str, now_ms: int) -> Candidate | None:
        """Read on from ``position``; the candidate to save when one is all settled."""
        log = self._log
        if self._candidate is not None and log.catching_up and not self._full:
            # Memory filled (or too many callbacks went missing) since this read of ids:
            # it cannot settle now; read back in full from the saved position instead.
            self._candidate = None
        if self._candidate is None:
            if log.catching_up and log.room_for() == 0:
                return None  # memory is full: the drain first
            full = log.catching_up
            read = await self._reader.read(position, self._types, ids_only=not full)
            candidate = Candidate(read.next_token, now_ms, gaps=list(read.gaps))
            if full:
                candidate.tail = read.events  # (each room's after its gap, if it has one)
            else:
                for event in read.events:
                    candidate.event_ids[str(event["event_id"])] = str(event["room_id"])
            self._candidate, self._full = candidate, full
        candidate = self._candidate
        if not candidate.complete:
            await self._read_on(candidate, now_ms)
            if not candidate.complete:
                return None
        if self._full and log.catching_up:
            log.caught_up()
        if not log.unsettled(candidate):
            self._candidate = None
            return candidate
        if not log.catching_up:
            await self._fetch_missing(candidate, now_ms)
        return None

    def restart(self) -> None:
        """Forget the read under way (the next step reads from the saved position)."""
        self._candidate = None

    async def _read_on(self, candidate: Candidate, now_ms: int) -> None:
        log = self._log
        full = self._full
        while candidate.gaps and (not full or log.room_for() > 0):
            gap: Gap = candidate.gaps[0]
            limit = min(PAGE_LIMIT, log.room_for()) if full else PAGE_LIMIT
            events, rest = await self._reader.page(gap, self._types, limit=max(1, limit))
            self._take(candidate, events, now_ms)
            if rest is None:
                candidate.gaps.pop(0)
            else:
                candidate.gaps[0] = rest
        still_open = {gap.room_id for gap in candidate.gaps}
        waiting = []
        for event in candidate.tail:
            if event["room_id"] in still_open or (full and log.room_for() == 0):
                waiting.append(event)
            else:
                self._take(candidate, [event], now_ms)
        candidate.tail = waiting

    def _take(self, candidate: Candidate, events: list[dict[str, object]], now_ms: int) -> None:
        for event in events:
            candidate.event_ids[str(event["event_id"])] = str(event["room_id"])
        if self._full:
            self._log.add_read(events, now_ms)

    async def _fetch_missing(self, candidate: Candidate, now_ms: int) -> None:
        missing = self._log.missing(candidate)
        if not missing or now_ms - candidate.read_ms < CALLBACK_GRACE_MS:
            return
        if len(missing) > MAX_FETCHED:
            logger.warning(
                "Recording: %d messages had no callback; reading them back", len(missing)
            )
            self._log.catching_up = True
            self._candidate = None
            return
        logger.warning("Recording: %d messages had no callback; fetching them", len(missing))
        for event_id in missing:
            room_id = candidate.event_ids[event_id]
            event = await self._reader.event(room_id, event_id)
            if event is None:
                self._log.settle_now(event_id, now_ms)  # (not visible: nothing to record)
            else:
                self._log.add_read([event], now_ms)
