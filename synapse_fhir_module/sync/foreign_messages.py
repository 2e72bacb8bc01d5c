"""Communications other systems write into a thread (pure): which ones the module relays,
in what order, and which Matrix event each one replies to.

A Communication is *the module's own* — never relayed, it came from Matrix — when it
carries the origin tag or an identifier in the Matrix event-id system (either alone is
enough: a FHIR server or proxy that drops tags must not make the module echo its own
records). Everything else in a thread with a room is foreign. OZO's own Communications
(the guide's examples) carry neither an identifier nor ``sent``; a system that does set
``sent`` or an identifier of its own is still another system, and its message is relayed
rather than silently dropped.

Several pending at once (after an outage, found by the sweep) are relayed oldest first by
``meta.lastUpdated`` (FHIR's own clock; ties by id; an unreadable one last), so a reply
comes after what it answers.

``inResponseTo`` becomes an ``m.in_reply_to`` relation when it points at a message of the
same thread that is in the room: one the module relayed (its first message), or one the
module recorded from Matrix (its event-id identifier, written as ``Communication/<id>`` or
as the conditional reference the recorder writes,
``Communication?identifier=https://matrix.org/event-id|<event id>``).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from datetime import datetime
from typing import Any
from urllib.parse import parse_qs, urlsplit

from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG, reference_of
from synapse_fhir_module.fhir.dates import parse_fhir_datetime
from synapse_fhir_module.mapping.communication import has_tag, is_event_id

# In-reply-to is how Matrix clients show a reply (no fallback text: the quoted message
# may no longer be what FHIR says).
RELATES_TO = "m.relates_to"
IN_REPLY_TO = "m.in_reply_to"


def is_module_written(resource: Mapping[str, Any]) -> bool:
    return has_tag(resource, ORIGIN_TAG) or recorded_event_id(resource) is not None


def recorded_event_id(resource: Mapping[str, Any]) -> str | None:
    """The Matrix event a Communication was recorded from, by its event-id identifier."""
    for identifier in _items(resource.get("identifier")):
        if isinstance(identifier, Mapping) and identifier.get("system") == EVENT_ID_SYSTEM:
            value = identifier.get("value")
            if is_event_id(value):
                return str(value)
    return None


def part_of(resource: Mapping[str, Any], thread: str) -> bool:
    """Whether the Communication says it belongs to ``thread`` (``CommunicationRequest/<id>``)."""
    return any(reference_of(item) == thread for item in _items(resource.get("partOf")))


def relay_order(resources: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Oldest ``meta.lastUpdated`` first; ties by id; unreadable instants last."""
    return sorted(resources, key=_order_key)


def _order_key(resource: Mapping[str, Any]) -> tuple[bool, datetime, str]:
    meta = resource.get("meta")
    value = meta.get("lastUpdated") if isinstance(meta, Mapping) else None
    resource_id = str(resource.get("id") or "")
    if isinstance(value, str):
        try:
            return False, parse_fhir_datetime(value), resource_id
        except (ValueError, ArithmeticError):
            pass
    return True, datetime.min, resource_id


def answered(resource: Mapping[str, Any]) -> str | None:
    """The first ``inResponseTo`` reference, as written (``Communication/<id>`` or a
    conditional reference); None when there is none to follow."""
    for item in _items(resource.get("inResponseTo")):
        reference = item.get("reference") if isinstance(item, Mapping) else None
        if isinstance(reference, str) and reference.startswith("Communication"):
            return reference
    return None


def literal_id(reference: str) -> str | None:
    """``Communication/<id>`` → the id (a version suffix dropped); None otherwise."""
    resource_type, _, rest = reference.partition("/")
    if resource_type != "Communication" or not rest:
        return None
    resource_id = rest.split("/", 1)[0]
    return resource_id or None


def conditional_event_id(reference: str) -> str | None:
    """``Communication?identifier=<event-id system>|<event id>`` → the event id."""
    if not reference.startswith("Communication?"):
        return None
    query = parse_qs(urlsplit(reference).query)
    for value in query.get("identifier", []):
        system, bar, event_id = value.partition("|")
        if bar and system == EVENT_ID_SYSTEM and is_event_id(event_id):
            return event_id
    return None


def _items(value: Any) -> list[Any]:
    # (FHIR JSON from other systems: a repeating element may arrive as anything.)
    return value if isinstance(value, list) else []


def with_reply(content: Mapping[str, Any], event_id: str) -> dict[str, Any]:
    """``content`` as a reply to ``event_id``."""
    return {**content, RELATES_TO: {IN_REPLY_TO: {"event_id": event_id}}}
