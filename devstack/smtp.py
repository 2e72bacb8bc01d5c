"""A throwaway SMTP server on 127.0.0.1 that keeps every message it receives, so tests can
read the mail Synapse sends (e.g. the link that verifies an email address)."""

from __future__ import annotations

import email
import email.policy
import threading
from email.message import EmailMessage
from typing import Any

from aiosmtpd.controller import Controller

from devstack.ports import free_port
from devstack.waiting import wait_until


class SmtpServer:
    """``start``/``stop`` it; ``synapse_config()`` is the ``email:`` section that makes a
    Synapse send its mail here (plain SMTP, no TLS, no login)."""

    def __init__(self, port: int | None = None) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        self._lock = threading.Lock()
        self._messages: list[EmailMessage] = []
        self._controller = Controller(_Collector(self._receive), hostname=self.host, port=self.port)

    def start(self) -> None:
        self._controller.start()  # (returns once the server answers)

    def stop(self) -> None:
        self._controller.stop()

    def synapse_config(self, notif_from: str = "Care network <noreply@example.org>") -> dict:
        return {
            "smtp_host": self.host,
            "smtp_port": self.port,
            "enable_tls": False,
            "notif_from": notif_from,
        }

    def take_mail(self, to: str, *, timeout: float = 30.0) -> EmailMessage:
        """The oldest message for ``to`` not taken yet (removed from the server), waiting
        for one to arrive."""
        return wait_until(
            lambda: self._take(to.lower()),
            timeout=timeout,
            what=f"a mail delivered to {to}",
        )

    def waiting_for(self) -> set[str]:
        """The recipients of every message received and not taken yet (lower case)."""
        with self._lock:
            return {
                address.lower()
                for message in self._messages
                for address in message.get_all("X-Rcpt-To", [])
            }

    def _take(self, to: str) -> EmailMessage | None:
        with self._lock:
            for message in self._messages:
                if to in (address.lower() for address in message.get_all("X-Rcpt-To", [])):
                    self._messages.remove(message)
                    return message
        return None

    def _receive(self, recipients: list[str], content: bytes) -> None:
        message = email.message_from_bytes(content, policy=email.policy.default)
        assert isinstance(message, EmailMessage)
        for recipient in recipients:  # the envelope's, which headers need not show
            message["X-Rcpt-To"] = recipient
        with self._lock:
            self._messages.append(message)


class _Collector:
    """The aiosmtpd handler: every message is accepted and handed on."""

    def __init__(self, receive: Any) -> None:
        self._receive = receive

    async def handle_DATA(self, server: Any, session: Any, envelope: Any) -> str:
        self._receive(list(envelope.rcpt_tos), bytes(envelope.content))
        return "250 Message accepted for delivery"


def plain_text(message: EmailMessage) -> str:
    """The message's text/plain body (Synapse sends text and HTML alternatives)."""
    part = message.get_body(preferencelist=("plain",))
    assert part is not None, "the mail has no text/plain part"
    return str(part.get_content())
