#!/usr/bin/env python3
"""Write Synapse's configuration, with the synapse-fhir-module entry, from environment variables.

Installed in the ``synapse-fhir`` image as ``sfm-generate-config``; Docker Compose runs it once
(an existing ``homeserver.yaml`` is kept, so an operator may edit it), Kubernetes at every start
with ``--overwrite`` (the Secrets are the truth). Only the standard library and PyYAML, which
every Synapse installation has.

    sfm-generate-config --out DIR [--overwrite] [--owner UID:GID]

Writes ``DIR/homeserver.yaml``, ``DIR/log.config`` (to standard output, as containers log),
``DIR/workers/<name>.yaml`` per worker, and the signing key ``DIR/<server_name>.signing.key``
when there is none (never replaced, not even with ``--overwrite``).

Required: SYNAPSE_SERVER_NAME, POSTGRES_HOST, POSTGRES_PASSWORD, FHIR_BASE_URL,
FHIR_WEBHOOK_SECRET (and REDIS_HOST with SYNAPSE_WORKERS). Missing ones: exit code 2 and a
message naming them. Nothing secret is ever printed.

Optional (default):
  SYNAPSE_PUBLIC_BASEURL (Synapse's: https://<server_name>/)
  POSTGRES_PORT (5432), POSTGRES_DB (synapse), POSTGRES_USER (synapse)
  SYNAPSE_MACAROON_SECRET_KEY, SYNAPSE_FORM_SECRET, SYNAPSE_REGISTRATION_SHARED_SECRET,
  SYNAPSE_WORKER_REPLICATION_SECRET (with workers)
      (random at the first generation, then kept: read back from the existing file)
  SYNAPSE_METRICS_PORT: a metrics listener on that port (workers: port + 1 + i), enable_metrics
  SYNAPSE_WORKERS: comma list of generic worker names; with it Redis replication
      (REDIS_HOST, REDIS_PORT 6379), main's replication listener (SYNAPSE_REPLICATION_PORT 9093)
      in instance_map as SYNAPSE_MAIN_HOST (synapse), the module's ``worker`` = the first
      worker, and worker i's client listener on SYNAPSE_WORKER_PORT_BASE (8083) + i
  SYNAPSE_HTTP_PORT (8008), SYNAPSE_BIND_ADDRESS (0.0.0.0): the main client listener
  SYNAPSE_SIGNING_KEY_PATH (DIR/<server_name>.signing.key), SYNAPSE_MEDIA_STORE_PATH
      (DIR/media_store)
  FHIR_BEARER_TOKEN: the module's fhir.auth.bearer_token
  FHIR_MODULE_CONFIG_EXTRA: a YAML/JSON mapping merged into the module's config
      (e.g. '{"sync": {"poll_interval": "30s"}}'); see homeserver.module.yaml for the keys
"""

from __future__ import annotations

import argparse
import base64
import os
import secrets
import string
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import yaml

REQUIRED = (
    "SYNAPSE_SERVER_NAME",
    "POSTGRES_HOST",
    "POSTGRES_PASSWORD",
    "FHIR_BASE_URL",
    "FHIR_WEBHOOK_SECRET",
)
# Secrets Synapse needs stable across restarts: from the environment, else kept from the
# existing homeserver.yaml, else random.
KEPT_SECRETS = {
    "macaroon_secret_key": "SYNAPSE_MACAROON_SECRET_KEY",
    "form_secret": "SYNAPSE_FORM_SECRET",
    "registration_shared_secret": "SYNAPSE_REGISTRATION_SHARED_SECRET",
    # (Only with workers: what they present to main's replication listener.)
    "worker_replication_secret": "SYNAPSE_WORKER_REPLICATION_SECRET",
}
MODULE = "synapse_fhir_module.FhirModule"
EXIT_USAGE = 2  # a variable missing or unusable
EXIT_CONFLICT = 1  # the existing configuration disagrees with the environment


class UsageError(Exception):
    """Something in the environment is missing or unusable (exit 2)."""


class Conflict(Exception):
    """The kept homeserver.yaml was made for another set of workers (exit 1)."""


def main(argv: list[str] | None = None, environ: Mapping[str, str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sfm-generate-config",
        description="Write Synapse's config with the synapse-fhir-module entry from the"
        " environment (see the module's docs/deployment.md).",
    )
    parser.add_argument("--out", required=True, type=Path, help="the config directory")
    parser.add_argument(
        "--overwrite",
        action="store_true",
        help="rewrite existing files (secrets and the signing key are kept)",
    )
    parser.add_argument(
        "--owner", help="UID:GID to give the directory and the files written (as root)"
    )
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        settings = Settings.from_env(env)
        owner = _parse_owner(args.owner)
        for line in generate(settings, args.out, overwrite=args.overwrite, owner=owner):
            print(line)
    except UsageError as e:
        print(f"sfm-generate-config: {e}", file=sys.stderr)
        return EXIT_USAGE
    except Conflict as e:
        print(f"sfm-generate-config: {e}", file=sys.stderr)
        return EXIT_CONFLICT
    return 0


class Settings:
    """What the environment says, checked; secrets are held, never shown."""

    def __init__(self, env: Mapping[str, str]) -> None:
        def get(name: str, default: str = "") -> str:
            return env.get(name, "").strip() or default

        self.server_name = get("SYNAPSE_SERVER_NAME")
        self.public_baseurl = get("SYNAPSE_PUBLIC_BASEURL")
        self.bind_address = get("SYNAPSE_BIND_ADDRESS", "0.0.0.0")
        self.http_port = _port(env, "SYNAPSE_HTTP_PORT", 8008)
        self.postgres = {
            "host": get("POSTGRES_HOST"),
            "port": _port(env, "POSTGRES_PORT", 5432),
            "database": get("POSTGRES_DB", "synapse"),
            "user": get("POSTGRES_USER", "synapse"),
            "password": env.get("POSTGRES_PASSWORD", ""),
        }
        self.fhir_base_url = get("FHIR_BASE_URL")
        self.webhook_secret = env.get("FHIR_WEBHOOK_SECRET", "")
        self.fhir_bearer_token = env.get("FHIR_BEARER_TOKEN", "")
        self.module_extra = _mapping(env.get("FHIR_MODULE_CONFIG_EXTRA", ""))
        self.secrets = {key: env.get(var, "") for key, var in KEPT_SECRETS.items()}
        self.metrics_port = _port(env, "SYNAPSE_METRICS_PORT", None)
        self.workers = [w.strip() for w in get("SYNAPSE_WORKERS").split(",") if w.strip()]
        for name in self.workers:
            if not all(c in string.ascii_letters + string.digits + "-_." for c in name):
                raise UsageError(
                    f"SYNAPSE_WORKERS: {name!r} is not a worker name (letters, digits, - _ .)"
                )
        self.redis_host = get("REDIS_HOST")
        self.redis_port = _port(env, "REDIS_PORT", 6379)
        self.main_host = get("SYNAPSE_MAIN_HOST", "synapse")
        self.replication_port = _port(env, "SYNAPSE_REPLICATION_PORT", 9093)
        self.worker_port_base = _port(env, "SYNAPSE_WORKER_PORT_BASE", 8083)
        self.signing_key_path = get("SYNAPSE_SIGNING_KEY_PATH")
        self.media_store_path = get("SYNAPSE_MEDIA_STORE_PATH")

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        missing = [name for name in REQUIRED if not env.get(name, "").strip()]
        if env.get("SYNAPSE_WORKERS", "").strip() and not env.get("REDIS_HOST", "").strip():
            missing.append("REDIS_HOST")
        if missing:
            raise UsageError("missing required environment variables: " + ", ".join(missing))
        return cls(env)

    @property
    def worker(self) -> str | None:
        """The instance that runs the module's background work (None: the main process)."""
        return self.workers[0] if self.workers else None


def generate(
    settings: Settings, out: Path, *, overwrite: bool, owner: tuple[int, int] | None = None
) -> list[str]:
    """Write the files; returns what was done, one line per file (no secret in them)."""
    done: list[str] = []
    out.mkdir(parents=True, exist_ok=True)
    _chown(out, owner)
    config_path = out / "homeserver.yaml"
    existing = _read_yaml(config_path)
    if existing is not None and not overwrite:
        _check_same_workers(existing, settings, config_path)

    signing_key = Path(settings.signing_key_path or out / f"{settings.server_name}.signing.key")
    if signing_key.exists():
        done.append(f"kept {signing_key}")
    else:
        signing_key.parent.mkdir(parents=True, exist_ok=True)
        _write(signing_key, _new_signing_key() + "\n", private=True, owner=owner)
        done.append(f"wrote {signing_key}")

    log_config = out / "log.config"
    files: list[tuple[Path, dict[str, Any], bool]] = [
        (log_config, _log_config(), False),
        (
            config_path,
            _homeserver(settings, out, signing_key, log_config, existing or {}),
            True,
        ),
    ]
    for index, name in enumerate(settings.workers):
        files.append(
            (out / "workers" / f"{name}.yaml", _worker(settings, index, log_config), False)
        )
    for path, content, private in files:
        if path.exists() and not overwrite:
            done.append(f"kept {path} (exists; --overwrite rewrites it)")
            continue
        path.parent.mkdir(parents=True, exist_ok=True)
        _chown(path.parent, owner)
        _write(path, _dump(content), private=private, owner=owner)
        done.append(f"wrote {path}")
    return done


def _homeserver(
    s: Settings, out: Path, signing_key: Path, log_config: Path, existing: dict[str, Any]
) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = [
        _http_listener(s.http_port, s.bind_address, ["client", "federation"])
    ]
    config: dict[str, Any] = {
        "server_name": s.server_name,
        "report_stats": False,
        "listeners": listeners,
        "database": {
            "name": "psycopg2",
            "args": {**s.postgres, "cp_min": 5, "cp_max": 10},
        },
        "log_config": str(log_config),
        "media_store_path": s.media_store_path or str(out / "media_store"),
        "signing_key_path": str(signing_key),
    }
    if s.public_baseurl:
        config["public_baseurl"] = s.public_baseurl
    for key in KEPT_SECRETS:
        if key == "worker_replication_secret" and not s.workers:
            continue
        kept = existing.get(key)
        config[key] = s.secrets[key] or (kept if isinstance(kept, str) and kept else None)
        if not config[key]:
            config[key] = secrets.token_urlsafe(32)
    if s.metrics_port is not None:
        config["enable_metrics"] = True
        listeners.append(_metrics_listener(s.metrics_port, s.bind_address))
    if s.workers:
        listeners.append(_http_listener(s.replication_port, s.bind_address, ["replication"]))
        config["instance_map"] = {"main": {"host": s.main_host, "port": s.replication_port}}
        config["redis"] = {"enabled": True, "host": s.redis_host, "port": s.redis_port}
    # Recommended beside the module (homeserver.module.yaml): an invite shows its care team.
    config["room_prejoin_state"] = {
        "additional_event_types": ["org.synapse_fhir.care_team", "org.synapse_fhir.thread"]
    }
    config["modules"] = [{"module": MODULE, "config": _module_config(s)}]
    return config


def _module_config(s: Settings) -> dict[str, Any]:
    fhir: dict[str, Any] = {"base_url": s.fhir_base_url}
    if s.fhir_bearer_token:
        fhir["auth"] = {"bearer_token": s.fhir_bearer_token}
    # The instance that records reads Synapse's stream back through its own client
    # listener (README: "ideally its own"), inside its own container or pod.
    own_port = s.worker_port_base if s.worker else s.http_port
    config: dict[str, Any] = {
        "fhir": fhir,
        "webhook": {"secret": s.webhook_secret},
        "communication": {"client_url": f"http://127.0.0.1:{own_port}"},
        "worker": s.worker,
    }
    return _merged(config, s.module_extra)


def _worker(s: Settings, index: int, log_config: Path) -> dict[str, Any]:
    """A generic worker's own file, read after homeserver.yaml (``-c`` twice)."""
    listeners = [_http_listener(s.worker_port_base + index, s.bind_address, ["client"])]
    if s.metrics_port is not None:
        listeners.append(_metrics_listener(s.metrics_port + 1 + index, s.bind_address))
    return {
        "worker_app": "synapse.app.generic_worker",
        "worker_name": s.workers[index],
        "worker_listeners": listeners,
        "worker_log_config": str(log_config),
    }


def _http_listener(port: int, bind: str, names: list[str]) -> dict[str, Any]:
    # /health is served on every HTTP listener. x_forwarded: behind a reverse proxy, the
    # client's address comes from X-Forwarded-For.
    return {
        "port": port,
        "bind_addresses": [bind],
        "type": "http",
        "tls": False,
        "x_forwarded": True,
        "resources": [{"names": names, "compress": False}],
    }


def _metrics_listener(port: int, bind: str) -> dict[str, Any]:
    return {"port": port, "bind_addresses": [bind], "type": "metrics"}


def _log_config() -> dict[str, Any]:
    """Python logging to standard output (the container's log), Synapse's request context."""
    return {
        "version": 1,
        "formatters": {
            "precise": {
                "format": "%(asctime)s - %(name)s - %(lineno)d - %(levelname)s"
                " - %(request)s - %(message)s"
            }
        },
        "filters": {"context": {"()": "synapse.logging.context.LoggingContextFilter"}},
        "handlers": {
            "console": {
                "class": "logging.StreamHandler",
                "formatter": "precise",
                "filters": ["context"],
                "stream": "ext://sys.stdout",
            }
        },
        "loggers": {"synapse.storage.SQL": {"level": "INFO"}},
        "root": {"level": "INFO", "handlers": ["console"]},
        "disable_existing_loggers": False,
    }


def _check_same_workers(existing: dict[str, Any], s: Settings, path: Path) -> None:
    """A kept homeserver.yaml must run the module's background work where the environment
    now says: a worker the file does not know would never start its work, or wait for it."""
    kept_worker = None
    for entry in existing.get("modules") or []:
        if isinstance(entry, dict) and entry.get("module") == MODULE:
            kept_worker = (entry.get("config") or {}).get("worker")
    if kept_worker != s.worker:
        raise Conflict(
            f"{path} was generated with the module's worker {kept_worker or '(main process)'},"
            f" SYNAPSE_WORKERS now says {s.worker or '(main process)'}: run again with"
            " --overwrite (secrets and the signing key are kept; edits to the file are not)"
            " or edit the file"
        )


def _merged(base: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    merged = dict(base)
    for key, value in extra.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _merged(merged[key], value)
        else:
            merged[key] = value
    return merged


def _mapping(text: str) -> dict[str, Any]:
    if not text.strip():
        return {}
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        # (Its content is not shown: it may hold a secret.)
        raise UsageError("FHIR_MODULE_CONFIG_EXTRA is not valid YAML or JSON") from None
    if not isinstance(value, dict):
        raise UsageError("FHIR_MODULE_CONFIG_EXTRA must be a mapping of module config keys")
    return value


def _port(env: Mapping[str, str], name: str, default: int | None) -> Any:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if not raw.isdigit() or not 0 < int(raw) < 65536:
        raise UsageError(f"{name} must be a TCP port number (1-65535)")
    return int(raw)


def _parse_owner(value: str | None) -> tuple[int, int] | None:
    if value is None:
        return None
    uid, _, gid = value.partition(":")
    if not uid.isdigit() or not gid.isdigit():
        raise UsageError("--owner must be UID:GID (numbers)")
    return int(uid), int(gid)


def _new_signing_key() -> str:
    """An ed25519 signing key in Synapse's file format: algorithm, key id, seed (base64)."""
    version = "a_" + "".join(secrets.choice(string.ascii_letters) for _ in range(4))
    seed = base64.b64encode(secrets.token_bytes(32)).decode("ascii").rstrip("=")
    return f"ed25519 {version} {seed}"


def _read_yaml(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    try:
        value = yaml.safe_load(path.read_text())
    except yaml.YAMLError:
        raise UsageError(f"{path} exists but is not valid YAML") from None
    return value if isinstance(value, dict) else {}


def _dump(content: dict[str, Any]) -> str:
    return "# Generated by sfm-generate-config from environment variables.\n" + yaml.safe_dump(
        content, sort_keys=False, default_flow_style=False
    )


def _write(path: Path, text: str, *, private: bool, owner: tuple[int, int] | None) -> None:
    """Replace ``path`` atomically; private files (secrets) are never readable by others."""
    tmp = path.with_name(f".{path.name}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o640 if private else 0o644)
    try:
        os.fchmod(fd, 0o640 if private else 0o644)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
        os.replace(tmp, path)
    finally:
        if fd != -1:
            os.close(fd)
        tmp.unlink(missing_ok=True)


def _chown(path: Path, owner: tuple[int, int] | None) -> None:
    if owner is not None:
        os.chown(path, *owner)


if __name__ == "__main__":
    sys.exit(main())
