"""A FHIR payload (of a CommunicationRequest or Communication) as Matrix message content,
as a pure function. The content names its FHIR source, so the recorder knows the event
came from FHIR and does not write it back.

The service user posts every relayed message (never a person's own account: whoever can
write FHIR must not be able to make a Matrix user appear to say something). It says who
wrote it in FHIR twice: the name before the text, for every client, and a per-message
profile (MSC4144, unstable ``com.beeper.per_message_profile``) for clients that show one
in place of the service user's own name — marked as coming from the care record, so a
name in FHIR cannot pass for a Matrix user of that name.
"""

from __future__ import annotations

import html
from collections.abc import Mapping
from typing import Any

# Content key naming the FHIR resource a message was posted from.
SOURCE_KEY = "org.synapse_fhir.source"
PER_MESSAGE_PROFILE = "com.beeper.per_message_profile"
# MSC4144: `id` and `displayname` at most 255 bytes of UTF-8, no null bytes.
PROFILE_FIELD_BYTES = 255
FROM_THE_RECORD = " (care record)"


def relay_content(
    payload: Any,
    *,
    source: str,
    sender_name: str | None,
    sender_ref: str | None = None,
) -> dict[str, Any] | None:
    """``m.text`` content for the payload, or None when it has nothing to show.

    ``sender_name``: who wrote it, as FHIR names them (None: the care network itself, as
    for a thread's opening words); ``sender_ref``: their FHIR reference, the profile's id.
    """
    parts = (
        [_text_of(item) for item in payload if isinstance(item, Mapping)]
        if isinstance(payload, list)
        else []
    )
    text = "\n\n".join(part for part in parts if part)
    if not text:
        return None
    if not sender_name:
        return {"msgtype": "m.text", "body": text, SOURCE_KEY: source}
    return {
        "msgtype": "m.text",
        "body": f"{sender_name}: {text}",
        "format": "org.matrix.custom.html",
        "formatted_body": f"<strong>{_html(sender_name)}</strong>: {_html(text)}",
        PER_MESSAGE_PROFILE: {
            "id": _profile_field(sender_ref or sender_name),
            "displayname": _profile_field(sender_name, suffix=FROM_THE_RECORD),
        },
        SOURCE_KEY: source,
    }


def source_of(content: Mapping[str, Any]) -> str | None:
    """The FHIR resource a message claims to come from (to be checked, never trusted)."""
    source = content.get(SOURCE_KEY)
    return source if isinstance(source, str) else None


def _html(text: str) -> str:
    return html.escape(text).replace("\n", "<br>")


def _profile_field(text: str, *, suffix: str = "") -> str:
    limit = PROFILE_FIELD_BYTES - len(suffix.encode("utf-8"))
    clean = text.replace("\x00", "")
    return clean.encode("utf-8")[:limit].decode("utf-8", errors="ignore") + suffix


def _text_of(item: Mapping[str, Any]) -> str | None:
    if isinstance(item.get("contentString"), str):
        return str(item["contentString"])
    attachment = item.get("contentAttachment")
    if isinstance(attachment, Mapping):
        title = attachment.get("title")
        url = attachment.get("url")
        described = " ".join(str(v) for v in (title, url) if isinstance(v, str) and v)
        return f"Attachment: {described}" if described else None
    return None
