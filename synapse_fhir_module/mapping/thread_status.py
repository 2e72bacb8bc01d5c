"""What a thread's ``CommunicationRequest.status`` means for its room (pure).

- ``draft``, ``active``: the conversation is live — a room is made, members may speak.
- ``completed``, ``revoked``, ``on-hold``: read-only — nobody but the service user may
  send, nobody new is invited; members keep reading and may leave. Back to ``active``:
  writable again.
- ``entered-in-error``: the thread should never have existed — everyone but the service
  user is removed and nobody is admitted.
- ``unknown``, a missing or an unrecognised status: read-only (nothing says the
  conversation is live; FHIR requires a status).

Only ``draft`` and ``active`` make a room: a request that arrives already closed gets
none (integrators write historical or closed requests into the record; a room nobody can
speak in, with invitations to it, would be noise). If it is reopened, the room is made
then.

The room's team adds its own limits: a thread room is open only while its team also
admits members, and emptied when either says so.
"""

from __future__ import annotations

from enum import Enum
from typing import Any

import attr


class ThreadMode(str, Enum):
    OPEN = "open"
    READ_ONLY = "read_only"
    EMPTIED = "emptied"


OPENING_STATUSES = frozenset({"draft", "active"})
READ_ONLY_STATUSES = frozenset({"completed", "revoked", "on-hold"})
EMPTYING_STATUSES = frozenset({"entered-in-error"})


def thread_mode(status: Any) -> ThreadMode:
    if not isinstance(status, str):
        return ThreadMode.READ_ONLY  # (FHIR JSON from elsewhere: anything may be here)
    if status in OPENING_STATUSES:
        return ThreadMode.OPEN
    if status in EMPTYING_STATUSES:
        return ThreadMode.EMPTIED
    return ThreadMode.READ_ONLY  # closed, unknown, missing or malformed


def opens_room(status: Any) -> bool:
    """Whether a request with this status gets a room when it has none yet."""
    return isinstance(status, str) and status in OPENING_STATUSES


def parse_mode(value: Any) -> ThreadMode:
    """A mode as stored; anything unreadable counts as open (a row from nowhere must not
    lock a live room: the next sync of its request stores it again)."""
    try:
        return ThreadMode(value)
    except ValueError:
        return ThreadMode.OPEN


@attr.s(frozen=True, auto_attribs=True)
class RoomRules:
    """How a room's membership and power levels follow FHIR."""

    emptied: bool  # every member but the service user (and exempt users) removed
    admit_new: bool  # members not yet in the room are invited
    read_only: bool  # sending needs the service user's level


def room_rules(*, team_admits: bool, team_emptied: bool, mode: ThreadMode) -> RoomRules:
    """The team's state and the thread's combined: the stricter of the two wins."""
    emptied = team_emptied or mode is ThreadMode.EMPTIED
    open_ = team_admits and mode is ThreadMode.OPEN and not emptied
    return RoomRules(emptied=emptied, admit_new=open_, read_only=not open_)
