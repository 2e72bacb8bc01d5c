"""A callback whose failure must not disturb Synapse: the error is logged and a fallback
answered (access-deciding callbacks fail closed instead: ``enforcement.callback_guard``)."""

from __future__ import annotations

import functools
import logging
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


def never_raises(
    callback: Callable[..., Awaitable[T]], *, fallback: T
) -> Callable[..., Awaitable[T]]:
    """Wrap a callback whose failure must not disturb Synapse (e.g. account validity)."""

    @functools.wraps(callback)
    async def guarded(*args: Any, **kwargs: Any) -> T:
        try:
            return await callback(*args, **kwargs)
        except Exception:
            logger.exception("Unexpected error in %s", callback.__qualname__)
            return fallback

    return guarded
