"""Errors from the FHIR server, split by what the caller should do about them.

Transient: try again later (connection refused, timeout, 408, 429, 5xx).
Permanent: trying again will give the same answer (any other 4xx); carries the
server's OperationOutcome text so an operator can see *why*.

The OperationOutcome's text is kept apart (``outcome``), never in ``str(error)``: FHIR's
diagnostics can quote what a request carried — a message's text, a searched email — and
error texts end up in logs. Only admin-only places (dead letters) show it.
"""

from __future__ import annotations

from typing import Any


class FhirError(Exception):
    """Any failed exchange with the FHIR server."""

    def __init__(self, message: str, *, status: int | None = None, outcome: str = "") -> None:
        super().__init__(message)
        self.status = status
        # Diagnostics from the server's OperationOutcome, as plain text (may quote content).
        self.outcome = outcome

    @property
    def detail(self) -> str:
        """The message with FHIR's own words, for admin-only places (never for logs)."""
        text = str(self)
        return f"{text}: {self.outcome}" if self.outcome else text


class FhirTransientError(FhirError):
    """The server could not be reached or asked us to come back later."""


class FhirPermanentError(FhirError):
    """The server understood the request and refused it."""


class FhirNotFoundError(FhirPermanentError):
    """404 (no such resource) or 410 (deleted)."""


TRANSIENT_STATUSES = frozenset({408, 429})


def error_for_status(status: int, what: str, body: Any) -> FhirError:
    """The exception for a non-2xx answer to ``what`` (e.g. ``GET CareTeam/12``)."""
    outcome = outcome_text(body)
    message = f"{what} failed with HTTP {status}"
    if status >= 500 or status in TRANSIENT_STATUSES:
        return FhirTransientError(message, status=status, outcome=outcome)
    if status in (404, 410):
        return FhirNotFoundError(message, status=status, outcome=outcome)
    return FhirPermanentError(message, status=status, outcome=outcome)


def outcome_text(body: Any) -> str:
    """The diagnostics of an OperationOutcome body, joined; '' for anything else."""
    if not isinstance(body, dict) or body.get("resourceType") != "OperationOutcome":
        return ""
    parts = []
    for issue in body.get("issue") or []:
        if not isinstance(issue, dict):
            continue
        text = issue.get("diagnostics") or (issue.get("details") or {}).get("text")
        if text:
            parts.append(f"{issue.get('severity', 'error')}: {text}")
    return "; ".join(parts)
