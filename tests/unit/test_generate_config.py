"""docker/generate_config.py (``sfm-generate-config`` in the image): the files it writes are a
config Synapse and the module accept, it keeps what must stay stable, refuses a missing
variable by name, and never prints a secret."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from signedjson.key import read_signing_keys
from synapse.config.homeserver import HomeServerConfig

from synapse_fhir_module.module import FhirModule

GENERATOR = Path(__file__).resolve().parents[2] / "docker" / "generate_config.py"
SECRETS = {
    "POSTGRES_PASSWORD": "pg-password-4f1c9a",
    "FHIR_WEBHOOK_SECRET": "webhook-secret-8d2e7b",
}
ENV = {
    "SYNAPSE_SERVER_NAME": "care.example.org",
    "POSTGRES_HOST": "postgres",
    "FHIR_BASE_URL": "http://hapi:8080/fhir",
    **SECRETS,
}


def generate(out: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """The generator as the image runs it: a program of its own, only ``env`` set."""
    return subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(out), *args],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def generated(out: Path, env: dict[str, str], *args: str) -> dict[str, Any]:
    result = generate(out, env, *args)
    assert result.returncode == 0, result.stderr
    assert_no_secret(result, env)
    return yaml.safe_load((out / "homeserver.yaml").read_text())


def assert_no_secret(result: subprocess.CompletedProcess[str], env: dict[str, str]) -> None:
    printed = result.stdout + result.stderr
    for name, value in env.items():
        if "SECRET" in name or "PASSWORD" in name or "TOKEN" in name:
            assert value not in printed, f"{name}'s value was printed"


def module_entry(config: dict[str, Any]) -> dict[str, Any]:
    (entry,) = [m for m in config["modules"] if m["module"] == "synapse_fhir_module.FhirModule"]
    return entry["config"]


def test_missing_variables_are_named_and_exit_2(tmp_path: Path) -> None:
    env = {"SYNAPSE_SERVER_NAME": "care.example.org", **SECRETS}
    result = generate(tmp_path / "data", env)
    assert result.returncode == 2
    assert "POSTGRES_HOST" in result.stderr and "FHIR_BASE_URL" in result.stderr
    assert "SYNAPSE_SERVER_NAME" not in result.stderr  # it was given
    assert_no_secret(result, env)
    assert not (tmp_path / "data" / "homeserver.yaml").exists()


def test_a_blank_required_variable_counts_as_missing(tmp_path: Path) -> None:
    result = generate(tmp_path / "data", {**ENV, "FHIR_WEBHOOK_SECRET": "  "})
    assert result.returncode == 2
    assert "FHIR_WEBHOOK_SECRET" in result.stderr


def test_workers_need_redis(tmp_path: Path) -> None:
    result = generate(tmp_path / "data", {**ENV, "SYNAPSE_WORKERS": "synapse-worker"})
    assert result.returncode == 2
    assert "REDIS_HOST" in result.stderr


def test_unparseable_module_extra_is_refused_without_showing_it(tmp_path: Path) -> None:
    extra = "fhir: {auth: {bearer_token: token-6a1f, [unclosed"
    result = generate(tmp_path / "data", {**ENV, "FHIR_MODULE_CONFIG_EXTRA": extra})
    assert result.returncode == 2
    assert "FHIR_MODULE_CONFIG_EXTRA" in result.stderr
    assert "token-6a1f" not in result.stdout + result.stderr


def test_the_module_entry_is_a_config_the_module_accepts(tmp_path: Path) -> None:
    config = generated(
        tmp_path / "data",
        {**ENV, "FHIR_MODULE_CONFIG_EXTRA": '{"sync": {"poll_interval": "30s"}}'},
    )
    module = module_entry(config)
    parsed = FhirModule.parse_config(module)
    assert parsed.fhir.base_url == "http://hapi:8080/fhir"
    assert parsed.webhook.secret == SECRETS["FHIR_WEBHOOK_SECRET"]
    assert parsed.worker is None
    # Without workers the main process records, reading its own listener.
    assert module["communication"]["client_url"] == "http://127.0.0.1:8008"
    assert module["sync"] == {"poll_interval": "30s"}
    assert config["database"]["args"]["password"] == SECRETS["POSTGRES_PASSWORD"]
    assert config["database"]["args"]["host"] == "postgres"
    assert "redis" not in config and "instance_map" not in config


def test_synapse_loads_the_config_it_writes(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generated(out, {**ENV, "SYNAPSE_PUBLIC_BASEURL": "https://matrix.example.org/"})
    config = HomeServerConfig.load_config("test", ["-c", str(out / "homeserver.yaml")])
    assert config.server.server_name == "care.example.org"
    assert config.server.public_baseurl == "https://matrix.example.org/"
    assert [listener.port for listener in config.server.listeners] == [8008]
    assert not config.metrics.enable_metrics
    with open(out / "care.example.org.signing.key") as f:
        (key,) = read_signing_keys(f)
    assert key.alg == "ed25519"


def test_worker_files_are_configs_synapse_loads(tmp_path: Path) -> None:
    out = tmp_path / "data"
    env = {
        **ENV,
        "SYNAPSE_WORKERS": "synapse-worker, second-worker",
        "REDIS_HOST": "redis",
        "SYNAPSE_METRICS_PORT": "9000",
    }
    config = generated(out, env)
    assert config["redis"] == {"enabled": True, "host": "redis", "port": 6379}
    assert config["instance_map"] == {"main": {"host": "synapse", "port": 9093}}
    assert config["enable_metrics"] is True
    assert config["worker_replication_secret"]
    module = module_entry(config)
    assert module["worker"] == "synapse-worker"
    assert module["communication"]["client_url"] == "http://127.0.0.1:8083"

    main = HomeServerConfig.load_config("test", ["-c", str(out / "homeserver.yaml")])
    assert sorted(listener.port for listener in main.server.listeners) == [8008, 9000, 9093]
    for index, name in enumerate(["synapse-worker", "second-worker"]):
        worker = HomeServerConfig.load_config(
            "test",
            ["-c", str(out / "homeserver.yaml"), "-c", str(out / "workers" / f"{name}.yaml")],
        )
        assert worker.worker.worker_name == name
        assert worker.worker.worker_app == "synapse.app.generic_worker"
        ports = sorted(listener.port for listener in worker.worker.worker_listeners)
        assert ports == [8083 + index, 9001 + index]
        (client,) = [x for x in worker.worker.worker_listeners if x.port == 8083 + index]
        assert client.http_options is not None
        assert [r.names for r in client.http_options.resources] == [["client"]]


def test_an_existing_config_is_kept_and_overwrite_keeps_its_secrets(tmp_path: Path) -> None:
    out = tmp_path / "data"
    first = generated(out, ENV)
    key = (out / "care.example.org.signing.key").read_text()
    edited = (out / "homeserver.yaml").read_text() + "enable_registration: false\n"
    (out / "homeserver.yaml").write_text(edited)

    again = generate(out, ENV)
    assert again.returncode == 0 and "kept" in again.stdout
    assert (out / "homeserver.yaml").read_text() == edited  # the operator's edit stays

    rewritten = generated(out, {**ENV, "FHIR_BASE_URL": "http://fhir.internal/fhir"}, "--overwrite")
    assert module_entry(rewritten)["fhir"]["base_url"] == "http://fhir.internal/fhir"
    assert "enable_registration" not in rewritten
    for secret in ("macaroon_secret_key", "form_secret", "registration_shared_secret"):
        assert rewritten[secret] == first[secret]
    assert (out / "care.example.org.signing.key").read_text() == key  # never replaced


def test_secrets_from_the_environment_win(tmp_path: Path) -> None:
    env = {**ENV, "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-secret-1b7e"}
    config = generated(tmp_path / "data", env)
    assert config["macaroon_secret_key"] == "macaroon-secret-1b7e"


def test_a_kept_config_for_other_workers_is_a_conflict(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generated(out, ENV)
    env = {**ENV, "SYNAPSE_WORKERS": "synapse-worker", "REDIS_HOST": "redis"}
    result = generate(out, env)
    assert result.returncode == 1
    assert "--overwrite" in result.stderr and "synapse-worker" in result.stderr
    assert not (out / "workers").exists()
    assert module_entry(generated(out, env, "--overwrite"))["worker"] == "synapse-worker"


def test_files_holding_secrets_are_not_readable_by_others(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generated(out, ENV)
    assert (out / "homeserver.yaml").stat().st_mode & 0o777 == 0o640
    assert (out / "care.example.org.signing.key").stat().st_mode & 0o777 == 0o640
    assert (out / "log.config").stat().st_mode & 0o777 == 0o644


@pytest.mark.parametrize("port", ["0", "70000", "http"])
def test_a_port_that_is_no_port_is_refused(tmp_path: Path, port: str) -> None:
    result = generate(tmp_path / "data", {**ENV, "POSTGRES_PORT": port})
    assert result.returncode == 2
    assert "POSTGRES_PORT" in result.stderr


# -- Redis' password --------------------------------------------------------------------------

WORKERS_ENV = {**ENV, "SYNAPSE_WORKERS": "synapse-worker", "REDIS_HOST": "redis"}


def test_the_redis_password_reaches_main_and_the_workers(tmp_path: Path) -> None:
    out = tmp_path / "data"
    config = generated(out, {**WORKERS_ENV, "REDIS_PASSWORD": "redis-password-93c0d1"})
    assert config["redis"]["password"] == "redis-password-93c0d1"
    # Synapse reads it so on main and, through homeserver.yaml, on the worker.
    main = HomeServerConfig.load_config("test", ["-c", str(out / "homeserver.yaml")])
    worker = HomeServerConfig.load_config(
        "test",
        ["-c", str(out / "homeserver.yaml"), "-c", str(out / "workers" / "synapse-worker.yaml")],
    )
    assert main.redis.redis_password == worker.redis.redis_password == "redis-password-93c0d1"


def test_a_kept_config_without_the_redis_password_is_a_conflict(tmp_path: Path) -> None:
    """(An existing volume, then REDIS_PASSWORD set: Redis would refuse the kept file.)"""
    out = tmp_path / "data"
    generated(out, WORKERS_ENV)
    env = {**WORKERS_ENV, "REDIS_PASSWORD": "redis-password-93c0d1"}
    result = generate(out, env)
    assert result.returncode == 1
    assert "REDIS_PASSWORD" in result.stderr and "--overwrite" in result.stderr
    assert_no_secret(result, env)
    assert generated(out, env, "--overwrite")["redis"]["password"] == "redis-password-93c0d1"
    assert generate(out, env).returncode == 0  # kept, and now it agrees


def test_without_a_redis_password_none_is_written(tmp_path: Path) -> None:
    config = generated(tmp_path / "data", WORKERS_ENV)
    assert "password" not in config["redis"]


# -- x_forwarded --------------------------------------------------------------------------------


def forwarded_ports(out: Path, workers: list[str]) -> dict[int, bool]:
    """Every listener Synapse opens (main and workers): port -> whether it trusts
    X-Forwarded-For."""
    ports = {}
    main = HomeServerConfig.load_config("test", ["-c", str(out / "homeserver.yaml")])
    listeners = list(main.server.listeners)
    for name in workers:
        worker = HomeServerConfig.load_config(
            "test",
            ["-c", str(out / "homeserver.yaml"), "-c", str(out / "workers" / f"{name}.yaml")],
        )
        listeners += worker.worker.worker_listeners
    for listener in listeners:
        options = listener.http_options
        ports[listener.port] = bool(options and options.x_forwarded)
    return ports


def test_no_listener_trusts_x_forwarded_for_by_default(tmp_path: Path) -> None:
    out = tmp_path / "data"
    generated(out, {**WORKERS_ENV, "SYNAPSE_METRICS_PORT": "9000"})
    assert forwarded_ports(out, ["synapse-worker"]) == {
        8008: False,
        9000: False,
        9093: False,
        8083: False,
        9001: False,
    }


def test_behind_a_proxy_only_the_client_listeners_trust_x_forwarded_for(tmp_path: Path) -> None:
    out = tmp_path / "data"
    env = {**WORKERS_ENV, "SYNAPSE_METRICS_PORT": "9000", "SYNAPSE_BEHIND_PROXY": "true"}
    generated(out, env)
    # Main's client/federation listener and the worker's client listener; never replication
    # (9093) or metrics.
    assert forwarded_ports(out, ["synapse-worker"]) == {
        8008: True,
        9000: False,
        9093: False,
        8083: True,
        9001: False,
    }


def test_behind_proxy_must_be_a_boolean(tmp_path: Path) -> None:
    result = generate(tmp_path / "data", {**ENV, "SYNAPSE_BEHIND_PROXY": "maybe"})
    assert result.returncode == 2
    assert "SYNAPSE_BEHIND_PROXY" in result.stderr


# -- secrets ------------------------------------------------------------------------------------

ALL_SECRETS = {
    **SECRETS,
    "SYNAPSE_MACAROON_SECRET_KEY": "macaroon-secret-key-0a4f2c",
    "SYNAPSE_FORM_SECRET": "form-secret-value-71b3e9",
    "SYNAPSE_REGISTRATION_SHARED_SECRET": "registration-secret-5d8a60",
}
WORKER_SECRETS = {
    "SYNAPSE_WORKER_REPLICATION_SECRET": "replication-secret-2c9e47",
    "REDIS_PASSWORD": "redis-password-93c0d1",
}


@pytest.mark.parametrize(
    "name", ["POSTGRES_PASSWORD", "FHIR_WEBHOOK_SECRET", "REDIS_PASSWORD", "SYNAPSE_FORM_SECRET"]
)
@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("change-me", "placeholder"),
        ("CHANGE_ME", "placeholder"),
        ("ChangeMe", "placeholder"),
        ("please-change-me-now", "placeholder"),
        ("password", "placeholder"),
        ("0123456789abcde", "shorter than 16"),
        ("x" * 40, "different characters"),
        ("ab" * 20, "different characters"),
        ("change-me ", "placeholder"),
        ("\uff43\uff48\uff41\uff4e\uff47\uff45\uff4d\uff45" * 2, "placeholder"),
    ],
)
def test_a_placeholder_or_short_secret_is_refused_by_name(
    tmp_path: Path, name: str, value: str, problem: str
) -> None:
    """Without --require-secrets too (Compose): a secret that is given must be a secret."""
    env = {**WORKERS_ENV, **WORKER_SECRETS, name: value}
    result = generate(tmp_path / "data", env)
    assert result.returncode == 2
    assert f"{name} is " in result.stderr and problem in result.stderr
    assert value not in result.stdout + result.stderr.replace(name, "")
    assert not (tmp_path / "data" / "homeserver.yaml").exists()


@pytest.mark.parametrize("name", ["REDIS_PASSWORD", "SYNAPSE_FORM_SECRET"])
def test_a_blank_optional_secret_is_refused_not_taken_as_unset(tmp_path: Path, name: str) -> None:
    """(Required ones that are blank are refused as missing.)"""
    result = generate(tmp_path / "data", {**WORKERS_ENV, **WORKER_SECRETS, name: "    "})
    assert result.returncode == 2
    assert f"{name} is blank" in result.stderr
    assert not (tmp_path / "data" / "homeserver.yaml").exists()


def test_without_require_secrets_synapse_secrets_may_be_left_to_chance(tmp_path: Path) -> None:
    config = generated(tmp_path / "data", ENV)
    assert len(config["macaroon_secret_key"]) >= 32


@pytest.mark.parametrize("workers", [False, True], ids=["single", "workers"])
def test_require_secrets_names_every_secret_missing(tmp_path: Path, workers: bool) -> None:
    env = {**(WORKERS_ENV if workers else ENV), "SYNAPSE_FORM_SECRET": "  "}
    result = generate(tmp_path / "data", env, "--require-secrets")
    assert result.returncode == 2
    expected = {
        "SYNAPSE_MACAROON_SECRET_KEY",
        "SYNAPSE_FORM_SECRET",
        "SYNAPSE_REGISTRATION_SHARED_SECRET",
    }
    if workers:
        expected |= set(WORKER_SECRETS)
    named = set(re.findall(r"\b[A-Z][A-Z_]+[A-Z]\b", result.stderr))
    assert named == expected
    assert_no_secret(result, env)
    assert not (tmp_path / "data" / "homeserver.yaml").exists()


def test_require_secrets_refuses_a_placeholder_among_them(tmp_path: Path) -> None:
    env = {**ENV, **ALL_SECRETS, "SYNAPSE_REGISTRATION_SHARED_SECRET": "change-me"}
    result = generate(tmp_path / "data", env, "--require-secrets")
    assert result.returncode == 2
    assert "SYNAPSE_REGISTRATION_SHARED_SECRET is a placeholder" in result.stderr


@pytest.mark.parametrize("workers", [False, True], ids=["single", "workers"])
def test_require_secrets_with_every_secret_given_writes_them(tmp_path: Path, workers: bool) -> None:
    env = {**ENV, **ALL_SECRETS}
    if workers:
        env |= {**WORKERS_ENV, **WORKER_SECRETS}
    config = generated(tmp_path / "data", env, "--overwrite", "--require-secrets")
    assert config["macaroon_secret_key"] == ALL_SECRETS["SYNAPSE_MACAROON_SECRET_KEY"]
    assert config["form_secret"] == ALL_SECRETS["SYNAPSE_FORM_SECRET"]
    assert (
        config["registration_shared_secret"] == (ALL_SECRETS["SYNAPSE_REGISTRATION_SHARED_SECRET"])
    )
    if workers:
        assert (
            config["worker_replication_secret"]
            == (WORKER_SECRETS["SYNAPSE_WORKER_REPLICATION_SECRET"])
        )
        assert config["redis"]["password"] == WORKER_SECRETS["REDIS_PASSWORD"]


# -- symbolic links (the generator may run as root on a volume uid 991 writes) -----------------


def owner_args() -> list[str]:
    """--owner as Compose gives it when we are root (then chown is real), else our own ids."""
    uid, gid = (991, 991) if os.geteuid() == 0 else (os.getuid(), os.getgid())
    return ["--owner", f"{uid}:{gid}"]


def test_a_link_planted_as_the_temporary_file_is_not_written_through(tmp_path: Path) -> None:
    out, victim = tmp_path / "data", tmp_path / "victim"
    out.mkdir()
    victim.write_text("root's file\n")
    (out / ".homeserver.yaml.tmp").symlink_to(victim)
    (out / ".log.config.tmp").symlink_to(victim)
    generated(out, ENV, "--overwrite", *owner_args())
    assert victim.read_text() == "root's file\n"
    assert victim.stat().st_uid == os.getuid()
    assert not (out / "homeserver.yaml").is_symlink()
    assert (out / "homeserver.yaml").stat().st_mode & 0o777 == 0o640


@pytest.mark.parametrize("name", ["homeserver.yaml", "log.config"])
@pytest.mark.parametrize("overwrite", [False, True], ids=["keep", "overwrite"])
def test_a_link_in_place_of_a_config_file_is_refused(
    tmp_path: Path, name: str, overwrite: bool
) -> None:
    out, victim = tmp_path / "data", tmp_path / "victim.yaml"
    out.mkdir()
    victim.write_text("macaroon_secret_key: root-only-secret-8e1f\n")
    (out / name).symlink_to(victim)
    flags = ["--overwrite"] if overwrite else []
    result = generate(out, ENV, *flags, *owner_args())
    assert result.returncode == 2
    assert f"{out / name} is a symbolic link" in result.stderr
    assert victim.read_text() == "macaroon_secret_key: root-only-secret-8e1f\n"
    assert victim.stat().st_uid == os.getuid()
    if (out / "homeserver.yaml").is_file() and not (out / "homeserver.yaml").is_symlink():
        # (Nothing read through the link was copied out.)
        assert "root-only-secret-8e1f" not in (out / "homeserver.yaml").read_text()


def test_a_link_in_place_of_the_workers_directory_is_refused(tmp_path: Path) -> None:
    out, elsewhere = tmp_path / "data", tmp_path / "etc"
    out.mkdir()
    elsewhere.mkdir()
    (out / "workers").symlink_to(elsewhere, target_is_directory=True)
    result = generate(out, WORKERS_ENV, *owner_args())
    assert result.returncode == 2
    assert f"{out / 'workers'} is a symbolic link" in result.stderr
    assert list(elsewhere.iterdir()) == []
    assert elsewhere.stat().st_uid == os.getuid()  # not chowned through the link


def test_a_dangling_link_in_place_of_a_new_signing_key_is_refused(tmp_path: Path) -> None:
    out, target = tmp_path / "data", tmp_path / "planted.key"
    out.mkdir()
    (out / "care.example.org.signing.key").symlink_to(target)
    result = generate(out, ENV, *owner_args())
    assert result.returncode == 2
    assert "signing.key is a symbolic link" in result.stderr
    assert not target.exists()
