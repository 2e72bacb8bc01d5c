"""Registering through the client API with a verified email address, as a person's app
does on a server with ``registrations_require_3pid: [email]``: the registration asks for
the ``m.login.email.identity`` stage, Synapse mails a link, the person follows it, and
the registration completes with that stage."""

from __future__ import annotations

import re
import secrets
from typing import Any

import requests

from devstack.matrix_client import MatrixError
from devstack.smtp import SmtpServer, plain_text
from devstack.synapse import SynapseServer

EMAIL_STAGE = "m.login.email.identity"
_SUBMIT_TOKEN_LINK = re.compile(r"https?://\S+/registration/email/submit_token\?\S+")


def register_with_email(
    server: SynapseServer, smtp: SmtpServer, localpart: str, address: str
) -> requests.Response:
    """Register ``localpart`` proving ``address``; the final response, whatever its status,
    for tests to inspect. (Steps before it that fail raise MatrixError.)"""
    register_url = server.url("/_matrix/client/v3/register")
    body: dict[str, Any] = {"username": localpart, "password": f"pw-{localpart}"}

    first = requests.post(register_url, json=body, timeout=30)
    if first.status_code != 401:
        raise MatrixError(first)
    offered = [flow["stages"] for flow in first.json()["flows"]]
    assert [EMAIL_STAGE] in offered, f"no email-only registration flow offered: {offered}"

    client_secret = secrets.token_hex(16)
    sid = request_email_token(server, address, client_secret)
    follow_verification_link(smtp, address)

    body["auth"] = {
        "type": EMAIL_STAGE,
        "threepid_creds": {"sid": sid, "client_secret": client_secret},
        "session": first.json()["session"],
    }
    return requests.post(register_url, json=body, timeout=30)


def request_email_token(server: SynapseServer, address: str, client_secret: str) -> str:
    """Ask Synapse to mail ``address`` a verification link; the validation session id."""
    response = requests.post(
        server.url("/_matrix/client/v3/register/email/requestToken"),
        json={"client_secret": client_secret, "email": address, "send_attempt": 1},
        timeout=30,
    )
    if response.status_code != 200:
        raise MatrixError(response)
    return str(response.json()["sid"])


def follow_verification_link(smtp: SmtpServer, address: str) -> None:
    """Open the link in the mail Synapse sent to ``address``, as its owner would."""
    text = plain_text(smtp.take_mail(address))
    match = _SUBMIT_TOKEN_LINK.search(text)
    assert match is not None, f"no verification link in the mail:\n{text}"
    response = requests.get(match.group(0), timeout=30, allow_redirects=False)
    assert response.status_code == 200, f"verification link: HTTP {response.status_code}"


def username_available(server: SynapseServer, localpart: str) -> bool:
    response = requests.get(
        server.url("/_matrix/client/v3/register/available"),
        params={"username": localpart},
        timeout=30,
    )
    if response.status_code == 400 and response.json().get("errcode") == "M_USER_IN_USE":
        return False
    if response.status_code != 200:
        raise MatrixError(response)
    return bool(response.json()["available"])
