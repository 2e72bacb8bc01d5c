"""What the module's table code asks of a database cursor.

Every ``*_store.py`` holds plain functions over one cursor, run by Synapse through
``ModuleApi.run_db_interaction`` in one transaction, on SQLite and PostgreSQL alike
(``?`` placeholders: Synapse converts them). They touch the module's own tables only.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Protocol


class Cursor(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...
    def fetchall(self) -> list[tuple[Any, ...]]: ...
    def fetchone(self) -> tuple[Any, ...] | None: ...

    @property
    def rowcount(self) -> int: ...
