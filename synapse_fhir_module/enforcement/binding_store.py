"""The module's own record of what it bound (``synapse_fhir_bindings``, in Synapse's database).

Room state says which care team a room belongs to, but room state can change behind the
module's back: an admin acting as the service user, state resolution after a fork, a state
reset. The module's record is authoritative (design.md: mapping): a room the module bound belongs to
that team whatever its state says now, and state that disagrees is repaired.

One row per room: a care team's space (``space_id`` NULL; ``thread`` set once messages
sent in the space itself opened one) or a thread's room (``thread`` = its
CommunicationRequest, ``space_id`` = the space that lists it). A thread room stays with
the team it was made for (``care_team``, its *first* team) even if its CommunicationRequest
is later addressed elsewhere in FHIR: moving a conversation, history and all, away from a
team is not a FHIR writer's call.

A thread addressed to several CareTeams (OZO) has further teams in
``synapse_fhir_binding_teams`` (room, team): their members share the room and their
spaces list it too. Rows made before that table existed simply have no further teams.

Functions take a cursor (Synapse's ``LoggingTransaction`` in ``run_db_interaction``); the
SQL runs on SQLite and PostgreSQL alike.
"""

from __future__ import annotations

import attr

from synapse_fhir_module.storage import Cursor

TABLE = "synapse_fhir_bindings"
TEAMS = "synapse_fhir_binding_teams"

SCHEMA = (
    f"""
    CREATE TABLE IF NOT EXISTS {TABLE} (
        room_id TEXT NOT NULL PRIMARY KEY,
        care_team TEXT NOT NULL,
        thread TEXT,
        space_id TEXT,
        bound_ms BIGINT NOT NULL
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TABLE}_team ON {TABLE} (care_team)",
    f"""
    CREATE TABLE IF NOT EXISTS {TEAMS} (
        room_id TEXT NOT NULL,
        care_team TEXT NOT NULL,
        PRIMARY KEY (room_id, care_team)
    )
    """,
    f"CREATE INDEX IF NOT EXISTS {TEAMS}_team ON {TEAMS} (care_team)",
)


@attr.s(frozen=True, auto_attribs=True)
class Binding:
    room_id: str
    care_team: str  # "CareTeam/12"
    thread: str | None = None  # "CommunicationRequest/7"
    space_id: str | None = None  # the team's space, for a thread's room; None for the space
    # A thread room's further teams (sorted), whose spaces list it too.
    further_teams: tuple[str, ...] = ()

    @property
    def is_space(self) -> bool:
        return self.space_id is None

    @property
    def teams(self) -> tuple[str, ...]:
        """Every team of the room, the one it was made for first."""
        return (self.care_team, *self.further_teams)


def create_schema(txn: Cursor) -> None:
    for statement in SCHEMA:
        txn.execute(statement)


def bind(txn: Cursor, binding: Binding, now_ms: int) -> None:
    """Record (or correct) what the module bound a room to, its further teams included."""
    txn.execute(
        f"INSERT INTO {TABLE} (room_id, care_team, thread, space_id, bound_ms)"
        " VALUES (?, ?, ?, ?, ?) ON CONFLICT (room_id) DO UPDATE SET"
        " care_team = excluded.care_team, thread = excluded.thread,"
        " space_id = excluded.space_id",
        (binding.room_id, binding.care_team, binding.thread, binding.space_id, now_ms),
    )
    txn.execute(f"DELETE FROM {TEAMS} WHERE room_id = ?", (binding.room_id,))
    for team in sorted(set(binding.further_teams) - {binding.care_team}):
        txn.execute(
            f"INSERT INTO {TEAMS} (room_id, care_team) VALUES (?, ?)", (binding.room_id, team)
        )


def binding_of(txn: Cursor, room_id: str) -> Binding | None:
    txn.execute(
        f"SELECT room_id, care_team, thread, space_id FROM {TABLE} WHERE room_id = ?",
        (room_id,),
    )
    row = txn.fetchone()
    return None if row is None else _with_teams(txn, Binding(*row))


def bindings_of_team(txn: Cursor, care_team: str) -> list[Binding]:
    """The team's space and thread rooms (those it was made for, and those it shares as a
    further team), the space first."""
    shared = f"SELECT room_id FROM {TEAMS} WHERE care_team = ?"
    txn.execute(
        f"SELECT room_id, care_team, thread, space_id FROM {TABLE} WHERE care_team = ?"
        f" OR room_id IN ({shared}) ORDER BY space_id IS NOT NULL, room_id",
        (care_team, care_team),
    )
    bindings = [Binding(*row) for row in txn.fetchall()]
    # Every room's further teams in one query (a team may have thousands of rooms).
    txn.execute(
        f"SELECT t.room_id, t.care_team FROM {TEAMS} t JOIN {TABLE} b ON b.room_id = t.room_id"
        f" WHERE b.care_team = ? OR t.room_id IN ({shared}) ORDER BY t.room_id, t.care_team",
        (care_team, care_team),
    )
    further: dict[str, list[str]] = {}
    for room_id, team in txn.fetchall():
        further.setdefault(str(room_id), []).append(str(team))
    return [
        attr.evolve(b, further_teams=tuple(further[b.room_id])) if b.room_id in further else b
        for b in bindings
    ]


def bound_teams(txn: Cursor) -> list[str]:
    """Every CareTeam the module bound a room to (as its first or a further team)."""
    txn.execute(
        f"SELECT care_team FROM {TABLE} UNION SELECT care_team FROM {TEAMS} ORDER BY care_team"
    )
    return [str(team) for (team,) in txn.fetchall()]


def spaces_page(txn: Cursor, after: str | None, limit: int) -> list[tuple[str, str]]:
    """(care team, space id) of the teams the module made a space for, by reference,
    ``limit`` of them from after ``after`` (a page of the operator console)."""
    txn.execute(
        f"SELECT care_team, room_id FROM {TABLE} WHERE space_id IS NULL AND care_team > ?"
        " ORDER BY care_team, room_id LIMIT ?",
        ("" if after is None else after, limit),
    )
    return [(str(team), str(room_id)) for team, room_id in txn.fetchall()]


def spaces_of_team(txn: Cursor, care_team: str) -> list[tuple[str, str]]:
    """(care team, space id) of one team's space (none, or one: the module makes one)."""
    txn.execute(
        f"SELECT care_team, room_id FROM {TABLE} WHERE space_id IS NULL AND care_team = ?"
        " ORDER BY room_id",
        (care_team,),
    )
    return [(str(team), str(room_id)) for team, room_id in txn.fetchall()]


def _with_teams(txn: Cursor, binding: Binding) -> Binding:
    txn.execute(
        f"SELECT care_team FROM {TEAMS} WHERE room_id = ? ORDER BY care_team",
        (binding.room_id,),
    )
    further = tuple(str(team) for (team,) in txn.fetchall())
    return attr.evolve(binding, further_teams=further) if further else binding
