#!/usr/bin/env python3
"""Write Synapse's configuration, with the synapse-fhir-module entry, from environment variables.

Installed in the ``synapse-fhir`` image as ``sfm-generate-config``; Docker Compose runs it once
(an existing ``homeserver.yaml`` is kept, so an operator may edit it), Kubernetes at every start
with ``--overwrite --require-secrets`` (the Secrets are the truth). Only the standard library
and PyYAML, which every Synapse installation has.

    sfm-generate-config --out DIR [--overwrite] [--owner UID:GID] [--require-secrets]

Writes ``DIR/homeserver.yaml``, ``DIR/log.config`` (to standard output, as containers log),
``DIR/workers/<name>.yaml`` per worker, and the signing key ``DIR/<server_name>.signing.key``
when there is none (never replaced, not even with ``--overwrite``). It never reads or writes
through a symbolic link in DIR (it may run as root on a volume another user can write): a link
at ``homeserver.yaml``, ``log.config``, ``workers/``, a worker file or a new signing key is
refused (exit 2), temporary files are created afresh (never opened if they exist), and
``--owner`` changes only the directory and files the generator opened itself.

Exit 1: a kept ``homeserver.yaml`` (no ``--overwrite``) names another module worker than
SYNAPSE_WORKERS, or, with workers, another Redis password than REDIS_PASSWORD.

Required: SYNAPSE_SERVER_NAME, POSTGRES_HOST, POSTGRES_PASSWORD, FHIR_BASE_URL,
FHIR_WEBHOOK_SECRET (and REDIS_HOST with SYNAPSE_WORKERS). Missing ones: exit code 2 and a
message naming them. Nothing secret is ever printed.

Secrets are checked (exit 2, naming the variable and what is wrong, never the value): a
secret that is given must not be a placeholder (``change-me``, ``changeme``, ``secret``,
``password`` ..., any case) nor shorter than 16 characters -- POSTGRES_PASSWORD,
FHIR_WEBHOOK_SECRET, REDIS_PASSWORD and the SYNAPSE_*_SECRET* variables below. With
``--require-secrets`` (for generation at every start, as on Kubernetes, where a random secret
would differ between pods and restarts) each of POSTGRES_PASSWORD, FHIR_WEBHOOK_SECRET,
SYNAPSE_MACAROON_SECRET_KEY, SYNAPSE_FORM_SECRET, SYNAPSE_REGISTRATION_SHARED_SECRET, and with
SYNAPSE_WORKERS also SYNAPSE_WORKER_REPLICATION_SECRET and REDIS_PASSWORD, must be given.

Optional (default):
  SYNAPSE_PUBLIC_BASEURL (Synapse's: https://<server_name>/)
  POSTGRES_PORT (5432), POSTGRES_DB (synapse), POSTGRES_USER (synapse)
  SYNAPSE_MACAROON_SECRET_KEY, SYNAPSE_FORM_SECRET, SYNAPSE_REGISTRATION_SHARED_SECRET,
  SYNAPSE_WORKER_REPLICATION_SECRET (with workers)
      (random at the first generation, then kept: read back from the existing file)
  SYNAPSE_BEHIND_PROXY (false): true sets ``x_forwarded`` on the client listeners (main's
      client/federation listener, each worker's client listener; never replication or
      metrics), so Synapse takes the client's address from X-Forwarded-For. Only behind a
      reverse proxy that OVERWRITES that header with the address it sees (Synapse trusts the
      leftmost entry), and only if nothing else can reach those ports.
  SYNAPSE_METRICS_PORT: a metrics listener on that port (workers: port + 1 + i), enable_metrics
  SYNAPSE_WORKERS: comma list of generic worker names; with it Redis replication
      (REDIS_HOST, REDIS_PORT 6379, REDIS_PASSWORD: ``redis.password``, which the workers read
      from homeserver.yaml too), main's replication listener (SYNAPSE_REPLICATION_PORT 9093)
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
import stat
import string
import sys
import unicodedata
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
# Checked whenever given; with --require-secrets they must be given (the last two only with
# workers).
CHECKED_SECRETS = (
    "POSTGRES_PASSWORD",
    "FHIR_WEBHOOK_SECRET",
    "SYNAPSE_MACAROON_SECRET_KEY",
    "SYNAPSE_FORM_SECRET",
    "SYNAPSE_REGISTRATION_SHARED_SECRET",
    "SYNAPSE_WORKER_REPLICATION_SECRET",
    "REDIS_PASSWORD",
)
WORKER_SECRETS = ("SYNAPSE_WORKER_REPLICATION_SECRET", "REDIS_PASSWORD")
MIN_SECRET_LENGTH = 16
# A random secret of 16+ characters has far more; "abababab…" does not.
MIN_DISTINCT_CHARACTERS = 6
# Refused inside a secret too ("change-me-please"); the other words only as the whole value.
PLACEHOLDERS_INSIDE = ("changeme", "changethis", "replaceme", "placeholder")
# What examples and templates put where a secret goes (compared lower-case, without
# punctuation or spaces).
PLACEHOLDERS = {
    "changeme",
    "changethis",
    "replaceme",
    "setme",
    "secret",
    "password",
    "passw0rd",
    "placeholder",
    "example",
    "todo",
    "fixme",
    "xxx",
    "none",
    "null",
    "default",
}
MODULE = "synapse_fhir_module.FhirModule"
GENERATE_HINT = 'python3 -c "import secrets; print(secrets.token_urlsafe(32))"'
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
    parser.add_argument(
        "--require-secrets",
        action="store_true",
        help="refuse to run unless every secret is given in the environment (no random"
        " ones): for configs generated at every start, as on Kubernetes",
    )
    args = parser.parse_args(argv)
    env = os.environ if environ is None else environ
    try:
        settings = Settings.from_env(env, require_secrets=args.require_secrets)
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
        self.redis_password = env.get("REDIS_PASSWORD", "")
        self.behind_proxy = _boolean(env, "SYNAPSE_BEHIND_PROXY", False)
        self.main_host = get("SYNAPSE_MAIN_HOST", "synapse")
        self.replication_port = _port(env, "SYNAPSE_REPLICATION_PORT", 9093)
        self.worker_port_base = _port(env, "SYNAPSE_WORKER_PORT_BASE", 8083)
        self.signing_key_path = get("SYNAPSE_SIGNING_KEY_PATH")
        self.media_store_path = get("SYNAPSE_MEDIA_STORE_PATH")

    @classmethod
    def from_env(cls, env: Mapping[str, str], *, require_secrets: bool = False) -> Settings:
        workers = bool(env.get("SYNAPSE_WORKERS", "").strip())
        required = list(REQUIRED)
        if workers:
            required.append("REDIS_HOST")
        if require_secrets:
            required += [
                name
                for name in CHECKED_SECRETS
                if name not in required and (workers or name not in WORKER_SECRETS)
            ]
        missing = [name for name in required if not env.get(name, "").strip()]
        if missing:
            raise UsageError(
                "missing required environment variables: "
                + ", ".join(missing)
                + (" (--require-secrets: every secret must be given)" if require_secrets else "")
            )
        weak = [
            f"{name} {problem}"
            for name in CHECKED_SECRETS
            if (problem := _weak_secret(env.get(name, "")))
        ]
        if weak:
            raise UsageError(
                "unusable secrets: "
                + "; ".join(weak)
                + f" (use long random values, e.g. {GENERATE_HINT})"
            )
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
    # DIR itself is the operator's choice (a volume's mount point); inside it nothing is
    # followed: every file is opened relative to DIR's descriptor, without following links.
    out_fd = os.open(out, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        if owner is not None:
            os.fchown(out_fd, *owner)
        config_path = out / "homeserver.yaml"
        existing = _read_yaml(out_fd, config_path)
        if existing is not None and not overwrite:
            _check_same_workers(existing, settings, config_path)

        signing_key = Path(settings.signing_key_path or out / f"{settings.server_name}.signing.key")
        if signing_key.exists():
            done.append(f"kept {signing_key}")
        else:
            _write_signing_key(out, out_fd, signing_key, owner)
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
            if os.path.lexists(path) and not overwrite:
                _refuse_link(path)
                done.append(f"kept {path} (exists; --overwrite rewrites it)")
                continue
            dir_fd = out_fd if path.parent == out else _subdirectory(out_fd, path.parent, owner)
            try:
                _write(dir_fd, path, _dump(content), private=private, owner=owner)
            finally:
                if dir_fd != out_fd:
                    os.close(dir_fd)
            done.append(f"wrote {path}")
    finally:
        os.close(out_fd)
    return done


def _homeserver(
    s: Settings, out: Path, signing_key: Path, log_config: Path, existing: dict[str, Any]
) -> dict[str, Any]:
    listeners: list[dict[str, Any]] = [
        _http_listener(
            s.http_port, s.bind_address, ["client", "federation"], x_forwarded=s.behind_proxy
        )
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
        listeners.append(
            _http_listener(s.replication_port, s.bind_address, ["replication"], x_forwarded=False)
        )
        config["instance_map"] = {"main": {"host": s.main_host, "port": s.replication_port}}
        config["redis"] = {"enabled": True, "host": s.redis_host, "port": s.redis_port}
        if s.redis_password:
            # (Workers load homeserver.yaml before their own file: they get it too.)
            config["redis"]["password"] = s.redis_password
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
    listeners = [
        _http_listener(
            s.worker_port_base + index, s.bind_address, ["client"], x_forwarded=s.behind_proxy
        )
    ]
    if s.metrics_port is not None:
        listeners.append(_metrics_listener(s.metrics_port + 1 + index, s.bind_address))
    return {
        "worker_app": "synapse.app.generic_worker",
        "worker_name": s.workers[index],
        "worker_listeners": listeners,
        "worker_log_config": str(log_config),
    }


def _http_listener(port: int, bind: str, names: list[str], *, x_forwarded: bool) -> dict[str, Any]:
    # /health is served on every HTTP listener. x_forwarded: Synapse takes the client's
    # address from the leftmost X-Forwarded-For entry, whoever sent it, so only where a
    # reverse proxy (which overwrites the header) is the only way in.
    return {
        "port": port,
        "bind_addresses": [bind],
        "type": "http",
        "tls": False,
        "x_forwarded": x_forwarded,
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
    redis = existing.get("redis")
    kept_password = redis.get("password") if isinstance(redis, dict) else None
    if s.workers and s.redis_password and kept_password != s.redis_password:
        # (Redis would refuse Synapse: replication would fail after the start.)
        raise Conflict(
            f"{path} does not have REDIS_PASSWORD as redis.password: run again with"
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


def _weak_secret(value: str) -> str | None:
    """Why a given secret is unusable (None: it is fine, or not given at all)."""
    if not value:
        return None
    if not value.strip():
        return "is blank"
    # (Compatibility forms folded: "changeme" in full-width letters is still "changeme".)
    folded = "".join(c for c in unicodedata.normalize("NFKC", value).casefold() if c.isalnum())
    if folded in PLACEHOLDERS or any(word in folded for word in PLACEHOLDERS_INSIDE):
        return "is a placeholder"
    if len(set(value)) < MIN_DISTINCT_CHARACTERS:
        return f"is made of fewer than {MIN_DISTINCT_CHARACTERS} different characters"
    if len(value) < MIN_SECRET_LENGTH:
        return f"is shorter than {MIN_SECRET_LENGTH} characters"
    return None


def _boolean(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("true", "yes", "1", "on"):
        return True
    if raw in ("false", "no", "0", "off"):
        return False
    raise UsageError(f"{name} must be true or false")


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


def _refuse_link(path: Path) -> None:
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link: refusing to follow it (remove it)")


def _read_yaml(out_fd: int, path: Path) -> dict[str, Any] | None:
    try:
        fd = os.open(path.name, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=out_fd)
    except FileNotFoundError:
        return None
    except OSError:
        _refuse_link(path)
        raise
    with os.fdopen(fd) as f:
        if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
            raise UsageError(f"{path} is not a regular file")
        text = f.read()
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError:
        raise UsageError(f"{path} exists but is not valid YAML") from None
    return value if isinstance(value, dict) else {}


def _dump(content: dict[str, Any]) -> str:
    return "# Generated by sfm-generate-config from environment variables.\n" + yaml.safe_dump(
        content, sort_keys=False, default_flow_style=False
    )


def _subdirectory(out_fd: int, path: Path, owner: tuple[int, int] | None) -> int:
    """DIR's subdirectory ``path`` (made if missing), opened without following a link."""
    name = path.name
    try:
        os.mkdir(name, 0o755, dir_fd=out_fd)
    except FileExistsError:
        pass
    try:
        fd = os.open(
            name, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=out_fd
        )
    except OSError:
        _refuse_link(path)
        raise
    if owner is not None:
        os.fchown(fd, *owner)
    return fd


def _write(
    dir_fd: int, path: Path, text: str, *, private: bool, owner: tuple[int, int] | None
) -> None:
    """Replace ``path`` (a name in ``dir_fd``) atomically, through a temporary file made
    afresh; private files (secrets) are never readable by others. The rename replaces a
    link at ``path`` itself, never what it points to."""
    if path.is_symlink():
        _refuse_link(path)
    tmp = f".{path.name}.tmp"
    try:
        os.unlink(tmp, dir_fd=dir_fd)  # (a leftover, or a planted link: removed, not followed)
    except FileNotFoundError:
        pass
    _create(dir_fd, tmp, text, private=private, owner=owner)
    try:
        os.replace(tmp, path.name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        os.unlink(tmp, dir_fd=dir_fd)
        raise


def _write_signing_key(out: Path, out_fd: int, path: Path, owner: tuple[int, int] | None) -> None:
    """A new signing key, in a file that must not exist yet (not even as a dangling link)."""
    if path.is_symlink():
        raise UsageError(f"{path} is a symbolic link to nothing: refusing to follow it (remove it)")
    if path.parent == out:
        dir_fd = out_fd
    else:
        # (Elsewhere: SYNAPSE_SIGNING_KEY_PATH, the operator's choice of directory.)
        path.parent.mkdir(parents=True, exist_ok=True)
        dir_fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        _create(dir_fd, path.name, _new_signing_key() + "\n", private=True, owner=owner)
    except FileExistsError:
        raise UsageError(f"{path} appeared while it was being written: run again") from None
    finally:
        if dir_fd != out_fd:
            os.close(dir_fd)


def _create(
    dir_fd: int, name: str, text: str, *, private: bool, owner: tuple[int, int] | None
) -> None:
    """A new file ``name`` in ``dir_fd``: O_EXCL (it must not exist, not even as a link)."""
    mode = 0o640 if private else 0o644
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    fd = os.open(name, flags, mode, dir_fd=dir_fd)
    try:
        os.fchmod(fd, mode)
        if owner is not None:
            os.fchown(fd, *owner)
        with os.fdopen(fd, "w") as f:
            fd = -1
            f.write(text)
    except BaseException:
        if fd != -1:
            os.close(fd)
        os.unlink(name, dir_fd=dir_fd)
        raise


if __name__ == "__main__":
    sys.exit(main())
