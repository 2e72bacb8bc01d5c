"""How the sync names rooms and senders it posts for (pure helpers of fhir_sync)."""

from __future__ import annotations

from synapse_fhir_module.sync.fhir_to_matrix import _display_name, _request_name


def test_a_room_is_named_from_the_request_category_never_its_payload() -> None:
    assert _request_name({"category": [{"text": "Wound care"}], "payload": [{"x": 1}]}) == (
        "Wound care"
    )
    assert _request_name({"category": [{"coding": [{"display": "Medication"}]}]}) == "Medication"
    assert _request_name({"payload": [{"contentString": "Mr. Jansen's wound"}]}) == "Conversation"


def test_a_sender_is_shown_by_name_else_by_kind_never_by_a_matrix_id() -> None:
    assert _display_name({"name": [{"text": "Dr. A. de Vries"}]}) == "Dr. A. de Vries"
    assert _display_name({"name": [{"given": ["Anna"], "family": "Visser"}]}) == "Anna Visser"
    # A FHIR writer could name anyone's account: no name is shown as what they are.
    named_account = {
        "resourceType": "Practitioner",
        "identifier": [{"system": "https://matrix.org/user-id", "value": "@a:x.org"}],
    }
    assert _display_name(named_account) == "A practitioner"
    assert _display_name({"resourceType": "RelatedPerson"}) == "A related person"
    assert _display_name(None) == "Someone"
