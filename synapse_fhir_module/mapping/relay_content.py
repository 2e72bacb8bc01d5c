"""A FHIR payload (of a CommunicationRequest or Communication) as Matrix messages, as a
pure function: one message per part, in the payload's order — a string as text, an
attachment with an ``mxc://`` URI as a file (image, audio, video by its content type), one
with an http(s) URL as a text naming it and its link. Attachments of any other kind
(inline data, other schemes) and references are not posted: the caller counts them. Each
message names its FHIR source, so the recorder knows the event came from FHIR and does
not write it back.

The service user posts every relayed message (never a person's own account: whoever can
write FHIR must not be able to make a Matrix user appear to say something). It says who
wrote it in FHIR twice: the name before the text, for every client, and a per-message
profile (MSC4144, unstable ``com.beeper.per_message_profile``) for clients that show one
in place of the service user's own name — marked as coming from the care record, so a
name in FHIR cannot pass for a Matrix user of that name.
"""

from __future__ import annotations

import html
import json
import re
import unicodedata
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

import attr

# Content key naming the FHIR resource (and part, ``part_key``) a message was posted from.
SOURCE_KEY = "org.synapse_fhir.source"
PER_MESSAGE_PROFILE = "com.beeper.per_message_profile"
# MSC4144: `id` and `displayname` at most 255 bytes of UTF-8, no null bytes.
PROFILE_FIELD_BYTES = 255
FROM_THE_RECORD = " (care record)"
# An attachment's content type → how Matrix shows the file.
FILE_MSGTYPES = {"image": "m.image", "audio": "m.audio", "video": "m.video"}
DEFAULT_FILE_NAME = "attachment"
# Synapse refuses an event over 64 KiB, and would refuse it on every retry: a text is cut
# to this many bytes of UTF-8 (in the event's JSON it appears twice, and a '"' takes 2
# bytes in the body and 6 in its HTML copy: 8 in all), a file name is cut, and a URL too
# long to cut is not posted.
TEXT_BYTES = 6_000
NAME_BYTES = 1_000
URL_BYTES = 4_000
SHORTENED = " … (shortened: the full text is in the care record)"
# Who wrote it, when FHIR's name for them holds nothing that can be shown.
SOMEONE = "Someone"
# The largest integer canonical JSON carries: Synapse refuses an event with a larger one.
MAX_JSON_INT = 2**53 - 1
# The most a message's content may take as JSON (Synapse adds the event's own fields).
CONTENT_BYTES = 60_000
TOO_LARGE = "A message from the care record too large to show here: see the record itself."
# Characters FHIR strings may not hold and JSON would write six bytes each for.
_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")
_MIMETYPE = re.compile(r"[A-Za-z0-9!#$&^_.+-]{1,64}/[A-Za-z0-9!#$&^_.+-]{1,64}")
# mxc://<server name>/<media id> (the media id's grammar from the spec).
_MXC = re.compile(r"mxc://[A-Za-z0-9.\-:\[\]]+/[A-Za-z0-9_\-]+")


@attr.s(frozen=True, auto_attribs=True)
class RelayMessage:
    key: str  # what the post is claimed under (``part_key``)
    content: dict[str, Any]


@attr.s(frozen=True, auto_attribs=True)
class RelayPlan:
    """The messages a payload becomes, in the payload's order, and how many of its parts
    show nothing in Matrix (an attachment without an http(s) or ``mxc://`` URL, a
    ``contentReference``, an empty string)."""

    messages: tuple[RelayMessage, ...]
    skipped: int


def part_key(source: str, index: int) -> str:
    """The claim of the ``index``-th message posted from ``source``: the source itself for
    the first (what a reply to the resource links to), ``<source>#payload/<i>`` after."""
    return source if index == 0 else f"{source}#payload/{index}"


def resource_of_key(key: str) -> str:
    """The FHIR resource a claim key belongs to."""
    return key.split("#", 1)[0]


def relay_messages(
    payload: Any,
    *,
    source: str,
    sender_name: str | None,
    sender_ref: str | None = None,
) -> RelayPlan:
    """One message per payload part that Matrix can show, in order.

    ``sender_name``: who wrote it, as FHIR names them (None: the care network itself, as
    for a thread's opening words); ``sender_ref``: their FHIR reference, the profile's id.
    """
    items = payload if isinstance(payload, list) else []
    contents = [_content_of(item) if isinstance(item, Mapping) else None for item in items]
    shown = [content for content in contents if content is not None]
    messages = tuple(
        RelayMessage(key, _attributed(content, key, sender_name, sender_ref))
        for key, content in ((part_key(source, i), c) for i, c in enumerate(shown))
    )
    return RelayPlan(messages, skipped=len(items) - len(shown))


def _attributed(
    content: dict[str, Any], key: str, sender_name: str | None, sender_ref: str | None
) -> dict[str, Any]:
    # (The claim key, so the recorder can check this very part was the module's post.)
    content = {**content, SOURCE_KEY: key}
    if not sender_name:
        return _fitting(content)
    sender_name = _profile_field(_visible(sender_name)).strip() or SOMEONE
    if content["msgtype"] == "m.text":
        text = content["body"]
        content["body"] = f"{sender_name}: {text}"
        content["format"] = "org.matrix.custom.html"
        content["formatted_body"] = f"<strong>{_html(sender_name)}</strong>: {_html(text)}"
    else:  # a file: its caption names the sender (the file name stays in `filename`)
        content["body"] = f"{sender_name}: {content['filename']}"
    content[PER_MESSAGE_PROFILE] = {
        "id": _profile_field(sender_ref or sender_name),
        "displayname": _profile_field(sender_name, suffix=FROM_THE_RECORD),
    }
    return _fitting(content)


def _fitting(content: dict[str, Any]) -> dict[str, Any]:
    """``content``, or a short notice in its place when its JSON would still be too large
    for one event (Synapse would refuse it on every retry)."""
    size = len(json.dumps(content, ensure_ascii=False).encode("utf-8"))
    if size <= CONTENT_BYTES:
        return content
    return {"msgtype": "m.notice", "body": TOO_LARGE, SOURCE_KEY: content[SOURCE_KEY]}


def _visible(text: str) -> str:
    """``text`` without control and format characters (zero-width, bidi overrides): what
    is left is what a reader sees."""
    return "".join(c for c in clean_text(text) if unicodedata.category(c) not in ("Cc", "Cf"))


def clean_text(text: str) -> str:
    """``text`` without what FHIR strings may not hold: control characters (but tab and
    line breaks) and lone surrogates, which no event could carry."""
    text = text.encode("utf-8", errors="replace").decode("utf-8")
    return _CONTROL.sub("", text)


def source_of(content: Mapping[str, Any]) -> str | None:
    """The FHIR resource a message claims to come from (to be checked, never trusted)."""
    source = content.get(SOURCE_KEY)
    return source if isinstance(source, str) else None


def _cut(text: str, limit: int) -> str:
    """``text`` if it fits in ``limit`` bytes of UTF-8; else its start, marked as cut."""
    encoded = text.encode("utf-8")
    if len(encoded) <= limit:
        return text
    room = limit - len(SHORTENED.encode("utf-8"))
    return encoded[:room].decode("utf-8", errors="ignore") + SHORTENED


def _html(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _profile_field(text: str, *, suffix: str = "") -> str:
    limit = PROFILE_FIELD_BYTES - len(suffix.encode("utf-8"))
    clean = text.replace("\x00", "")
    return clean.encode("utf-8")[:limit].decode("utf-8", errors="ignore") + suffix


def _content_of(item: Mapping[str, Any]) -> dict[str, Any] | None:
    text = item.get("contentString")
    if isinstance(text, str):
        text = clean_text(text)
        return {"msgtype": "m.text", "body": _cut(text, TEXT_BYTES)} if text.strip() else None
    attachment = item.get("contentAttachment")
    if not isinstance(attachment, Mapping):
        return None  # (a contentReference: nothing a member could open)
    url = attachment.get("url")
    if isinstance(url, str) and len(url) > URL_BYTES:
        return None  # (a cut URL leads nowhere: counted as not posted)
    title = attachment.get("title")
    title = clean_text(title).strip() if isinstance(title, str) else None
    title = _cut(title, NAME_BYTES) if title else None
    if is_mxc_uri(url):
        return _file(str(url), title, attachment)
    if is_web_url(url):
        described = " ".join(part for part in (title, str(url)) if part)
        return {"msgtype": "m.text", "body": f"Attachment: {described}"}
    return None  # inline data, another scheme: not posted (counted by the caller)


def _file(url: str, title: str | None, attachment: Mapping[str, Any]) -> dict[str, Any]:
    mimetype = attachment.get("contentType")
    mimetype = mimetype if isinstance(mimetype, str) and _MIMETYPE.fullmatch(mimetype) else None
    major = mimetype.split("/", 1)[0] if mimetype else ""
    info: dict[str, Any] = {}
    if mimetype:
        info["mimetype"] = mimetype
    size = attachment.get("size")
    if isinstance(size, int) and not isinstance(size, bool) and 0 <= size <= MAX_JSON_INT:
        info["size"] = size
    name = title or DEFAULT_FILE_NAME
    content: dict[str, Any] = {
        "msgtype": FILE_MSGTYPES.get(major, "m.file"),
        "body": name,
        "filename": name,
        "url": url,
    }
    if info:
        content["info"] = info
    return content


def is_mxc_uri(value: Any) -> bool:
    return isinstance(value, str) and _MXC.fullmatch(value) is not None


def is_web_url(value: Any) -> bool:
    # (Printable ASCII only: what a link can be, and nothing an event could not carry.)
    if not isinstance(value, str) or not (value.isascii() and value.isprintable()):
        return False
    if any(c.isspace() for c in value):
        return False
    try:
        parsed = urlsplit(value)
    except ValueError:  # (e.g. an unclosed "[" where a host should be)
        return False
    return parsed.scheme in ("http", "https") and bool(parsed.netloc)
