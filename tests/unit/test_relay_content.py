"""FHIR payloads as Matrix messages."""

from __future__ import annotations

from synapse_fhir_module.relay_content import (
    PER_MESSAGE_PROFILE,
    SOURCE_KEY,
    relay_content,
    source_of,
)


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


def test_the_fhir_sender_is_named_in_the_body_and_in_a_per_message_profile() -> None:
    content = relay_content(
        [{"contentString": "ok <b>\nthen"}],
        source="C/1",
        sender_name="Dr. Jansen & co",
        sender_ref="Practitioner/7",
    )
    assert content is not None
    assert content["body"] == "Dr. Jansen & co: ok <b>\nthen"
    assert content["formatted_body"] == "<strong>Dr. Jansen &amp; co</strong>: ok &lt;b&gt;<br>then"
    assert content["format"] == "org.matrix.custom.html"
    assert content[PER_MESSAGE_PROFILE] == {
        "id": "Practitioner/7",
        "displayname": "Dr. Jansen & co (care record)",  # never passes for a Matrix user
    }


def test_profile_fields_are_cut_to_what_msc4144_allows() -> None:
    name = "Ä" * 200 + "\x00"  # 400 bytes of UTF-8
    content = relay_content([{"contentString": "x"}], source="C/1", sender_name=name)
    assert content is not None
    displayname = content[PER_MESSAGE_PROFILE]["displayname"]
    assert len(displayname.encode("utf-8")) <= 255 and "\x00" not in displayname
    assert displayname == "Ä" * 120 + " (care record)"


def test_nothing_to_show_is_none() -> None:
    assert relay_content(None, source="C/1", sender_name=None) is None
    assert relay_content([{"contentReference": {}}], source="C/1", sender_name=None) is None
    assert source_of({"body": "x"}) is None
