"""Identity by email (issue 12): address → account from memory at scale, and what email
identity does to care-team decisions.

    python -m bench.identity_resolution [--persons N] [--runs N] [--rounds R] [--smoke]
        [--fhir URL [--hapi-pid PID]]

Two parts, each with its baseline measured in the same run the same way:

- **From memory, N persons x N accounts** (default 10,000): the module's own
  ``EmailIdentity.account_of_email`` (what identity lookups answer from) once every
  address was decided, against the explicit-Matrix-id path's memory read
  (``PersonDirectory.remembered``). The directory here reads a FHIR stand-in in memory:
  only the remembered answers are timed, never FHIR.
- **Decisions**, against the real HAPI: two teams of the same people, one naming their
  accounts explicitly and one by OZO email identifiers (accounts' addresses from a stand-in
  for Synapse's 3PIDs). ``CareTeamGate.user_may_join_room`` for a member, cached and cold
  (the team's answer forgotten first: the email team's load also looks its candidates up).

Each measure is timed in R rounds; the table shows the median, min and max of the
rounds' p50 and p99.
"""

from __future__ import annotations

import argparse
import random
import uuid
from collections.abc import Collection, Iterable, Mapping
from typing import Any

from synapse.module_api import NOT_SPAM

from bench._common import Row, Target, add_stack_arguments, report, stack
from bench._module_parts import BenchApi, MappedBinding, Rounds, run_in_reactor, timed_rounds
from devstack.fhir_seed import FhirSeeder
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.enforcement.gate import CareTeamGate
from synapse_fhir_module.fhir.client import FhirClient
from synapse_fhir_module.fhir.conventions import MATRIX_ID_SYSTEM
from synapse_fhir_module.fhir.person_directory import PersonDirectory
from synapse_fhir_module.fhir.team_directory import CareTeamDirectory
from synapse_fhir_module.identity.email_identity import EmailIdentity

NAME = "identity_resolution"
OZO_EMAIL = "https://www.ozoverbindzorg.nl/namingsystem/email"
SERVER = "example.org"
MEMORY_P50_US = 50.0
# "Decision latency unchanged (≥ 0.95x)": the email team's decision takes at most 1/0.95.
DECISION_RATIO = 1 / 0.95
TEAM_SIZE = 10


class MemoryEmails:
    """Synapse's email 3PIDs and the module's copy of them, as two dicts."""

    enabled = True

    def __init__(self, addresses: Mapping[str, str]) -> None:
        self._of_account = {user: {address} for user, address in addresses.items()}
        self._holders: dict[str, set[str]] = {}
        for user, address in addresses.items():
            self._holders.setdefault(address, set()).add(user)

    async def of_account(self, user_id: str) -> dict[str, int]:
        return dict.fromkeys(self._of_account.get(user_id, set()), 1)

    async def accounts_with(self, addresses: Collection[str]) -> dict[str, set[str]]:
        return {a: set(self._holders[a]) for a in addresses if a in self._holders}

    async def all_addresses(self) -> list[str]:
        return sorted(self._holders)

    async def create_table(self) -> None:
        pass

    async def spellings(self, addresses: Collection[str]) -> dict[str, set[str]]:
        return {}

    async def remember_spellings(self, pairs: Collection[tuple[str, str]]) -> None:
        pass

    async def confirm_tie(self, user_id: str, address: str, person: str, validated: int) -> bool:
        return True


class NoRecords:
    """No account was registered under the registration gate."""

    async def persons_of(self, user_ids: Iterable[str]) -> dict[str, str]:
        return {}

    async def accounts_of_persons(self, persons: Iterable[str]) -> dict[str, list[str]]:
        return {}


class MemoryFhir:
    """Token searches over persons held in memory (the ones PersonDirectory makes)."""

    def __init__(self, persons: list[dict[str, Any]]) -> None:
        self._by_token: dict[tuple[str, str, str], list[dict[str, Any]]] = {}
        for person in persons:
            kind = person["resourceType"]
            for identifier in person.get("identifier", []):
                token = f"{identifier['system']}|{identifier['value']}"
                self._by_token.setdefault((kind, "identifier", token), []).append(person)

    async def search_json(self, resource_type: str, params: Any) -> list[dict[str, Any]]:
        found: dict[str, dict[str, Any]] = {}
        for name, value in dict(params).items():
            for token in value.split(","):
                for person in self._by_token.get((resource_type, name, token), []):
                    found[person["id"]] = person
        return list(found.values())


def practitioner(
    key: str, *, user_id: str | None = None, address: str | None = None
) -> dict[str, Any]:
    identifier = []
    if user_id:
        identifier.append({"system": MATRIX_ID_SYSTEM, "value": user_id})
    if address:
        identifier.append({"system": OZO_EMAIL, "value": address})
    return {"resourceType": "Practitioner", "id": key, "active": True, "identifier": identifier}


async def measure_memory(persons: int, runs: int, rounds: int) -> dict[str, Rounds]:
    tag = uuid.uuid4().hex[:8]
    users = [f"@u{i}_{tag}:{SERVER}" for i in range(persons)]
    addresses = [f"u{i}-{tag}@care.example" for i in range(persons)]
    by_email = [practitioner(f"e{i}-{tag}", address=a) for i, a in enumerate(addresses)]
    explicit = [practitioner(f"x{i}-{tag}", user_id=u) for i, u in enumerate(users)]
    fhir: Any = MemoryFhir(by_email + explicit)
    # Explicit: the accounts named by the x-persons. Email: other accounts, same addresses.
    email_users = [f"@m{i}_{tag}:{SERVER}" for i in range(persons)]
    emails: Any = MemoryEmails(dict(zip(email_users, addresses, strict=True)))
    directory = PersonDirectory(fhir, emails=emails, email_identifier_systems=[OZO_EMAIL])
    identity = EmailIdentity(BenchApi(), directory, NoRecords(), emails)  # type: ignore[arg-type]
    await directory.refresh(users)
    for address in addresses:  # every address decided once: from here on, memory
        await identity.account_of_email(address)
    assert await identity.account_of_email(addresses[0]) == email_users[0]
    assert directory.remembered(users[0]).person == f"Practitioner/x0-{tag}"  # type: ignore[union-attr]

    picks = random.Random(7)
    order = [picks.randrange(persons) for _ in range(runs)]

    async def by_address(i: int) -> str | None:
        return await identity.account_of_email(addresses[order[i % runs]])

    async def explicit_read(i: int) -> Any:
        return directory.remembered(users[order[i % runs]])

    per_round = max(runs // rounds, 1)
    return {
        "explicit": await timed_rounds(explicit_read, rounds=rounds, per_round=per_round),
        "email": await timed_rounds(by_address, rounds=rounds, per_round=per_round),
    }


async def measure_decisions(fhir_url: str, runs: int, rounds: int) -> dict[str, Rounds]:
    tag = uuid.uuid4().hex[:8]
    explicit_users = [f"@x{i}_{tag}:{SERVER}" for i in range(TEAM_SIZE)]
    email_users = [f"@e{i}_{tag}:{SERVER}" for i in range(TEAM_SIZE)]
    addresses = [f"e{i}-{tag}@care.example" for i in range(TEAM_SIZE)]
    people = [practitioner(f"x{i}-{tag}", user_id=u) for i, u in enumerate(explicit_users)]
    people += [practitioner(f"e{i}-{tag}", address=a) for i, a in enumerate(addresses)]
    teams = {
        kind: {
            "resourceType": "CareTeam",
            "id": f"{kind}-{tag}",
            "status": "active",
            "participant": [
                {"member": {"reference": f"Practitioner/{prefix}{i}-{tag}"}}
                for i in range(TEAM_SIZE)
            ],
        }
        for kind, prefix in (("explicit", "x"), ("email", "e"))
    }
    FhirSeeder(fhir_url).put_all([*people, *teams.values()])
    fhir = FhirClient(FhirConfig(base_url=fhir_url, timeout=10.0))
    api: Any = BenchApi()
    emails: Any = MemoryEmails(dict(zip(email_users, addresses, strict=True)))
    directory = PersonDirectory(fhir, emails=emails, email_identifier_systems=[OZO_EMAIL])
    identity = EmailIdentity(api, directory, NoRecords(), emails)  # type: ignore[arg-type]
    team_directory = CareTeamDirectory(api, fhir, ttl=3600.0, resolver=identity.resolver_for)
    rooms = {f"!{kind}:{SERVER}": f"CareTeam/{kind}-{tag}" for kind in teams}
    gate = CareTeamGate(
        MappedBinding(rooms),  # type: ignore[arg-type]
        team_directory,
        service_user_id=f"@fhir:{SERVER}",
        exempt_users=(),
        fail_closed=True,
        is_local=api.is_mine,
        remove_member_soon=lambda room_id, user_id: None,
    )
    member = {"explicit": explicit_users[3], "email": email_users[3]}

    def decide(kind: str, *, cold: bool) -> Any:
        async def call(_: int) -> str:
            if cold:
                await team_directory.invalidate_team(f"CareTeam/{kind}-{tag}")
            return await gate.user_may_join_room(member[kind], f"!{kind}:{SERVER}", False)

        return call

    for kind in teams:  # both members are let in (else the figures would be of refusals)
        assert await decide(kind, cold=False)(0) == NOT_SPAM, kind

    per_round = max(runs // rounds, 1)
    cold_per_round = max(per_round // 50, 10)
    results: dict[str, Rounds] = {}
    for kind in teams:  # warm both code paths and HAPI's JIT on both queries
        await timed_rounds(decide(kind, cold=True), rounds=1, per_round=cold_per_round)
    for label, cold, size in (("cached", False, per_round), ("cold", True, cold_per_round)):
        # The two teams take turns round by round: both see the same machine.
        for kind in teams:
            results[f"{label} {kind}"] = Rounds([], [], 0)
        for _ in range(rounds):
            for kind in teams:
                one = await timed_rounds(decide(kind, cold=cold), rounds=1, per_round=size)
                into = results[f"{label} {kind}"]
                into.p50 += one.p50
                into.p99 += one.p99
                into.calls += one.calls
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--persons", type=int, default=10_000, help="persons and accounts")
    parser.add_argument("--runs", type=int, default=20_000, help="calls per memory measure")
    parser.add_argument("--rounds", type=int, default=5)
    add_stack_arguments(parser)
    args = parser.parse_args()
    persons = min(args.persons, 200) if args.smoke else args.persons
    runs = min(args.runs, 500) if args.smoke else args.runs
    rounds = min(args.rounds, 3) if args.smoke else args.rounds

    with stack(NAME, args) as the_stack:

        async def both() -> tuple[dict[str, Rounds], dict[str, Rounds]]:
            memory = await measure_memory(persons, runs, rounds)
            return memory, await measure_decisions(the_stack.fhir_url, runs, rounds)

        memory, decisions = run_in_reactor(both)
        explicit = memory["explicit"].rows(
            f"explicit Matrix id, from memory ({persons:,} accounts; baseline)", "µs"
        )
        cached_explicit = decisions["cached explicit"].rows(
            "cached decision, explicit ids (baseline)", "µs"
        )
        cold_explicit = decisions["cold explicit"].rows(
            "cold decision, explicit ids (baseline)", "ms"
        )
        rows: list[Row] = [
            *explicit,
            *memory["email"].rows(
                f"address → account, from memory ({persons:,} persons x {persons:,} accounts)",
                "µs",
                baseline=explicit,
                p50_target=Target("<=", MEMORY_P50_US),
                note="EmailIdentity.account_of_email once every address was decided",
            ),
            *cached_explicit,
            *decisions["cached email"].rows(
                "cached decision, members by email",
                "µs",
                baseline=cached_explicit,
                p50_target=Target("<=", round(DECISION_RATIO, 3), of_ratio=True),
                note="latency ratio ≤ 1.053x, i.e. speed ≥ 0.95x",
            ),
            *cold_explicit,
            *decisions["cold email"].rows(
                "cold decision, members by email",
                "ms",
                baseline=cold_explicit,
                note="the team's load also looks its candidate accounts up in FHIR",
            ),
        ]
        report(
            NAME,
            "Identity by email: address → account from memory, and care-team decisions",
            rows,
            the_stack=the_stack,
            parameters={
                "persons": persons,
                "runs": runs,
                "rounds": rounds,
                "team_size": TEAM_SIZE,
            },
        )


if __name__ == "__main__":
    main()
