"""Homeservers that federate with each other on 127.0.0.1, for tests.

Each server's name is an IP literal with a port, ``127.0.0.1:<port>``: Synapse then
connects straight to that host and port (no SRV, no ``.well-known``), over TLS, and
fetches the other server's signing keys from it (``/_matrix/key/v2/server``). Each
server gets a self-signed certificate; certificate checks are off, so nothing needs a
CA. Outbound federation to loopback is allowed (``ip_range_blacklist``), and only the
named servers may federate (``federation_domain_whitelist``).
"""

from __future__ import annotations

import datetime
import ipaddress
import socket
from collections.abc import Sequence
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

LOOPBACK = "127.0.0.1"


def free_ports(count: int) -> list[int]:
    """``count`` distinct free ports on loopback (all bound at once, then released)."""
    with ExitStack() as stack:
        sockets = [
            stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM))
            for _ in range(count)
        ]
        for s in sockets:
            s.bind((LOOPBACK, 0))
        return [int(s.getsockname()[1]) for s in sockets]


def loopback_server_name(federation_port: int) -> str:
    return f"{LOOPBACK}:{federation_port}"


def write_self_signed_certificate(cert_path: Path, key_path: Path) -> None:
    """A certificate for 127.0.0.1 (EC P-256, valid a day); enough for a test run."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, LOOPBACK)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address(LOOPBACK))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))


def federation_config(workdir: Path, federation_port: int, peers: Sequence[str]) -> dict[str, Any]:
    """Top-level ``homeserver.yaml`` keys for a server federating on ``federation_port``.

    ``peers`` are the server names it may federate with (its own is added). The
    caller adds ``listener`` to its ``listeners``.
    """
    cert_path = workdir / "federation.crt"
    key_path = workdir / "federation.key"
    if not cert_path.exists() or not key_path.exists():
        write_self_signed_certificate(cert_path, key_path)
    own_name = loopback_server_name(federation_port)
    return {
        "listener": {
            "port": federation_port,
            "bind_addresses": [LOOPBACK],
            "type": "http",
            "tls": True,
            "x_forwarded": False,
            # `federation` also serves the key resource (/_matrix/key/v2/server).
            "resources": [{"names": ["federation"], "compress": False}],
        },
        "config": {
            "tls_certificate_path": str(cert_path),
            "tls_private_key_path": str(key_path),
            "federation_verify_certificates": False,
            "federation_domain_whitelist": sorted({own_name, *peers}),
            # Synapse blocks loopback (and private) addresses for outbound federation by
            # default. `ip_range_whitelist` cannot lift that for IP-literal server names:
            # the federation client wraps its agent in a BlocklistingAgentWrapper that
            # checks the blocklist alone (synapse/http/matrixfederationclient.py). So the
            # blocklist is Synapse's default without 127.0.0.0/8; the rest stays blocked.
            "ip_range_blacklist": _blocklist_without_loopback(),
            "trusted_key_servers": [],
            # No waiting minutes before retrying a peer that was briefly unreachable.
            "federation": {
                "destination_min_retry_interval": "1s",
                "destination_max_retry_interval": "5s",
            },
        },
    }


def _blocklist_without_loopback() -> list[str]:
    from synapse.config.server import DEFAULT_IP_RANGE_BLOCKLIST

    return [r for r in DEFAULT_IP_RANGE_BLOCKLIST if r != "127.0.0.0/8"]
