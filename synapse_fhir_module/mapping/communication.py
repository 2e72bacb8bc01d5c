"""A Matrix message as a FHIR ``Communication`` (design.md: mapping, OZO ``OZOCommunication``), as
pure functions: plain event data and the room's care-team context in, FHIR JSON out.

What the outbox writes for an event is a :class:`CommunicationWrite`: a conditional
create (a new message: ``ifNoneExist`` on the event-id identifier, so a retry never makes
a second Communication), or, for a message redacted before FHIR had it, a conditional
update by that identifier to its withdrawn form. Edits and redactions of a message FHIR
already has are applied to its stored Communication (``recording.amendments``).

With ``communication.profile: ozo`` every Communication also declares and meets
``OZOCommunication`` (``mapping.profile``): a withdrawn or encrypted one carries a
fixed placeholder as its payload, and the thread the module opens is an
``OZOCommunicationRequest`` with a requester.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from datetime import datetime, timezone
from typing import Any

import attr

from synapse_fhir_module.config import CommunicationProfile
from synapse_fhir_module.fhir.conventions import (
    EVENT_ID_SYSTEM,
    ORIGIN_TAG,
    ROOM_ID_SYSTEM,
    reference_of,
)
from synapse_fhir_module.fhir.dates import format_fhir_instant
from synapse_fhir_module.fhir.thread_teams import request_teams
from synapse_fhir_module.mapping.profile import (
    ENCRYPTED_PLACEHOLDER,
    OZO_COMMUNICATION,
    OZO_COMMUNICATION_REQUEST,
    WITHDRAWN_PLACEHOLDER,
    declare,
    declares,
)

# Marks a Communication recorded from an encrypted event: it has no payload on purpose
# (under the OZO profile, a placeholder).
ENCRYPTED_TAG = {"system": "urn:synapse-fhir-module:content", "code": "encrypted"}

# Key of an outbox row's event whose message was redacted before FHIR had it: its content
# is erased, and it is written withdrawn. The value is {} (redacted by its sender) or the
# moderator's Redaction as JSON.
WITHDRAWN = "withdrawn"
# A moderator's withdrawal, as the note names it: no clinical words, it sits beside the record.
MODERATOR_NOTE = "Withdrawn in Matrix by a moderator"

_EVENT_ID = re.compile(r"\$[A-Za-z0-9_\-+/=.:]{1,254}")

FILE_MSGTYPES = frozenset({"m.image", "m.file", "m.audio", "m.video"})
# FHIR's `code` and `unsignedInt` limits (what Attachment.contentType and .size accept).
FHIR_CODE = re.compile(r"[^\s]+( [^\s]+)*")
MAX_UNSIGNED_INT = 2**31 - 1
ENTERED_IN_ERROR = "entered-in-error"
BASE = CommunicationProfile.BASE


@attr.s(frozen=True, auto_attribs=True)
class RoomContext:
    """The FHIR side of a care-team room."""

    thread: str  # "CommunicationRequest/<id>"
    care_team: str | None  # "CareTeam/<id>"; None for an ordinary room (rooms: all)
    patient: str | None  # "Patient/<id>", when the CareTeam has a subject
    # The room's other teams, when its thread addresses several (recipients too).
    further_teams: tuple[str, ...] = ()


@attr.s(frozen=True, auto_attribs=True)
class CommunicationWrite:
    """One entry of the transaction Bundle the outbox sends."""

    method: str  # "POST" (conditional create) or "PUT" (conditional update)
    url: str  # "Communication" or "Communication?identifier=..."
    resource: dict[str, Any]
    if_none_exist: str | None = None

    def bundle_entry(self) -> dict[str, Any]:
        request: dict[str, Any] = {"method": self.method, "url": self.url}
        if self.if_none_exist:
            request["ifNoneExist"] = self.if_none_exist
        return {"resource": self.resource, "request": request}


@attr.s(frozen=True, auto_attribs=True)
class Redaction:
    """Who redacted a message, and when (recorded when it was not its sender)."""

    user_id: str  # the redacter's Matrix user id
    person: str | None  # their FHIR person ("Practitioner/<id>"), if they have one
    ts_ms: int  # when: the redaction's origin_server_ts

    def to_json(self) -> dict[str, Any]:
        return {"user_id": self.user_id, "person": self.person, "ts": self.ts_ms}

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Redaction:
        person = data.get("person")
        return cls(str(data["user_id"]), str(person) if person else None, int(data["ts"]))


class NotRecorded(Exception):
    """This event does not become a Communication (not a message, or policy says skip)."""


def identifier_search(event_id: str) -> str:
    return f"identifier={EVENT_ID_SYSTEM}|{event_id}"


def communication_reference(event_id: str) -> str:
    """A conditional reference to the Communication of ``event_id`` (resolved by FHIR)."""
    return f"Communication?{identifier_search(event_id)}"


def message_write(
    event: Mapping[str, Any],
    room: RoomContext,
    sender_person: str,
    *,
    encrypted_policy: str = "metadata_only",
    parent: str | None = None,
    profile: CommunicationProfile = BASE,
) -> CommunicationWrite:
    """The write for a new ``m.room.message``/``m.room.encrypted`` event (withdrawn, when
    it was redacted while waiting in the outbox: see ``WITHDRAWN``).

    ``sender_person`` is ``Practitioner/<id>`` (or RelatedPerson/Patient).
    ``parent``: for a reply, what its ``inResponseTo`` names, as the caller found the
    parent in the room's thread: ``Communication/<id>`` (recorded, or the resource a
    message posted from FHIR came from), ``communication_reference(<event id>)`` (written
    in the same transaction), or ``CommunicationRequest/<id>`` (a thread's first message:
    ``partOf`` says it all). None: the reply is written without ``inResponseTo`` — a
    reference FHIR cannot resolve would refuse the message for good, and one to another
    room's record would tie the message to another patient's thread. ``profile``: the form
    written (see ``in_profile``). Raises NotRecorded for events that are not recorded.
    """
    event_type = event.get("type")
    content = event.get("content") or {}
    if not isinstance(content, Mapping):
        raise NotRecorded("content is not an object")
    if event_type == "m.room.encrypted" and encrypted_policy != "metadata_only":
        raise NotRecorded(f"encrypted events: policy {encrypted_policy}")
    withdrawn = event.get(WITHDRAWN)
    if isinstance(withdrawn, Mapping) and event_type in ("m.room.message", "m.room.encrypted"):
        # Nothing of what it said is left to write, not even whom it replied to.
        moderator = Redaction.from_json(withdrawn) if withdrawn else None
        return redaction_write(event, room, sender_person, moderator=moderator, profile=profile)
    if event_type == "m.room.encrypted":
        resource = _communication(event, room, sender_person, payload=None)
        resource["meta"]["tag"].append(dict(ENCRYPTED_TAG))
        return _create(event, in_profile(resource, profile))
    if event_type != "m.room.message":
        raise NotRecorded(f"{event_type} is not a message")

    relates_to = content.get("m.relates_to")
    if isinstance(relates_to, Mapping) and relates_to.get("rel_type") == "m.replace":
        # An edit changes its original's Communication (recording.amendments).
        raise NotRecorded("an edit is not a message of its own")

    resource = _communication(event, room, sender_person, payload=_payload(content))
    if parent is not None and reply_target(content) is not None:
        if parent.startswith("Communication?"):
            resource["inResponseTo"] = [{"reference": parent}]
        elif parent.startswith("Communication/"):
            resource["inResponseTo"] = [{"reference": parent, "type": "Communication"}]
        # (A reply to a thread's first message: the request is already its partOf.)
    return _create(event, in_profile(resource, profile))


def redaction_write(
    original: Mapping[str, Any],
    room: RoomContext,
    sender_person: str,
    *,
    moderator: Redaction | None = None,
    profile: CommunicationProfile = BASE,
) -> CommunicationWrite:
    """A message redacted before FHIR had it: its Communication withdrawn (entered-in-error,
    without payload — under the OZO profile, the placeholder), created or, if an earlier
    attempt did reach FHIR, updated."""
    resource = _communication(original, room, sender_person, payload=None)
    if original.get("type") == "m.room.encrypted":
        resource["meta"]["tag"].append(dict(ENCRYPTED_TAG))
    resource["status"] = ENTERED_IN_ERROR
    if moderator is not None:
        resource["note"] = [moderator_note(moderator)]
    return CommunicationWrite(
        method="PUT",
        url=communication_reference(str(original["event_id"])),
        resource=in_profile(resource, profile),
    )


def in_profile(resource: dict[str, Any], profile: CommunicationProfile) -> dict[str, Any]:
    """A Communication the module writes, in the form ``profile`` asks (changed in place).

    Under ``ozo`` it declares OZOCommunication. Whatever declares it — also a record
    written so before the profile was switched off — keeps the payload OZO requires: a
    withdrawn one the withdrawal placeholder instead of what was said, an encrypted one the
    encryption placeholder. Under ``base`` a record that does not declare it is left alone.
    """
    if profile is CommunicationProfile.OZO:
        declare(resource, OZO_COMMUNICATION)
    if not declares(resource, OZO_COMMUNICATION):
        return resource
    if resource.get("status") == ENTERED_IN_ERROR:
        resource["payload"] = [{"contentString": WITHDRAWN_PLACEHOLDER}]
    elif not resource.get("payload") and has_tag(resource, ENCRYPTED_TAG):
        resource["payload"] = [{"contentString": ENCRYPTED_PLACEHOLDER}]
    return resource


def thread_request(
    room_id: str,
    care_team: str | None,
    patient: str | None,
    *,
    requester: str | None = None,
    profile: CommunicationProfile = BASE,
) -> dict[str, Any]:
    """The CommunicationRequest the module opens as a room's thread (keyed by the room id).

    Under ``ozo`` it declares OZOCommunicationRequest and names ``requester`` (a person
    reference); whether it then meets the profile (a patient, a requester, a team) is
    ``mapping.profile.request_problems``' to say.
    """
    request: dict[str, Any] = {
        "resourceType": "CommunicationRequest",
        "meta": {"tag": [dict(ORIGIN_TAG)]},
        "identifier": [{"system": ROOM_ID_SYSTEM, "value": room_id}],
        "status": "active",
    }
    if care_team:
        request["recipient"] = [{"reference": care_team, "type": "CareTeam"}]
    if patient:
        request["subject"] = {"reference": patient, "type": "Patient"}
    if profile is CommunicationProfile.OZO:
        declare(request, OZO_COMMUNICATION_REQUEST)
        if requester:
            request["requester"] = _reference(requester)
    return request


def unadoptable(
    request: Mapping[str, Any], care_teams: Sequence[str], patient: str | None
) -> str | None:
    """Why ``request`` — a CommunicationRequest FHIR holds under a room's id — must not be
    taken as that room's thread, or None when it is one the module opens for it: its origin
    tag, addressed to the room's first team and to none but the room's teams (recipients
    and OZO's sender team), about the team's patient (about nobody when the team names
    none).

    Whoever writes FHIR can create a request under any room's id: taken as it is, it would
    make the room's messages part of a thread about another patient or for another team.
    The reason names rules, never values."""
    if not has_tag(request, ORIGIN_TAG):
        return "it does not carry this module's origin tag"
    # (A recipient that is no relative reference counts as None: never one of the teams.)
    addressees = {reference_of(r) for r in _list(request.get("recipient"))}
    if care_teams and care_teams[0] not in addressees:
        return "it is not addressed to the room's care team"
    if not addressees | set(request_teams(request)) <= set(care_teams):
        return "it is addressed to someone other than the room's care teams"
    subject = request.get("subject")
    named = reference_of(subject)
    if (subject is not None and named is None) or named != patient:
        return "its subject is not the care team's patient"
    return None


def has_tag(resource: Mapping[str, Any], tag: Mapping[str, str]) -> bool:
    """Whether ``resource`` carries ``tag`` (system and code) in ``meta.tag``."""
    meta = resource.get("meta")
    tags = meta.get("tag") if isinstance(meta, Mapping) else None
    return isinstance(tags, list) and any(
        isinstance(t, Mapping) and t.get("system") == tag["system"] and t.get("code") == tag["code"]
        for t in tags
    )


def moderator_note(redaction: Redaction) -> dict[str, Any]:
    """An R4 Annotation naming who withdrew the message: their FHIR person, or else their
    Matrix user id."""
    note: dict[str, Any] = {"text": MODERATOR_NOTE, "time": _sent(redaction.ts_ms)}
    if redaction.person:
        note["authorReference"] = _reference(redaction.person)
    else:
        note["authorString"] = redaction.user_id
    return note


def replaced_event(content: Mapping[str, Any]) -> str | None:
    """The event id an edit (``m.replace``) replaces; None when it is not an edit (or names
    no well-formed event id: the value goes into FHIR searches)."""
    relates_to = content.get("m.relates_to")
    if not isinstance(relates_to, Mapping) or relates_to.get("rel_type") != "m.replace":
        return None
    original = relates_to.get("event_id")
    return original if is_event_id(original) else None


def is_event_id(value: Any) -> bool:
    """Whether ``value`` is a Matrix event id: ``$`` and the characters event ids are made
    of — never a comma or a bar, which a FHIR token search reads as "or" and "system"."""
    return isinstance(value, str) and _EVENT_ID.fullmatch(value) is not None


def edit_payload(content: Mapping[str, Any]) -> dict[str, Any]:
    """The payload an edit gives its original (from ``m.new_content``)."""
    new_content = content.get("m.new_content")
    if not isinstance(new_content, Mapping):
        raise NotRecorded("an edit without new content")
    return _payload(new_content)


def _create(event: Mapping[str, Any], resource: dict[str, Any]) -> CommunicationWrite:
    return CommunicationWrite(
        method="POST",
        url="Communication",
        resource=resource,
        if_none_exist=identifier_search(str(event["event_id"])),
    )


def _communication(
    event: Mapping[str, Any],
    room: RoomContext,
    sender_person: str,
    *,
    payload: dict[str, Any] | None,
) -> dict[str, Any]:
    resource: dict[str, Any] = {
        "resourceType": "Communication",
        "meta": {"tag": [dict(ORIGIN_TAG)]},
        "identifier": [{"system": EVENT_ID_SYSTEM, "value": str(event["event_id"])}],
        "status": "completed",
        "partOf": [_reference(room.thread)],
        "sent": _sent(event.get("origin_server_ts")),
        "sender": _reference(sender_person),
    }
    if room.care_team:
        resource["recipient"] = [_reference(t) for t in (room.care_team, *room.further_teams)]
    if room.patient:
        resource["subject"] = _reference(room.patient)
    if payload is not None:
        resource["payload"] = [payload]
    return resource


def _payload(content: Mapping[str, Any]) -> dict[str, Any]:
    msgtype = content.get("msgtype")
    body = content.get("body")
    if msgtype in FILE_MSGTYPES:
        url = content.get("url")
        if not isinstance(url, str) or not url.startswith("mxc://") or _has_space(url):
            # Encrypted attachments carry their URL in `file`; the module cannot read them.
            raise NotRecorded("an attachment without a plain mxc:// URL")
        raw_info = content.get("info")
        info: Mapping[str, Any] = raw_info if isinstance(raw_info, Mapping) else {}
        attachment: dict[str, Any] = {"url": url}
        # Clients fill `info` as they like; keep only what FHIR can hold, so one odd
        # field never costs the message its record.
        mimetype = info.get("mimetype")
        if isinstance(mimetype, str) and FHIR_CODE.fullmatch(mimetype):
            attachment["contentType"] = mimetype
        size = info.get("size")
        if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_UNSIGNED_INT:
            attachment["size"] = size
        title = content.get("filename") or body
        if isinstance(title, str) and title:
            attachment["title"] = title
        return {"contentAttachment": attachment}
    if not isinstance(body, str):
        raise NotRecorded("a message without a text body")
    # m.text, m.notice, m.emote — and unknown msgtypes, whose `body` is the readable
    # fallback every client must send.
    return {"contentString": body}


def _has_space(text: str) -> bool:
    return any(c.isspace() for c in text)


def reply_target(content: Mapping[str, Any]) -> str | None:
    """The event id a message replies to, if it is a reply."""
    return _reply_target(content.get("m.relates_to"))


def _reply_target(relates_to: Any) -> str | None:
    if not isinstance(relates_to, Mapping):
        return None
    in_reply_to = relates_to.get("m.in_reply_to")
    if isinstance(in_reply_to, Mapping) and is_event_id(in_reply_to.get("event_id")):
        return str(in_reply_to["event_id"])
    return None


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []


def _reference(ref: str) -> dict[str, str]:
    return {"reference": ref, "type": ref.split("/", 1)[0]}


def _sent(origin_server_ts: Any) -> str:
    if not isinstance(origin_server_ts, int):
        raise NotRecorded("an event without origin_server_ts")
    return format_fhir_instant(datetime.fromtimestamp(origin_server_ts / 1000, timezone.utc))
