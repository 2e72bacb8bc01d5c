"""One place where an unexpected error in an access-deciding callback is logged and turned
into a safe answer (fail closed, or open as configured), instead of a try/except in each."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from synapse.module_api.errors import SynapseError

from synapse_fhir_module.enforcement.denials import Denied, Reason

logger = logging.getLogger(__name__)

T = TypeVar("T")


def access_decision(
    callback: Callable[..., Awaitable[T]], *, fail_closed: bool, allow: T
) -> Callable[..., Awaitable[T]]:
    """Wrap an access-deciding callback: a bug denies (fail closed) or allows (fail open)."""

    @functools.wraps(callback)
    async def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            return await callback(*args, **kwargs)
        except SynapseError:
            raise  # our Denied, or Synapse's own errors: the client should see them
        except Exception:
            logger.exception("Unexpected error in %s", callback.__qualname__)
            if fail_closed:
                raise Denied(Reason.DIRECTORY_UNAVAILABLE) from None
            return allow

    return guarded
