"""The Communications this module wrote lately, by reference.

Every one of them comes back as a notification from the shim; knowing it is ours saves a
FHIR read per message (the origin tag would tell, but only after reading the resource).
Bounded: an old write that is forgotten is still recognised by its tag, just later.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable

DEFAULT_SIZE = 10_000


class RecentWrites:
    def __init__(self, size: int = DEFAULT_SIZE) -> None:
        self._order: deque[str] = deque()
        self._known: set[str] = set()
        self._size = size

    def add_all(self, references: Iterable[str]) -> None:
        for reference in references:
            if reference in self._known:
                continue
            self._known.add(reference)
            self._order.append(reference)
            if len(self._order) > self._size:
                self._known.discard(self._order.popleft())

    def __contains__(self, reference: object) -> bool:
        return reference in self._known
