"""Test-only crash points, to prove that a crash there loses no message.

Inert unless the environment variable ``SYNAPSE_FHIR_MODULE_FAULTS`` names the point
(comma-separated) when Synapse starts; even then a point fires only for a message that
carries the matching key in its content (``org.synapse_fhir.test.fault``), so a test
chooses the very message. Firing ends the process at once, as a power cut would:
no clean shutdown, nothing flushed. Never set it in production.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterable, Mapping
from typing import Any

logger = logging.getLogger(__name__)

ENVIRONMENT = "SYNAPSE_FHIR_MODULE_FAULTS"
CONTENT_KEY = "org.synapse_fhir.test.fault"
# Synapse has stored the message; its on_new_event callback has not run.
IN_CALLBACK = "in_callback"
# FHIR has committed the batch holding the message; the recorder has not noted it.
AFTER_FHIR_COMMIT = "after_fhir_commit"
EXIT_CODE = 70

_ARMED = frozenset(
    point.strip() for point in os.environ.get(ENVIRONMENT, "").split(",") if point.strip()
)


def in_callback(content: Mapping[str, Any]) -> None:
    if _ARMED and IN_CALLBACK in _ARMED and content.get(CONTENT_KEY) == IN_CALLBACK:
        _crash(IN_CALLBACK)


def after_fhir_commit(events: Iterable[Mapping[str, Any]]) -> None:
    if not _ARMED or AFTER_FHIR_COMMIT not in _ARMED:
        return
    for event in events:
        content = event.get("content")
        if isinstance(content, Mapping) and content.get(CONTENT_KEY) == AFTER_FHIR_COMMIT:
            _crash(AFTER_FHIR_COMMIT)


def _crash(point: str) -> None:
    logger.critical("Test fault %s: ending the process now", point)
    os._exit(EXIT_CODE)
