"""One decision for the audit trail: who, about whom, where, what, when, and how it ended.

NEN 7513 asks who accessed which client's record, what they did, when, and whether it was
allowed. A decision carries references only: Matrix ids, room ids and FHIR references,
never a message's text, a name or an email address."""

from __future__ import annotations

import uuid
from enum import Enum

import attr


class DecisionKind(str, Enum):
    """What was decided (each kind becomes one kind of AuditEvent)."""

    # Someone was refused by a care-team rule (``reason``: the refusal's reason code;
    # ``detail``: what they tried: join, invite, send, state, create_room, federated).
    ACCESS_REFUSED = "access_refused"
    # A registration went through the FHIR identity gate (``outcome`` says which way).
    REGISTRATION = "registration"
    # The module changed a room's membership or power levels to match FHIR.
    MEMBER_INVITED = "member_invited"
    MEMBER_REMOVED = "member_removed"
    MEMBER_BANNED = "member_banned"
    POWER_LEVELS_SET = "power_levels_set"
    # A Communication written to FHIR by another system was posted into its room.
    MESSAGE_RELAYED = "message_relayed"


class Outcome(str, Enum):
    SUCCESS = "success"
    REFUSED = "refused"


@attr.s(frozen=True, auto_attribs=True, kw_only=True)
class Decision:
    kind: DecisionKind
    outcome: Outcome
    recorded_ms: int
    # The Matrix user the decision is about (who was refused, invited, removed...).
    user_id: str | None = None
    # Who acted: the user themselves (a refusal), an inviter, or the service user.
    actor_id: str | None = None
    room_id: str | None = None
    # The FHIR resources whose network this is ("CareTeam/12", "CommunicationRequest/7").
    care_team: str | None = None
    request: str | None = None
    # A refusal's reason code (design.md: endpoints), e.g. "not_in_care_team".
    reason: str | None = None
    # What was attempted or done, as a short code or reference (never content).
    detail: str | None = None
    # Names this decision everywhere: the journal row and its AuditEvent's identifier.
    audit_id: str = attr.Factory(lambda: uuid.uuid4().hex)
