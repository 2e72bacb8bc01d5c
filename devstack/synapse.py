"""Synapse with the module loaded, as a managed subprocess on SQLite (or PostgreSQL).

A subprocess rather than an in-process homeserver: tests need to SIGKILL and
restart it, run several side by side with different configs, and see a bad
config stop it exactly as an operator would (``bench/synapse_start.py`` measures
both ways of starting).

Optionally with one generic worker beside the main process (``worker``: its instance
name), as Synapse requires it: on PostgreSQL, with Redis for replication.
"""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import requests
import yaml
from signedjson.key import generate_signing_key, write_signing_keys

from devstack.federation import federation_config, loopback_server_name
from devstack.ports import free_port
from devstack.postgres import PostgresDatabase
from devstack.processes import ManagedProcess
from devstack.redis import RedisServer
from devstack.waiting import StopWaiting, wait_until

SERVER_NAME = "example.org"
START_TIMEOUT = 60.0
# Generous limits: the tests and benchmarks act faster than any person.
_NO_RATE_LIMIT = {"per_second": 10000, "burst_count": 10000}


def module_config(fhir_base_url: str, **overrides: Any) -> dict[str, Any]:
    """A ``modules:`` config for FhirModule; ``overrides`` replace top-level keys."""
    config: dict[str, Any] = {
        "fhir": {"base_url": fhir_base_url, "timeout": "5s"},
        "service_user": "fhir",
        "webhook": {"secret": "test-webhook-secret"},
        # Off unless a test or the demo turns it on: most tests make their spaces by hand,
        # and a sweep making spaces for every team in a shared HAPI would get in the way.
        "sync": {"enabled": False},
    }
    config.update(overrides)
    return config


class SynapseServer:
    """One homeserver in ``workdir``; ``fhir_module`` None runs Synapse without the module.

    By default it is ``example.org`` and never federates. With ``federation_port`` it is
    ``127.0.0.1:<federation_port>``, serves federation over TLS on that port and federates
    with the servers named in ``federation_peers`` (see ``devstack.federation``).
    Its database is SQLite in ``workdir``, or ``postgres`` (see ``devstack.postgres``).

    With ``worker`` (and then ``postgres`` and ``redis``) a generic worker of that instance
    name runs beside the main process, started after it and stopped before it: the main
    process gets a replication listener, ``instance_map: {main: ...}`` and ``redis``, the
    worker a client listener of its own (``worker_url``; module web resources are served
    there too; when the module's ``worker`` is this worker, its ``communication.client_url``
    defaults to it) and its own log. Synapse's own background tasks stay on the main process
    (no ``run_background_tasks_on``): what moves to the worker is what the module config's
    ``worker`` key gives it, nothing else.

    With ``worker_persists_events`` (and then ``worker``) the worker is also the events
    stream writer (``stream_writers: {events: [<worker>]}``): it gets an HTTP replication
    listener of its own and an ``instance_map`` entry, and every process — the main one
    included — hands the events it creates to it for persisting. ``stop_main`` and
    ``start_main`` stop and start the main process alone, the worker left running.
    """

    def __init__(
        self,
        workdir: Path,
        fhir_module: dict[str, Any] | None,
        *,
        port: int | None = None,
        extra_config: dict[str, Any] | None = None,
        federation_port: int | None = None,
        federation_peers: Sequence[str] = (),
        metrics: bool = False,
        postgres: PostgresDatabase | None = None,
        redis: RedisServer | None = None,
        worker: str | None = None,
        worker_persists_events: bool = False,
    ) -> None:
        if worker is not None and (postgres is None or redis is None):
            raise ValueError("a Synapse worker needs PostgreSQL and Redis")
        if worker_persists_events and worker is None:
            raise ValueError("worker_persists_events needs a worker")
        self.workdir = workdir
        self.postgres = postgres
        self.redis = redis
        self.worker_name = worker
        self.worker_persists_events = worker_persists_events
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.federation_port = federation_port
        self.federation_peers = tuple(federation_peers)
        self.server_name = (
            loopback_server_name(federation_port) if federation_port is not None else SERVER_NAME
        )
        self.registration_secret = secrets.token_hex(16)
        # (What the HAPI shim would present: ``notify``.)
        self.webhook_secret = ((fhir_module or {}).get("webhook") or {}).get("secret")
        # A Prometheus listener of its own, when asked for (`metrics_url`).
        self.metrics_port = free_port() if metrics else None
        self.metrics_url = (
            f"http://127.0.0.1:{self.metrics_port}/_synapse/metrics" if metrics else None
        )
        self.config_path = self.workdir / "homeserver.yaml"
        # The worker's ports (unused without one).
        self.replication_port = free_port() if worker else 0
        self.worker_port = free_port() if worker else 0
        # The worker's own replication listener (only as the events stream writer).
        self.worker_replication_port = free_port() if worker_persists_events else 0
        self.worker_url = f"http://127.0.0.1:{self.worker_port}" if worker else None
        self.worker_metrics_port = free_port() if worker and metrics else None
        self.worker_metrics_url = (
            f"http://127.0.0.1:{self.worker_metrics_port}/_synapse/metrics"
            if self.worker_metrics_port is not None
            else None
        )
        self._write_config(fhir_module, extra_config or {})
        self.process = ManagedProcess(
            "synapse",
            [sys.executable, "-m", "synapse.app.homeserver", "-c", str(self.config_path)],
            self.workdir / "console.log",
            cwd=self.workdir,
        )
        self.worker_process: ManagedProcess | None = None
        if worker is not None:
            worker_config = self._write_worker_config(worker)
            self.worker_process = ManagedProcess(
                f"synapse-{worker}",
                [
                    sys.executable,
                    "-m",
                    "synapse.app.generic_worker",
                    "-c",
                    str(self.config_path),
                    "-c",
                    str(worker_config),
                ],
                self.workdir / f"console-{worker}.log",
                cwd=self.workdir,
            )
        self.start_seconds: float | None = None

    @property
    def log_path(self) -> Path:
        return self.workdir / "homeserver.log"

    @property
    def worker_log_path(self) -> Path | None:
        return None if self.worker_name is None else self.workdir / f"{self.worker_name}.log"

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the main process (then the worker, if any) and wait until they answer."""
        self.start_main(timeout)
        if self.worker_process is not None:
            self.start_worker(timeout)

    def start_main(self, timeout: float = START_TIMEOUT) -> None:
        """Start the main process alone and wait until it answers (the worker, if any, is
        left as it is)."""
        self.process.start()
        wait_until(
            self._ready,
            timeout=timeout,
            what=f"Synapse answering {self.base_url}/health (logs in {self.workdir})",
            interval=0.05,
        )
        self.start_seconds = time.monotonic() - self.process.started_at

    def stop_main(self) -> None:
        """Stop the main process alone (SIGTERM); the worker, if any, keeps running."""
        self.process.stop()

    def start_worker(self, timeout: float = START_TIMEOUT) -> None:
        assert self.worker_process is not None, "no worker configured"
        self.worker_process.start()
        wait_until(
            self._worker_ready,
            timeout=timeout,
            what=f"the Synapse worker answering {self.worker_url}/health (logs in {self.workdir})",
            interval=0.05,
        )

    def stop_worker(self) -> None:
        if self.worker_process is not None:
            self.worker_process.stop()

    def start_expecting_failure(self, timeout: float = START_TIMEOUT) -> str:
        """Start and wait for Synapse to exit; return what it printed."""
        self.process.start()
        assert self.process.process is not None
        self.process.process.wait(timeout)
        return self.process.log_path.read_text(errors="replace")

    def stop(self) -> None:
        self.stop_worker()
        self.process.stop()

    def kill(self) -> None:
        if self.worker_process is not None:
            self.worker_process.kill()
        self.process.kill()

    def url(self, path: str) -> str:
        return f"{self.base_url}{path}"

    def notify(
        self,
        reference: str,
        *,
        action: str = "update",
        version: str = "1",
        via: str | None = None,
    ) -> None:
        """What the HAPI shim says after a commit (``CareTeam/12`` changed), with the
        module's webhook secret, to this server (or the listener at ``via``: a worker);
        the module answers 202 at once and queues the work."""
        resource_type, resource_id = reference.split("/")
        response = requests.post(
            (via or self.base_url) + "/_synapse/client/fhir/notify",
            json={
                "resourceType": resource_type,
                "id": resource_id,
                "versionId": version,
                "action": action,
            },
            headers={"Authorization": f"Bearer {self.webhook_secret}"},
            timeout=10,
        )
        if response.status_code != 202:
            raise AssertionError(f"notify {reference}: HTTP {response.status_code}")

    def user_id(self, localpart: str) -> str:
        return f"@{localpart}:{self.server_name}"

    def _ready(self) -> bool:
        if not self.process.running:
            raise StopWaiting(
                f"Synapse exited with code {self.process.exit_code()}:\n{self.process.log_tail()}"
            )
        try:
            return requests.get(self.url("/health"), timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _worker_ready(self) -> bool:
        assert self.worker_process is not None
        if not self.worker_process.running:
            raise StopWaiting(
                f"The Synapse worker exited with code {self.worker_process.exit_code()}:\n"
                f"{self.worker_process.log_tail()}"
            )
        try:
            return requests.get(f"{self.worker_url}/health", timeout=2).status_code == 200
        except requests.RequestException:
            return False

    def _write_worker_config(self, name: str) -> Path:
        """The worker's own file, read after ``homeserver.yaml`` (which it shares)."""
        assert self.worker_log_path is not None
        log_config = self.workdir / f"log-{name}.config"
        log_config.write_text(yaml.safe_dump(_log_config(self.worker_log_path)))
        listeners: list[dict[str, Any]] = [
            {
                "port": self.worker_port,
                "bind_addresses": ["127.0.0.1"],
                "type": "http",
                "tls": False,
                "x_forwarded": False,
                "resources": [{"names": ["client"], "compress": False}],
            }
        ]
        if self.worker_persists_events:
            # The other processes hand it the events they create, over HTTP replication.
            listeners.append(
                {
                    "port": self.worker_replication_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["replication"], "compress": False}],
                }
            )
        if self.worker_metrics_port is not None:
            listeners.append(
                {
                    "port": self.worker_metrics_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "metrics",
                }
            )
        config = {
            "worker_app": "synapse.app.generic_worker",
            "worker_name": name,
            "worker_listeners": listeners,
            "worker_log_config": str(log_config),
            "worker_pid_file": str(self.workdir / f"{name}.pid"),
        }
        path = self.workdir / f"worker-{name}.yaml"
        path.write_text(yaml.safe_dump(config, sort_keys=False))
        return path

    def _write_config(self, fhir_module: dict[str, Any] | None, extra: dict[str, Any]) -> None:
        signing_key = self.workdir / "signing.key"
        if not signing_key.exists():
            with open(signing_key, "w") as f:
                write_signing_keys(f, [generate_signing_key("a_dev")])
        log_config = self.workdir / "log.config"
        log_config.write_text(yaml.safe_dump(_log_config(self.log_path)))
        config: dict[str, Any] = {
            "server_name": self.server_name,
            "public_baseurl": f"{self.base_url}/",
            "pid_file": str(self.workdir / "homeserver.pid"),
            "listeners": [
                {
                    "port": self.port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["client"], "compress": False}],
                }
            ],
            "database": (
                self.postgres.synapse_config()
                if self.postgres is not None
                else {"name": "sqlite3", "args": {"database": str(self.workdir / "homeserver.db")}}
            ),
            "log_config": str(log_config),
            "media_store_path": str(self.workdir / "media"),
            "signing_key_path": str(signing_key),
            "registration_shared_secret": self.registration_secret,
            "macaroon_secret_key": secrets.token_hex(16),
            "form_secret": secrets.token_hex(16),
            "report_stats": False,
            "trusted_key_servers": [],
            "suppress_key_server_warning": True,
            # Tests and demos never leave this machine.
            "federation_domain_whitelist": [],
            "enable_metrics": False,
            "rc_message": _NO_RATE_LIMIT,
            "rc_registration": _NO_RATE_LIMIT,
            "rc_login": {
                "address": _NO_RATE_LIMIT,
                "account": _NO_RATE_LIMIT,
                "failed_attempts": _NO_RATE_LIMIT,
            },
            "rc_joins": {"local": _NO_RATE_LIMIT, "remote": _NO_RATE_LIMIT},
            "rc_invites": {
                "per_room": _NO_RATE_LIMIT,
                "per_user": _NO_RATE_LIMIT,
                "per_issuer": _NO_RATE_LIMIT,
            },
            "rc_admin_redaction": _NO_RATE_LIMIT,
            "rc_room_creation": _NO_RATE_LIMIT,
            "rc_joins_per_room": _NO_RATE_LIMIT,
            "rc_profile": _NO_RATE_LIMIT,
            "rc_3pid_validation": _NO_RATE_LIMIT,
            "room_prejoin_state": {
                "additional_event_types": ["org.synapse_fhir.care_team", "org.synapse_fhir.thread"]
            },
            "modules": [],
        }
        if self.metrics_port is not None:
            config["enable_metrics"] = True
            config["listeners"].append(
                {"port": self.metrics_port, "bind_addresses": ["127.0.0.1"], "type": "metrics"}
            )
        if fhir_module is not None:
            if (
                self.worker_url is not None
                and fhir_module.get("worker") == self.worker_name
                and "client_url" not in fhir_module.get("communication", {})
            ):
                # As README advises: the recording worker reads the stream from its own
                # client listener, not through the main process.
                communication = {**fhir_module.get("communication", {})}
                communication["client_url"] = self.worker_url
                fhir_module = {**fhir_module, "communication": communication}
            config["modules"] = [
                {"module": "synapse_fhir_module.FhirModule", "config": fhir_module}
            ]
        if self.worker_name is not None:
            assert self.redis is not None
            # Workers reach the main process over HTTP replication; every process follows
            # the others' streams through Redis.
            config["listeners"].append(
                {
                    "port": self.replication_port,
                    "bind_addresses": ["127.0.0.1"],
                    "type": "http",
                    "tls": False,
                    "x_forwarded": False,
                    "resources": [{"names": ["replication"], "compress": False}],
                }
            )
            config["instance_map"] = {"main": {"host": "127.0.0.1", "port": self.replication_port}}
            if self.worker_persists_events:
                config["instance_map"][self.worker_name] = {
                    "host": "127.0.0.1",
                    "port": self.worker_replication_port,
                }
                config["stream_writers"] = {"events": [self.worker_name]}
            config["redis"] = self.redis.synapse_config()
        if self.federation_port is not None:
            federation = federation_config(
                self.workdir, self.federation_port, self.federation_peers
            )
            config["listeners"].append(federation["listener"])
            config.update(federation["config"])
        config.update(extra)
        self.config_path.write_text(yaml.safe_dump(config, sort_keys=False))


def _log_config(log_path: Path) -> dict[str, Any]:
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s - %(message)s"
            }
        },
        "handlers": {
            "file": {
                "class": "logging.FileHandler",
                "formatter": "precise",
                "filename": str(log_path),
                "encoding": "utf8",
            }
        },
        "loggers": {
            "synapse": {"level": "INFO"},
            "synapse.storage.SQL": {"level": "WARNING"},
            "synapse.access": {"level": "WARNING"},
            "synapse_fhir_module": {"level": "DEBUG"},
        },
        "root": {"level": "INFO", "handlers": ["file"]},
        "disable_existing_loggers": False,
    }
