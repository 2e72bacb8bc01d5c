"""Edits and redactions of a recorded message, applied to its Communication (authorship).

- An edit (``m.replace``) changes the Communication only when the editor is the message's
  sender (the same FHIR person), and then only its payload: sender, sent, inResponseTo,
  partOf, subject, recipient, identifier and tags stay as recorded.
- A redaction withdraws it (``entered-in-error``, without payload) when its sender made
  it; with ``communication.redactions: moderators`` also when anyone else Synapse let
  redact it did, and then a note names them.
- Nothing brings a withdrawn Communication back.
- With ``communication.profile: ozo`` the new version declares OZOCommunication, and a
  withdrawn one keeps a fixed placeholder as its payload (``in_profile``). A withdrawal is
  never refused for the profile's sake: a record that cannot meet it (written so by another
  system or an older version) is withdrawn without the claim.

The decisions are pure functions of what is stored: the Communication, or the outbox row
of a message FHIR does not have yet. ``CommunicationAmender`` reads the Communication,
decides, and writes the new version only if FHIR still holds the version it read
(``If-Match``); when someone else wrote in between it reads and decides again, a few
times, before leaving it for a later attempt.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Collection, Mapping
from typing import Any

import attr

from synapse_fhir_module.config import CommunicationProfile, RedactionPolicy
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG, reference_of
from synapse_fhir_module.fhir.errors import FhirPermanentError
from synapse_fhir_module.mapping.communication import (
    ENCRYPTED_TAG,
    WITHDRAWN,
    Redaction,
    has_tag,
    in_profile,
    is_event_id,
    moderator_note,
)
from synapse_fhir_module.mapping.profile import (
    OZO_COMMUNICATION,
    communication_problems,
    declares,
    undeclare,
)
from synapse_fhir_module.recording.writer import invalid_communication

logger = logging.getLogger(__name__)

ENTERED_IN_ERROR = "entered-in-error"
# Someone else wrote between our read and our conditional write: HAPI answers 409, the
# FHIR spec 412.
CONFLICT_STATUSES = frozenset({409, 412})
MAX_ATTEMPTS = 5
# What FHIR sets on every write: not ours to send back.
SERVER_META = frozenset({"versionId", "lastUpdated", "source"})
ERASED = "details erased: the message was redacted"
_HTTP_STATUS = re.compile(r"HTTP (\d{3})\b")


@attr.s(frozen=True, auto_attribs=True)
class Unchanged:
    """The amendment leaves the record as it is; ``reason`` says why (never its content)."""

    reason: str


@attr.s(frozen=True, auto_attribs=True)
class Amended:
    location: str  # "Communication/<id>", now at a new version


# A decision on the stored Communication: its next version, or why there is none.
Decision = dict[str, Any] | Unchanged


class StillConflicting(Exception):
    """The Communication kept changing between our read and our write: try again later."""


def edited(
    stored: Mapping[str, Any],
    editor_person: str | None,
    payload: Mapping[str, Any],
    *,
    profile: CommunicationProfile = CommunicationProfile.BASE,
) -> Decision:
    """The stored Communication with an edit's payload, if the editor may change it."""
    if stored.get("status") == ENTERED_IN_ERROR:
        return Unchanged("the message was withdrawn; an edit does not bring it back")
    if has_tag(stored, ENCRYPTED_TAG):
        return Unchanged("recorded without payload on purpose (encrypted)")
    if not _same_person(editor_person, reference_of(stored.get("sender"))):
        return Unchanged("edited by someone other than its sender")
    resource = _next_version(stored)
    resource["payload"] = [dict(payload)]
    return in_profile(resource, profile)


def withdrawn(
    stored: Mapping[str, Any],
    redaction: Redaction,
    policy: RedactionPolicy,
    *,
    by_local_user: bool = True,
    profile: CommunicationProfile = CommunicationProfile.BASE,
) -> Decision:
    """The stored Communication withdrawn by a redaction, if the policy lets the redacter;
    a note names them when they are not its sender."""
    if stored.get("status") == ENTERED_IN_ERROR:
        return Unchanged("already withdrawn")
    by_sender = _same_person(redaction.person, reference_of(stored.get("sender")))
    if not redaction_counts(policy, by_sender=by_sender, by_local_user=by_local_user):
        return Unchanged("redacted by someone other than its sender (redactions: sender)")
    resource = _next_version(stored)
    resource.pop("payload", None)
    resource["status"] = ENTERED_IN_ERROR
    if not by_sender:
        resource["note"] = [*_mappings(stored.get("note")), moderator_note(redaction)]
    resource = in_profile(resource, profile)
    if declares(resource, OZO_COMMUNICATION) and communication_problems(resource):
        # A record that claims the profile without meeting it (another system's, an older
        # version's): the withdrawal must not be refused for that, nor a false claim
        # written, so the claim goes (the placeholder stays).
        undeclare(resource, OZO_COMMUNICATION)
    return resource


def redaction_counts(policy: RedactionPolicy, *, by_sender: bool, by_local_user: bool) -> bool:
    """Whether a redaction withdraws the message's record. Someone else's counts only with
    ``moderators``, and only from this server's users: Synapse checked their ``redact``
    power level when it accepted the redaction, which it does not for a redaction received
    over federation (room versions 3 and later apply those only when showing the room)."""
    return by_sender or (policy is RedactionPolicy.MODERATORS and by_local_user)


def same_author(
    user_id: str, person: str | None, other_user_id: str, other_person: str | None
) -> bool:
    """Two Matrix accounts write as one author: the same account, or the same FHIR person
    (for a message FHIR has not got, whose sender may have no person yet)."""
    return user_id == other_user_id or _same_person(person, other_person)


def erased_event(event: Mapping[str, Any], moderator: Redaction | None) -> dict[str, Any]:
    """An outbox row's event once its message is redacted: content gone (text, file, the
    reply it was), marked to be written withdrawn; ``moderator`` when not its sender."""
    return {**event, "content": {}, WITHDRAWN: moderator.to_json() if moderator else {}}


def erased_error(last_error: str | None) -> str | None:
    """A row's last error without what FHIR's words may have quoted from the message."""
    if last_error is None:
        return None
    status = _HTTP_STATUS.match(last_error)
    return f"HTTP {status.group(1)} ({ERASED})" if status else ERASED


def edited_event(
    event: Mapping[str, Any], edit_content: Mapping[str, Any]
) -> dict[str, Any] | Unchanged:
    """An outbox row's event with an edit applied (its author's, checked by the caller):
    what a retry of the dead letter writes."""
    if WITHDRAWN in event:
        return Unchanged("the message was withdrawn; an edit does not bring it back")
    new_content = edit_content.get("m.new_content")
    if not isinstance(new_content, Mapping):
        return Unchanged("an edit without new content")
    content = {key: value for key, value in new_content.items() if key != "m.relates_to"}
    original_content = event.get("content")
    if isinstance(original_content, Mapping) and "m.relates_to" in original_content:
        # Still the reply it was: new content does not repeat the relation.
        content["m.relates_to"] = original_content["m.relates_to"]
    return {**event, "content": content}


class CommunicationAmender:
    """Applies a decision to the Communication of a message, conditionally on its version."""

    def __init__(self, fhir: FhirClient, *, max_attempts: int = MAX_ATTEMPTS) -> None:
        self._fhir = fhir
        self._max_attempts = max_attempts

    async def amend(
        self, event_id: str, decide: Callable[[Mapping[str, Any]], Decision]
    ) -> Amended | Unchanged | None:
        """Apply ``decide`` to the Communication recorded for ``event_id``; None when FHIR
        has none.

        Raises StillConflicting after ``max_attempts`` lost races, FhirTransientError, and
        FhirPermanentError when FHIR refuses the new version."""
        location = None
        for attempt in range(1, self._max_attempts + 1):
            stored = await self.stored(event_id)
            if stored is None:
                return None
            location = f"Communication/{stored['id']}"
            decision = decide(stored)
            if isinstance(decision, Unchanged):
                return decision
            problem = invalid_communication(decision)
            if problem:
                raise FhirPermanentError(problem)
            version = _version_of(stored)
            if version is None:
                raise FhirPermanentError(f"{location} came without a version to update")
            try:
                await self._fhir.update_json(decision, if_match_version=version)
            except FhirPermanentError as e:
                if e.status not in CONFLICT_STATUSES:
                    raise
                logger.info(
                    "%s changed since version %s (attempt %d of %d); reading it again",
                    location,
                    version,
                    attempt,
                    self._max_attempts,
                )
                continue
            return Amended(location)
        raise StillConflicting(f"{location} kept changing while it was being updated")

    async def stored(self, event_id: str) -> dict[str, Any] | None:
        """The Communication this module recorded for ``event_id``, as FHIR holds it now
        (not another system's that happens to carry the identifier)."""
        if not is_event_id(event_id):
            return None
        found = await self._fhir.search_json(
            "Communication", {"identifier": f"{EVENT_ID_SYSTEM}|{event_id}"}
        )
        for resource in found:
            if (
                resource.get("resourceType") == "Communication"
                and resource.get("id")
                and has_tag(resource, ORIGIN_TAG)
                and _carries_event_id(resource, event_id)
            ):
                return resource
        return None


def _next_version(stored: Mapping[str, Any]) -> dict[str, Any]:
    """The stored Communication as the body of its next version: without what FHIR sets on
    a write, and without a narrative (it would still tell the old text)."""
    resource = {key: value for key, value in stored.items() if key != "text"}
    meta = stored.get("meta")
    if isinstance(meta, Mapping):
        resource["meta"] = {key: value for key, value in meta.items() if key not in SERVER_META}
    return resource


def _version_of(stored: Mapping[str, Any]) -> str | None:
    meta = stored.get("meta")
    version = meta.get("versionId") if isinstance(meta, Mapping) else None
    return str(version) if version else None


def _carries_event_id(resource: Mapping[str, Any], event_id: str) -> bool:
    return any(
        isinstance(identifier, Mapping)
        and identifier.get("system") == EVENT_ID_SYSTEM
        and identifier.get("value") == event_id
        for identifier in _mappings(resource.get("identifier"))
    )


def in_thread(stored: Mapping[str, Any], thread: str | None) -> bool:
    """Whether the stored Communication is part of ``thread`` (the room an edit or a
    redaction was sent in): a room's events never change another room's record."""
    return thread is not None and any(
        reference_of(part) == thread for part in _mappings(stored.get("partOf"))
    )


def in_threads(stored: Mapping[str, Any], threads: Collection[str]) -> bool:
    """Whether the stored Communication is part of one of ``threads``."""
    return any(in_thread(stored, thread) for thread in threads)


def _same_person(person: str | None, other: str | None) -> bool:
    return person is not None and person == other


def _mappings(value: Any) -> list[Mapping[str, Any]]:
    return [item for item in value if isinstance(item, Mapping)] if isinstance(value, list) else []
