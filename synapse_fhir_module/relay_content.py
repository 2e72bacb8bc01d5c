"""A FHIR payload (of a CommunicationRequest or Communication) as Matrix message content,
as a pure function. The content names its FHIR source, so the recorder knows the event
came from FHIR and does not write it back."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

# Content key naming the FHIR resource a message was posted from.
SOURCE_KEY = "org.synapse_fhir.source"


def relay_content(payload: Any, *, source: str, sender_name: str | None) -> dict[str, Any] | None:
    """``m.text`` content for the payload, or None when it has nothing to show."""
    parts = (
        [_text_of(item) for item in payload if isinstance(item, Mapping)]
        if isinstance(payload, list)
        else []
    )
    text = "\n\n".join(part for part in parts if part)
    if not text:
        return None
    if sender_name:
        # Posted by the service user for someone without a local account: say who wrote it.
        text = f"{sender_name}: {text}"
    return {"msgtype": "m.text", "body": text, SOURCE_KEY: source}


def source_of(content: Mapping[str, Any]) -> str | None:
    """The FHIR resource a message claims to come from (to be checked, never trusted)."""
    source = content.get(SOURCE_KEY)
    return source if isinstance(source, str) else None


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
