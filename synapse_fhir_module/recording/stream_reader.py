"""Reads Synapse's event stream as the service user, through the client-server API.

Synapse stores every event durably and in order; this is how the recorder reads that
log back — after a restart, or to check nothing passed it by — without raw SQL on
Synapse's tables: a filtered ``/sync`` from a stream position (its ``next_batch`` is the
next position), ``/messages`` forward through a room whose ``/sync`` timeline was cut
short (``limited``), and single events by id. Every request has one deadline for the
whole exchange; anything below HTTP or a 5xx is ``StreamUnavailable`` (try later), a
401 is ``TokenRejected`` (mint a new token).
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Collection, Mapping
from typing import Any
from urllib.parse import quote, urlencode

import attr

from synapse_fhir_module.http_exchange import Unreachable, exchange, http_client

logger = logging.getLogger(__name__)

# What the recorder reads of an event (a callback hands over the same).
RECORDED_FIELDS = (
    "event_id",
    "type",
    "sender",
    "origin_server_ts",
    "content",
    "redacts",
    "unsigned",
)
TIMELINE_LIMIT = 100
PAGE_LIMIT = 1000
REQUEST_TIMEOUT = 30.0


class StreamUnavailable(Exception):
    """Synapse's client API cannot be read now (unreachable, overloaded, odd answer)."""


class TokenRejected(StreamUnavailable):
    """The access token is no longer valid (the device was deleted, or it expired)."""


@attr.s(frozen=True, auto_attribs=True)
class Gap:
    """A room's events between two stream positions that ``/sync`` left out."""

    room_id: str
    start: str  # where the read began (the previous position)
    end: str  # the room timeline's prev_batch: the first event ``/sync`` did return


@attr.s(frozen=True, auto_attribs=True)
class StreamRead:
    """What one ``/sync`` from a position returned.

    ``events``: the recorded types, each room's in stream order (with ``room_id``);
    ``gaps``: rooms where events before these are still to be read; ``next_token``: the
    position after all of them."""

    next_token: str
    events: list[dict[str, Any]]
    gaps: list[Gap]


def sync_filter(types: Collection[str], *, ids_only: bool) -> str:
    """The service user's ``/sync`` filter: timelines of ``types`` only, nothing else.
    ``ids_only`` keeps just what the checkpoint compares (cheaper for Synapse to send)."""
    room: dict[str, Any] = {
        "timeline": {"types": sorted(types), "limit": TIMELINE_LIMIT},
        "state": {"types": []},
        "ephemeral": {"types": []},
        "account_data": {"types": []},
        # A room the service user left still holds events from before it left.
        "include_leave": True,
    }
    spec: dict[str, Any] = {
        "room": room,
        "presence": {"types": []},
        "account_data": {"types": []},
    }
    if ids_only:
        spec["event_fields"] = ["event_id", "type"]
    return json.dumps(spec, separators=(",", ":"), sort_keys=True)


def parse_sync(body: Any, since: str) -> StreamRead:
    """A ``/sync`` answer as a StreamRead (``StreamUnavailable`` if it is not one)."""
    if not isinstance(body, Mapping) or not isinstance(body.get("next_batch"), str):
        raise StreamUnavailable("/sync answered without next_batch")
    events: list[dict[str, Any]] = []
    gaps: list[Gap] = []
    rooms = body.get("rooms")
    rooms = rooms if isinstance(rooms, Mapping) else {}
    for section in ("join", "leave"):
        by_room = rooms.get(section)
        if not isinstance(by_room, Mapping):
            continue
        for room_id, room in by_room.items():
            timeline = room.get("timeline") if isinstance(room, Mapping) else None
            if not isinstance(timeline, Mapping):
                continue
            if timeline.get("limited") and isinstance(timeline.get("prev_batch"), str):
                gaps.append(Gap(str(room_id), since, str(timeline["prev_batch"])))
            events.extend(_with_room(timeline.get("events"), str(room_id)))
    return StreamRead(str(body["next_batch"]), events, gaps)


def _with_room(raw: Any, room_id: str) -> list[dict[str, Any]]:
    if not isinstance(raw, list):
        return []
    return [
        _as_recorded(event, room_id)
        for event in raw
        if isinstance(event, dict) and isinstance(event.get("event_id"), str)
    ]


def _as_recorded(event: dict[str, Any], room_id: str) -> dict[str, Any]:
    """An event as the recorder takes it: the fields it reads and nothing else (another
    server can add any key at an event's top level, and Synapse passes it on), with its
    room, and a redaction's target at the top level (room version 11 keeps it in the
    content only). Of ``unsigned`` — Synapse's own — only when it arrived and who
    redacted it; never the bundled relations (a reply's text)."""
    recorded: dict[str, Any] = {
        key: event[key] for key in RECORDED_FIELDS if key in event and key != "unsigned"
    }
    recorded["room_id"] = room_id
    unsigned = event.get("unsigned")
    if isinstance(unsigned, Mapping):
        kept: dict[str, Any] = {}
        if isinstance(unsigned.get("age"), int):
            kept["age"] = unsigned["age"]
        because = unsigned.get("redacted_because")
        if isinstance(because, Mapping):
            kept["redacted_because"] = {
                k: because[k] for k in ("sender", "origin_server_ts") if k in because
            }
        if kept:
            recorded["unsigned"] = kept
    content = event.get("content")
    if (
        event.get("type") == "m.room.redaction"
        and not isinstance(event.get("redacts"), str)
        and isinstance(content, Mapping)
        and isinstance(content.get("redacts"), str)
    ):
        recorded["redacts"] = content["redacts"]
    return recorded


class StreamReader:
    """Reads the service user's view of the stream at ``base_url`` (a client listener)."""

    def __init__(self, base_url: str, access_token: Callable[[], str | None]) -> None:
        self._base_url = base_url.rstrip("/")
        self._access_token = access_token
        self._http = http_client(2)

    async def now(self) -> str:
        """The stream's current position (a ``/sync`` that asks for no room)."""
        spec: dict[str, Any] = {
            "room": {"rooms": []},
            "presence": {"types": []},
            "account_data": {"types": []},
        }
        body = await self._get(
            "/_matrix/client/v3/sync",
            {"filter": json.dumps(spec), "timeout": "0", "set_presence": "offline"},
        )
        if not isinstance(body, Mapping) or not isinstance(body.get("next_batch"), str):
            raise StreamUnavailable("/sync answered without next_batch")
        return str(body["next_batch"])

    async def read(self, since: str, types: Collection[str], *, ids_only: bool) -> StreamRead:
        """Everything of ``types`` after ``since`` (each room's newest
        ``TIMELINE_LIMIT``; see ``gaps`` for the rest)."""
        body = await self._get(
            "/_matrix/client/v3/sync",
            {
                "since": since,
                "filter": sync_filter(types, ids_only=ids_only),
                "timeout": "0",
                "set_presence": "offline",
            },
        )
        return parse_sync(body, since)

    async def page(
        self, gap: Gap, types: Collection[str], limit: int = PAGE_LIMIT
    ) -> tuple[list[dict[str, Any]], Gap | None]:
        """The oldest events of a gap, and what is left of it (None: nothing)."""
        body = await self._get(
            f"/_matrix/client/v3/rooms/{quote(gap.room_id, safe='')}/messages",
            {
                "dir": "f",
                "from": gap.start,
                "to": gap.end,
                "limit": str(limit),
                "filter": json.dumps({"types": sorted(types)}),
            },
        )
        if body is _FORBIDDEN:
            # Synapse's own refusal: the service user may not see that stretch of the room
            # (it was not in it), so nothing there can be read, now or later.
            logger.warning(
                "Cannot read back events of %s: not visible to the service user", gap.room_id
            )
            return [], None
        if not isinstance(body, Mapping):
            raise StreamUnavailable("/messages answered with no object")
        events = _with_room(body.get("chunk"), gap.room_id)
        end = body.get("end")
        # (A page can come back empty yet go on: Synapse filters what the user may not see
        # after reading the page. No `end`, or one that does not move: the gap is read.)
        if not isinstance(end, str) or end == gap.start:
            return events, None
        return events, attr.evolve(gap, start=end)

    async def event(self, room_id: str, event_id: str) -> dict[str, Any] | None:
        """One event as the service user sees it; None when Synapse has none by that id
        for it."""
        try:
            body = await self._get(
                f"/_matrix/client/v3/rooms/{quote(room_id, safe='')}/event/"
                f"{quote(event_id, safe='')}",
                {},
            )
        except _NotFound:
            return None
        if body is _FORBIDDEN:
            return None
        if not isinstance(body, dict) or body.get("event_id") != event_id:
            return None
        return _as_recorded(body, room_id)

    async def _get(self, path: str, params: Mapping[str, str]) -> Any:
        token = self._access_token()
        if token is None:
            raise TokenRejected("no access token yet")
        url = f"{self._base_url}{path}" + (f"?{urlencode(params)}" if params else "")
        try:
            code, payload = await exchange(
                self._http,
                "GET",
                url,
                timeout=REQUEST_TIMEOUT,
                headers={"Authorization": f"Bearer {token}"},
            )
        except Unreachable as e:
            raise StreamUnavailable(f"{path}: unreachable ({e.reason})") from e
        try:
            body = json.loads(payload) if payload else None
        except ValueError:
            body = None
        if code == 401 and _errcode(body) == "M_UNKNOWN_TOKEN":
            raise TokenRejected("the service user's access token was refused (M_UNKNOWN_TOKEN)")
        if code == 404 and _errcode(body) == "M_NOT_FOUND":
            raise _NotFound("M_NOT_FOUND")  # (Synapse's answer; a proxy's 404 is not)
        if code == 403 and _errcode(body) == "M_FORBIDDEN":
            return _FORBIDDEN  # (Synapse's answer; a proxy's 403 is "unavailable")
        if code != 200:
            raise StreamUnavailable(f"HTTP {code} ({_errcode(body)})")
        return body


class _NotFound(StreamUnavailable):
    pass


_FORBIDDEN = object()  # (a 403: the service user may not see it)


def _errcode(body: Any) -> str:
    if isinstance(body, Mapping) and isinstance(body.get("errcode"), str):
        return str(body["errcode"])
    return "no errcode"
