"""The treq FHIR client against the real HAPI dev server."""

from __future__ import annotations

import pytest
import pytest_twisted
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.communication import Communication
from fhir.resources.R4B.patient import Patient
from fhir.resources.R4B.practitioner import Practitioner

from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirNotFoundError, FhirPermanentError

TAG_SYSTEM = "urn:synapse-fhir-module:test-run"


def tagged_patient(tag: str, n: int) -> dict:
    return {
        "resourceType": "Patient",
        "meta": {"tag": [{"system": TAG_SYSTEM, "code": tag}]},
        "active": True,
        "identifier": [{"system": f"{TAG_SYSTEM}/n", "value": f"{tag}-{n}"}],
    }


def batch_of_creates(resources: list[dict]) -> Bundle:
    return Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "batch",
            "entry": [
                {"resource": r, "request": {"method": "POST", "url": r["resourceType"]}}
                for r in resources
            ],
        }
    )


@pytest_twisted.ensureDeferred
async def test_search_follows_next_links_through_120_resources(
    fhir: FhirClient, run_tag: str
) -> None:
    response = await fhir.transaction(
        batch_of_creates([tagged_patient(run_tag, n) for n in range(120)])
    )
    assert [e.response.status[:3] for e in response.entry] == ["201"] * 120

    pages = [
        page
        async for page in fhir.search_pages(
            "Patient", {"_tag": f"{TAG_SYSTEM}|{run_tag}", "_count": "50"}
        )
    ]
    assert [len(page.entry or []) for page in pages] == [50, 50, 20]

    found = await fhir.search("Patient", {"_tag": f"{TAG_SYSTEM}|{run_tag}", "_count": "50"})
    created_ids = {e.response.location.split("/")[1] for e in response.entry}
    assert {p.id for p in found} == created_ids
    assert len(found) == 120


@pytest_twisted.ensureDeferred
async def test_conditional_create_twice_makes_one_resource(fhir: FhirClient, run_tag: str) -> None:
    condition = f"identifier={TAG_SYSTEM}/n|{run_tag}-once"
    first, created_first = await fhir.create_if_none_exist(
        Patient.model_validate(
            tagged_patient(run_tag, 0)
            | {"identifier": [{"system": f"{TAG_SYSTEM}/n", "value": f"{run_tag}-once"}]}
        ),
        condition,
    )
    second, created_second = await fhir.create_if_none_exist(
        Patient.model_validate(
            tagged_patient(run_tag, 0)
            | {"identifier": [{"system": f"{TAG_SYSTEM}/n", "value": f"{run_tag}-once"}]}
        ),
        condition,
    )
    assert (created_first, created_second) == (True, False)
    assert first.id == second.id
    matches = await fhir.search("Patient", {"identifier": f"{TAG_SYSTEM}/n|{run_tag}-once"})
    assert [p.id for p in matches] == [first.id]


@pytest_twisted.ensureDeferred
async def test_transaction_bundle_commits_entries_together(fhir: FhirClient, run_tag: str) -> None:
    bundle = Bundle.model_validate(
        {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "fullUrl": "urn:uuid:8c1f3a34-3c59-4d7a-9d35-1b0f7b5f0a01",
                    "resource": {"resourceType": "Practitioner", "active": True},
                    "request": {"method": "POST", "url": "Practitioner"},
                },
                {
                    "resource": {
                        "resourceType": "PractitionerRole",
                        "active": True,
                        "practitioner": {
                            "reference": "urn:uuid:8c1f3a34-3c59-4d7a-9d35-1b0f7b5f0a01"
                        },
                        "identifier": [{"system": TAG_SYSTEM, "value": run_tag}],
                    },
                    "request": {
                        "method": "POST",
                        "url": "PractitionerRole",
                        "ifNoneExist": f"identifier={TAG_SYSTEM}|{run_tag}",
                    },
                },
            ],
        }
    )
    response = await fhir.transaction(bundle)
    assert response.type == "transaction-response"
    practitioner_ref, role_ref = (e.response.location for e in response.entry)
    assert practitioner_ref.startswith("Practitioner/")
    role = await fhir.read("PractitionerRole", role_ref.split("/")[1])
    # The server rewrote the placeholder to the practitioner it created in the same transaction.
    assert role.practitioner.reference == "/".join(practitioner_ref.split("/")[:2])

    again = await fhir.transaction(bundle)
    # The conditional create found the role; only the unconditional Practitioner is new.
    assert again.entry[1].response.status.startswith("200")


@pytest_twisted.ensureDeferred
async def test_read_update_vread(fhir: FhirClient, run_tag: str) -> None:
    # Client-assigned id: the dev server lets us choose it.
    practitioner = Practitioner.model_validate(
        {"resourceType": "Practitioner", "id": f"p-{run_tag}", "active": True}
    )
    v1 = await fhir.update(practitioner)
    assert v1.id == f"p-{run_tag}" and v1.meta.versionId == "1"
    v2 = await fhir.update(Practitioner.model_validate(v1.model_dump() | {"active": False}))
    assert v2.meta.versionId == "2"
    assert (await fhir.read("Practitioner", v1.id)).active is False
    assert (await fhir.vread("Practitioner", v1.id, "1")).active is True


@pytest_twisted.ensureDeferred
async def test_missing_resource_is_a_permanent_not_found(fhir: FhirClient, run_tag: str) -> None:
    with pytest.raises(FhirNotFoundError) as caught:
        await fhir.read("CareTeam", f"missing-{run_tag}")
    assert isinstance(caught.value, FhirPermanentError)
    assert caught.value.status == 404
    assert caught.value.outcome  # HAPI's OperationOutcome text is carried along


@pytest_twisted.ensureDeferred
async def test_bad_request_carries_the_operation_outcome(fhir: FhirClient) -> None:
    with pytest.raises(FhirPermanentError) as caught:
        await fhir.search("Patient", {"no-such-parameter": "x"})
    assert caught.value.status == 400
    assert "no-such-parameter" in caught.value.outcome


@pytest_twisted.ensureDeferred
async def test_validate_reports_errors_only_for_an_invalid_resource(fhir: FhirClient) -> None:
    valid = Communication.model_validate({"resourceType": "Communication", "status": "completed"})
    outcome = await fhir.validate(valid)
    assert outcome.get_resource_type() == "OperationOutcome"
    assert [i for i in outcome.issue if i.severity in ("error", "fatal")] == []

    invalid = Communication.model_validate(
        {"resourceType": "Communication", "status": "not-a-status"}
    )
    outcome = await fhir.validate(invalid)
    assert [i for i in outcome.issue if i.severity in ("error", "fatal")]
