"""The notify webhook (design.md: endpoints), driven through Synapse's own request pipeline
in-process.

Each request is raw HTTP fed to a Twisted ``HTTPChannel`` whose requests are real
``SynapseRequest``s, over a resource tree built by Synapse's ``create_resource_tree`` (as
``register_web_resource`` gets it): routing, status codes and error JSON are Synapse's,
only the network is left out. (Synapse's own test helpers are not part of its wheel.)
"""

from __future__ import annotations

import hmac
import http.client
import io
import json
import logging
from typing import Any
from urllib.parse import quote

import attr
import pytest
import pytest_twisted
from prometheus_client import REGISTRY
from synapse.http.site import SynapseRequest
from synapse.util.httpresourcetree import create_resource_tree
from twisted.internet import reactor
from twisted.internet.testing import StringTransport
from twisted.web.http import HTTPChannel
from twisted.web.resource import Resource
from twisted.web.server import Site

from synapse_fhir_module.web import webhook
from synapse_fhir_module.web.webhook import (
    HANDLED_RESOURCE_TYPES,
    MAX_BODY_BYTES,
    NOTIFY_PATH,
    Action,
    Notification,
    NotifyResource,
)

SECRET = "test-secret-\u00e9"  # not ASCII: compared as UTF-8 bytes
AUTH = {"Authorization": f"Bearer {SECRET}"}
PATIENT_NAME = "Jansen"  # stands for clinical data: must never reach a log or an answer


class _Site(Site):
    """What SynapseRequest asks of its site."""

    site_tag = "test"
    access_logger = logging.getLogger("test.access")
    server_version_string = b"test"
    reactor = reactor


class _CountingReader:
    """The request body, counting what the resource reads of it."""

    def __init__(self, file: Any) -> None:
        self._file = file
        self.bytes_read = 0

    def read(self, size: int = -1) -> bytes:
        data: bytes = self._file.read(size)
        self.bytes_read += len(data)
        return data

    def __getattr__(self, name: str) -> Any:
        return getattr(self._file, name)


class _Request(SynapseRequest):
    body: _CountingReader

    def process(self) -> None:
        # The body has arrived (Twisted buffered it); the resource is about to run.
        self.content = self.body = _CountingReader(self.content)
        super().process()


@attr.s(auto_attribs=True)
class Answer:
    code: int
    body: dict[str, Any]
    bytes_read: int


class Webhook:
    """One NotifyResource at NOTIFY_PATH and the notifications it handed on."""

    def __init__(self, secret: str | None = SECRET) -> None:
        self.received: list[Notification] = []
        root = create_resource_tree(
            {NOTIFY_PATH: NotifyResource(secret, self.received.append)}, Resource()
        )
        self._site = _Site(root)

    async def request(
        self,
        method: str,
        path: str = "",
        body: bytes | None = None,
        headers: dict[str, str] | None = None,
        *,
        chunked: bool = False,
    ) -> Answer:
        requests: list[_Request] = []

        def make_request(channel: HTTPChannel, queued: bool) -> _Request:
            # Synapse's own limit far above ours, so the webhook's check is what answers.
            request = _Request(channel, self._site, "test", max_request_body_size=1 << 24)
            requests.append(request)
            return request

        channel = HTTPChannel()
        channel.site = self._site
        channel.requestFactory = make_request
        transport = StringTransport()
        channel.makeConnection(transport)

        # (A client percent-encodes what a request line may not hold.)
        lines = [f"{method} {NOTIFY_PATH}{quote(path, safe='/%')} HTTP/1.1", "Host: test"]
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        if chunked:
            lines.append("Transfer-Encoding: chunked")
            payload = b"%x\r\n%s\r\n0\r\n\r\n" % (len(body or b""), body or b"")
        else:
            if body is not None:
                lines.append(f"Content-Length: {len(body)}")
            payload = body or b""
        channel.dataReceived("\r\n".join(lines).encode("utf-8") + b"\r\n\r\n" + payload)

        await requests[0].notifyFinish().addTimeout(10, reactor)
        response = http.client.HTTPResponse(_RawSocket(transport.value()))
        response.begin()
        return Answer(response.status, json.loads(response.read()), requests[0].body.bytes_read)

    async def post(self, content: Any, headers: dict[str, str] | None = None) -> Answer:
        body = content if isinstance(content, bytes) else json.dumps(content).encode()
        return await self.request("POST", "", body, AUTH if headers is None else headers)


class _RawSocket:
    """Lets http.client parse a response held in memory."""

    def __init__(self, data: bytes) -> None:
        self._file = io.BytesIO(data)

    def makefile(self, *args: Any, **kwargs: Any) -> io.BytesIO:
        return self._file


def shim_body(**overrides: Any) -> dict[str, Any]:
    body = {"resourceType": "CareTeam", "id": "team-12", "versionId": "4", "action": "update"}
    body.update(overrides)
    return {key: value for key, value in body.items() if value is not _MISSING}


def outcome(diagnostics: str) -> dict[str, Any]:
    return {
        "resourceType": "OperationOutcome",
        "issue": [{"severity": "information", "code": "informational", "diagnostics": diagnostics}],
    }


class _Missing:
    def __repr__(self) -> str:
        return "MISSING"


_MISSING = _Missing()


def fhir_resource(resource_type: str = "CareTeam", resource_id: str = "team-12") -> bytes:
    """What a rest-hook Subscription with a payload sends: the whole resource."""
    return json.dumps(
        {
            "resourceType": resource_type,
            "id": resource_id,
            "meta": {"versionId": "3"},
            "status": "active",
            "subject": {"display": PATIENT_NAME},
        }
    ).encode()


# --- the shim's form: POST /notify ---------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_shim_notification_is_accepted_and_handed_on() -> None:
    hook = Webhook()
    answer = await hook.post(shim_body())
    assert (answer.code, answer.body) == (202, {"status": "accepted"})
    assert hook.received == [Notification("CareTeam", "team-12", 4, Action.UPDATE)]
    assert hook.received[0].reference == "CareTeam/team-12"


@pytest.mark.parametrize("action", ["create", "update", "delete"])
@pytest_twisted.ensureDeferred
async def test_every_action_of_the_contract(action: str) -> None:
    hook = Webhook()
    assert (await hook.post(shim_body(action=action))).code == 202
    assert hook.received[0].action is Action(action)


@pytest.mark.parametrize(
    ("version", "expected"), [(None, None), (_MISSING, None), ("0", 0), (17, 17)]
)
@pytest_twisted.ensureDeferred
async def test_version_may_be_unknown_or_a_number(version: Any, expected: int | None) -> None:
    hook = Webhook()
    assert (await hook.post(shim_body(versionId=version))).code == 202
    assert hook.received[0].version_id == expected


@pytest.mark.parametrize("resource_type", sorted(HANDLED_RESOURCE_TYPES))
@pytest_twisted.ensureDeferred
async def test_every_handled_type_is_handed_on(resource_type: str) -> None:
    hook = Webhook()
    assert (await hook.post(shim_body(resourceType=resource_type))).code == 202
    assert hook.received[0].resource_type == resource_type


@pytest_twisted.ensureDeferred
async def test_unknown_type_is_accepted_and_ignored() -> None:
    hook = Webhook()
    answer = await hook.post(shim_body(resourceType="Observation"))
    assert (answer.code, answer.body) == (202, {"status": "ignored"})
    assert hook.received == []


@pytest_twisted.ensureDeferred
async def test_trailing_slash_is_the_same_endpoint() -> None:
    hook = Webhook()
    body = json.dumps(shim_body()).encode()
    assert (await hook.request("POST", "/", body, AUTH)).code == 202
    assert len(hook.received) == 1


# --- authentication ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "errcode"),
    [
        ({}, "M_MISSING_TOKEN"),
        ({"Authorization": "Basic dGVzdDp0ZXN0"}, "M_MISSING_TOKEN"),
        ({"Authorization": "Bearer wrong"}, "M_UNKNOWN_TOKEN"),
        ({"Authorization": f"Bearer {SECRET}x"}, "M_UNKNOWN_TOKEN"),
        ({"Authorization": "Bearer "}, "M_UNKNOWN_TOKEN"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_missing_or_wrong_secret_is_refused(headers: dict[str, str], errcode: str) -> None:
    hook = Webhook()
    answer = await hook.post(shim_body(), headers)
    assert (answer.code, answer.body["errcode"]) == (401, errcode)
    assert hook.received == []


@pytest_twisted.ensureDeferred
async def test_scheme_is_case_insensitive() -> None:
    hook = Webhook()
    assert (await hook.post(shim_body(), {"Authorization": f"bearer {SECRET}"})).code == 202


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_without_a_configured_secret_everything_is_refused(method: str) -> None:
    hook = Webhook(secret=None)
    path = "" if method == "POST" else "/CareTeam/team-12"
    body = json.dumps(shim_body()).encode()
    for headers in ({}, {"Authorization": "Bearer "}, {"Authorization": "Bearer None"}):
        answer = await hook.request(method, path, body, headers)
        assert answer.code == 401, headers
    assert hook.received == []


@pytest_twisted.ensureDeferred
async def test_secret_is_compared_in_constant_time(monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[tuple[Any, Any]] = []
    real = hmac.compare_digest

    def spy(a: Any, b: Any) -> bool:
        calls.append((a, b))
        return real(a, b)

    monkeypatch.setattr(webhook.hmac, "compare_digest", spy)
    hook = Webhook()
    assert (await hook.post(shim_body(), {"Authorization": "Bearer wrong"})).code == 401
    assert (await hook.post(shim_body())).code == 202
    assert calls == [(b"wrong", SECRET.encode()), (SECRET.encode(), SECRET.encode())]


# --- size ----------------------------------------------------------------------------


def padded(size: int) -> bytes:
    """A valid shim body of exactly ``size`` bytes (JSON allows trailing whitespace)."""
    body = json.dumps(shim_body()).encode()
    return body + b" " * (size - len(body))


@pytest_twisted.ensureDeferred
async def test_body_of_exactly_64_kib_is_accepted() -> None:
    hook = Webhook()
    assert len(padded(MAX_BODY_BYTES)) == 64 * 1024
    assert (await hook.post(padded(MAX_BODY_BYTES))).code == 202
    assert len(hook.received) == 1


@pytest_twisted.ensureDeferred
async def test_one_byte_more_is_too_large_and_not_read() -> None:
    hook = Webhook()
    answer = await hook.post(padded(MAX_BODY_BYTES + 1))
    assert (answer.code, answer.body["errcode"]) == (413, "M_TOO_LARGE")
    assert hook.received == []
    # Refused on its Content-Length: nothing of the body was read.
    assert answer.bytes_read == 0


@pytest_twisted.ensureDeferred
async def test_chunked_body_over_the_limit_is_read_no_further_than_the_limit() -> None:
    hook = Webhook()
    answer = await hook.request("POST", "", padded(1024 * 1024), AUTH, chunked=True)
    assert (answer.code, answer.body["errcode"]) == (413, "M_TOO_LARGE")
    assert answer.bytes_read == MAX_BODY_BYTES + 1


@pytest_twisted.ensureDeferred
async def test_chunked_body_within_the_limit_is_accepted() -> None:
    hook = Webhook()
    answer = await hook.request("POST", "", padded(MAX_BODY_BYTES), AUTH, chunked=True)
    assert answer.code == 202


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_subscription_form_has_the_same_limit(method: str) -> None:
    hook = Webhook()
    too_large = b" " * (MAX_BODY_BYTES + 1)
    answer = await hook.request(method, "/CareTeam/team-12", too_large, AUTH)
    assert answer.code == 413
    assert (await hook.request(method, "/CareTeam/team-12", too_large[1:], AUTH)).code == 202


@pytest_twisted.ensureDeferred
async def test_secret_is_checked_before_size() -> None:
    hook = Webhook()
    assert (await hook.post(padded(MAX_BODY_BYTES + 1), {})).code == 401


# --- malformed -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",  # what a rest-hook Subscription without payload POSTs: names no resource
        b"{",
        b'{"resourceType": "CareTeam", "id": "1", "action": "update"',
        b"[]",
        b'"CareTeam/1"',
        b"\xff\xfe{}",
        b'{"resourceType": "CareTeam", "id": "1", "versionId": NaN, "action": "update"}',
        b"[" * 30_000 + b"]" * 30_000,
    ],
    ids=["empty", "brace", "unterminated", "array", "string", "not-utf8", "nan", "nested"],
)
@pytest_twisted.ensureDeferred
async def test_malformed_json_is_refused(body: bytes) -> None:
    hook = Webhook()
    answer = await hook.post(body)
    assert (answer.code, answer.body["errcode"]) == (400, "M_BAD_JSON")
    assert "resourceType" in answer.body["error"]
    assert hook.received == []


@pytest.mark.parametrize(
    "overrides",
    [
        {"resourceType": _MISSING},
        {"id": _MISSING},
        {"action": _MISSING},
        {"resourceType": None},
        {"id": 12},
        {"action": "patch"},
        {"action": "UPDATE"},
        {"versionId": "v4"},
        {"versionId": "-1"},
        {"versionId": -1},
        {"versionId": True},
        {"versionId": 4.0},
        {"versionId": "1" * 19},
    ],
    ids=repr,
)
@pytest_twisted.ensureDeferred
async def test_missing_or_invalid_field_is_refused(overrides: dict[str, Any]) -> None:
    hook = Webhook()
    answer = await hook.post(shim_body(**overrides))
    assert (answer.code, answer.body["errcode"]) == (400, "M_INVALID_PARAM")
    assert hook.received == []


BAD_IDS = ["", "a" * 65, "team_12", "team 12", "team/12", "tëam", "12\n"]
BAD_TYPES = ["careTeam", "Care-Team", "1CareTeam", "Care Team", "", "C" + "a" * 64]


@pytest.mark.parametrize("bad_id", BAD_IDS)
@pytest_twisted.ensureDeferred
async def test_bad_id_syntax_is_refused(bad_id: str) -> None:
    hook = Webhook()
    answer = await hook.post(shim_body(id=bad_id))
    assert (answer.code, answer.body["errcode"]) == (400, "M_INVALID_PARAM")
    assert hook.received == []


@pytest.mark.parametrize("bad_type", BAD_TYPES)
@pytest_twisted.ensureDeferred
async def test_bad_resource_type_syntax_is_refused(bad_type: str) -> None:
    hook = Webhook()
    answer = await hook.post(shim_body(resourceType=bad_type))
    assert (answer.code, answer.body["errcode"]) == (400, "M_INVALID_PARAM")


@pytest_twisted.ensureDeferred
async def test_longest_id_is_accepted() -> None:
    hook = Webhook()
    longest = "A-z.0" + "9" * 59
    assert (await hook.post(shim_body(id=longest))).code == 202
    assert hook.received[0].id == longest


# --- the rest-hook Subscription form: PUT|DELETE /notify/<type>/<id> -----------------


@pytest_twisted.ensureDeferred
async def test_put_with_the_resource_as_hapi_sends_it() -> None:
    """HAPI 8.8: PUT <endpoint>/CareTeam/<id>, the resource as body, If-Match: W/"<version>"."""
    hook = Webhook()
    headers = {**AUTH, "Content-Type": "application/fhir+json", "If-Match": 'W/"3"'}
    answer = await hook.request("PUT", "/CareTeam/team-12", fhir_resource(), headers)
    # HAPI's client parses the answer as a FHIR resource, and retries when it is not one.
    assert (answer.code, answer.body) == (202, outcome("accepted"))
    assert hook.received == [Notification("CareTeam", "team-12", 3, Action.UPDATE)]


@pytest_twisted.ensureDeferred
async def test_put_body_is_never_trusted() -> None:
    """The path names the resource; a body naming another one, or no JSON at all, does not count."""
    hook = Webhook()
    for body in (fhir_resource("Patient", "someone-else"), b"not json", b"", None):
        assert (await hook.request("PUT", "/CareTeam/team-12", body, AUTH)).code == 202
    assert {n.reference for n in hook.received} == {"CareTeam/team-12"}


@pytest_twisted.ensureDeferred
async def test_put_without_a_version_as_with_strip_version_ids() -> None:
    hook = Webhook()
    assert (await hook.request("PUT", "/Patient/p1", fhir_resource(), AUTH)).code == 202
    assert hook.received == [Notification("Patient", "p1", None, Action.UPDATE)]


@pytest.mark.parametrize("if_match", ['"3"', "W/3", 'W/"three"', "*"])
@pytest_twisted.ensureDeferred
async def test_if_match_other_than_a_version_means_version_unknown(if_match: str) -> None:
    hook = Webhook()
    headers = {**AUTH, "If-Match": if_match}
    assert (await hook.request("PUT", "/CareTeam/team-12", None, headers)).code == 202
    assert hook.received[0].version_id == (3 if if_match == '"3"' else None)


@pytest_twisted.ensureDeferred
async def test_delete_without_body_as_hapi_sends_it() -> None:
    hook = Webhook()
    answer = await hook.request("DELETE", "/CareTeam/team-12", None, AUTH)
    assert (answer.code, answer.body) == (202, outcome("accepted"))
    assert hook.received == [Notification("CareTeam", "team-12", None, Action.DELETE)]


@pytest.mark.parametrize("method", ["PUT", "DELETE"])
@pytest_twisted.ensureDeferred
async def test_history_suffix_gives_the_version(method: str) -> None:
    hook = Webhook()
    answer = await hook.request(method, "/CareTeam/team-12/_history/7", None, AUTH)
    assert answer.code == 202
    action = Action.UPDATE if method == "PUT" else Action.DELETE
    assert hook.received == [Notification("CareTeam", "team-12", 7, action)]
    if method == "PUT":
        del hook.received[:]
        # The path's version wins over If-Match.
        headers = {**AUTH, "If-Match": 'W/"6"'}
        await hook.request(method, "/CareTeam/team-12/_history/7/", None, headers)
        assert hook.received[0].version_id == 7


@pytest_twisted.ensureDeferred
async def test_subscription_form_unknown_type_is_ignored() -> None:
    hook = Webhook()
    answer = await hook.request("PUT", "/Observation/o1", fhir_resource("Observation"), AUTH)
    assert (answer.code, answer.body) == (202, outcome("ignored: type not handled"))
    assert (await hook.request("DELETE", "/Observation/o1", None, AUTH)).code == 202
    assert hook.received == []


@pytest.mark.parametrize(
    "path",
    [f"/CareTeam/{bad}" for bad in BAD_IDS if bad and "/" not in bad and " " not in bad]
    + ["/CareTeam/team%2F12", "/CareTeam/team%2012", "/CareTeam/%FF"]
    + [f"/{bad}/team-12" for bad in BAD_TYPES if bad and " " not in bad]
    + ["/CareTeam/team-12/_history/x", "/CareTeam/team-12/_history/-1"],
)
@pytest_twisted.ensureDeferred
async def test_subscription_form_bad_syntax_is_refused(path: str) -> None:
    hook = Webhook()
    answer = await hook.request("PUT", path, None, AUTH)
    assert (answer.code, answer.body["errcode"]) == (400, "M_INVALID_PARAM")
    assert hook.received == []


@pytest.mark.parametrize("method", ["PUT", "DELETE", "POST"])
@pytest.mark.parametrize(
    "path",
    [
        "/CareTeam%2F..%2F..%2F..%2F..%2F_matrix/x",
        "/%2E%2E%2F%2E%2E%2F_matrix",
        "/../x",
        "/CareTeam/..",
        "/./CareTeam/team-12",
    ],
)
@pytest_twisted.ensureDeferred
async def test_encoded_slashes_and_dot_segments_are_refused_before_the_secret(
    method: str, path: str
) -> None:
    """A proxy that routes on the decoded, dot-resolved path (``/_matrix/...``) would pass
    these to /notify: they are refused as malformed, never answered 401 (no secret guessing
    from outside, no alert raised from outside)."""
    hook = Webhook()
    answer = await hook.request(method, path, None, {"Authorization": "Bearer wrong"})
    assert (answer.code, answer.body["errcode"]) == (400, "M_INVALID_PARAM")
    assert hook.received == []


@pytest.mark.parametrize(
    "path", ["/CareTeam", "/CareTeam/1/_history", "/CareTeam/1/_version/2", "/a/b/c/d/e"]
)
@pytest_twisted.ensureDeferred
async def test_other_paths_are_not_found(path: str) -> None:
    hook = Webhook()
    answer = await hook.request("PUT", path, None, AUTH)
    assert (answer.code, answer.body["errcode"]) == (404, "M_UNRECOGNIZED")


# --- methods -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", ""),
        ("PATCH", ""),
        ("PUT", ""),
        ("DELETE", ""),
        ("POST", "/CareTeam/team-12"),
        ("GET", "/CareTeam/team-12"),
        ("PATCH", "/CareTeam/team-12"),
    ],
)
@pytest_twisted.ensureDeferred
async def test_wrong_method_is_not_allowed(method: str, path: str) -> None:
    hook = Webhook()
    body = json.dumps(shim_body()).encode()
    answer = await hook.request(method, path, body, AUTH)
    assert answer.code == 405
    assert hook.received == []


# --- what is logged and answered -----------------------------------------------------


@pytest_twisted.ensureDeferred
async def test_body_is_never_logged_nor_echoed(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    hook = Webhook()
    answers = [
        await hook.request("PUT", "/CareTeam/team-12", fhir_resource(), AUTH),
        await hook.post(b'{"resourceType": "CareTeam", "id": "' + PATIENT_NAME.encode()),
        await hook.post(shim_body(id=f"{PATIENT_NAME} Jan", action=PATIENT_NAME)),
        await hook.post(shim_body(action=PATIENT_NAME)),
    ]
    assert [a.code for a in answers] == [202, 400, 400, 400]
    assert PATIENT_NAME not in caplog.text
    assert all(PATIENT_NAME not in json.dumps(a.body) for a in answers)
    assert "update CareTeam/team-12" in caplog.text  # type, id and action only


# --- what Prometheus sees: rejections counted by reason ----------------------------


def rejected(reason: str) -> float:
    value = REGISTRY.get_sample_value("synapse_fhir_notify_rejected_total", {"reason": reason})
    return value or 0.0


@pytest_twisted.ensureDeferred
async def test_each_refusal_is_counted_once_by_its_reason_and_an_accepted_call_is_not() -> None:
    reasons = [
        "missing_secret",
        "wrong_secret",
        "malformed",
        "not_found",
        "method_not_allowed",
        "too_large",
    ]
    before = {reason: rejected(reason) for reason in reasons}
    hook = Webhook()

    assert (await hook.post(shim_body(), headers={})).code == 401
    assert (await hook.post(shim_body(), headers={"Authorization": "Bearer nope"})).code == 401
    assert (await hook.post(b"{not json")).code == 400
    assert (await hook.request("PUT", "/CareTeam", b"", AUTH)).code == 404
    assert (await hook.request("POST", "/CareTeam/12", b"{}", AUTH)).code == 405
    too_long = b"x" * (MAX_BODY_BYTES + 1)
    assert (await hook.request("POST", "", too_long, AUTH)).code == 413
    assert (await hook.post(shim_body())).code == 202

    assert {reason: rejected(reason) - before[reason] for reason in reasons} == dict.fromkeys(
        reasons, 1.0
    )


@pytest_twisted.ensureDeferred
async def test_with_no_secret_configured_every_call_counts_as_a_wrong_secret() -> None:
    before = rejected("wrong_secret")
    assert (await Webhook(secret=None).post(shim_body())).code == 401
    assert rejected("wrong_secret") - before == 1.0
