"""How the module says no (design.md: endpoints): HTTP 403, ``M_FORBIDDEN``, a reason code in
``org.synapse_fhir.reason`` and a sentence a clinician understands. No patient data."""

from __future__ import annotations

from enum import Enum

from synapse.module_api.errors import Codes, SynapseError

REASON_FIELD = "org.synapse_fhir.reason"


class Reason(str, Enum):
    NOT_IN_CARE_TEAM = "not_in_care_team"
    INVITER_NOT_IN_CARE_TEAM = "inviter_not_in_care_team"
    CARE_TEAM_INACTIVE = "care_team_inactive"
    DIRECTORY_UNAVAILABLE = "directory_unavailable"
    ACCOUNT_INACTIVE = "account_inactive"
    ENCRYPTION_FORBIDDEN = "encryption_forbidden"
    PROTECTED_STATE = "protected_state"
    NO_FHIR_IDENTITY = "no_fhir_identity"
    THIRD_PARTY_INVITE_FORBIDDEN = "third_party_invite_forbidden"


_MESSAGES = {
    Reason.NOT_IN_CARE_TEAM: (
        "This room belongs to a care team, and this person is not a current member of it "
        "in the care record."
    ),
    Reason.INVITER_NOT_IN_CARE_TEAM: (
        "Only current members of this room's care team can invite people to it."
    ),
    Reason.CARE_TEAM_INACTIVE: (
        "This room's care team is not active in the care record, so nobody new can join it."
    ),
    Reason.DIRECTORY_UNAVAILABLE: (
        "The care record cannot be reached to check care-team membership; please try again "
        "in a few minutes."
    ),
    Reason.ACCOUNT_INACTIVE: "This account is marked inactive in the care record.",
    Reason.ENCRYPTION_FORBIDDEN: (
        "Care-team rooms are recorded in the care record and cannot be end-to-end encrypted "
        "on this server."
    ),
    Reason.PROTECTED_STATE: (
        "This setting links the room to the care record and can only be changed by the "
        "care network service."
    ),
    Reason.THIRD_PARTY_INVITE_FORBIDDEN: (
        "People join care-team rooms through the care record; invitations by email or phone "
        "number are not possible here."
    ),
    Reason.NO_FHIR_IDENTITY: (
        "Accounts on this server are for people in the care record; no active person in it "
        "matches this username or email address."
    ),
}


class Denied(SynapseError):
    """Raised from a callback; Synapse hands it to the client as is."""

    def __init__(self, reason: Reason) -> None:
        super().__init__(
            403,
            _MESSAGES[reason],
            Codes.FORBIDDEN,
            additional_fields={REASON_FIELD: reason.value},
        )
        self.reason = reason
