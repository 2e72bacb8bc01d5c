"""Polling with a deadline: how tests and tools wait for something to become true."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import TypeVar

T = TypeVar("T")


class NeverHappened(AssertionError):
    """What was waited for did not happen before the deadline."""


class StopWaiting(Exception):
    """Raised by a check when waiting longer cannot help (e.g. the server exited)."""


def wait_until(
    check: Callable[[], T | None],
    *,
    timeout: float,
    what: str,
    interval: float = 0.05,
) -> T:
    """Call ``check`` until it returns something truthy, and return that.

    Raises NeverHappened naming ``what`` (and the last exception, if any)
    when ``timeout`` seconds pass first. A failed ``assert`` in ``check`` (a plain
    AssertionError, e.g. two Communications for one message) fails at once: waiting
    cannot undo it. Errors of the servers asked (a refused request, an HTTP error) are
    retried until the deadline.
    """
    deadline = time.monotonic() + timeout
    last_error: Exception | None = None
    while True:
        try:
            result = check()
            if result:
                return result
        except StopWaiting:
            raise
        except AssertionError as e:
            if type(e) is AssertionError:
                raise
            last_error = e  # (a MatrixError: the server's answer, which may change)
        except Exception as e:  # remembered and reported on timeout
            last_error = e
        if time.monotonic() >= deadline:
            detail = f" (last error: {last_error!r})" if last_error else ""
            raise NeverHappened(f"{what}: not within {timeout:.0f} s{detail}")
        time.sleep(interval)
