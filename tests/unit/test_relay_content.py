"""FHIR payloads as Matrix messages."""

from __future__ import annotations

from synapse_fhir_module.relay_content import SOURCE_KEY, relay_content, source_of


def test_text_and_attachments_become_one_message_naming_the_source() -> None:
    payload = [
        {"contentString": "Please check the wound"},
        {"contentAttachment": {"title": "photo.jpg", "url": "https://files.example/1"}},
    ]
    content = relay_content(payload, source="Communication/9", sender_name=None)
    assert content == {
        "msgtype": "m.text",
        "body": "Please check the wound\n\nAttachment: photo.jpg https://files.example/1",
        SOURCE_KEY: "Communication/9",
    }
    assert source_of(content) == "Communication/9"


def test_a_sender_without_an_account_is_named_in_the_body() -> None:
    content = relay_content([{"contentString": "ok"}], source="C/1", sender_name="Dr. Jansen")
    assert content is not None
    assert content["body"] == "Dr. Jansen: ok"


def test_nothing_to_show_is_none() -> None:
    assert relay_content(None, source="C/1", sender_name=None) is None
    assert relay_content([{"contentReference": {}}], source="C/1", sender_name=None) is None
    assert source_of({"body": "x"}) is None
