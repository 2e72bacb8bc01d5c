"""The registration gate around the rule: what it asks FHIR, what it holds between the
check and the new account, and what it records (against stand-ins for Synapse and FHIR;
tests/integration/test_registration_gate.py runs the real thing)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import pytest
import pytest_twisted
from synapse.spam_checker_api import RegistrationBehaviour

from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.enforcement.denials import Denied, Reason
from synapse_fhir_module.enforcement.registration_gate import (
    PENDING_SECONDS,
    RegistrationGate,
    verified_email,
)
from synapse_fhir_module.fhir.errors import FhirTransientError
from synapse_fhir_module.fhir.person_directory import PersonDirectory

SERVER = "example.org"
HENK = {
    "resourceType": "Patient",
    "id": "henk",
    "telecom": [{"system": "email", "value": "Henk@Example.org"}],
}
ANNE = {
    "resourceType": "Patient",
    "id": "anne",
    "telecom": [{"system": "email", "value": "anne@example.org"}],
}


class Api:
    def get_qualified_user_id(self, localpart: str) -> str:
        return f"@{localpart}:{SERVER}"


class Fhir:
    """Email searches: HAPI-like, and a little sloppy (the gate checks the answers)."""

    def __init__(self, *persons: dict[str, Any], down: bool = False) -> None:
        self.persons = persons
        self.down = down

    async def search_json(self, resource_type: str, params: Mapping[str, str]) -> list[dict]:
        if self.down:
            raise FhirTransientError("connection refused")
        return [p for p in self.persons if p["resourceType"] == resource_type]


class NobodyNamed(PersonDirectory):
    """The real directory's email searches over the stand-in FHIR; no explicit Matrix ids."""

    async def persons_naming(self, user_id: str) -> dict[str, dict[str, Any]]:
        return {}


class Accounts:
    def __init__(self) -> None:
        self.recorded: list[tuple[str, str, str]] = []

    async def record(self, user_id: str, person: str, established_by: str) -> None:
        self.recorded.append((user_id, person, established_by))

    async def accounts_of(self, person: str) -> list[str]:
        return [user_id for user_id, recorded, _ in self.recorded if recorded == person]


class Clock:
    now = 1000.0

    def __call__(self) -> float:
        return self.now


class Journal:
    def __init__(self) -> None:
        self.noted: list[tuple[str, str | None, str | None, str | None]] = []

    def note(self, kind: DecisionKind, outcome: Outcome, **fields: Any) -> None:
        assert kind is DecisionKind.REGISTRATION
        self.noted.append((outcome.value, fields["user_id"], fields["reason"], fields["detail"]))


def gate(
    fhir: Fhir,
    accounts: Accounts | None = None,
    clock: Clock | None = None,
    journal: Journal | None = None,
) -> RegistrationGate:
    return RegistrationGate(
        Api(),  # type: ignore[arg-type]
        NobodyNamed(fhir),  # type: ignore[arg-type]
        accounts or Accounts(),  # type: ignore[arg-type]
        exempt_users={f"@audit:{SERVER}"},
        monotonic=clock or Clock(),
        journal=journal,  # type: ignore[arg-type]
    )


def verified(address: str) -> dict[str, Any]:
    return {"medium": "email", "address": address, "validated_at": 1}


async def check(g: RegistrationGate, email: dict[str, Any] | None, username: str | None) -> Any:
    return await g.check_registration_for_spam(email, username, [("ua", "127.0.0.1")])


async def refusal(g: RegistrationGate, email: dict[str, Any] | None, username: str | None) -> str:
    with pytest.raises(Denied) as denied:
        await check(g, email, username)
    return denied.value.reason.value


@pytest_twisted.ensureDeferred
async def test_the_identified_person_is_recorded_once_the_account_exists() -> None:
    accounts = Accounts()
    g = gate(Fhir(HENK, ANNE), accounts)
    assert await check(g, verified("henk@example.org"), "henk") is RegistrationBehaviour.ALLOW
    assert accounts.recorded == []  # not yet: the account does not exist
    await g.on_user_registration(f"@henk:{SERVER}")
    assert accounts.recorded == [(f"@henk:{SERVER}", "Patient/henk", "email")]
    await g.on_user_registration(f"@henk:{SERVER}")  # (once)
    await g.on_user_registration(f"@other:{SERVER}")  # made without the check
    assert len(accounts.recorded) == 1


@pytest_twisted.ensureDeferred
async def test_two_registrations_of_one_username_for_different_persons_at_once() -> None:
    clock = Clock()
    g = gate(Fhir(HENK, ANNE), clock=clock)
    assert await check(g, verified("henk@example.org"), "newname") is RegistrationBehaviour.ALLOW
    # Anne's, for the same username, before Henk's completed: which account would be whose?
    assert await refusal(g, verified("anne@example.org"), "newname") == "no_fhir_identity"
    # The same person again is fine; and once Henk's attempt is long over, Anne may.
    assert await check(g, verified("henk@example.org"), "newname") is RegistrationBehaviour.ALLOW
    clock.now += PENDING_SECONDS + 1
    assert await check(g, verified("anne@example.org"), "newname") is RegistrationBehaviour.ALLOW


@pytest_twisted.ensureDeferred
async def test_each_gated_registration_is_noted_for_the_audit_trail_once() -> None:
    journal = Journal()
    g = gate(Fhir(HENK), journal=journal)
    assert await check(g, verified("henk@example.org"), "henk") is RegistrationBehaviour.ALLOW
    assert await refusal(g, None, "piet") == "no_fhir_identity"
    assert await refusal(g, verified("henk@example.org"), None) == "no_fhir_identity"
    # Exempt, made by the module or an admin (no client): not gated.
    await g.check_registration_for_spam(None, "audit", [])
    assert journal.noted == [
        ("success", f"@henk:{SERVER}", None, "email"),
        ("refused", f"@piet:{SERVER}", "no_fhir_identity", None),
        ("refused", None, "no_fhir_identity", None),
    ]


@pytest_twisted.ensureDeferred
async def test_refusals_without_a_person() -> None:
    g = gate(Fhir(HENK))
    assert await refusal(g, None, "henk") == "no_fhir_identity"  # no verified email
    assert await refusal(g, verified("henk@example.org"), None) == "no_fhir_identity"  # guest
    unverified = {"medium": "email", "address": "henk@example.org"}
    assert await refusal(g, unverified, "henk") == "no_fhir_identity"


@pytest_twisted.ensureDeferred
async def test_exempt_users_are_registered_by_the_module_and_admins_only() -> None:
    g = gate(Fhir(down=True))
    # The module's own registration (and Synapse's admin APIs) carry no client details.
    assert await g.check_registration_for_spam(None, "audit", []) is RegistrationBehaviour.ALLOW
    # A client asking for that name first is refused: it would hold the account.
    assert await refusal(g, None, "audit") == "no_fhir_identity"


@pytest_twisted.ensureDeferred
async def test_the_email_alone_makes_one_account_per_person() -> None:
    accounts = Accounts()
    g = gate(Fhir(HENK), accounts)
    assert await check(g, verified("henk@example.org"), "henk") is RegistrationBehaviour.ALLOW
    await g.on_user_registration(f"@henk:{SERVER}")
    # Whoever reads Henk's mailbox cannot collect more usernames for him.
    assert await refusal(g, verified("henk@example.org"), "henk2") == "no_fhir_identity"


@pytest_twisted.ensureDeferred
async def test_fhir_down_refuses_with_directory_unavailable() -> None:
    g = gate(Fhir(HENK, down=True))
    assert await refusal(g, verified("henk@example.org"), "henk") == (
        Reason.DIRECTORY_UNAVAILABLE.value
    )


def test_only_a_validated_email_counts() -> None:
    assert verified_email(verified("a@example.org")) == "a@example.org"
    assert verified_email(None) is None
    assert verified_email({"medium": "msisdn", "address": "31205550000", "validated_at": 1}) is None
    assert verified_email({"medium": "email", "address": "a@example.org"}) is None
    assert verified_email({"medium": "email", "address": " ", "validated_at": 1}) is None
