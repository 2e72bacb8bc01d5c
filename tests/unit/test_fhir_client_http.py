"""FhirClient's HTTP behaviour against a scripted local HTTP server: auth headers, status
classification, and the deadline covering a body that never finishes. (Behaviour against
real HAPI is in tests/integration/test_fhir_client.py.)"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import pytest
import pytest_twisted
from fhir.resources.R4B.patient import Patient
from twisted.internet import defer, reactor
from twisted.internet.address import IPv4Address
from twisted.internet.error import ConnectingCancelledError, ConnectionRefusedError, DNSLookupError
from twisted.web import resource, server

from synapse_fhir_module.config import FhirAuthConfig, FhirConfig
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.errors import FhirPermanentError, FhirTransientError


class Scripted(resource.Resource):
    """Answers every request with the next scripted (status, body); records the requests."""

    isLeaf = True  # noqa: N815 - Twisted looks for this name

    def __init__(self) -> None:
        super().__init__()
        self.answers: list[tuple[int, Any]] = []
        self.requests: list[dict[str, Any]] = []

    def render(self, request: server.Request) -> Any:
        self.requests.append(
            {
                "method": request.method.decode(),
                "path": request.uri.decode(),
                "authorization": (request.getHeader("authorization") or ""),
                "if-none-exist": request.getHeader("if-none-exist"),
                "cache-control": request.getHeader("cache-control"),
            }
        )
        status, body = self.answers.pop(0)
        request.setResponseCode(status)
        if body == "HANG":
            # Headers go out, the body never ends: only the client's deadline can stop it.
            request.setHeader("content-length", "1000")
            request.write(b"{")
            return server.NOT_DONE_YET
        if isinstance(body, bytes):  # (not JSON: what a proxy or a cut-off answer sends)
            request.setHeader("content-type", "text/html")
            return body
        request.setHeader("content-type", "application/fhir+json")
        return json.dumps(body).encode()


@pytest.fixture
def scripted() -> Iterator[tuple[Scripted, str]]:
    root = Scripted()
    port = reactor.listenTCP(0, server.Site(root), interface="127.0.0.1")
    yield root, f"http://127.0.0.1:{port.getHost().port}/fhir"
    port.stopListening()


def client(base_url: str, **kwargs: Any) -> FhirClient:
    return FhirClient(FhirConfig(base_url=base_url, **kwargs))


PATIENT = {"resourceType": "Patient", "id": "p1", "active": True}


@pytest_twisted.ensureDeferred
async def test_bearer_token_is_sent(scripted: tuple[Scripted, str]) -> None:
    root, url = scripted
    root.answers.append((200, PATIENT))
    fhir = client(url, auth=FhirAuthConfig(bearer_token="tok-123"))
    assert (await fhir.read("Patient", "p1")).id == "p1"
    assert root.requests[0]["authorization"] == "Bearer tok-123"
    assert root.requests[0]["path"] == "/fhir/Patient/p1"


@pytest_twisted.ensureDeferred
async def test_basic_auth_is_sent(scripted: tuple[Scripted, str]) -> None:
    root, url = scripted
    root.answers.append((200, PATIENT))
    fhir = client(url, auth=FhirAuthConfig(username="synapse", password="pw"))
    await fhir.read("Patient", "p1")
    assert root.requests[0]["authorization"] == "Basic c3luYXBzZTpwdw=="


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize("status", [408, 429, 500, 503])
async def test_busy_or_broken_server_is_transient(
    scripted: tuple[Scripted, str], status: int
) -> None:
    root, url = scripted
    root.answers.append((status, {"resourceType": "OperationOutcome", "issue": []}))
    with pytest.raises(FhirTransientError) as caught:
        await client(url).read("Patient", "p1")
    assert caught.value.status == status


@pytest_twisted.ensureDeferred
async def test_unreadable_resource_is_permanent_and_quotes_no_values(
    scripted: tuple[Scripted, str],
) -> None:
    root, url = scripted
    root.answers.append((200, {"resourceType": "Patient", "active": "Henk Jansen"}))
    with pytest.raises(FhirPermanentError) as caught:
        await client(url).read("Patient", "p1")
    assert "Henk" not in str(caught.value)
    assert "active" in str(caught.value)


@pytest_twisted.ensureDeferred
async def test_conditional_create_sends_if_none_exist(scripted: tuple[Scripted, str]) -> None:
    root, url = scripted
    root.answers.append((200, PATIENT))
    stored, created = await client(url).create_if_none_exist(
        Patient.model_validate(PATIENT), "identifier=sys|1"
    )
    assert (stored.id, created) == ("p1", False)
    assert root.requests[0]["if-none-exist"] == "identifier=sys|1"


@pytest_twisted.ensureDeferred
async def test_deadline_covers_a_body_that_never_ends(scripted: tuple[Scripted, str]) -> None:
    root, url = scripted
    root.answers.append((200, "HANG"))
    started = time.monotonic()
    with pytest.raises(FhirTransientError) as caught:
        await client(url, timeout=0.5).read("Patient", "p1")
    assert "timed out" in str(caught.value)
    assert time.monotonic() - started < 3.0


@pytest_twisted.ensureDeferred
async def test_next_link_to_another_host_is_refused(scripted: tuple[Scripted, str]) -> None:
    """Credentials go only to the configured server, whatever a Bundle says."""
    root, url = scripted
    root.answers.append(
        (
            200,
            {
                "resourceType": "Bundle",
                "type": "searchset",
                "link": [{"relation": "next", "url": "http://127.0.0.2:1/fhir?page=2"}],
            },
        )
    )
    fhir = client(url, auth=FhirAuthConfig(bearer_token="tok"))
    with pytest.raises(FhirPermanentError, match="another host"):
        await fhir.search("Patient")
    assert len(root.requests) == 1


@pytest_twisted.ensureDeferred
async def test_searches_ask_for_fresh_results(scripted: tuple[Scripted, str]) -> None:
    """HAPI would otherwise reuse an identical search's results for a minute."""
    root, url = scripted
    root.answers.append((200, {"resourceType": "Bundle", "type": "searchset"}))
    assert await client(url).search_json("CareTeam", {"_id": "1"}) == []
    assert root.requests[0]["cache-control"] == "no-cache"


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "failure",
    [
        ConnectingCancelledError(IPv4Address("TCP", "127.0.0.1", 1)),
        ConnectionRefusedError(),
        DNSLookupError("nowhere"),
    ],
)
async def test_any_failure_below_http_is_transient(failure: Exception) -> None:
    """E.g. the deadline cutting off a TCP connect raises ConnectingCancelledError."""
    fhir = client("http://127.0.0.1:1/fhir")

    class FailingHttp:
        def request(self, *args: Any, **kwargs: Any) -> defer.Deferred:
            return defer.fail(failure)

    fhir._http = FailingHttp()  # type: ignore[assignment]
    with pytest.raises(FhirTransientError, match="unreachable"):
        await fhir.read("Patient", "p1")


TRANSACTION = {"resourceType": "Bundle", "type": "transaction", "entry": []}


@pytest_twisted.ensureDeferred
@pytest.mark.parametrize(
    "body",
    [
        b"<html><body>Please log in</body></html>",  # a proxy's page
        b'{"resourceType": "Bundle", "entry": [',  # cut off
        {"resourceType": "OperationOutcome", "issue": []},  # JSON, but no Bundle
        ["not", "a", "resource"],
    ],
    ids=["html", "cut-off", "outcome", "list"],
)
async def test_a_success_without_a_bundle_is_asked_again_never_refused(
    scripted: tuple[Scripted, str], body: Any
) -> None:
    """A 200 that is not the transaction's Bundle says nothing about the entries: the
    batch is retried (its creates are conditional), never turned into dead letters."""
    root, url = scripted
    root.answers.append((200, body))
    with pytest.raises(FhirTransientError):
        await client(url).transaction_json(TRANSACTION)


@pytest_twisted.ensureDeferred
async def test_a_read_answered_200_without_json_is_transient(
    scripted: tuple[Scripted, str],
) -> None:
    root, url = scripted
    root.answers.append((200, b"<html>maintenance</html>"))
    with pytest.raises(FhirTransientError) as caught:
        await client(url).read("Patient", "p1")
    assert "without JSON" in str(caught.value)
