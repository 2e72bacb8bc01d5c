"""How the tests wait: a failed assert in a check ends the wait at once; an error of the
server asked is retried until the deadline."""

from __future__ import annotations

import json

import pytest
import requests

from devstack.matrix_client import MatrixError
from devstack.waiting import NeverHappened, wait_until


def test_a_failed_assert_in_the_check_fails_at_once_not_at_the_deadline() -> None:
    calls = []

    def check() -> bool:
        calls.append(1)
        assert len(calls) > 5, "two Communications for one message"
        return True

    with pytest.raises(AssertionError, match="two Communications") as raised:
        wait_until(check, timeout=60, what="recorded", interval=0)
    assert type(raised.value) is AssertionError
    assert len(calls) == 1


def test_a_server_error_is_retried_until_the_check_passes() -> None:
    answers: list[Exception | str] = [
        requests.ConnectionError("refused"),
        MatrixError(_response(403, {"errcode": "M_FORBIDDEN"})),
        "joined",
    ]

    def check() -> str:
        answer = answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert wait_until(check, timeout=60, what="joined", interval=0) == "joined"
    assert answers == []


def test_the_deadline_names_what_was_waited_for_and_the_last_error() -> None:
    def check() -> None:
        raise MatrixError(_response(403, {"errcode": "M_FORBIDDEN"}))

    with pytest.raises(NeverHappened, match=r"joined: not within 0 s \(last error: .*403"):
        wait_until(check, timeout=0, what="joined", interval=0)


def _response(status: int, body: dict[str, str]) -> requests.Response:
    response = requests.Response()
    response.status_code = status
    response._content = json.dumps(body).encode()
    return response
