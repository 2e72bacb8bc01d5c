"""Writing test and demo data into FHIR, synchronously (requests)."""

from __future__ import annotations

from typing import Any

import requests

FHIR_JSON = {"Content-Type": "application/fhir+json"}


class FhirSeeder:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url

    def put(self, resource: dict[str, Any]) -> dict[str, Any]:
        """Create or update a resource with a client-assigned id."""
        url = f"{self.base_url}/{resource['resourceType']}/{resource['id']}"
        response = requests.put(url, json=resource, headers=FHIR_JSON, timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def put_all(self, resources: list[dict[str, Any]], *, timeout: float = 120) -> None:
        """Create or update several resources in one transaction."""
        bundle = {
            "resourceType": "Bundle",
            "type": "transaction",
            "entry": [
                {
                    "resource": r,
                    "request": {"method": "PUT", "url": f"{r['resourceType']}/{r['id']}"},
                }
                for r in resources
            ],
        }
        response = requests.post(self.base_url, json=bundle, headers=FHIR_JSON, timeout=timeout)
        response.raise_for_status()

    def read(self, reference: str) -> dict[str, Any]:
        response = requests.get(f"{self.base_url}/{reference}", timeout=60)
        response.raise_for_status()
        return dict(response.json())

    def patch_active(self, reference: str, active: bool) -> None:
        resource = self.read(reference)
        resource["active"] = active
        self.put(resource)
