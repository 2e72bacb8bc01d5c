"""Which FHIR answers are worth retrying, and what the error tells the operator."""

from __future__ import annotations

import pytest

from synapse_fhir_module.fhir.errors import (
    FhirNotFoundError,
    FhirPermanentError,
    FhirTransientError,
    error_for_status,
    outcome_text,
)

OUTCOME = {
    "resourceType": "OperationOutcome",
    "issue": [
        {"severity": "error", "code": "processing", "diagnostics": "Unknown search parameter"},
        {"severity": "warning", "code": "informational", "details": {"text": "Deprecated"}},
    ],
}


@pytest.mark.parametrize("status", [408, 429, 500, 502, 503, 504])
def test_server_trouble_is_transient(status: int) -> None:
    assert isinstance(error_for_status(status, "GET x", None), FhirTransientError)


@pytest.mark.parametrize("status", [400, 401, 403, 409, 412, 422])
def test_refusals_are_permanent(status: int) -> None:
    error = error_for_status(status, "POST Communication", OUTCOME)
    assert isinstance(error, FhirPermanentError)
    assert not isinstance(error, FhirNotFoundError)
    assert error.status == status


@pytest.mark.parametrize("status", [404, 410])
def test_missing_or_deleted_is_not_found(status: int) -> None:
    assert isinstance(error_for_status(status, "GET CareTeam/1", None), FhirNotFoundError)


def test_operation_outcome_text_is_carried_apart_from_the_message() -> None:
    error = error_for_status(400, "GET Patient", OUTCOME)
    assert error.outcome == "error: Unknown search parameter; warning: Deprecated"
    assert error.detail == (
        "GET Patient failed with HTTP 400: error: Unknown search parameter; warning: Deprecated"
    )
    # What ends up in logs: FHIR's diagnostics can quote what the request carried.
    assert str(error) == "GET Patient failed with HTTP 400"


@pytest.mark.parametrize("body", [None, "text", {"resourceType": "Patient"}, {"issue": "x"}])
def test_anything_but_an_operation_outcome_gives_no_text(body: object) -> None:
    assert outcome_text(body) == ""
