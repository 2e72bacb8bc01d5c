"""audit.enabled against a real Synapse with the module (A, registration gated by FHIR
identity, federating with a plain Synapse B), the real HAPI dev server and real email
verification: every kind of decision the module makes becomes exactly one AuditEvent in
HAPI, valid R4 (the R4B models and HAPI's own ``$validate``), carrying no message text;
with audit off nothing reaches FHIR while the journal still keeps the refusals; a FHIR
outage and a Synapse restart lose nothing and write nothing twice.

FHIR changes reach the module through ``notify`` (what the HAPI shim would send), and its
sweep runs hourly: whatever the sync does here, a test asked for it.
"""

from __future__ import annotations

import sqlite3
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import attr
import pytest
import requests
from fhir.resources.R4B.auditevent import AuditEvent

from devstack.email_registration import register_with_email
from devstack.federation import free_ports, loopback_server_name
from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.rooms import create_bound_space, create_room_in_space, service_session
from devstack.smtp import SmtpServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.audit import journal_store
from synapse_fhir_module.audit.decision import DecisionKind, Outcome
from synapse_fhir_module.audit.journal_store import JournalRow
from synapse_fhir_module.fhir.conventions import AUDIT_ID_SYSTEM, ORIGIN_TAG
from tests.conftest import SERVER_LOGS
from tests.integration.care_network import TwoServerNames
from tests.integration.matrix_views import open_invites

SHIPPED_WITHIN = 60.0
APPLIED_WITHIN = 60.0
FEDERATION_TIMEOUT = 60.0
RELAYED_TEXT = "Wondverband vandaag verschoond, geen roodheid"
SENT_TEXT = "Ik kom morgen om tien uur langs"
REQUEST_TEXT = "Graag dagelijks de wond fotograferen"
FHIR_JSON = {"Content-Type": "application/fhir+json"}
AUDIT_CONFIG = {"enabled": True, "poll_interval": "250ms", "batch_size": 20}


def telecom(user_id: str, email: str | None = None) -> dict[str, Any]:
    points = [{"system": "url", "value": f"matrix:u/{user_id.removeprefix('@')}"}]
    if email:
        points.append({"system": "email", "value": email})
    return {"telecom": points}


@attr.s(auto_attribs=True, frozen=True)
class Network(TwoServerNames):
    """A care team whose patient and nurses are on A and whose GP is on B."""

    def email(self, name: str) -> str:
        return f"{name}.{self.tag}@example.org"

    @property
    def patient(self) -> str:
        return self.ref("Patient", "patient")

    def person(self, resource_type: str, name: str, identity: dict[str, Any]) -> dict[str, Any]:
        return {
            "resourceType": resource_type,
            "id": f"{name}-{self.tag}",
            "active": True,
            **identity,
        }

    def care_team(self, *, lena_until: str | None = None) -> dict[str, Any]:
        def member(ref: str, period: dict[str, str] | None = None) -> dict[str, Any]:
            found: dict[str, Any] = {"member": {"reference": ref, "type": ref.split("/")[0]}}
            if period:
                found["period"] = period
            return found

        lena = {"end": lena_until} if lena_until else None
        return {
            "resourceType": "CareTeam",
            "id": f"team-{self.tag}",
            "status": "active",
            "name": "Wijkteam",
            "subject": {"reference": self.patient, "type": "Patient"},
            "participant": [
                member(self.patient),
                member(self.ref("Practitioner", "anna")),
                member(self.ref("Practitioner", "lena"), lena),
                member(self.ref("Practitioner", "gp")),
            ],
        }

    def resources(self) -> list[dict[str, Any]]:
        return [
            self.person("Patient", "patient", {}),
            self.person("Practitioner", "anna", telecom(self.on_a("anna"), self.email("anna"))),
            self.person("Practitioner", "lena", telecom(self.on_a("lena"), self.email("lena"))),
            # Known to FHIR, in no team of this patient.
            self.person("Practitioner", "olga", telecom(self.on_a("olga"), self.email("olga"))),
            self.person("Practitioner", "gp", telecom(self.on_b("gp"))),
            self.care_team(),
        ]


@attr.s(auto_attribs=True)
class Audited:
    a: SynapseServer
    b: SynapseServer
    hapi: HapiDevServer
    smtp: SmtpServer


@pytest.fixture(scope="module")
def audited(own_hapi: HapiDevServer, run_dir: Path, smtp: SmtpServer) -> Iterator[Audited]:
    """A (the module, audit on, registration gated, the sync on) and B (plain Synapse)."""
    port_a, port_b = free_ports(2)
    name_a, name_b = loopback_server_name(port_a), loopback_server_name(port_b)
    root = f"@root_audit:{name_a}"
    config = module_config(
        own_hapi.base_url,
        sync={"enabled": True, "poll_interval": "1h"},
        audit=AUDIT_CONFIG,
        registration={"require_fhir_identity": True},
        enforcement={"exempt_users": [root]},
    )
    a = SynapseServer(
        run_dir / "synapse-audit-a",
        config,
        federation_port=port_a,
        federation_peers=[name_b],
        extra_config={
            "enable_registration": True,
            "registrations_require_3pid": ["email"],
            "email": smtp.synapse_config(),
        },
    )
    b = SynapseServer(
        run_dir / "synapse-audit-b", None, federation_port=port_b, federation_peers=[name_a]
    )
    started: list[SynapseServer] = []
    try:
        for server in (a, b):
            SERVER_LOGS.extend([server.log_path, server.process.log_path])
            started.append(server)
            server.start()
        yield Audited(a, b, own_hapi, smtp)
    finally:
        for server in started:
            server.stop()


@pytest.fixture(scope="module")
def root(audited: Audited) -> MatrixUser:
    """A's server admin (exempt from the registration gate), registered once."""
    return register_user(audited.a, "root_audit", admin=True)


@pytest.fixture
def hapi_back(audited: Audited) -> Iterator[HapiDevServer]:
    """Whatever a test does to HAPI, the next one finds it running."""
    yield audited.hapi
    if not audited.hapi.process.running:
        audited.hapi.start()


# -- what the journal and FHIR hold ----------------------------------------------------


def journal(server: SynapseServer) -> list[JournalRow]:
    """Every journal row of ``server``, oldest first (read from its SQLite file)."""
    connection = sqlite3.connect(f"file:{server.workdir / 'homeserver.db'}?mode=ro", uri=True)
    try:
        try:
            return journal_store.every_row(connection.cursor())
        except sqlite3.OperationalError as e:
            if "no such table" in str(e):
                return []
            raise
    finally:
        connection.close()


def rows_of(server: SynapseServer, kind: DecisionKind, **fields: Any) -> list[JournalRow]:
    return [
        row
        for row in journal(server)
        if row.decision.kind is kind
        and all(getattr(row.decision, k) == v for k, v in fields.items())
    ]


def one_row(server: SynapseServer, kind: DecisionKind, what: str, **fields: Any) -> JournalRow:
    """The single journal row of this decision, once it is there and shipped."""

    def shipped() -> list[JournalRow] | None:
        rows = rows_of(server, kind, **fields)
        return rows if rows and all(r.shipped_ms for r in rows) else None

    found = wait_until(shipped, timeout=SHIPPED_WITHIN, what=f"{what}: journaled and shipped")
    assert len(found) == 1, [r.decision for r in found]
    return found[0]


def search(hapi: HapiDevServer, params: dict[str, str]) -> list[dict[str, Any]]:
    found: list[dict[str, Any]] = []
    url: str | None = f"{hapi.base_url}/AuditEvent?{urlencode({**params, '_count': '500'})}"
    while url:
        response = requests.get(url, timeout=60)
        response.raise_for_status()
        bundle = response.json()
        found.extend(e["resource"] for e in bundle.get("entry") or [])
        url = next(
            (link["url"] for link in bundle.get("link", []) if link["relation"] == "next"), None
        )
    return found


def events_of(hapi: HapiDevServer, audit_id: str) -> list[dict[str, Any]]:
    return search(hapi, {"_tag": f"{AUDIT_ID_SYSTEM}|{audit_id}"})


def the_event(hapi: HapiDevServer, row: JournalRow) -> dict[str, Any]:
    """The AuditEvent of ``row``: exactly one, valid R4, the module's."""
    found = events_of(hapi, row.decision.audit_id)
    assert len(found) == 1, f"{len(found)} AuditEvents for {row.decision}"
    event = found[0]
    AuditEvent.model_validate(event)
    assert ORIGIN_TAG in event["meta"]["tag"]
    return event


def hapi_errors(hapi: HapiDevServer, resource: dict[str, Any]) -> list[str]:
    """HAPI's own validator's errors for ``resource`` (``$validate``)."""
    response = requests.post(
        f"{hapi.base_url}/AuditEvent/$validate", json=resource, headers=FHIR_JSON, timeout=300
    )
    outcome = response.json()
    assert outcome["resourceType"] == "OperationOutcome", outcome
    return [
        f"{issue.get('severity')}: {issue.get('diagnostics')} at {issue.get('expression')}"
        for issue in outcome.get("issue", [])
        if issue.get("severity") in ("error", "fatal")
    ]


def codes(event: dict[str, Any]) -> tuple[str, str, str, str]:
    return (event["type"]["code"], event["subtype"][0]["code"], event["action"], event["outcome"])


def agents(event: dict[str, Any]) -> list[tuple[str | None, str | None, bool]]:
    """(altId, who.reference, requestor) of each agent."""
    return [(a.get("altId"), a["who"].get("reference"), a.get("requestor")) for a in event["agent"]]


def entities(event: dict[str, Any]) -> list[str]:
    """Each entity as its reference, or ``room:<id>``."""
    found = []
    for entity in event.get("entity", []):
        what = entity["what"]
        found.append(what.get("reference") or f"room:{what['identifier']['value']}")
    return found


# -- Matrix ----------------------------------------------------------------------------


def invited_to(user: MatrixUser, reference: str) -> str | None:
    """The room ``user`` is invited to that is bound to ``reference`` (team or thread)."""
    invites = open_invites(user)
    return next((room for room, ref in sorted(invites.items()) if ref == reference), None)


def membership_on(viewer: MatrixUser, room_id: str, user_id: str) -> str | None:
    path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/m.room.member/{quote(user_id)}"
    try:
        return str(viewer.request("GET", path)["membership"])
    except MatrixError as e:
        if e.status == 404:
            return None
        raise


def join_over_federation(user: MatrixUser, room_id: str, via: str) -> None:
    query = urlencode({"via": via, "server_name": via})
    user.request("POST", f"/_matrix/client/v3/join/{quote(room_id)}?{query}", {})


def refused(action: Callable[[], object]) -> MatrixError:
    with pytest.raises(MatrixError) as caught:
        action()
    return caught.value


def registered(stack: Audited, network: Network, name: str) -> MatrixUser:
    response = register_with_email(
        stack.a, stack.smtp, network.localpart(name), network.email(name)
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return MatrixUser(stack.a, body["user_id"], body["access_token"])


def test_each_kind_of_decision_is_one_valid_audit_event_in_fhir(
    audited: Audited, root: MatrixUser
) -> None:
    a, b, hapi = audited.a, audited.b, audited.hapi
    network = Network(uuid.uuid4().hex[:8], a.server_name, b.server_name)
    service_id = a.user_id("fhir")
    fhir = FhirSeeder(hapi.base_url)
    fhir.put_all(network.resources())

    # Registrations through the FHIR identity gate: allowed (their own username and
    # verified email) and refused (an address no person in the record carries).
    anna = registered(audited, network, "anna")
    lena = registered(audited, network, "lena")
    olga = registered(audited, network, "olga")
    nobody = network.localpart("nobody")
    response = register_with_email(a, audited.smtp, nobody, network.email("nobody"))
    assert response.status_code == 403, response.text
    gp = register_user(b, network.localpart("gp"))
    mallory = register_user(b, network.localpart("mallory"))

    # FHIR → Matrix: the team's space, each member invited.
    a.notify(network.team)
    space = wait_until(
        lambda: invited_to(anna, network.team), timeout=APPLIED_WITHIN, what="anna invited"
    )
    anna.join(space)
    wait_until(
        lambda: invited_to(lena, network.team) == space, timeout=APPLIED_WITHIN, what="lena invited"
    )
    lena.join(space)
    anna.send_text(space, SENT_TEXT)

    # A refused join (someone FHIR knows, not in this team) and a refused invite by her.
    error = refused(lambda: olga.join(space))
    assert (error.status, error.reason) == (403, "not_in_care_team")
    error = refused(lambda: olga.invite(space, anna.user_id))
    assert error.status == 403, error

    # A thread: its room, a relayed Communication from another system.
    thread = network.ref("CommunicationRequest", "thread")
    fhir.put(
        {
            "resourceType": "CommunicationRequest",
            "id": thread.split("/")[1],
            "status": "active",
            "subject": {"reference": network.patient},
            "recipient": [{"reference": network.team, "type": "CareTeam"}],
            "payload": [{"contentString": REQUEST_TEXT}],
        }
    )
    a.notify(thread)
    room = wait_until(
        lambda: invited_to(anna, thread),
        timeout=APPLIED_WITHIN,
        what="anna invited to the thread's room",
    )
    anna.join(room)
    communication = network.ref("Communication", "lab")
    fhir.put(
        {
            "resourceType": "Communication",
            "id": communication.split("/")[1],
            "status": "completed",
            "partOf": [{"reference": thread}],
            "sender": {"reference": network.ref("Practitioner", "lena")},
            "payload": [{"contentString": RELAYED_TEXT}],
        }
    )
    a.notify(communication)

    # A removal: Lena's participation ends.
    fhir.put(network.care_team(lena_until="2020-01-01"))
    a.notify(network.team)
    wait_until(
        lambda: membership_on(anna, space, lena.user_id) == "leave",
        timeout=APPLIED_WITHIN,
        what="lena removed",
    )

    # A ban: a remote outsider whose server lets her into a public room of the team
    # (B does the join itself once its GP is in the room; A soft-fails it and bans her).
    service = service_session(root)
    own_space = create_bound_space(service, network.team)
    public = create_room_in_space(service, own_space, public=True)
    join_over_federation(gp, public, a.server_name)
    gp.request("GET", f"/_matrix/client/v3/rooms/{quote(public)}/members")
    join_over_federation(mallory, public, a.server_name)
    wait_until(
        lambda: membership_on(service, public, mallory.user_id) == "ban",
        timeout=FEDERATION_TIMEOUT,
        what="the remote outsider banned",
    )

    # -- each decision: one row, one AuditEvent, as expected ---------------------------
    persons = {
        anna.user_id: network.ref("Practitioner", "anna"),
        lena.user_id: network.ref("Practitioner", "lena"),
        olga.user_id: network.ref("Practitioner", "olga"),
    }
    checked: list[dict[str, Any]] = []

    def check(
        row: JournalRow,
        expected: tuple[str, str, str, str],
        expected_agents: list[tuple[str | None, str | None, bool]],
        expected_entities: list[str],
        outcome_desc: str | None = None,
    ) -> dict[str, Any]:
        event = the_event(hapi, row)
        if row.room_id == space and row.decision.request is not None:
            assert row.decision.request.startswith("CommunicationRequest/")
            expected_entities = [
                *expected_entities[:2],
                row.decision.request,
                *expected_entities[2:],
            ]
        assert codes(event) == expected
        assert agents(event) == expected_agents
        assert entities(event) == expected_entities
        assert event.get("outcomeDesc") == outcome_desc
        assert event["source"]["observer"]["identifier"]["value"] == a.server_name
        checked.append(event)
        return event

    def row(kind: DecisionKind, what: str, **fields: Any) -> JournalRow:
        return one_row(a, kind, what, **fields)

    # (Once a message was recorded in the space, the space has a thread the module opened
    # for it in FHIR: decisions about the space then name that thread too.)
    space_entities = [network.patient, network.team, f"room:{space}"]
    check(
        row(DecisionKind.REGISTRATION, "anna's registration", user_id=anna.user_id),
        ("110114", "registration", "E", "0"),
        [(anna.user_id, persons[anna.user_id], True)],
        [],
    )
    check(
        row(DecisionKind.REGISTRATION, "the refused registration", user_id=a.user_id(nobody)),
        ("110114", "registration", "E", "4"),
        [(a.user_id(nobody), None, True)],
        [],
        "no_fhir_identity",
    )
    check(
        row(DecisionKind.ACCESS_REFUSED, "olga's join", user_id=olga.user_id, detail="join"),
        ("110113", "access_refused", "E", "4"),
        [(olga.user_id, persons[olga.user_id], True)],
        space_entities,
        "not_in_care_team",
    )
    check(
        row(DecisionKind.ACCESS_REFUSED, "olga's invite", actor_id=olga.user_id, detail="invite"),
        ("110113", "access_refused", "E", "4"),
        [(olga.user_id, persons[olga.user_id], True), (anna.user_id, persons[anna.user_id], False)],
        space_entities,
        "inviter_not_in_care_team",
    )
    check(
        row(DecisionKind.MEMBER_INVITED, "anna's invite", user_id=anna.user_id, room_id=space),
        ("110136", "member_invited", "C", "0"),
        [(service_id, None, True), (anna.user_id, persons[anna.user_id], False)],
        space_entities,
    )
    check(
        row(
            DecisionKind.MEMBER_INVITED, "anna's thread invite", user_id=anna.user_id, room_id=room
        ),
        ("110136", "member_invited", "C", "0"),
        [(service_id, None, True), (anna.user_id, persons[anna.user_id], False)],
        [network.patient, network.team, thread, f"room:{room}"],
    )
    check(
        row(
            DecisionKind.MEMBER_INVITED, "the remote GP's invite", user_id=gp.user_id, room_id=space
        ),
        ("110136", "member_invited", "C", "0"),
        # (Another server's user: named by Matrix id only, their person never looked up.)
        [(service_id, None, True), (gp.user_id, None, False)],
        space_entities,
    )
    check(
        row(DecisionKind.MEMBER_REMOVED, "lena's removal", user_id=lena.user_id, room_id=space),
        ("110136", "member_removed", "D", "0"),
        [(service_id, None, True), (lena.user_id, persons[lena.user_id], False)],
        space_entities,
    )
    removed_at = rows_of(a, DecisionKind.MEMBER_REMOVED, user_id=lena.user_id)[0].recorded_ms
    # Her power level went with her (and the space's were set when it was made).
    levels = [
        r
        for r in rows_of(a, DecisionKind.POWER_LEVELS_SET, room_id=space)
        if r.recorded_ms >= removed_at - 1000
    ]
    assert levels, "no power-level change after lena's removal"
    for levels_row in rows_of(a, DecisionKind.POWER_LEVELS_SET, room_id=space):
        one_row(
            a, DecisionKind.POWER_LEVELS_SET, "power levels", audit_id=levels_row.decision.audit_id
        )
        check(
            levels_row,
            ("110136", "power_levels_set", "U", "0"),
            [(service_id, None, True)],
            space_entities,
        )
    check(
        row(DecisionKind.MESSAGE_RELAYED, "the relay", detail=communication),
        ("110106", "message_relayed", "R", "0"),
        [(service_id, None, True)],
        [network.patient, network.team, thread, communication, f"room:{room}"],
    )
    check(
        row(DecisionKind.MEMBER_BANNED, "mallory's ban", user_id=mallory.user_id),
        ("110136", "member_banned", "D", "0"),
        [(service_id, None, True), (mallory.user_id, None, False)],
        [network.patient, network.team, f"room:{public}"],
    )
    # (Her join was refused first, over federation: a refusal of its own.)
    check(
        row(
            DecisionKind.ACCESS_REFUSED,
            "mallory's federated join",
            user_id=mallory.user_id,
            detail="federated_join",
        ),
        ("110113", "access_refused", "E", "4"),
        [(mallory.user_id, None, True)],
        [network.patient, network.team, f"room:{public}"],
        "not_in_care_team",
    )

    # HAPI's own validator finds no error in any of them.
    for event in checked:
        assert hapi_errors(hapi, event) == [], codes(event)
    # No message text anywhere: not the relayed one, not one sent in Matrix, not the
    # request's; no email address either.
    everything = search(hapi, {"_tag": f"{ORIGIN_TAG['system']}|{ORIGIN_TAG['code']}"})
    dumped = repr(everything)
    for text in (RELAYED_TEXT, SENT_TEXT, REQUEST_TEXT, "@example.org", "Wijkteam"):
        assert text not in dumped, text
    # Found the way an auditor asks: who touched this patient's network, and when.
    by_patient = search(hapi, {"entity": network.patient, "date": "ge2020-01-01"})
    assert {e["id"] for e in checked if network.patient in entities(e)} <= {
        e["id"] for e in by_patient
    }
    # (Her registration, her refused join, her refused invite.)
    by_person = search(hapi, {"agent": persons[olga.user_id]})
    assert sorted(e["subtype"][0]["code"] for e in by_person) == [
        "access_refused",
        "access_refused",
        "registration",
    ]
    assert len(search(hapi, {"altid": olga.user_id})) == 3
    # /health says the queue is empty.
    health = requests.get(a.url("/_synapse/client/fhir/health"), timeout=10).json()
    assert health["audit"]["enabled"] is True
    wait_until(
        lambda: (
            requests.get(a.url("/_synapse/client/fhir/health"), timeout=10).json()["audit"][
                "pending"
            ]
            == 0
        ),
        timeout=SHIPPED_WITHIN,
        what="nothing pending on /health",
    )


def test_every_journal_row_is_exactly_one_audit_event(audited: Audited) -> None:
    """Over all the test above did: each row of the journal, one AuditEvent, never two."""
    wait_until(
        lambda: all(r.shipped_ms for r in journal(audited.a)),
        timeout=SHIPPED_WITHIN,
        what="every journal row shipped",
    )
    rows = journal(audited.a)
    assert rows
    for row in rows:
        assert len(events_of(audited.hapi, row.decision.audit_id)) == 1, row.decision


RETRY_REFUSED = "/_synapse/client/fhir/admin/api/audit/retry-refused"


def audit_health(server: SynapseServer) -> dict[str, Any]:
    health = requests.get(server.url("/_synapse/client/fhir/health"), timeout=10).json()
    return dict(health["audit"])


def refused_ms_of(server: SynapseServer, audit_id: str) -> int | None:
    connection = sqlite3.connect(f"file:{server.workdir / 'homeserver.db'}?mode=ro", uri=True)
    try:
        found = connection.execute(
            f"SELECT refused_ms FROM {journal_store.TABLE} WHERE audit_id = ?", (audit_id,)
        ).fetchone()
    finally:
        connection.close()
    return None if found is None else found[0]


def test_an_admin_puts_refused_audit_events_back_in_the_queue_and_nobody_else_can(
    audited: Audited, root: MatrixUser
) -> None:
    a = audited.a
    network = Network(uuid.uuid4().hex[:8], a.server_name, audited.b.server_name)
    FhirSeeder(audited.hapi.base_url).put_all(network.resources())
    olga = registered(audited, network, "olga")
    space = create_bound_space(service_session(root), network.team)
    refuse_outsider(a, space, olga)
    row = one_row(a, DecisionKind.ACCESS_REFUSED, "olga's refused join", user_id=olga.user_id)
    audit_id = row.decision.audit_id
    # The row as the shipper leaves one FHIR refused: set aside with the status (written
    # into Synapse's database while it runs, as another process would).
    connection = sqlite3.connect(a.workdir / "homeserver.db", timeout=30)
    try:
        with connection:
            connection.execute(
                f"UPDATE {journal_store.TABLE} SET shipped_ms = NULL, refused_ms = 1,"
                " failure = 'HTTP 422' WHERE audit_id = ?",
                (audit_id,),
            )
    finally:
        connection.close()
    wait_until(
        lambda: audit_health(a)["refused"] == 1,
        timeout=SHIPPED_WITHIN,
        what="/health counting the row set aside",
    )
    # Nobody but a server admin may put it back: no token 401, a member 403.
    assert requests.post(a.url(RETRY_REFUSED), json={}, timeout=10).status_code == 401
    forbidden = refused(lambda: olga.request("POST", RETRY_REFUSED, {}))
    assert (forbidden.status, forbidden.errcode) == (403, "M_FORBIDDEN")
    assert refused_ms_of(a, audit_id) == 1
    # A server admin: it goes back in the queue and ships (the conditional create finds
    # the AuditEvent FHIR already had: still one).
    assert root.request("POST", RETRY_REFUSED, {}) == {"requeued": 1}
    assert refused_ms_of(a, audit_id) is None
    one_row(a, DecisionKind.ACCESS_REFUSED, "olga's refusal, retried", user_id=olga.user_id)
    assert len(events_of(audited.hapi, audit_id)) == 1
    wait_until(
        lambda: audit_health(a)["refused"] == 0,
        timeout=SHIPPED_WITHIN,
        what="/health counting no row set aside",
    )
    assert root.request("POST", RETRY_REFUSED, {}) == {"requeued": 0}


def refuse_outsider(server: SynapseServer, space: str, outsider: MatrixUser) -> None:
    error = refused(lambda: outsider.join(space))
    assert error.status == 403, error


def test_with_audit_off_nothing_reaches_fhir_and_the_journal_still_has_the_refusals(
    audited: Audited, root: MatrixUser, start_synapse: Callable[..., SynapseServer]
) -> None:
    off = start_synapse(module_config(audited.hapi.base_url, audit={"enabled": False}))
    tag = uuid.uuid4().hex[:8]
    team = f"CareTeam/off-{tag}"
    FhirSeeder(audited.hapi.base_url).put(
        {"resourceType": "CareTeam", "id": f"off-{tag}", "status": "active"}
    )
    service = service_session(register_user(off, f"root_{tag}", admin=True))
    space = create_bound_space(service, team)
    outsider = register_user(off, f"outsider_{tag}")
    refuse_outsider(off, space, outsider)
    # The journal keeps it (the operator console reads it)...
    wait_until(
        lambda: rows_of(off, DecisionKind.ACCESS_REFUSED, user_id=outsider.user_id),
        timeout=SHIPPED_WITHIN,
        what="the refusal journaled with audit off",
    )
    (kept,) = rows_of(off, DecisionKind.ACCESS_REFUSED, user_id=outsider.user_id)
    assert (kept.decision.outcome, kept.decision.reason) == (Outcome.REFUSED, "not_in_care_team")
    # ...and, while a refusal on the audited server made after it reaches FHIR, this one
    # never does.
    control = registered_outsider_refused(audited, root)
    one_row(audited.a, DecisionKind.ACCESS_REFUSED, "the control refusal", user_id=control)
    assert search(audited.hapi, {"altid": outsider.user_id}) == []
    assert (
        kept.shipped_ms is None and rows_of(off, DecisionKind.ACCESS_REFUSED)[0].shipped_ms is None
    )
    health = requests.get(off.url("/_synapse/client/fhir/health"), timeout=10).json()
    assert health["audit"] == {
        "enabled": False,
        "pending": 0,
        "oldest_age_seconds": None,
        "refused": 0,
    }


def registered_outsider_refused(stack: Audited, root: MatrixUser) -> str:
    """A new account on A (a person FHIR knows, in no team) refused entry to a team's
    space; its user id."""
    network = Network(uuid.uuid4().hex[:8], stack.a.server_name, stack.b.server_name)
    FhirSeeder(stack.hapi.base_url).put_all(network.resources())
    olga = registered(stack, network, "olga")
    space = create_bound_space(service_session(root), network.team)
    refuse_outsider(stack.a, space, olga)
    return olga.user_id


def test_fhir_down_while_decisions_happen_ships_them_all_once_it_is_back(
    audited: Audited, root: MatrixUser, hapi_back: HapiDevServer
) -> None:
    tag = uuid.uuid4().hex[:8]
    network = Network(tag, audited.a.server_name, audited.b.server_name)
    FhirSeeder(hapi_back.base_url).put_all(network.resources())
    olga = registered(audited, network, "olga")
    service = service_session(root)
    space = create_bound_space(service, network.team)
    # Olga's record is read once while FHIR is up (then known from memory).
    refuse_outsider(audited.a, space, olga)
    hapi_back.stop()
    rooms = [create_bound_space(service, network.team) for _ in range(3)]
    for room in rooms:
        refuse_outsider(audited.a, room, olga)  # refused: FHIR cannot tell (fail closed)

    def journaled() -> list[JournalRow] | None:
        rows = rows_of(audited.a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
        return rows if len(rows) == 4 else None

    during = wait_until(
        journaled, timeout=SHIPPED_WITHIN, what="the refusals journaled while FHIR is down"
    )
    assert [r.room_id for r in during[1:]] == rooms
    assert all(r.shipped_ms is None for r in during[1:])
    hapi_back.start()
    wait_until(
        lambda: all(
            r.shipped_ms
            for r in rows_of(audited.a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
        ),
        timeout=SHIPPED_WITHIN,
        what="everything shipped once FHIR is back",
    )
    for row in rows_of(audited.a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id):
        assert len(events_of(hapi_back, row.decision.audit_id)) == 1
    # The attempts that failed were counted, with a reason that carries no content.
    after = rows_of(audited.a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
    assert any(r.attempts >= 1 for r in after[1:])
    assert {r.failure for r in after[1:]} <= {None, "FHIR unreachable"} | {
        f"HTTP {s}" for s in range(500, 600)
    }


def test_a_restart_with_unshipped_rows_ships_them_once(
    audited: Audited, root: MatrixUser, hapi_back: HapiDevServer
) -> None:
    """Rows journaled while FHIR is down, then Synapse stops; meanwhile rows FHIR already
    has lose their shipped mark (a crash between FHIR's answer and the mark). After the
    restart: every row shipped, each exactly once in FHIR (the conditional create finds
    the ones it has)."""
    a = audited.a
    network = Network(uuid.uuid4().hex[:8], a.server_name, audited.b.server_name)
    FhirSeeder(hapi_back.base_url).put_all(network.resources())
    olga = registered(audited, network, "olga")
    service = service_session(root)
    shipped_before = [create_bound_space(service, network.team) for _ in range(2)]
    for room in shipped_before:
        refuse_outsider(a, room, olga)
    wait_until(
        lambda: (
            len(
                [
                    r
                    for r in rows_of(a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
                    if r.shipped_ms
                ]
            )
            == 2
        ),
        timeout=SHIPPED_WITHIN,
        what="the first refusals shipped",
    )
    hapi_back.stop()
    for room in [create_bound_space(service, network.team) for _ in range(2)]:
        refuse_outsider(a, room, olga)
    wait_until(
        lambda: len(rows_of(a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)) == 4,
        timeout=SHIPPED_WITHIN,
        what="the refusals journaled while FHIR is down",
    )
    a.stop()
    connection = sqlite3.connect(a.workdir / "homeserver.db")
    try:
        with connection:
            connection.execute(
                f"UPDATE {journal_store.TABLE} SET shipped_ms = NULL WHERE user_id = ?",
                (olga.user_id,),
            )
    finally:
        connection.close()
    assert all(
        r.shipped_ms is None for r in rows_of(a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
    )
    hapi_back.start()
    a.start()
    wait_until(
        lambda: all(
            r.shipped_ms for r in rows_of(a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
        ),
        timeout=SHIPPED_WITHIN,
        what="every row shipped after the restart",
    )
    rows = rows_of(a, DecisionKind.ACCESS_REFUSED, user_id=olga.user_id)
    assert len(rows) == 4
    for row in rows:
        assert len(events_of(hapi_back, row.decision.audit_id)) == 1, row.decision
