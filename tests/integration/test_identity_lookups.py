"""identity.lookup: the Identity Service API v2 lookups, served by the module on Synapse's
own listener, driven with plain HTTP exactly as a client (Element) does: log in, get an
OpenID token from the homeserver, register with the identity service, read the terms and
the hash details, look addresses up hashed and plain.

The persons live in HAPI with an email address and no Matrix id; their accounts get that
address as a verified email through Synapse's admin API (which runs the module's 3PID
callbacks, as a verification by mail would). An address resolves to the account of the
one person carrying it; unknown and ambiguous addresses are absent.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.ports import free_port
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from synapse_fhir_module.identity.lookup import lookup_hash
from synapse_fhir_module.identity.service import REGISTER_BURST
from tests.conftest import SERVER_LOGS

IS = "/_matrix/identity/v2"
BURST = 50  # addresses per user (the rate-limit test spends them all)


class People:
    """Persons carrying an email address and no Matrix id; ids and addresses carry the tag."""

    def __init__(self) -> None:
        self.tag = uuid.uuid4().hex[:8]

    def email(self, name: str) -> str:
        return f"{name}.{self.tag}@example.org"

    def localpart(self, name: str) -> str:
        return f"{name}_{self.tag}"

    def resources(self) -> list[dict[str, Any]]:
        def person(resource_type: str, name: str, address: str, **extra: Any) -> dict:
            return {
                "resourceType": resource_type,
                "id": f"{name}-{self.tag}",
                "active": True,
                "telecom": [{"system": "email", "value": address}],
                **extra,
            }

        return [
            person("Practitioner", "anna", self.email("anna")),
            # One address, two persons: it identifies neither.
            person("Practitioner", "sam", self.email("shared")),
            person("Patient", "kim", self.email("shared")),
        ]


class IdentityServer:
    """A Synapse whose client listener also serves the OpenID userinfo endpoint."""

    def __init__(self, synapse: SynapseServer, admin: MatrixUser) -> None:
        self.synapse = synapse
        self.admin = admin

    def url(self, path: str) -> str:
        return self.synapse.url(IS + path)

    def account(self, localpart: str, address: str | None = None) -> str:
        """A new account (with ``address`` as a verified email); its user id."""
        user = register_user(self.synapse, localpart)
        if address is not None:
            self.admin.request(
                "PUT",
                f"/_synapse/admin/v2/users/{quote(user.user_id)}",
                {"threepids": [{"medium": "email", "address": address}]},
            )
        return user.user_id


@pytest.fixture(scope="module")
def people(hapi: HapiDevServer) -> People:
    people = People()
    FhirSeeder(hapi.base_url).put_all(people.resources())
    return people


@pytest.fixture(scope="module")
def server(hapi: HapiDevServer, run_dir: Path, people: People) -> Iterator[IdentityServer]:
    port = free_port()
    base_url = f"http://127.0.0.1:{port}"
    synapse = SynapseServer(
        run_dir / f"synapse-identity-{people.tag}",
        module_config(
            hapi.base_url,
            identity={"lookup": True, "lookup_burst": BURST, "lookup_per_second": 0.01},
        ),
        port=port,
        extra_config={
            "listeners": [
                {
                    "port": port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    # `openid`: the userinfo endpoint the module asks about OpenID tokens.
                    "resources": [{"names": ["client", "openid"], "compress": False}],
                }
            ],
            # What the README asks for: clients find the identity service here.
            "serve_client_wellknown": True,
            "default_identity_server": base_url,
        },
    )
    SERVER_LOGS.extend([synapse.log_path, synapse.process.log_path])
    synapse.start()
    try:
        identity = IdentityServer(
            synapse, register_user(synapse, f"admin_{people.tag}", admin=True)
        )
        identity.account(people.localpart("anna"), people.email("anna"))
        identity.account(people.localpart("sam"), people.email("shared"))
        identity.account(people.localpart("kim"), people.email("shared"))
        # An account holding an address no person in the care record carries.
        identity.account(people.localpart("eve"), people.email("eve"))
        yield identity
    finally:
        synapse.stop()


# --- what a client does, step by step ---------------------------------------------------


def login(server: IdentityServer, localpart: str) -> MatrixUser:
    response = requests.post(
        server.synapse.url("/_matrix/client/v3/login"),
        json={
            "type": "m.login.password",
            "identifier": {"type": "m.id.user", "user": localpart},
            "password": f"pw-{localpart}",
        },
        timeout=30,
    )
    assert response.status_code == 200, response.text
    body = response.json()
    return MatrixUser(server.synapse, body["user_id"], body["access_token"])


def openid_token(user: MatrixUser) -> dict[str, Any]:
    token = user.request(
        "POST", f"/_matrix/client/v3/user/{quote(user.user_id)}/openid/request_token", {}
    )
    assert token["matrix_server_name"] == user.server.server_name
    return dict(token)


def register(server: IdentityServer, openid: dict[str, Any]) -> requests.Response:
    return requests.post(server.url("/account/register"), json=openid, timeout=30)


def session(server: IdentityServer, localpart: str) -> str:
    """A new local user, logged in and registered with the identity service: its token."""
    server.account(localpart)
    response = register(server, openid_token(login(server, localpart)))
    assert response.status_code == 200, response.text
    token = response.json()["token"]
    assert isinstance(token, str) and token
    return str(token)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def get(server: IdentityServer, path: str, token: str | None = None) -> requests.Response:
    return requests.get(server.url(path), headers=bearer(token) if token else {}, timeout=30)


def post(
    server: IdentityServer, path: str, body: Any, token: str | None = None
) -> requests.Response:
    headers = bearer(token) if token else {}
    return requests.post(server.url(path), json=body, headers=headers, timeout=30)


def error(response: requests.Response, status: int, errcode: str) -> dict[str, Any]:
    assert response.status_code == status, response.text
    body = dict(response.json())
    assert body["errcode"] == errcode, body
    return body


def hash_details(server: IdentityServer, token: str) -> tuple[list[str], str]:
    response = get(server, "/hash_details", token)
    assert response.status_code == 200, response.text
    body = response.json()
    return body["algorithms"], body["lookup_pepper"]


def lookup(
    server: IdentityServer, token: str, algorithm: str, pepper: str, addresses: list[str]
) -> requests.Response:
    body = {"algorithm": algorithm, "pepper": pepper, "addresses": addresses}
    return post(server, "/lookup", body, token)


def mappings(response: requests.Response) -> dict[str, str]:
    assert response.status_code == 200, response.text
    return dict(response.json()["mappings"])


# --- tests ----------------------------------------------------------------------------------


def test_a_client_finds_a_colleague_s_account_by_email(
    server: IdentityServer, people: People
) -> None:
    anna_id = server.synapse.user_id(people.localpart("anna"))
    # Where a client finds the identity service: the homeserver's own base URL.
    well_known = requests.get(server.synapse.url("/.well-known/matrix/client"), timeout=30)
    assert well_known.json()["m.identity_server"] == {"base_url": server.synapse.base_url}

    status = get(server, "")
    assert (status.status_code, status.json()) == (200, {})
    terms = get(server, "/terms")
    assert (terms.status_code, terms.json()) == (200, {"policies": {}})

    server.account(people.localpart("asker"))
    user = login(server, people.localpart("asker"))
    registered = register(server, openid_token(user))
    assert registered.status_code == 200, registered.text
    token = registered.json()["token"]
    account = get(server, "/account", token)
    assert (account.status_code, account.json()) == (200, {"user_id": user.user_id})

    algorithms, pepper = hash_details(server, token)
    assert set(algorithms) == {"sha256", "none"}
    assert pepper

    def hashed(address: str, medium: str = "email") -> str:
        return lookup_hash(address, medium, pepper)

    anna = hashed(people.email("anna"))
    asked = [
        anna,
        hashed(people.email("shared")),  # two persons carry it
        hashed(people.email("eve")),  # an account holds it, no person carries it
        hashed(people.email("nobody")),  # nobody at all
        hashed(people.email("anna"), "msisdn"),  # only email resolves
    ]
    found = wait_until(
        lambda: mappings(lookup(server, token, "sha256", pepper, asked)),
        timeout=30,
        what="Anna's address found by its hash",
    )
    assert found == {anna: anna_id}

    plain = [
        f"{people.email('anna').upper()} email",  # any case
        f"{people.email('shared')} email",
        f"{people.email('nobody')} email",
        f"{people.email('anna')} msisdn",
    ]
    assert mappings(lookup(server, token, "none", pepper, plain)) == {plain[0]: anna_id}


def test_lookups_need_the_current_pepper_and_a_known_algorithm(
    server: IdentityServer, people: People
) -> None:
    token = session(server, people.localpart("pepper"))
    _, pepper = hash_details(server, token)
    stale = error(lookup(server, token, "sha256", "stale", []), 400, "M_INVALID_PEPPER")
    assert (stale["algorithm"], stale["lookup_pepper"]) == ("sha256", pepper)
    md5 = error(lookup(server, token, "md5", pepper, []), 400, "M_INVALID_PARAM")
    assert "algorithm" in md5["error"]
    missing = error(
        post(server, "/lookup", {"algorithm": "sha256"}, token), 400, "M_MISSING_PARAMS"
    )
    assert "pepper" in missing["error"] and "addresses" in missing["error"]
    not_json = requests.post(
        server.url("/lookup"), data=b"{not json", headers=bearer(token), timeout=30
    )
    error(not_json, 400, "M_NOT_JSON")
    too_many = error(
        lookup(server, token, "sha256", pepper, ["x"] * (BURST + 1)), 400, "M_INVALID_PARAM"
    )
    assert f"At most {BURST} addresses" in too_many["error"]


def test_without_a_valid_identity_token_nothing_but_status_and_terms(
    server: IdentityServer, people: People
) -> None:
    for token in (None, "sfm_is_made-up"):
        error(get(server, "/hash_details", token), 401, "M_UNAUTHORIZED")
        error(get(server, "/account", token), 401, "M_UNAUTHORIZED")
        body = {"algorithm": "none", "pepper": "x", "addresses": []}
        error(post(server, "/lookup", body, token), 401, "M_UNAUTHORIZED")
    # The token as a query parameter (Synapse's own identity client sends it so).
    token = session(server, people.localpart("query"))
    response = requests.get(server.url("/hash_details"), params={"access_token": token}, timeout=30)
    assert response.status_code == 200, response.text


def test_only_this_homeserver_s_valid_openid_tokens_are_accepted(
    server: IdentityServer, people: People
) -> None:
    localpart = people.localpart("openid")
    server.account(localpart)
    genuine = openid_token(login(server, localpart))
    remote = error(
        register(server, {**genuine, "matrix_server_name": "elsewhere.example"}),
        403,
        "M_FORBIDDEN",
    )
    assert server.synapse.server_name in remote["error"]
    forged = error(
        register(server, {**genuine, "access_token": "not-a-token"}), 401, "M_UNAUTHORIZED"
    )
    assert "OpenID" in forged["error"]
    error(register(server, {"matrix_server_name": "example.org"}), 400, "M_MISSING_PARAMS")
    assert register(server, genuine).status_code == 200


def test_invitations_and_bindings_are_refused_members_come_from_fhir(
    server: IdentityServer, people: People
) -> None:
    token = session(server, people.localpart("inviter"))
    invite = {
        "medium": "email",
        "address": people.email("anna"),
        "room_id": "!room:example.org",
        "sender": server.synapse.user_id(people.localpart("inviter")),
    }
    for path in ("/store-invite", "/sign-ed25519", "/3pid/bind", "/validate/email/requestToken"):
        refused = error(post(server, path, invite, token), 403, "M_FORBIDDEN")
        assert "FHIR care record" in refused["error"]
        assert refused["org.synapse_fhir.reason"] == "third_party_invite_forbidden"
    error(get(server, "/no-such-endpoint", token), 404, "M_UNRECOGNIZED")


def test_a_browser_may_call_it_from_another_origin(server: IdentityServer) -> None:
    preflight = requests.options(
        server.url("/lookup"),
        headers={
            "Origin": "https://app.element.io",
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "authorization, content-type",
        },
        timeout=30,
    )
    assert preflight.status_code in (200, 204)
    assert preflight.headers["Access-Control-Allow-Origin"] == "*"
    assert "Authorization" in preflight.headers["Access-Control-Allow-Headers"]
    assert get(server, "/terms").headers["Access-Control-Allow-Origin"] == "*"


def test_a_user_s_lookups_are_rate_limited(server: IdentityServer, people: People) -> None:
    token = session(server, people.localpart("counter"))
    _, pepper = hash_details(server, token)
    assert lookup(server, token, "sha256", pepper, ["x"] * BURST).status_code == 200
    limited = error(lookup(server, token, "sha256", pepper, ["x"]), 429, "M_LIMIT_EXCEEDED")
    assert limited["retry_after_ms"] > 0
    # Another user has a bucket of their own.
    other = session(server, people.localpart("other"))
    assert lookup(server, other, "sha256", pepper, ["x"]).status_code == 200


def test_logout_and_deactivation_end_a_token(server: IdentityServer, people: People) -> None:
    token = session(server, people.localpart("leaver"))
    out = post(server, "/account/logout", {}, token)
    assert (out.status_code, out.json()) == (200, {})
    error(get(server, "/account", token), 401, "M_UNAUTHORIZED")
    error(post(server, "/account/logout", {}, token), 401, "M_UNKNOWN_TOKEN")

    localpart = people.localpart("deactivated")
    token = session(server, localpart)
    server.admin.request(
        "POST", f"/_synapse/admin/v1/deactivate/{quote(server.synapse.user_id(localpart))}", {}
    )
    error(get(server, "/account", token), 403, "M_FORBIDDEN")


def test_tokens_and_the_pepper_survive_a_restart_and_nothing_private_is_logged(
    server: IdentityServer, people: People
) -> None:
    token = session(server, people.localpart("restart"))
    _, pepper = hash_details(server, token)
    server.synapse.stop()
    server.synapse.start()
    assert hash_details(server, token) == (["sha256", "none"], pepper)

    log = server.synapse.log_path.read_text(errors="replace")
    for secret in (token, pepper, people.email("anna"), people.email("shared")):
        assert secret not in log
    assert lookup_hash(people.email("anna"), "email", pepper) not in log


def test_without_the_openid_resource_registration_says_so_and_is_rate_limited(
    hapi: HapiDevServer, start_synapse: Callable[..., SynapseServer]
) -> None:
    """The default listener serves `client` only: the module cannot check OpenID tokens
    there, answers 503 and tells the operator why. Registering needs no token, so it is
    limited per client address."""
    synapse = start_synapse(module_config(hapi.base_url, identity={"lookup": True}))
    url = synapse.url(IS + "/account/register")
    body = {"access_token": "anything", "matrix_server_name": synapse.server_name}
    unavailable = error(requests.post(url, json=body, timeout=30), 503, "M_UNKNOWN")
    assert "try again later" in unavailable["error"]
    wait_until(
        lambda: "serve the 'openid' resource" in synapse.log_path.read_text(errors="replace"),
        timeout=10,
        what="the log naming the missing openid resource",
    )
    for _ in range(REGISTER_BURST - 1):
        assert requests.post(url, json=body, timeout=30).status_code == 503
    limited = error(requests.post(url, json=body, timeout=30), 429, "M_LIMIT_EXCEEDED")
    assert limited["retry_after_ms"] > 0
