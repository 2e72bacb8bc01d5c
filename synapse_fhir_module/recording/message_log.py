"""What the recorder holds in memory between Synapse's event stream and FHIR (no I/O).

Messages reach it two ways: live, from ``on_new_event`` (memory only: the send path pays
no database write), and read back from Synapse's stream (``stream_reader``) — at start-up
from the saved position, after more piled up than memory holds, or when a checkpoint
finds one whose callback never came. Either way an event is *pending* until the drain
has written it to FHIR (or found nothing to write, or kept it as a dead letter): then it
is *settled*. The saved stream position may move past an event only once it is settled
(``Candidate``): so a crash, an outage or a lost callback makes the recorder read the
events again, never skip them, and FHIR's conditional creates make a second write of
one a no-op.

While the log *catches up* (reading the stream, not taking callbacks), a callback's event
is held aside: the read will bring it in stream order, or — when it came after the read —
it joins once the read is in. Held aside too long or too many (the stream cannot be read,
or FHIR is away for long), they are handed to the outbox table (``spill``), where they
wait in order with their rooms: never dropped, since a room the service user is not in
cannot be read back.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable, Mapping
from typing import Any

import attr

MAX_SETTLED = 500_000
# Held aside beyond either, events go to the outbox table.
HELD_ASIDE = 10_000
HELD_FOR_MS = 30_000


@attr.s(frozen=True, auto_attribs=True)
class PendingEvent:
    event: dict[str, Any]  # event_id, room_id, type, sender, origin_server_ts, content, ...
    arrived_ms: int  # when this server had it (its origin_server_ts is the sender's choice)

    @property
    def event_id(self) -> str:
        return str(self.event["event_id"])

    @property
    def room_id(self) -> str:
        return str(self.event["room_id"])


@attr.s(auto_attribs=True, eq=False)
class Candidate:
    """A stream position read from the saved one: it may be saved once every event
    before it is settled. ``gaps`` are rooms still to be read up to it (``stream_reader.Gap``),
    ``tail`` what the read returned for rooms whose gaps are still open."""

    token: str
    read_ms: int
    event_ids: dict[str, str] = attr.Factory(dict)  # event id -> room id
    gaps: list[Any] = attr.Factory(list)
    tail: list[dict[str, Any]] = attr.Factory(list)

    @property
    def complete(self) -> bool:
        return not self.gaps and not self.tail


class RecordingLog:
    def __init__(self, max_pending: int) -> None:
        self._max_pending = max_pending
        self._pending: dict[str, PendingEvent] = {}  # in arrival order
        self._settled: dict[str, int] = {}  # event id -> when (ms), in that order
        self._held: deque[PendingEvent] = deque()
        # Until the first read from the saved position is in, everything comes from reads.
        self.catching_up = True

    # --- live, from on_new_event -------------------------------------------------------

    def offer(self, event: Mapping[str, Any], now_ms: int) -> bool:
        """An event from its callback; True when the drain should look now."""
        entry = PendingEvent(dict(event), now_ms)
        if entry.event_id in self._pending or entry.event_id in self._settled:
            return False
        if not self.catching_up and len(self._pending) >= self._max_pending:
            # FHIR is away for long: memory stops here, Synapse's stream keeps the rest.
            self.catching_up = True
        if self.catching_up:
            self._held.append(entry)
            return False
        self._pending[entry.event_id] = entry
        return True

    def settle_now(self, event_id: str, now_ms: int) -> None:
        """An event with nothing to write (the callback knew at once)."""
        self._pending.pop(event_id, None)
        self._remember_settled(event_id, now_ms)

    # --- the drain -------------------------------------------------------------------

    def take(self, limit: int) -> list[PendingEvent]:
        """The oldest pending events (they stay pending until settled)."""
        taken: list[PendingEvent] = []
        for entry in self._pending.values():
            if len(taken) >= limit:
                break
            taken.append(entry)
        return taken

    def settle(self, event_ids: Iterable[str], now_ms: int) -> None:
        for event_id in event_ids:
            self._pending.pop(event_id, None)
            self._remember_settled(event_id, now_ms)

    # --- reads from the stream ----------------------------------------------------------

    def room_for(self) -> int:
        """How many more events memory takes from reads now."""
        return max(0, self._max_pending - len(self._pending))

    def add_read(self, events: Iterable[Mapping[str, Any]], now_ms: int) -> None:
        """Events read from the stream, in stream order per room: the unknown ones become
        pending (callers keep to ``room_for``)."""
        for event in events:
            event_id = str(event["event_id"])
            if event_id in self._pending or event_id in self._settled:
                continue
            # (Read now: ``unsigned.age`` of a federated event is the other server's word.)
            self._pending[event_id] = PendingEvent(dict(event), now_ms)

    def caught_up(self) -> None:
        """A read reached the stream's end: take callbacks again, starting with those
        held aside."""
        held, self._held = self._held, deque()
        self.catching_up = False
        for entry in held:
            if entry.event_id not in self._pending and entry.event_id not in self._settled:
                self._pending[entry.event_id] = entry

    def spill(self, now_ms: int) -> list[PendingEvent]:
        """Those held aside, when they are too many or waited too long, for the outbox
        table, behind the pending messages of their rooms (a room's order): the caller
        settles them once the table has them, or holds them again (``hold_again``)."""
        if not self._held or (
            len(self._held) < HELD_ASIDE and now_ms - self._held[0].arrived_ms < HELD_FOR_MS
        ):
            return []
        held = [e for e in self._held if e.event_id not in self._settled]
        self._held.clear()
        rooms = {entry.room_id for entry in held}
        earlier = [e for e in self._pending.values() if e.room_id in rooms]
        return earlier + [e for e in held if e.event_id not in self._pending]

    def hold_again(self, entries: list[PendingEvent]) -> None:
        """A spill the table did not take: as they were (pending ones stay pending)."""
        self._held.extendleft(reversed([e for e in entries if e.event_id not in self._pending]))

    # --- checkpoints -----------------------------------------------------------------

    def unsettled(self, candidate: Candidate) -> list[str]:
        return [e for e in candidate.event_ids if e not in self._settled]

    def missing(self, candidate: Candidate) -> list[str]:
        """Events before the candidate that are neither pending nor settled: their
        callback has not come (yet)."""
        return [e for e in candidate.event_ids if e not in self._settled and e not in self._pending]

    def saved(self, candidate: Candidate, margin_ms: int) -> None:
        """The candidate's position is saved: forget what was settled before its read
        (it is behind the position now, or in a room the stream does not show)."""
        for event_id in candidate.event_ids:
            self._settled.pop(event_id, None)
        cutoff = candidate.read_ms - margin_ms
        while self._settled:
            event_id, settled_ms = next(iter(self._settled.items()))
            if settled_ms >= cutoff:
                break
            del self._settled[event_id]

    # --- figures -------------------------------------------------------------------

    @property
    def pending(self) -> int:
        return len(self._pending) + len(self._held)

    def oldest_ms(self) -> int | None:
        first = next(iter(self._pending.values()), None)
        if first is None:
            return self._held[0].arrived_ms if self._held else None
        return first.arrived_ms

    def is_pending(self, event_id: str) -> bool:
        return event_id in self._pending

    def _remember_settled(self, event_id: str, now_ms: int) -> None:
        self._settled.pop(event_id, None)
        self._settled[event_id] = now_ms
        if len(self._settled) > MAX_SETTLED:
            # (Forgetting one early costs at most a second, harmless, conditional write.)
            del self._settled[next(iter(self._settled))]
