"""FHIR payloads as Matrix messages: one per part, in order."""

from __future__ import annotations

import json
from typing import Any

from hypothesis import given
from hypothesis import strategies as st

from synapse_fhir_module.mapping.relay_content import (
    PER_MESSAGE_PROFILE,
    SHORTENED,
    SOURCE_KEY,
    TEXT_BYTES,
    is_mxc_uri,
    is_web_url,
    part_key,
    relay_messages,
    resource_of_key,
    source_of,
)


def contents(payload: Any, sender_name: str | None = None, **kw: Any) -> list[dict[str, Any]]:
    plan = relay_messages(payload, source="Communication/9", sender_name=sender_name, **kw)
    return [message.content for message in plan.messages]


def test_each_part_is_a_message_in_the_payloads_order_naming_its_source() -> None:
    payload = [
        {"contentString": "Please check the wound"},
        {"contentAttachment": {"title": "photo.jpg", "url": "https://files.example/1"}},
        {
            "contentAttachment": {
                "title": "wound.png",
                "url": "mxc://example.org/AbC_12-x",
                "contentType": "image/png",
                "size": 2048,
            }
        },
        {"contentAttachment": {"url": "mxc://example.org/report", "contentType": "text/pdf"}},
        {"contentString": "Thanks"},
    ]
    plan = relay_messages(payload, source="Communication/9", sender_name=None)
    assert plan.skipped == 0
    assert [m.key for m in plan.messages] == [
        "Communication/9",  # the first: what a reply to the resource links to
        "Communication/9#payload/1",
        "Communication/9#payload/2",
        "Communication/9#payload/3",
        "Communication/9#payload/4",
    ]
    assert [m.content for m in plan.messages] == [
        {"msgtype": "m.text", "body": "Please check the wound", SOURCE_KEY: "Communication/9"},
        {
            "msgtype": "m.text",
            "body": "Attachment: photo.jpg https://files.example/1",
            SOURCE_KEY: "Communication/9#payload/1",
        },
        {
            "msgtype": "m.image",
            "body": "wound.png",
            "filename": "wound.png",
            "url": "mxc://example.org/AbC_12-x",
            "info": {"mimetype": "image/png", "size": 2048},
            SOURCE_KEY: "Communication/9#payload/2",
        },
        {
            "msgtype": "m.file",
            "body": "attachment",
            "filename": "attachment",
            "url": "mxc://example.org/report",
            "info": {"mimetype": "text/pdf"},
            SOURCE_KEY: "Communication/9#payload/3",
        },
        {"msgtype": "m.text", "body": "Thanks", SOURCE_KEY: "Communication/9#payload/4"},
    ]
    assert source_of(plan.messages[2].content) == "Communication/9#payload/2"
    assert {resource_of_key(m.key) for m in plan.messages} == {"Communication/9"}


def test_attachments_matrix_cannot_show_are_counted_not_posted() -> None:
    payload = [
        {"contentAttachment": {"title": "x", "url": "ftp://files.example/1"}},
        {"contentAttachment": {"title": "inline", "data": "aGVsbG8=", "contentType": "text/plain"}},
        {"contentAttachment": {"url": "javascript:alert(1)"}},
        {"contentAttachment": {"url": "mxc://example.org/../etc"}},
        {"contentAttachment": {"url": "https://files.example/a b"}},
        {"contentReference": {"reference": "DocumentReference/1"}},
        {"contentString": "   "},
        {"contentString": "kept"},
        "not an object",
    ]
    plan = relay_messages(payload, source="CommunicationRequest/7", sender_name=None)
    assert plan.skipped == 8
    assert [m.content["body"] for m in plan.messages] == ["kept"]
    assert plan.messages[0].key == "CommunicationRequest/7"  # the first posted part


def test_the_fhir_sender_is_named_in_the_body_and_in_a_per_message_profile() -> None:
    [text, file] = contents(
        [
            {"contentString": "ok <b>\nthen"},
            {"contentAttachment": {"title": "scan.pdf", "url": "mxc://example.org/s"}},
        ],
        sender_name="Dr. Jansen & co",
        sender_ref="Practitioner/7",
    )
    assert text["body"] == "Dr. Jansen & co: ok <b>\nthen"
    assert text["formatted_body"] == "<strong>Dr. Jansen &amp; co</strong>: ok &lt;b&gt;<br>then"
    assert text["format"] == "org.matrix.custom.html"
    profile = {
        "id": "Practitioner/7",
        "displayname": "Dr. Jansen & co (care record)",  # never passes for a Matrix user
    }
    assert text[PER_MESSAGE_PROFILE] == profile
    # A file's caption names the sender; its name stays the file's.
    assert file["body"] == "Dr. Jansen & co: scan.pdf"
    assert file["filename"] == "scan.pdf"
    assert file[PER_MESSAGE_PROFILE] == profile


def test_profile_fields_are_cut_to_what_msc4144_allows() -> None:
    name = "Ä" * 200 + "\x00"  # 400 bytes of UTF-8
    [content] = contents([{"contentString": "x"}], sender_name=name)
    displayname = content[PER_MESSAGE_PROFILE]["displayname"]
    assert len(displayname.encode("utf-8")) <= 255 and "\x00" not in displayname
    assert displayname == "Ä" * 120 + " (care record)"


def test_nothing_to_show() -> None:
    assert relay_messages(None, source="C/1", sender_name=None).messages == ()
    assert relay_messages({"contentString": "x"}, source="C/1", sender_name=None).messages == ()
    assert source_of({"body": "x"}) is None


def test_part_keys_round_trip() -> None:
    assert part_key("Communication/1", 0) == "Communication/1"
    assert resource_of_key(part_key("Communication/1", 3)) == "Communication/1"


def test_urls() -> None:
    assert is_mxc_uri("mxc://matrix.example.org:8448/abcDEF_-1")
    for bad in ("mxc://example.org/", "mxc://example.org/a/b", "mxc://ex ample/a", None, 3):
        assert not is_mxc_uri(bad)
    assert is_web_url("http://x.example/a?b=c") and is_web_url("HTTPS://x.example")
    for bad in ("https://", "file:///etc/passwd", "data:text/plain,hi", "//x.example/a", None):
        assert not is_web_url(bad)


_PART = st.one_of(
    st.fixed_dictionaries({"contentString": st.one_of(st.text(), st.integers(), st.none())}),
    st.fixed_dictionaries(
        {
            "contentAttachment": st.one_of(
                st.none(),
                st.text(),
                st.fixed_dictionaries(
                    {},
                    optional={
                        "url": st.one_of(
                            st.text(),
                            st.from_regex(
                                r"mxc://[a-z.]{1,10}/[A-Za-z0-9_-]{1,10}", fullmatch=True
                            ),
                            st.from_regex(r"https?://[a-z.]{1,10}/[a-z]{0,5}", fullmatch=True),
                        ),
                        "title": st.one_of(st.text(), st.integers()),
                        "contentType": st.one_of(st.text(), st.none()),
                        "size": st.one_of(st.integers(), st.booleans(), st.text()),
                    },
                ),
            )
        }
    ),
    st.text(),
    st.none(),
)


@given(st.one_of(st.lists(_PART, max_size=6), st.none(), st.text(), st.integers()))
def test_any_payload_yields_shown_parts_plus_skipped_and_valid_messages(payload: Any) -> None:
    plan = relay_messages(payload, source="Communication/1", sender_name="N", sender_ref="P/1")
    total = len(payload) if isinstance(payload, list) else 0
    assert len(plan.messages) + plan.skipped == total
    for index, message in enumerate(plan.messages):
        assert message.key == part_key("Communication/1", index)
        assert message.content[SOURCE_KEY] == message.key
        assert isinstance(message.content["body"], str) and message.content["body"]
        if message.content["msgtype"] != "m.text":
            assert is_mxc_uri(message.content["url"])


# Synapse refuses an event whose JSON exceeds 65,536 bytes; the content must leave room
# for the event's own fields (ids, hashes, signatures).
CONTENT_LIMIT = 60_000
# Worst cases for the HTML copy: every character escaped to six bytes, or a 4-byte one.
_HEAVY = st.text(
    alphabet=st.sampled_from(
        ['"', "'", "\\", "&", "<", "\n", "\x01", "\x1b", "\x7f", "\ud800", "é", "𝄞", "a"]
    ),
    min_size=1,
)


@given(
    text=st.builds(lambda part, n: part * n, _HEAVY, st.integers(1, 40_000)),
    name=st.builds(lambda part, n: part * n, _HEAVY, st.integers(1, 2_000)),
    url_length=st.integers(1, 20_000),
    content_type=st.one_of(
        st.none(), st.builds(lambda part, n: part * n, _HEAVY, st.integers(1, 20_000))
    ),
)
def test_a_relayed_message_always_fits_in_one_matrix_event(
    text: str, name: str, url_length: int, content_type: str | None
) -> None:
    """However long FHIR's text, file name, URL or sender's name, every message can be
    sent (one that cannot would be retried forever, and hold back the room's members)."""
    payload = [
        {"contentString": text},
        {"contentAttachment": {"title": name, "url": "https://x.example/" + "a" * url_length}},
        {"contentAttachment": {"title": name, "url": "https://x.example/" + name[:url_length]}},
        {
            "contentAttachment": {
                "title": name,
                "url": "mxc://example.org/" + "b" * url_length,
                "contentType": content_type,
            }
        },
    ]
    for sender in (None, name):
        for content in contents(payload, sender_name=sender, sender_ref="Practitioner/1"):
            encoded = json.dumps(content, ensure_ascii=False).encode("utf-8")  # (no surrogate)
            assert len(encoded) <= CONTENT_LIMIT, len(encoded)


def test_a_text_too_long_is_cut_and_says_so() -> None:
    (content,) = contents([{"contentString": "x" * 100_000}])
    assert content["body"].startswith("x" * 5_000)
    assert content["body"].endswith(SHORTENED)
    assert len(content["body"].encode("utf-8")) <= TEXT_BYTES


def test_a_url_python_cannot_split_a_name_of_nothing_visible_and_a_huge_size_are_safe() -> None:
    assert not is_web_url("http://[x")
    (text,) = contents([{"contentString": "hi"}], sender_name="\x01\u200b\u202e")
    assert text["body"] == "Someone: hi"  # (never passed off as the care network's own)
    (file,) = contents(
        [{"contentAttachment": {"url": "mxc://example.org/f", "size": 2**60, "title": "x"}}]
    )
    assert "size" not in file.get("info", {})
