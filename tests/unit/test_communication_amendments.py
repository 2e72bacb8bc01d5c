"""Authorship of edits and redactions: the pure decisions on a stored Communication (or an
outbox row), and the conditional-update loop against a stand-in FHIR client
(tests/integration/test_authorship.py runs the same against Synapse and HAPI)."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import pytest_twisted
from fhir.resources.R4B.communication import Communication

from synapse_fhir_module.config import CommunicationProfile, RedactionPolicy
from synapse_fhir_module.fhir.conventions import EVENT_ID_SYSTEM, ORIGIN_TAG
from synapse_fhir_module.fhir.errors import FhirPermanentError, error_for_status
from synapse_fhir_module.mapping.communication import (
    ENCRYPTED_TAG,
    MODERATOR_NOTE,
    WITHDRAWN,
    Redaction,
    RoomContext,
    message_write,
)
from synapse_fhir_module.mapping.profile import OZO_COMMUNICATION, WITHDRAWN_PLACEHOLDER
from synapse_fhir_module.recording.amendments import (
    ERASED,
    Amended,
    CommunicationAmender,
    StillConflicting,
    Unchanged,
    edited,
    edited_event,
    erased_error,
    erased_event,
    redaction_counts,
    same_author,
    withdrawn,
)

GP = "Practitioner/gp-1"
NURSE = "Practitioner/nurse-1"
ROOM = RoomContext(
    thread="CommunicationRequest/t-1", care_team="CareTeam/c-1", patient="Patient/p-1"
)
NEW_PAYLOAD = {"contentString": "BP 150/90"}
BY_GP = Redaction("@anna:example.org", GP, 1_779_000_060_000)
BY_NURSE = Redaction("@bram:example.org", NURSE, 1_779_000_060_000)
SENDER, MODERATORS = RedactionPolicy.SENDER, RedactionPolicy.MODERATORS
OZO = CommunicationProfile.OZO


def stored_reply(version: str = "1") -> dict[str, Any]:
    """A Communication as HAPI returns it: a reply by the GP, references resolved."""
    event = {
        "type": "m.room.message",
        "event_id": "$orig",
        "sender": "@anna:example.org",
        "origin_server_ts": 1_779_000_000_123,
        "content": {"msgtype": "m.text", "body": "BP 150/95"},
    }
    resource = message_write(event, ROOM, GP).resource
    resource["inResponseTo"] = [{"reference": "Communication/parent-1"}]
    resource["id"] = "c-1"
    resource["meta"] |= {"versionId": version, "lastUpdated": "2026-05-17T06:40:01.000+00:00"}
    resource["text"] = {"status": "generated", "div": "<div>BP 150/95</div>"}
    return resource


def kept_as_recorded(before: dict[str, Any], after: dict[str, Any]) -> None:
    for key in (
        "id",
        "identifier",
        "sender",
        "sent",
        "inResponseTo",
        "partOf",
        "subject",
        "recipient",
    ):
        assert after[key] == before[key], key
    assert after["meta"] == {"tag": [ORIGIN_TAG]}  # tags kept; what FHIR sets left to FHIR
    Communication.model_validate(after)


def test_an_edit_by_its_sender_changes_only_the_payload() -> None:
    before = stored_reply()
    after = edited(before, GP, NEW_PAYLOAD)
    assert isinstance(after, dict)
    assert after["payload"] == [NEW_PAYLOAD]
    assert after["status"] == "completed"
    assert "text" not in after  # the narrative would still tell the old text
    kept_as_recorded(before, after)
    assert before == stored_reply()  # (the stored copy is not changed)


@pytest.mark.parametrize("editor", [NURSE, None, "Practitioner/gp-1-other"])
def test_an_edit_by_anyone_else_changes_nothing(editor: str | None) -> None:
    assert edited(stored_reply(), editor, NEW_PAYLOAD) == Unchanged(
        "edited by someone other than its sender"
    )


def test_an_edit_never_revives_a_withdrawn_communication() -> None:
    gone = withdrawn(stored_reply(), BY_GP, SENDER)
    assert isinstance(gone, dict)
    decision = edited(gone, GP, NEW_PAYLOAD)
    assert isinstance(decision, Unchanged)
    assert "withdrawn" in decision.reason


def test_an_encrypted_record_gets_no_payload_from_an_edit() -> None:
    encrypted = stored_reply()
    encrypted["meta"]["tag"].append(dict(ENCRYPTED_TAG))
    assert isinstance(edited(encrypted, GP, NEW_PAYLOAD), Unchanged)


@pytest.mark.parametrize("policy", [SENDER, MODERATORS])
def test_its_senders_redaction_withdraws_it_without_a_note(policy: RedactionPolicy) -> None:
    before = stored_reply()
    after = withdrawn(before, BY_GP, policy)
    assert isinstance(after, dict)
    assert after["status"] == "entered-in-error"
    assert "payload" not in after and "text" not in after and "note" not in after
    assert "BP 150/95" not in str(after)
    kept_as_recorded(before, after)


def test_a_colleagues_redaction_changes_nothing_under_the_sender_policy() -> None:
    decision = withdrawn(stored_reply(), BY_NURSE, SENDER)
    assert isinstance(decision, Unchanged)


def test_a_moderators_redaction_withdraws_it_and_names_them_in_a_note() -> None:
    before = stored_reply()
    before["note"] = [{"text": "Seen by the practice nurse"}]  # another system's note stays
    after = withdrawn(before, BY_NURSE, MODERATORS)
    assert isinstance(after, dict)
    assert after["status"] == "entered-in-error" and "payload" not in after
    assert after["note"] == [
        {"text": "Seen by the practice nurse"},
        {
            "text": MODERATOR_NOTE,
            "time": "2026-05-17T06:41:00.000Z",
            "authorReference": {"reference": NURSE, "type": "Practitioner"},
        },
    ]
    kept_as_recorded(before, after)


def test_a_moderator_without_a_fhir_person_is_named_by_their_matrix_id() -> None:
    service = Redaction("@fhir:example.org", None, 1_779_000_060_000)
    after = withdrawn(stored_reply(), service, MODERATORS)
    assert isinstance(after, dict)
    assert after["note"][-1]["authorString"] == "@fhir:example.org"


def test_a_second_redaction_changes_nothing() -> None:
    gone = withdrawn(stored_reply(), BY_GP, SENDER)
    assert isinstance(gone, dict)
    assert withdrawn(gone, BY_NURSE, MODERATORS) == Unchanged("already withdrawn")


def test_which_redactions_count() -> None:
    assert redaction_counts(SENDER, by_sender=True, by_local_user=True)
    assert not redaction_counts(SENDER, by_sender=False, by_local_user=True)
    assert redaction_counts(MODERATORS, by_sender=False, by_local_user=True)
    # A redaction another server sends: Synapse did not check its sender's power level.
    assert not redaction_counts(MODERATORS, by_sender=False, by_local_user=False)
    assert redaction_counts(MODERATORS, by_sender=True, by_local_user=False)


def test_an_author_is_the_same_account_or_the_same_fhir_person() -> None:
    assert same_author("@anna:e.org", None, "@anna:e.org", None)  # no person yet
    assert same_author("@anna:e.org", GP, "@anna-phone:e.org", GP)  # one person, two accounts
    assert not same_author("@bram:e.org", NURSE, "@anna:e.org", GP)
    assert not same_author("@x:e.org", None, "@y:e.org", None)


# --- a message still in the outbox ---

OUTBOX_EVENT = {
    "event_id": "$orig",
    "room_id": "!r:example.org",
    "type": "m.room.message",
    "sender": "@anna:example.org",
    "origin_server_ts": 1_779_000_000_123,
    "content": {
        "msgtype": "m.text",
        "body": "> quoted\n\nwrong patient",
        "m.relates_to": {"m.in_reply_to": {"event_id": "$parent"}},
    },
    "redacts": None,
}


def test_a_redacted_row_keeps_nothing_of_what_the_message_said() -> None:
    by_sender = erased_event(OUTBOX_EVENT, None)
    assert by_sender == {**OUTBOX_EVENT, "content": {}, WITHDRAWN: {}}
    assert "wrong patient" not in str(by_sender) and "$parent" not in str(by_sender)
    by_moderator = erased_event(OUTBOX_EVENT, BY_NURSE)
    assert by_moderator[WITHDRAWN] == BY_NURSE.to_json()


@pytest.mark.parametrize(
    ("before", "after"),
    [
        (
            'HTTP 422: error: HAPI-1091: Invalid match URL "Communication?identifier=x|$secret"',
            f"HTTP 422 ({ERASED})",
        ),
        ("not valid FHIR: payload.0.contentAttachment.size: too big", ERASED),
        (None, None),
    ],
)
def test_a_redacted_rows_error_keeps_only_the_http_status(
    before: str | None, after: str | None
) -> None:
    assert erased_error(before) == after


def test_an_edit_goes_into_a_dead_letter_keeping_the_reply_it_was() -> None:
    edit = {
        "msgtype": "m.text",
        "body": "* right patient",
        "m.new_content": {"msgtype": "m.text", "body": "right patient"},
        "m.relates_to": {"rel_type": "m.replace", "event_id": "$orig"},
    }
    changed = edited_event(OUTBOX_EVENT, edit)
    assert changed == {
        **OUTBOX_EVENT,
        "content": {
            "msgtype": "m.text",
            "body": "right patient",
            "m.relates_to": {"m.in_reply_to": {"event_id": "$parent"}},
        },
    }
    assert isinstance(edited_event(erased_event(OUTBOX_EVENT, None), edit), Unchanged)
    assert isinstance(edited_event(OUTBOX_EVENT, {"body": "no new content"}), Unchanged)


# --- the conditional update, against a stand-in FHIR server ---


def rival_sets_language(resource: dict[str, Any]) -> dict[str, Any]:
    return dict(resource, language="nl")


class FhirStandIn:
    """Holds one Communication; ``rivals`` other writes (``rival``) land between a read and
    a write."""

    def __init__(
        self,
        resource: dict[str, Any] | None,
        *,
        rivals: int = 0,
        rival: Callable[[dict[str, Any]], dict[str, Any]] = rival_sets_language,
    ) -> None:
        self.resource = resource
        self.rivals = rivals
        self.rival = rival
        self.updates: list[tuple[str, dict[str, Any]]] = []  # (If-Match version, body)

    async def search_json(self, resource_type: str, params: dict[str, str]) -> list[dict]:
        assert (resource_type, params) == (
            "Communication",
            {"identifier": f"{EVENT_ID_SYSTEM}|$orig"},
        )
        return [copy.deepcopy(self.resource)] if self.resource else []

    async def update_json(self, resource: dict[str, Any], *, if_match_version: str) -> dict:
        assert self.resource is not None
        self.updates.append((if_match_version, resource))
        if self.rivals:
            self.rivals -= 1
            self._store(self.rival(self.resource))  # someone else's write
        if if_match_version != self.resource["meta"]["versionId"]:
            raise error_for_status(409, "update Communication/c-1", None)
        self._store(resource)
        return self.resource

    def _store(self, resource: dict[str, Any]) -> None:
        assert self.resource is not None
        version = str(int(self.resource["meta"]["versionId"]) + 1)
        self.resource = dict(resource, meta={**resource["meta"], "versionId": version})


def edit_by_gp(stored: Any) -> Any:
    return edited(stored, GP, NEW_PAYLOAD)


@pytest_twisted.ensureDeferred
async def test_the_update_is_conditional_on_the_version_read() -> None:
    fhir = FhirStandIn(stored_reply(version="7"))
    result = await CommunicationAmender(fhir).amend("$orig", edit_by_gp)  # type: ignore[arg-type]
    assert result == Amended("Communication/c-1")
    ((version, body),) = fhir.updates
    assert version == "7"
    assert body["payload"] == [NEW_PAYLOAD]


@pytest_twisted.ensureDeferred
async def test_a_conflict_is_read_again_and_decided_again() -> None:
    fhir = FhirStandIn(stored_reply(version="1"), rivals=2)
    result = await CommunicationAmender(fhir).amend("$orig", edit_by_gp)  # type: ignore[arg-type]
    assert result == Amended("Communication/c-1")
    # Versions 1 and 2 were overtaken; the third try wrote on top of the rivals' writes.
    assert [version for version, _ in fhir.updates] == ["1", "2", "3"]
    assert fhir.resource is not None
    assert fhir.resource["language"] == "nl"  # the rival's change is not lost
    assert fhir.resource["payload"] == [NEW_PAYLOAD]


@pytest_twisted.ensureDeferred
async def test_a_decision_made_again_sees_what_the_rival_wrote() -> None:
    def sender_withdraws(resource: dict[str, Any]) -> dict[str, Any]:
        gone = withdrawn(resource, BY_GP, SENDER)
        assert isinstance(gone, dict)
        return gone

    fhir = FhirStandIn(stored_reply(), rivals=1, rival=sender_withdraws)
    # The redaction won the race: the edit, decided again, does not bring the text back.
    result = await CommunicationAmender(fhir).amend("$orig", edit_by_gp)  # type: ignore[arg-type]
    assert isinstance(result, Unchanged)
    assert len(fhir.updates) == 1
    assert fhir.resource is not None
    assert fhir.resource["status"] == "entered-in-error" and "payload" not in fhir.resource


@pytest_twisted.ensureDeferred
async def test_conflicts_without_end_leave_the_row_for_later() -> None:
    fhir = FhirStandIn(stored_reply(), rivals=100)
    amender = CommunicationAmender(fhir, max_attempts=3)  # type: ignore[arg-type]
    with pytest.raises(StillConflicting):
        await amender.amend("$orig", edit_by_gp)
    assert len(fhir.updates) == 3


@pytest_twisted.ensureDeferred
async def test_no_communication_means_nothing_to_amend() -> None:
    fhir = FhirStandIn(None)
    assert await CommunicationAmender(fhir).amend("$orig", edit_by_gp) is None  # type: ignore[arg-type]


@pytest_twisted.ensureDeferred
async def test_an_unchanged_decision_writes_nothing() -> None:
    fhir = FhirStandIn(stored_reply())
    result = await CommunicationAmender(fhir).amend(  # type: ignore[arg-type]
        "$orig", lambda stored: edited(stored, NURSE, NEW_PAYLOAD)
    )
    assert isinstance(result, Unchanged)
    assert fhir.updates == []


@pytest_twisted.ensureDeferred
async def test_a_refusal_other_than_a_conflict_is_not_retried() -> None:
    class Refusing(FhirStandIn):
        async def update_json(self, resource: dict[str, Any], *, if_match_version: str) -> dict:
            self.updates.append((if_match_version, resource))
            raise error_for_status(422, "update Communication/c-1", None)

    fhir = Refusing(stored_reply())
    with pytest.raises(FhirPermanentError) as caught:
        await CommunicationAmender(fhir).amend("$orig", edit_by_gp)  # type: ignore[arg-type]
    assert caught.value.status == 422
    assert len(fhir.updates) == 1


@pytest_twisted.ensureDeferred
async def test_a_withdrawal_is_written_though_the_record_claims_a_profile_it_does_not_meet() -> (
    None
):
    """Once refused by the writer's profile check (a FhirPermanentError: a dead letter for
    good), now withdrawn without the claim."""
    claimed = stored_reply()
    claimed["meta"]["profile"] = [OZO_COMMUNICATION]
    claimed["sender"].pop("type")  # (as an older version wrote it)
    fhir = FhirStandIn(claimed)
    result = await CommunicationAmender(fhir).amend(  # type: ignore[arg-type]
        "$orig", lambda stored: withdrawn(stored, BY_GP, SENDER, profile=OZO)
    )
    assert result == Amended("Communication/c-1")
    ((_, body),) = fhir.updates
    assert body["status"] == "entered-in-error"
    assert body["payload"] == [{"contentString": WITHDRAWN_PLACEHOLDER}]
    assert "profile" not in body["meta"]


def test_an_event_id_is_never_a_search_expression() -> None:
    from synapse_fhir_module.mapping.communication import is_event_id, replaced_event

    assert is_event_id("$Abc-_+/=.:9")
    assert is_event_id("$1234:example.org")  # room versions 1 and 2
    for forged in ("$x,https://matrix.org/event-id|$victim", "$x|y", "x", "", None, "$a b"):
        assert not is_event_id(forged), forged
    edit = {"m.relates_to": {"rel_type": "m.replace", "event_id": "$a,$b"}}
    assert replaced_event(edit) is None


def test_an_amendment_applies_only_to_its_own_rooms_record() -> None:
    from synapse_fhir_module.recording.amendments import in_thread

    stored = {"partOf": [{"reference": "CommunicationRequest/7", "type": "CommunicationRequest"}]}
    assert in_thread(stored, "CommunicationRequest/7")
    assert not in_thread(stored, "CommunicationRequest/8")  # sent in another room
    assert not in_thread(stored, None)
