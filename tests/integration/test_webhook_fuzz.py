"""``/notify`` fuzzed over HTTP against a running Synapse with the module: any method, path,
headers (duplicated ``Authorization``, duplicated or non-numeric ``Content-Length``, odd
``If-Match``) and body. Every answer is one of the documented refusals or a 202, never a
server error; nothing is accepted without the secret; and the endpoint still works after.

Requests go out over a raw socket, so malformed headers reach Synapse as sent. ``make fuzz``
runs this with a larger budget."""

from __future__ import annotations

import json
import socket
from typing import Any

import requests
from hypothesis import given
from hypothesis import strategies as st

from devstack.synapse import SynapseServer
from synapse_fhir_module.sync.subscriptions import NOTIFY_PATH

SECRET = "test-webhook-secret"  # devstack.synapse.module_config
# What /notify may answer: accepted, malformed, unauthorised, wrong secret, unknown path,
# method, length required, too large.
DOCUMENTED = {202, 400, 401, 403, 404, 405, 411, 413}
# How long an answer may take before the request is taken to wait for more body.
BODY_WAIT = 5.0

SHIM_BODY = st.fixed_dictionaries(
    {},
    optional={
        "resourceType": st.one_of(st.sampled_from(["CareTeam", "Patient", "x"]), st.text()),
        "id": st.one_of(st.text(max_size=70), st.integers()),
        "versionId": st.one_of(
            st.text(max_size=30), st.integers(), st.just("9" * 400), st.floats()
        ),
        "action": st.one_of(st.sampled_from(["create", "update", "delete"]), st.text()),
    },
).map(lambda body: json.dumps(body).encode())
BODY = st.one_of(SHIM_BODY, st.binary(max_size=300), st.just(b""))
PATH = st.one_of(
    st.just(""),
    st.sampled_from(["/CareTeam/t-1", "/CareTeam/t-1/_history/2", "/x", "/CareTeam", "//"]),
    st.lists(
        st.text(alphabet="abcAZ09-._%/~", min_size=1, max_size=12), min_size=1, max_size=4
    ).map(lambda parts: "/" + "/".join(parts)),
)
AUTH_HEADERS = st.lists(
    st.sampled_from([f"Bearer {SECRET}", "Bearer wrong", "Basic eDp5", "", "Bearer"]),
    max_size=3,
)
LENGTH = st.one_of(
    st.none(),  # the real length
    st.sampled_from(["abc", "-1", "99999999999999999999", "", "1, 2", "0x10"]),
    st.lists(st.integers(0, 400).map(str), min_size=2, max_size=2),  # sent twice
)


@st.composite
def requests_to_notify(draw: st.DrawFn) -> tuple[bytes, bool]:
    """A raw HTTP/1.1 request, and whether it presents the secret exactly once."""
    method = draw(st.sampled_from(["POST", "PUT", "DELETE", "GET", "PATCH"]))
    path = draw(PATH)
    body = draw(BODY)
    auths = draw(AUTH_HEADERS)
    length = draw(LENGTH)
    headers = [("Host", "127.0.0.1"), ("Connection", "close")]
    headers += [("Authorization", value) for value in auths]
    if length is None:
        headers.append(("Content-Length", str(len(body))))
    elif isinstance(length, list):
        headers += [("Content-Length", value) for value in length]
    else:
        headers.append(("Content-Length", length))
    if draw(st.booleans()):
        headers.append(("If-Match", draw(st.sampled_from(['W/"2"', '"x"', 'W/"9' + "9" * 50]))))
    head = f"{method} {NOTIFY_PATH}{path} HTTP/1.1\r\n"
    head += "".join(f"{name}: {value}\r\n" for name, value in headers)
    return head.encode("latin-1") + b"\r\n" + body, auths == [f"Bearer {SECRET}"]


def _status_of(server: SynapseServer, raw: bytes) -> int | None:
    """The status Synapse answers with; None when it closed the connection unanswered
    (Twisted's reaction to a request it cannot parse at all). The request asks for
    ``Connection: close``, so the answer ends when Synapse closes."""
    with socket.create_connection(("127.0.0.1", server.port), timeout=30) as connection:
        connection.sendall(raw)
        connection.settimeout(BODY_WAIT)
        answer = b""
        try:
            while b"\r\n" not in answer and (chunk := connection.recv(65536)):
                answer += chunk
        except TimeoutError:
            # Synapse waits for the rest of a body the request said was longer: end it.
            connection.shutdown(socket.SHUT_WR)
            connection.settimeout(30)
            while b"\r\n" not in answer and (chunk := connection.recv(65536)):
                answer += chunk
    if not answer:
        return None
    status_line = answer.split(b"\r\n", 1)[0].decode("latin-1")
    return int(status_line.split(" ")[1])


# Which answers the fuzzing saw: a run that only ever saw dropped connections proves nothing.
SEEN: dict[int | None, int] = {}


@given(request=requests_to_notify())
def test_any_request_to_notify_gets_a_documented_answer_and_never_passes_without_the_secret(
    synapse: SynapseServer, request: tuple[bytes, bool]
) -> None:
    raw, presents_the_secret = request
    status = _status_of(synapse, raw)
    SEEN[status] = SEEN.get(status, 0) + 1
    assert status is None or status in DOCUMENTED, (status, raw[:300])
    if not presents_the_secret:
        assert status != 202, raw[:300]


def test_the_fuzzing_reached_the_module_and_a_well_formed_raw_request_is_accepted(
    synapse: SynapseServer,
) -> None:
    """(Runs after the fuzz in this module.) Most answers came from the module itself —
    accepted, or refused for the reason it documents — not from a dropped connection."""
    answered = sum(n for status, n in SEEN.items() if status is not None)
    assert answered > sum(SEEN.values()) / 2, SEEN
    assert {401, 400} <= SEEN.keys(), SEEN
    body = b'{"resourceType": "CareTeam", "id": "raw-1", "versionId": "1", "action": "update"}'
    raw = (
        f"POST {NOTIFY_PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n"
        f"Authorization: Bearer {SECRET}\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body
    assert _status_of(synapse, raw) == 202


def test_after_the_fuzzing_notify_still_answers_and_synapse_is_healthy(
    synapse: SynapseServer,
) -> None:
    """(Runs after the fuzz in this module: nothing it sent broke the resource.)"""
    body: dict[str, Any] = {
        "resourceType": "CareTeam",
        "id": "after-fuzz",
        "versionId": "1",
        "action": "update",
    }
    response = requests.post(
        synapse.url(NOTIFY_PATH),
        json=body,
        headers={"Authorization": f"Bearer {SECRET}"},
        timeout=30,
    )
    assert response.status_code == 202, response.text
    health = requests.get(synapse.url("/_synapse/client/fhir/health"), timeout=30)
    assert health.status_code == 200
