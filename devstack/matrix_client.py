"""A minimal Matrix client over HTTP, for tests, the demo and the benchmarks."""

from __future__ import annotations

import hashlib
import hmac
import itertools
from typing import Any
from urllib.parse import quote

import requests

from devstack.synapse import SynapseServer

_txn_ids = itertools.count()


class MatrixError(AssertionError):
    def __init__(self, response: requests.Response) -> None:
        self.status = response.status_code
        try:
            self.body: dict[str, Any] = response.json()
        except ValueError:
            self.body = {"raw": response.text}
        super().__init__(f"HTTP {self.status}: {self.body}")

    @property
    def errcode(self) -> str | None:
        return self.body.get("errcode")

    @property
    def reason(self) -> str | None:
        """The module's denial reason (``org.synapse_fhir.reason``)."""
        return self.body.get("org.synapse_fhir.reason")


class MatrixUser:
    """A logged-in user acting through the client-server API.

    Its requests go to ``base_url``: the server's main process unless told otherwise
    (``through`` gives the same session on another client listener, e.g. a worker's)."""

    def __init__(
        self,
        server: SynapseServer,
        user_id: str,
        access_token: str,
        *,
        base_url: str | None = None,
    ) -> None:
        self.server = server
        self.user_id = user_id
        self.access_token = access_token
        self.base_url = (base_url or server.base_url).rstrip("/")
        self._session = requests.Session()
        self._session.headers["Authorization"] = f"Bearer {access_token}"

    def through(self, base_url: str) -> MatrixUser:
        """The same user and access token, talking to the client listener at ``base_url``."""
        return MatrixUser(self.server, self.user_id, self.access_token, base_url=base_url)

    def request(self, method: str, path: str, body: Any = None) -> Any:
        response = self._session.request(method, f"{self.base_url}{path}", json=body, timeout=30)
        if response.status_code >= 400:
            raise MatrixError(response)
        return response.json() if response.content else None

    def create_room(self, **body: Any) -> str:
        return str(self.request("POST", "/_matrix/client/v3/createRoom", body)["room_id"])

    def invite(self, room_id: str, user_id: str) -> None:
        self.request(
            "POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/invite", {"user_id": user_id}
        )

    def join(self, room_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/join/{quote(room_id)}", {})

    def send(
        self, room_id: str, content: dict[str, Any], event_type: str = "m.room.message"
    ) -> str:
        txn = f"t{next(_txn_ids)}"
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/send/{event_type}/{txn}"
        return str(self.request("PUT", path, content)["event_id"])

    def send_text(self, room_id: str, text: str) -> str:
        return self.send(room_id, {"msgtype": "m.text", "body": text})

    def send_state(
        self, room_id: str, event_type: str, content: dict[str, Any], state_key: str = ""
    ) -> str:
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/state/{event_type}/{quote(state_key)}"
        return str(self.request("PUT", path, content)["event_id"])

    def redact(self, room_id: str, event_id: str) -> str:
        txn = f"t{next(_txn_ids)}"
        path = f"/_matrix/client/v3/rooms/{quote(room_id)}/redact/{quote(event_id)}/{txn}"
        return str(self.request("PUT", path, {})["event_id"])

    def state_event_id(self, room_id: str, event_type: str, state_key: str = "") -> str:
        """The id of a current state event (from the room's full state)."""
        for event in self.request("GET", f"/_matrix/client/v3/rooms/{quote(room_id)}/state"):
            if event["type"] == event_type and event["state_key"] == state_key:
                return str(event["event_id"])
        raise KeyError((event_type, state_key))

    def leave(self, room_id: str) -> None:
        self.request("POST", f"/_matrix/client/v3/rooms/{quote(room_id)}/leave", {})

    def whoami(self) -> str:
        return str(self.request("GET", "/_matrix/client/v3/account/whoami")["user_id"])


def register_user(server: SynapseServer, localpart: str, *, admin: bool = False) -> MatrixUser:
    """Register through the shared-secret admin API and return the logged-in user."""
    register_url = server.url("/_synapse/admin/v1/register")
    nonce = requests.get(register_url, timeout=10).json()["nonce"]
    password = f"pw-{localpart}"
    mac = hmac.new(server.registration_secret.encode(), digestmod=hashlib.sha1)
    mac.update(
        b"\x00".join(
            part.encode() for part in (nonce, localpart, password, "admin" if admin else "notadmin")
        )
    )
    body = {
        "nonce": nonce,
        "username": localpart,
        "password": password,
        "admin": admin,
        "mac": mac.hexdigest(),
    }
    response = requests.post(register_url, json=body, timeout=30)
    if response.status_code >= 400:
        raise MatrixError(response)
    data = response.json()
    return MatrixUser(server, data["user_id"], data["access_token"])


def register_publicly(server: SynapseServer, localpart: str) -> requests.Response:
    """Register through the public client API (dummy auth), as a person's app would.

    Returns the final response, whatever its status, for tests to inspect.
    """
    url = server.url("/_matrix/client/v3/register")
    body: dict[str, Any] = {"username": localpart, "password": f"pw-{localpart}"}
    first = requests.post(url, json=body, timeout=30)
    if first.status_code != 401 or "session" not in first.json():
        return first
    body["auth"] = {"type": "m.login.dummy", "session": first.json()["session"]}
    return requests.post(url, json=body, timeout=30)


def login_as(admin: MatrixUser, user_id: str) -> MatrixUser:
    """A session for ``user_id`` through the admin API (e.g. to act as the service user)."""
    token = admin.request("POST", f"/_synapse/admin/v1/users/{quote(user_id)}/login", {})[
        "access_token"
    ]
    return MatrixUser(admin.server, user_id, token)
