"""What the module's table code asks of a database cursor.

Every ``*_store.py`` holds plain functions over one cursor, run by Synapse through
``ModuleApi.run_db_interaction`` in one transaction, on SQLite and PostgreSQL alike
(``?`` placeholders: Synapse converts them). They touch the module's own tables only.

The tables' schema version is kept here too, with what moves it forward: ``migrate``
applies the module's migrations in order, each in one transaction, on the instance that
runs background work (see ``synapse_fhir_module.module``).
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

import attr
from twisted.internet import defer

if TYPE_CHECKING:
    from synapse.module_api import ModuleApi

logger = logging.getLogger(__name__)


class Cursor(Protocol):
    def execute(self, sql: str, args: Sequence[Any] = ...) -> Any: ...
    def fetchall(self) -> list[tuple[Any, ...]]: ...
    def fetchone(self) -> tuple[Any, ...] | None: ...

    @property
    def rowcount(self) -> int: ...

    @property
    def description(self) -> Any: ...


# The module's schema version, one row for all its tables. Version 0: no row (a new
# database, or one the first release made, which had no such table).
VERSION_TABLE = "synapse_fhir_schema_version"
_VERSION_ROW = 1


@attr.s(frozen=True, auto_attribs=True)
class Migration:
    """One step forward: ``apply`` brings the tables from ``version - 1`` to ``version``.

    A step must leave the tables usable by the release before it (instances are restarted
    one at a time: those not yet restarted run that release's code on the migrated
    tables), and must hold whatever shape it finds: a part creates its own tables, in
    their newest shape, when it starts, so a table may already be newer than the step, or
    not exist yet."""

    version: int
    purpose: str
    apply: Callable[[Cursor], None]


class SchemaTooNew(Exception):
    """The database was migrated by a newer release of the module than this one."""

    def __init__(self, stored: int, known: int) -> None:
        super().__init__(
            f"the module's tables are at schema version {stored}, and this release of"
            f" synapse-fhir-module knows versions up to {known} only: a newer release"
            " upgraded them. Install that release (or a later one) instead of this one."
        )
        self.stored = stored
        self.known = known


def stored_version(txn: Cursor) -> int:
    """The tables' schema version (creating the version table, at 0, if it is missing)."""
    txn.execute(
        f"CREATE TABLE IF NOT EXISTS {VERSION_TABLE} ("
        " id INTEGER NOT NULL PRIMARY KEY, version INTEGER NOT NULL, migrated_ms BIGINT NOT NULL)"
    )
    txn.execute(
        f"INSERT INTO {VERSION_TABLE} (id, version, migrated_ms) VALUES (?, 0, 0)"
        " ON CONFLICT (id) DO NOTHING",
        (_VERSION_ROW,),
    )
    txn.execute(f"SELECT version FROM {VERSION_TABLE} WHERE id = ?", (_VERSION_ROW,))
    found = txn.fetchone()
    assert found is not None
    return int(found[0])


def apply_migration(txn: Cursor, migration: Migration, now_ms: int) -> bool:
    """Take the tables from ``migration.version - 1`` to it, in this one transaction;
    False when they were not at that version (another instance got there first). The
    version moves first: on PostgreSQL a second instance doing the same waits on that
    row, then finds the version moved."""
    txn.execute(
        f"UPDATE {VERSION_TABLE} SET version = ?, migrated_ms = ? WHERE id = ? AND version = ?",
        (migration.version, now_ms, _VERSION_ROW, migration.version - 1),
    )
    if txn.rowcount != 1:
        return False
    migration.apply(txn)
    return True


def check_order(migrations: Sequence[Migration]) -> None:
    versions = [m.version for m in migrations]
    if versions != list(range(1, len(migrations) + 1)):
        raise ValueError(f"migrations must be versions 1, 2, … in order, not {versions}")


async def migrate(
    run: Callable[..., Awaitable[Any]],
    migrations: Sequence[Migration],
    now_ms: Callable[[], int],
) -> list[Migration]:
    """Bring the tables up to the last of ``migrations``, one transaction per step (``run``:
    ``ModuleApi.run_db_interaction``); the steps applied here. Raises ``SchemaTooNew``."""
    check_order(migrations)
    stored = await run("fhir_schema_version", stored_version)
    if stored > len(migrations):
        raise SchemaTooNew(stored, len(migrations))
    applied = []
    for migration in migrations[stored:]:
        if await run(f"fhir_schema_v{migration.version}", apply_migration, migration, now_ms()):
            applied.append(migration)
    return applied


def columns(txn: Cursor, table: str) -> set[str]:
    """The column names of one of the module's tables (DB-API's ``description``, which
    SQLite and PostgreSQL both fill)."""
    txn.execute(f"SELECT * FROM {table} WHERE 1 = 0")
    return {str(column[0]) for column in txn.description}


RETRY_MS = 5_000


class SchemaUpgrade:
    """The module's tables at this release's schema: migrated, once, where background work
    runs (``runs_here``); checked elsewhere. A database a newer release migrated stops
    the process, as Synapse does for its own schema: the code would misread it."""

    def __init__(
        self,
        api: ModuleApi,
        migrations: Sequence[Migration],
        *,
        runs_here: bool,
        now_ms: Callable[[], int],
        stop: Callable[[], None],
    ) -> None:
        check_order(migrations)
        self._api = api
        self._migrations = migrations
        self._runs_here = runs_here
        self._now_ms = now_ms
        self._stop = stop
        self._done = False
        self._lock = defer.DeferredLock()

    def start(self) -> None:
        self._api.delayed_background_call(0, self._start, desc="fhir_schema_upgrade")

    async def _start(self) -> None:
        try:
            await self.ready()
        except SchemaTooNew:
            return  # (stopping)
        except Exception as e:
            logger.warning("Could not check the module's schema (%s); trying again in 5 s", e)
            self._api.delayed_background_call(RETRY_MS, self._start, desc="fhir_schema_upgrade")

    async def ready(self) -> None:
        """Return once the tables are at this release's schema (migrating them here)."""
        async with self._lock:
            if self._done:
                return
            try:
                if self._runs_here:
                    applied = await migrate(
                        self._api.run_db_interaction, self._migrations, self._now_ms
                    )
                    for migration in applied:
                        logger.info("Schema version %d: %s", migration.version, migration.purpose)
                else:
                    # (Not migrating: the worker does. A step leaves the tables usable by
                    # the release before it, so this instance works either way.)
                    stored = await self._api.run_db_interaction(
                        "fhir_schema_version", stored_version
                    )
                    if stored > len(self._migrations):
                        raise SchemaTooNew(stored, len(self._migrations))
            except SchemaTooNew as e:
                logger.critical("Refusing to run: %s", e)
                self._stop()
                raise
            self._done = True
