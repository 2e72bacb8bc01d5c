"""Test-only crash points, to prove that a crash there loses no message.

Inert unless the environment variable ``SYNAPSE_FHIR_MODULE_FAULTS`` arms a point when
Synapse starts, with a secret of the test's choosing: ``in_callback=<secret>`` and/or
``after_fhir_commit=<secret>`` (comma-separated). Even then a point fires only for a
message whose content carries that secret under ``org.synapse_fhir.test.fault``, so
nobody who does not know it can fire it, and the test chooses the very message. Firing
ends the process at once, as a power cut would: no clean shutdown, nothing flushed.
Armed points are logged at start-up (CRITICAL). Never set it in production.
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
# FHIR has just created the batch holding the message; the recorder has not noted it.
AFTER_FHIR_COMMIT = "after_fhir_commit"
EXIT_CODE = 70
MIN_SECRET_LENGTH = 16


def _armed(value: str) -> dict[str, str]:
    points = {}
    for item in value.split(","):
        point, _, secret = item.strip().partition("=")
        if point in (IN_CALLBACK, AFTER_FHIR_COMMIT) and len(secret) >= MIN_SECRET_LENGTH:
            points[point] = secret
    return points


_ARMED = _armed(os.environ.get(ENVIRONMENT, ""))


def warn_if_armed() -> None:
    if _ARMED:
        logger.critical(
            "Test crash points armed (%s): this Synapse ends itself on a chosen message."
            " Unset %s outside tests.",
            ", ".join(sorted(_ARMED)),
            ENVIRONMENT,
        )


def in_callback(content: Mapping[str, Any]) -> None:
    secret = _ARMED.get(IN_CALLBACK)
    if secret is not None and content.get(CONTENT_KEY) == secret:
        _crash(IN_CALLBACK)


def after_fhir_commit(events: Iterable[Mapping[str, Any]]) -> None:
    """``events``: those FHIR has just created (a replay that found them does not fire:
    the restarted process must not end itself again)."""
    secret = _ARMED.get(AFTER_FHIR_COMMIT)
    if secret is None:
        return
    for event in events:
        content = event.get("content")
        if isinstance(content, Mapping) and content.get(CONTENT_KEY) == secret:
            _crash(AFTER_FHIR_COMMIT)


def _crash(point: str) -> None:
    logger.critical("Test crash point %s: ending the process now", point)
    os._exit(EXIT_CODE)
