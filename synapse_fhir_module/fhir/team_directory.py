"""Current CareTeam memberships, from FHIR, kept in memory for access decisions.

One FHIR search per team fetches the CareTeam with everything it reaches
(``_include:iterate`` over participants and PractitionerRole practitioners), and
``care_team.resolve_membership`` turns it into members. Answers are reused for
``enforcement.cache_ttl``; after half of that a background refresh replaces them
before they expire, so busy rooms never wait on FHIR. The cache is a Synapse
``@cached`` function registered with the ModuleApi, so an invalidation on one
worker reaches every worker through Synapse's replication.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Awaitable, Callable, Collection, Sequence
from datetime import datetime, timezone
from typing import Any

import attr
from synapse.module_api import ModuleApi, cached

from synapse_fhir_module.fhir.care_team import (
    AccountsOf,
    TeamMembership,
    explicit_accounts,
    resolve_membership,
)
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import is_fhir_id, reference_of
from synapse_fhir_module.fhir.errors import FhirError, FhirTransientError

logger = logging.getLogger(__name__)

# After a failed fetch, answer "unavailable" at once for this long instead of making
# every decision wait for another FHIR timeout.
UNREACHABLE_BACKOFF = 5.0

# Teams per search when many are loaded at once (one page each).
PREFETCH_BATCH = 25
# Included resources above which a batched answer may have been cut short: HAPI includes
# at most 1000 per page (DEFAULT_MAXIMUM_INCLUDES_TO_LOAD_PER_PAGE) and says nothing.
SAFE_INCLUDES = 800
# Teams whose answers are kept, before Synapse's cache factor (see care_team_membership).
MAX_CACHED_TEAMS = 20_000

# A team's resources → how their persons map to accounts, and what that depended on
# (``email_identity.EmailIdentity.resolver_for``).
Resolver = Callable[[dict[str, dict[str, Any]]], Awaitable[tuple[AccountsOf, frozenset[str]]]]


async def explicit_only(resources: dict[str, dict[str, Any]]) -> tuple[AccountsOf, frozenset[str]]:
    return explicit_accounts, frozenset()


# Stands for "a care-team room whose team cannot be named": it has no members.
UNRESOLVED_TEAM = "CareTeam/#unresolved"

MEMBERSHIP_INCLUDES = [
    ("_include", "CareTeam:participant"),
    ("_include:iterate", "CareTeam:participant"),
    ("_include:iterate", "PractitionerRole:practitioner"),
]


class DirectoryUnavailable(Exception):
    """FHIR cannot be asked and nothing recent enough is remembered."""


@attr.s(frozen=True, auto_attribs=True)
class _Fetched:
    membership: TeamMembership
    fetched_at: float
    references: frozenset[str]  # every resource the answer depended on


class CareTeamDirectory:
    def __init__(
        self,
        api: ModuleApi,
        fhir: FhirClient,
        *,
        ttl: float,
        resolver: Resolver = explicit_only,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._api = api
        self._fhir = fhir
        self._ttl = ttl
        self._resolver = resolver
        self._monotonic = monotonic
        self._unreachable_until = 0.0
        self._refreshing: set[str] = set()
        # When a background reload of a team last failed (no new attempt for a moment).
        self._refresh_failed_at: dict[str, float] = {}
        # Which teams' answers depend on a resource, for invalidation by person.
        self._dependents: dict[str, set[str]] = {}
        # `@cached` needs these two attributes on its owner.
        self.server_name = api.server_name
        self.clock = WallClock()
        api.register_cached_function(self.care_team_membership)

    async def membership(self, team_ref: str) -> TeamMembership:
        """The team's members now; DirectoryUnavailable when FHIR can't tell us."""
        # Fast path: a completed answer, read without going through a Deferred.
        fetched = self.care_team_membership.cache.get_immediate(team_ref, None)
        if fetched is None:
            fetched = await self._cached_or_fetch(team_ref)
        age = self._monotonic() - fetched.fetched_at
        if age >= self._ttl:
            self.care_team_membership.invalidate((team_ref,))
            fetched = await self._cached_or_fetch(team_ref)
        elif _boundary_passed(fetched.membership):
            # A period started or ended since: a member whose period ended already stopped
            # counting, one whose period started counts once FHIR confirms it — asked now,
            # so a newcomer is not refused (and, over federation, banned) meanwhile.
            return await self._past_boundary(team_ref, fetched)
        elif age >= self._ttl / 2:
            self.refresh_soon(team_ref)
        return fetched.membership

    def refresh_soon(self, team_ref: str) -> None:
        """Load the team again in the background; its answer stays usable meanwhile."""
        if team_ref not in self._refreshing and not self._backing_off(team_ref):
            self._refreshing.add(team_ref)
            self._api.run_as_background_process("fhir_refresh_care_team", self._refresh, team_ref)

    async def _past_boundary(self, team_ref: str, fetched: _Fetched) -> TeamMembership:
        """The team loaded again after one of its boundaries; the answer kept (which
        already leaves out whoever's period ended) while that fails or is under way."""
        if team_ref in self._refreshing or self._backing_off(team_ref):
            return fetched.membership
        self._refreshing.add(team_ref)
        try:
            return await self.reload(team_ref)
        except FhirError as e:
            self._refresh_failed_at[team_ref] = self._monotonic()
            logger.info("Reloading %s after a period boundary failed: %s", team_ref, e)
            return fetched.membership
        finally:
            self._refreshing.discard(team_ref)

    def _backing_off(self, team_ref: str) -> bool:
        failed_at = self._refresh_failed_at.get(team_ref)
        if failed_at is None:
            return False
        if self._monotonic() - failed_at < UNREACHABLE_BACKOFF:
            return True
        del self._refresh_failed_at[team_ref]
        return False

    async def fresh_membership(self, team_ref: str, *, since: float) -> TeamMembership:
        """The team's members as FHIR said at ``since`` (monotonic) or later: the kept
        answer if it is that recent, else one loaded now (kept for the decisions too)."""
        fetched = self.care_team_membership.cache.get_immediate(team_ref, None)
        if fetched is not None and fetched.fetched_at >= since:
            return fetched.membership
        try:
            return await self.reload(team_ref)
        except FhirError as e:
            raise DirectoryUnavailable(f"{team_ref}: {e}") from e

    def now(self) -> float:
        """This directory's clock (what ``fresh_membership``'s ``since`` is measured on)."""
        return self._monotonic()

    async def reload(self, team_ref: str) -> TeamMembership:
        """Load the team from FHIR now and keep the answer, without forgetting the old
        one first: decisions meanwhile still answer from memory (a full reconcile)."""
        if self._monotonic() < self._unreachable_until:
            # (Fail fast while FHIR is known to be away: a full reconcile's thousands of
            # checks must not each wait for a timeout.)
            raise FhirTransientError(f"{team_ref}: FHIR was unreachable moments ago")
        before = self.care_team_membership.cache.get_immediate(team_ref, None)
        try:
            fresh = await self._load(team_ref)
        except FhirTransientError:
            self._unreachable_until = self._monotonic() + UNREACHABLE_BACKOFF
            raise
        # Invalidated meanwhile (a change arrived): the next decision loads it again.
        if self.care_team_membership.cache.get_immediate(team_ref, None) is before:
            self.care_team_membership.prefill((team_ref,), fresh)
        return fresh.membership

    async def invalidate_team(self, team_ref: str) -> None:
        """Forget a team's answer on every worker (its CareTeam changed)."""
        await self._api.invalidate_cache(self.care_team_membership, (team_ref,))

    def teams_depending_on(self, reference: str) -> Collection[str]:
        """The teams whose answers (on this instance) used ``reference``: a resource, or
        an address or account consulted for identity by email."""
        return sorted(self._dependents.get(reference, set()))

    async def invalidate_resource(self, reference: str) -> None:
        """Forget every answer that depended on ``reference`` (e.g. ``Practitioner/12``)."""
        for team_ref in sorted(self._dependents.pop(reference, set())):
            await self.invalidate_team(team_ref)

    async def _cached_or_fetch(self, team_ref: str) -> _Fetched:
        if self._monotonic() < self._unreachable_until:
            raise DirectoryUnavailable(f"{team_ref}: FHIR was unreachable moments ago")
        try:
            # (mypy does not see through `@cached`; Synapse types it with its own plugin)
            return await self.care_team_membership(team_ref)  # type: ignore[call-arg, arg-type, misc]
        except FhirTransientError as e:
            self._unreachable_until = self._monotonic() + UNREACHABLE_BACKOFF
            raise DirectoryUnavailable(f"{team_ref}: {e}") from e
        except FhirError as e:
            # FHIR answered but refused: nobody can be shown to be a member.
            raise DirectoryUnavailable(f"{team_ref}: {e}") from e

    # Synapse's cache factor applies (default 0.5: 10,000 teams; bench/scale measures the memory);
    # `caches.per_cache_factors.care_team_membership` in homeserver.yaml scales it.
    @cached(max_entries=MAX_CACHED_TEAMS)
    async def care_team_membership(self, team_ref: str) -> _Fetched:
        # The name is the cache's name in Synapse's cross-worker invalidation.
        return await self._load(team_ref)

    async def _refresh(self, team_ref: str) -> None:
        before = self.care_team_membership.cache.get_immediate(team_ref, None)
        try:
            fresh = await self._load(team_ref)
            # Invalidated (and perhaps re-fetched) meanwhile: what we loaded may be stale.
            if self.care_team_membership.cache.get_immediate(team_ref, None) is before:
                self.care_team_membership.prefill((team_ref,), fresh)
        except FhirError as e:
            self._refresh_failed_at[team_ref] = self._monotonic()
            logger.info("Background refresh of %s failed: %s", team_ref, e)
        finally:
            self._refreshing.discard(team_ref)

    async def prefetch(self, team_refs: Sequence[str]) -> None:
        """Load these teams' answers with one search per ``PREFETCH_BATCH`` teams, for a
        sync about to apply them all (a full reconcile would otherwise search per team)."""
        ids = [ref.split("/", 1)[1] for ref in dict.fromkeys(team_refs)]
        ids = [team_id for team_id in ids if is_fhir_id(team_id)]
        for start in range(0, len(ids), PREFETCH_BATCH):
            chunk = ids[start : start + PREFETCH_BATCH]
            # One page: HAPI's default page size would split the batch into five, each
            # page a search of its own with the includes again (4x slower, measured).
            resources = await self._fhir.search_json(
                "CareTeam",
                [("_id", ",".join(chunk)), ("_count", str(len(chunk))), *MEMBERSHIP_INCLUDES],
            )
            by_ref = _by_reference(resources)
            if len(by_ref) >= len(chunk) + SAFE_INCLUDES:
                # Near HAPI's cap on included resources per page (1000 by default, cut
                # silently): members could be missing. These teams load one by one.
                logger.info("Batched load of %d teams too large; loading each", len(chunk))
                continue
            # One identity resolution for the whole batch (its persons' candidates at once).
            accounts_of, keys = await self._resolver(by_ref)
            for team_id in chunk:
                team_ref = f"CareTeam/{team_id}"
                reached = _reachable(team_ref, by_ref)
                fetched = self._fetched(
                    team_ref, {r: by_ref[r] for r in reached}, accounts_of, keys
                )
                self.care_team_membership.prefill((team_ref,), fetched)

    async def _load(self, team_ref: str) -> _Fetched:
        team_id = team_ref.split("/", 1)[1]
        if not is_fhir_id(team_id):
            membership = TeamMembership(team=team_ref, status="missing", members={})
            return _Fetched(membership, self._monotonic(), frozenset())
        resources = await self._fhir.search_json(
            "CareTeam", [("_id", team_id), *MEMBERSHIP_INCLUDES]
        )
        by_ref = _by_reference(resources)
        accounts_of, keys = await self._resolver(by_ref)
        return self._fetched(team_ref, by_ref, accounts_of, keys)

    def _fetched(
        self,
        team_ref: str,
        by_ref: dict[str, dict[str, Any]],
        accounts_of: AccountsOf,
        identity_keys: frozenset[str],
    ) -> _Fetched:
        if team_ref in by_ref:
            membership = resolve_membership(
                team_ref, by_ref, datetime.now(timezone.utc), accounts_of
            )
        else:
            # Deleted or never existed: a team without members that admits nobody.
            membership = TeamMembership(team=team_ref, status="missing", members={})
        references = frozenset(sys.intern(r) for r in [*by_ref, *identity_keys]) | {team_ref}
        for reference in references:
            self._dependents.setdefault(reference, set()).add(team_ref)
        return _Fetched(membership, self._monotonic(), references)


class WallClock:
    """The clock Synapse's ``@cached`` reads from its owner: the time, for its time-based
    eviction. (ModuleApi offers no clock, and the module imports no Synapse internals.)"""

    def time(self) -> float:
        return time.time()

    def time_msec(self) -> int:
        return int(time.time() * 1000)


def _boundary_passed(membership: TeamMembership) -> bool:
    return membership.next_change is not None and time.time() >= membership.next_change


def _by_reference(resources: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {
        f"{r['resourceType']}/{r['id']}": r
        for r in resources
        if isinstance(r.get("resourceType"), str) and isinstance(r.get("id"), str)
    }


def _reachable(team_ref: str, by_ref: dict[str, dict[str, Any]]) -> set[str]:
    """The resources among ``by_ref`` that ``team_ref`` reaches by references (its own
    answer depends on those only, not on the other teams a batched search returned)."""
    reached: set[str] = set()
    frontier = [team_ref]
    while frontier:
        reference = frontier.pop()
        if reference in reached or reference not in by_ref:
            continue
        reached.add(reference)
        frontier.extend(_references_in(by_ref[reference]))
    return reached


def _references_in(value: Any) -> list[str]:
    if isinstance(value, dict):
        # As membership resolution reads them ("Type/id/_history/2" is "Type/id").
        reference = reference_of(value)
        found = [reference] if reference else []
        for item in value.values():
            found.extend(_references_in(item))
        return found
    if isinstance(value, list):
        return [ref for item in value for ref in _references_in(item)]
    return []
