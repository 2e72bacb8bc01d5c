"""A small asynchronous FHIR R4 REST client on treq.

Resources go in and come out as ``fhir.resources.R4B`` models. Every treq
deferred is wrapped in ``make_deferred_yieldable`` so Synapse's log contexts
stay correct, and every request is bounded by a timeout covering the whole
exchange (connect, headers and body).
"""

from __future__ import annotations

import base64
import json
import logging
from collections.abc import AsyncIterator, Mapping, Sequence
from typing import Any, cast
from urllib.parse import urlencode, urlsplit

from fhir.resources.R4B import get_fhir_model_class
from fhir.resources.R4B.bundle import Bundle
from fhir.resources.R4B.resource import Resource
from pydantic import ValidationError

from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.fhir.errors import (
    FhirPermanentError,
    FhirTransientError,
    error_for_status,
)
from synapse_fhir_module.http_exchange import Unreachable, exchange, http_client

logger = logging.getLogger(__name__)

SearchParams = Mapping[str, str] | Sequence[tuple[str, str]]
_NO_CACHE = {"Cache-Control": "no-cache"}

FHIR_JSON = "application/fhir+json"


class FhirClient:
    """Talks to one FHIR server (``fhir.base_url``)."""

    def __init__(self, config: FhirConfig, *, pool_size: int = 10) -> None:
        self._base_url = config.base_url
        self._origin = _origin(config.base_url)
        self._timeout = config.timeout
        self._auth_header = _authorization(config)
        self._http = http_client(pool_size)

    @property
    def base_url(self) -> str:
        return self._base_url

    async def read(self, resource_type: str, resource_id: str) -> Resource:
        body = await self._call("GET", f"{resource_type}/{resource_id}")
        return parse_resource(body)

    async def vread(self, resource_type: str, resource_id: str, version_id: str) -> Resource:
        body = await self._call("GET", f"{resource_type}/{resource_id}/_history/{version_id}")
        return parse_resource(body)

    async def search_pages(
        self, resource_type: str, params: SearchParams = ()
    ) -> AsyncIterator[Bundle]:
        """Yield each page (a searchset Bundle), following the ``next`` links."""
        async for page in self.search_pages_json(resource_type, params):
            bundle = parse_resource(page)
            if not isinstance(bundle, Bundle):
                raise FhirPermanentError(f"search {resource_type} did not answer with a Bundle")
            yield bundle

    async def search(self, resource_type: str, params: SearchParams = ()) -> list[Resource]:
        """Every match over all pages (entries with ``search.mode = match``)."""
        found = []
        async for bundle in self.search_pages(resource_type, params):
            for entry in bundle.entry or []:
                mode = entry.search.mode if entry.search else "match"
                if entry.resource is not None and mode == "match":
                    found.append(entry.resource)
        return found

    async def search_pages_json(
        self, resource_type: str, params: SearchParams = ()
    ) -> AsyncIterator[dict[str, Any]]:
        """Like ``search_pages``, as plain JSON: for hot paths that only read a few fields."""
        query = urlencode(list(params.items()) if isinstance(params, Mapping) else list(params))
        url: str | None = self._url(f"{resource_type}?{query}" if query else resource_type)
        while url is not None:
            # HAPI reuses an identical search's results for a minute unless told not to;
            # access decisions must see writes made a moment ago.
            _, page = await self._exchange(
                "GET", url, f"search {resource_type}", extra_headers=_NO_CACHE
            )
            if not isinstance(page, dict) or page.get("resourceType") != "Bundle":
                raise FhirPermanentError(f"search {resource_type} did not answer with a Bundle")
            yield page
            url = self._next_link(page)

    async def search_json(
        self, resource_type: str, params: SearchParams = ()
    ) -> list[dict[str, Any]]:
        """Every resource over all pages, matches and ``_include``-d ones, as plain JSON."""
        found = []
        async for page in self.search_pages_json(resource_type, params):
            for entry in page.get("entry") or []:
                if isinstance(entry, dict) and isinstance(entry.get("resource"), dict):
                    found.append(entry["resource"])
        return found

    async def create(self, resource: Resource) -> Resource:
        body = await self._call(
            "POST", resource.get_resource_type(), resource=resource, prefer_representation=True
        )
        return parse_resource(body)

    async def create_if_none_exist(
        self, resource: Resource, condition: str
    ) -> tuple[Resource, bool]:
        """Conditional create; ``condition`` is a search such as ``identifier=sys|val``.

        Returns the stored resource and whether this call created it.
        """
        status, body = await self._exchange(
            "POST",
            self._url(resource.get_resource_type()),
            f"conditional create {resource.get_resource_type()}",
            resource=resource,
            extra_headers={"If-None-Exist": condition},
            prefer_representation=True,
        )
        return parse_resource(body), status == 201

    async def update(self, resource: Resource, *, if_match_version: str | None = None) -> Resource:
        if not resource.id:
            raise ValueError("update needs a resource with an id")
        headers = {"If-Match": f'W/"{if_match_version}"'} if if_match_version else {}
        _, body = await self._exchange(
            "PUT",
            self._url(f"{resource.get_resource_type()}/{resource.id}"),
            f"update {resource.get_resource_type()}/{resource.id}",
            resource=resource,
            extra_headers=headers,
            prefer_representation=True,
        )
        return parse_resource(body)

    async def update_json(
        self, resource: Mapping[str, Any], *, if_match_version: str
    ) -> dict[str, Any]:
        """Update a resource (plain JSON, with ``resourceType`` and ``id``) only if FHIR
        still holds version ``if_match_version`` of it; the stored resource comes back.

        Someone else's write in between answers 409 (HAPI) or 412: a FhirPermanentError
        with that ``status``."""
        what = f"update {resource['resourceType']}/{resource['id']}"
        _, body = await self._exchange(
            "PUT",
            self._url(f"{resource['resourceType']}/{resource['id']}"),
            what,
            raw_body=resource,
            extra_headers={"If-Match": f'W/"{if_match_version}"'},
            prefer_representation=True,
        )
        if not isinstance(body, dict) or body.get("resourceType") != resource["resourceType"]:
            raise FhirPermanentError(f"{what} did not answer with the resource")
        return body

    async def delete(self, resource_type: str, resource_id: str) -> None:
        await self._call("DELETE", f"{resource_type}/{resource_id}")

    async def transaction(self, bundle: Bundle) -> Bundle:
        """Send a ``transaction`` (all or nothing) or ``batch`` Bundle to the base URL."""
        if bundle.type not in ("transaction", "batch"):
            raise ValueError("expected a Bundle of type transaction or batch")
        _, body = await self._exchange("POST", self._base_url, f"{bundle.type}", resource=bundle)
        response = parse_resource(body)
        if not isinstance(response, Bundle):
            raise FhirPermanentError(f"the {bundle.type} did not answer with a Bundle")
        return response

    async def transaction_json(self, bundle: Mapping[str, Any]) -> dict[str, Any]:
        """``transaction`` as plain JSON, for the hot path whose entries are already
        checked one by one (no second model pass over the whole Bundle either way)."""
        _, body = await self._exchange(
            "POST", self._base_url, str(bundle.get("type")), raw_body=bundle
        )
        if not isinstance(body, dict) or body.get("resourceType") != "Bundle":
            # (A success without its Bundle: the entries may or may not be written; they
            # are conditional, so writing them again is safe, and no message is refused.)
            raise FhirTransientError("the transaction did not answer with a Bundle")
        return body

    async def validate(self, resource: Resource) -> Resource:
        """``$validate``: the server's OperationOutcome, whether or not it found errors."""
        what = f"validate {resource.get_resource_type()}"
        parameters = {
            "resourceType": "Parameters",
            "parameter": [{"name": "resource", "resource": to_json(resource)}],
        }
        # An invalid resource is a result, not a failure: HAPI answers 412 (or 400 when
        # the resource cannot even be parsed) with the OperationOutcome listing the errors.
        _, body = await self._exchange(
            "POST",
            self._url(f"{resource.get_resource_type()}/$validate"),
            what,
            raw_body=parameters,
            accept_statuses=(400, 412, 422),
        )
        return parse_resource(body)

    async def capabilities(self, *, timeout: float | None = None) -> dict[str, Any]:
        """The CapabilityStatement (``/metadata``), as plain JSON."""
        _, body = await self._exchange(
            "GET", self._url("metadata"), "GET metadata", timeout=timeout
        )
        return body

    async def _call(
        self,
        method: str,
        path: str,
        *,
        resource: Resource | None = None,
        prefer_representation: bool = False,
    ) -> Any:
        _, body = await self._exchange(
            method,
            self._url(path),
            f"{method} {path.split('?', 1)[0]}",
            resource=resource,
            prefer_representation=prefer_representation,
        )
        return body

    async def _exchange(
        self,
        method: str,
        url: str,
        what: str,
        *,
        resource: Resource | None = None,
        raw_body: Any = None,
        extra_headers: Mapping[str, str] | None = None,
        prefer_representation: bool = False,
        accept_statuses: Sequence[int] = (),
        timeout: float | None = None,
    ) -> tuple[int, Any]:
        """One HTTP exchange; returns (status, parsed JSON body or None)."""
        headers = {"Accept": FHIR_JSON}
        if self._auth_header:
            headers["Authorization"] = self._auth_header
        if prefer_representation:
            headers["Prefer"] = "return=representation"
        data: bytes | None = None
        if resource is not None:
            raw_body = to_json(resource)
        if raw_body is not None:
            headers["Content-Type"] = f"{FHIR_JSON}; charset=utf-8"
            data = json.dumps(raw_body).encode("utf-8")
        headers.update(extra_headers or {})

        status, payload = await self._send(
            method, url, headers, data, timeout or self._timeout, what
        )
        body = _parse_json(payload)
        if 200 <= status < 300 and payload.strip() and body is None:
            # Not FHIR's answer (a proxy's page, a cut-off body): what was asked may or
            # may not have happened, so it is asked again, never taken as a refusal.
            raise FhirTransientError(f"{what}: the FHIR server answered {status} without JSON")
        if 200 <= status < 300 or status in accept_statuses:
            return status, body
        raise error_for_status(status, what, body)

    async def _send(
        self,
        method: str,
        url: str,
        headers: Mapping[str, str],
        data: bytes | None,
        timeout: float,
        what: str,
    ) -> tuple[int, bytes]:
        try:
            return await exchange(
                self._http, method, url, timeout=timeout, headers=headers, data=data
            )
        except Unreachable as e:
            raise FhirTransientError(f"{what}: FHIR server unreachable ({e.reason})") from e

    def _url(self, path: str) -> str:
        return f"{self._base_url}/{path}"

    def _next_link(self, bundle: Mapping[str, Any]) -> str | None:
        for link in bundle.get("link") or []:
            if isinstance(link, dict) and link.get("relation") == "next" and link.get("url"):
                url = str(link["url"])
                # Credentials go to our FHIR server only, never to a host a Bundle names.
                if _origin(url) != self._origin:
                    raise FhirPermanentError(
                        "the FHIR server's next-page link points to another host; "
                        "set fhir.base_url to the address the server reports for itself"
                    )
                return url
        return None


def parse_resource(body: Any) -> Resource:
    """A JSON resource as its R4B model; a FhirPermanentError if it is not one."""
    if not isinstance(body, dict) or not isinstance(body.get("resourceType"), str):
        raise FhirPermanentError("the FHIR server did not answer with a resource")
    try:
        model = get_fhir_model_class(body["resourceType"])
        return cast(Resource, model.model_validate(body))
    except (ValueError, ValidationError) as e:
        # The pydantic message can quote field values; keep only the location.
        where = _first_error_location(e)
        raise FhirPermanentError(
            f"the FHIR server sent a {body['resourceType']} this module cannot read{where}"
        ) from None


def to_json(resource: Resource) -> dict[str, Any]:
    """A resource as FHIR JSON (no empty elements)."""
    return resource.model_dump(mode="json", by_alias=True, exclude_none=True)


def _first_error_location(e: Exception) -> str:
    if isinstance(e, ValidationError) and e.errors():
        return " (at " + ".".join(str(p) for p in e.errors()[0]["loc"]) + ")"
    return ""


def _parse_json(payload: bytes) -> Any:
    if not payload:
        return None
    try:
        return json.loads(payload)
    except (ValueError, RecursionError):  # (not JSON; nested deeper than Python reads)
        return None


def _authorization(config: FhirConfig) -> str | None:
    if config.auth.bearer_token:
        return f"Bearer {config.auth.bearer_token}"
    if config.auth.username is not None:
        token = f"{config.auth.username}:{config.auth.password or ''}".encode()
        return "Basic " + base64.b64encode(token).decode("ascii")
    return None


def _origin(url: str) -> tuple[str, str, int | None]:
    parts = urlsplit(url)
    port = parts.port or (443 if parts.scheme == "https" else 80)
    return parts.scheme, (parts.hostname or "").lower(), port
