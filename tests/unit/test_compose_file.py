"""docker/docker-compose.yml and the Dockerfiles, checked without a Docker engine.

The Compose file, as written and as Compose would run it (variables filled in from
docker/.env.example, with and without the ``workers`` profile), is validated against the
Compose Specification's JSON schema by check-jsonschema (PyPI; it ships the schema as
``vendor.compose-spec``). Then what the schema cannot know: every image pinned, every service
others wait on able to say it is healthy, a missing secret stopping Compose with its name, and
FHIR's notifications reaching the instance that runs the module's background work — the
port checked against the listener sfm-generate-config writes."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest
import yaml
from dockerfile_parse import DockerfileParser

from tests.docker_files import DOCKER, build_context

COMPOSE = DOCKER / "docker-compose.yml"
ENV_EXAMPLE = DOCKER / ".env.example"
GENERATOR = DOCKER / "generate_config.py"
DOCKERFILES = [DOCKER / "Dockerfile", DOCKER / "hapi.Dockerfile"]
# The images compose builds itself (their tags name this project's version).
OWN_IMAGES = {"synapse-fhir:0.1.0", "synapse-fhir-hapi:0.1.0"}
# What docker/.env must give in every profile.
REQUIRED_SECRETS = (
    "POSTGRES_SUPERUSER_PASSWORD",
    "POSTGRES_PASSWORD",
    "HAPI_POSTGRES_PASSWORD",
    "FHIR_WEBHOOK_SECRET",
)


def check_against_compose_spec(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
        + [str(path)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


# -- Compose's variable interpolation and profiles (what `docker compose config` does) ---------

_VARIABLE = re.compile(
    r"\$(?:(?P<escaped>\$)|\{(?P<name>[A-Za-z_][A-Za-z0-9_]*)(?:(?P<op>:?[-?+])(?P<arg>[^}]*))?\})"
)


class MissingVariable(Exception):
    pass


def interpolate(value: Any, env: dict[str, str]) -> Any:
    """Compose's ``${VAR}``, ``${VAR:-default}``, ``${VAR:?error}``, ``${VAR:+alt}`` (and
    their forms without the colon, which treat an empty value as set), ``$$``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match[str]) -> str:
        if match["escaped"]:
            return "$"
        name, op, arg = match["name"], match["op"], match["arg"]
        current = env.get(name)
        is_set = current is not None and (current != "" or (op or ":").startswith(("-", "?", "+")))
        if op in (":-", "-"):
            return current if is_set and current is not None else arg
        if op in (":?", "?"):
            if not is_set:
                raise MissingVariable(f"required variable {name} is missing a value: {arg}")
            return current or ""
        if op in (":+", "+"):
            return arg if is_set else ""
        return current or ""

    return _VARIABLE.sub(substitute, value)


def read_env_file(text: str) -> dict[str, str]:
    env = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            name, _, value = line.partition("=")
            env[name.strip()] = value.strip()
    return env


def example_env(*, workers: bool) -> dict[str, str]:
    """docker/.env.example as a user fills it in; ``workers``: its workers block uncommented."""
    text = ENV_EXAMPLE.read_text()
    if workers:
        block = text.split("# Workers ---", 1)[1]
        text += "\n" + "\n".join(
            line[2:]
            for line in block.splitlines()
            if re.match(r"# [A-Z_]+=", line) and not line.startswith("#   ")
        )
    env = read_env_file(text)
    for name in REQUIRED_SECRETS + (("REDIS_PASSWORD",) if workers else ()):
        assert name in env, f".env.example does not mention {name}"
        env[name] = f"filled-in-{name.lower()}"
    return env


def effective(env: dict[str, str], profiles: set[str]) -> dict[str, Any]:
    """The project Compose would run: variables filled in, services of inactive profiles
    left out with the optional dependencies on them."""
    raw = yaml.safe_load(COMPOSE.read_text())
    model = interpolate(raw, env)
    services = {
        name: service
        for name, service in model["services"].items()
        if not service.get("profiles") or profiles & set(service["profiles"])
    }
    for service in services.values():
        depends = service.get("depends_on", {})
        for target in list(depends):
            if target not in services:
                assert depends[target].get("required") is False, f"needs absent {target}"
                del depends[target]
    model["services"] = services
    return model


def profiles_of(env: dict[str, str]) -> set[str]:
    return {p for p in env.get("COMPOSE_PROFILES", "").split(",") if p}


@pytest.fixture(params=[False, True], ids=["single", "workers"])
def project(request: pytest.FixtureRequest) -> tuple[dict[str, str], dict[str, Any]]:
    env = example_env(workers=request.param)
    assert ("workers" in profiles_of(env)) is request.param
    return env, effective(env, profiles_of(env))


# -- the file against the Compose Specification ---------------------------------------------


def test_the_file_as_written_follows_the_compose_specification() -> None:
    result = check_against_compose_spec(COMPOSE)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_project_compose_runs_follows_the_compose_specification(
    project: tuple[dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    _, model = project
    path = tmp_path / "effective.yml"
    path.write_text(yaml.safe_dump(model))
    result = check_against_compose_spec(path)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_validator_rejects_what_compose_would_reject(tmp_path: Path) -> None:
    """(So a pass above means something.) A misspelt health-check key and an unknown
    dependency condition."""
    model = yaml.safe_load(COMPOSE.read_text())
    model["services"]["postgres"]["healthcheck"]["intervall"] = "5s"
    model["services"]["synapse"]["depends_on"]["postgres"]["condition"] = "service_ready"
    path = tmp_path / "broken.yml"
    path.write_text(yaml.safe_dump(model))
    result = check_against_compose_spec(path)
    assert result.returncode != 0
    assert "intervall" in result.stdout and "service_ready" in result.stdout


# -- what the schema cannot know -------------------------------------------------------------


def test_the_profiles_start_what_they_promise(
    project: tuple[dict[str, str], dict[str, Any]],
) -> None:
    env, model = project
    expected = {"postgres", "synapse-init", "synapse", "hapi"}
    if "workers" in profiles_of(env):
        expected |= {"redis", "synapse-worker"}
    assert set(model["services"]) == expected


def test_every_image_is_pinned() -> None:
    images = [s["image"] for s in yaml.safe_load(COMPOSE.read_text())["services"].values()]
    for dockerfile in DOCKERFILES:
        parser = DockerfileParser(path=str(dockerfile))
        images += [image for image in parser.parent_images]
    assert images
    for image in images:
        name, _, digest = image.partition("@")
        repository, _, tag = name.rpartition(":")
        assert repository and "/" not in tag, f"{image}: no tag"
        assert tag != "latest", f"{image}: latest"
        assert not digest or re.fullmatch(r"sha256:[0-9a-f]{64}", digest), image
        if image not in OWN_IMAGES:
            # A version, not a moving name like "stable" or "lts".
            assert re.match(r"v?\d+\.\d+", tag), f"{image}: {tag} is not a version"


def test_synapse_and_hapi_are_the_tested_versions() -> None:
    constraints = (DOCKER.parent / ".ci" / "constraints.txt").read_text()
    (synapse,) = re.findall(r"^matrix-synapse==(\S+)$", constraints, re.M)
    hapi_version = re.search(
        r"<hapi.version>([^<]+)</hapi.version>", (DOCKER.parent / "hapi" / "pom.xml").read_text()
    )
    assert hapi_version is not None
    synapse_bases = DockerfileParser(path=str(DOCKER / "Dockerfile")).parent_images
    assert set(synapse_bases) == {f"matrixdotorg/synapse:v{synapse}"}
    hapi_base = DockerfileParser(path=str(DOCKER / "hapi.Dockerfile")).baseimage
    # hapiproject/hapi tags are the starter's version: <HAPI version>-<starter revision>.
    assert hapi_base.startswith(f"hapiproject/hapi:v{hapi_version[1]}-")


def test_compose_uses_the_images_the_dockerfiles_build() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    built = {s["image"]: s["build"]["dockerfile"] for s in services.values() if "build" in s}
    assert built == {
        "synapse-fhir:0.1.0": "docker/Dockerfile",
        "synapse-fhir-hapi:0.1.0": "docker/hapi.Dockerfile",
    }
    for name, service in services.items():
        if "build" not in service and service["image"] in OWN_IMAGES:
            # Not pulled from a registry that does not have it: built by its sibling.
            assert service.get("pull_policy") == "never", name


def test_every_service_waited_on_can_say_it_is_ready(
    project: tuple[dict[str, str], dict[str, Any]],
) -> None:
    _, model = project
    services = model["services"]
    for name, service in services.items():
        for target, dependency in service.get("depends_on", {}).items():
            condition = dependency["condition"]
            assert condition in ("service_healthy", "service_completed_successfully"), (
                f"{name} waits for {target} only to start"
            )
            if condition == "service_healthy":
                assert "healthcheck" in services[target], f"{name} waits on {target}"
            else:
                assert services[target].get("restart") == "no", f"{target} is one-shot"
    for name, service in services.items():
        if service.get("restart") != "no":
            assert "healthcheck" in service, f"{name} has no health check"


def test_synapse_health_checks_ask_synapse_and_the_module(
    project: tuple[dict[str, str], dict[str, Any]],
) -> None:
    _, model = project
    for name, service in model["services"].items():
        if name.startswith("synapse") and name != "synapse-init":
            command = " ".join(service["healthcheck"]["test"])
            assert "/health " in command + " " and "/_synapse/client/fhir/health" in command


def test_a_missing_secret_stops_compose_naming_it() -> None:
    for name in REQUIRED_SECRETS:
        env = example_env(workers=False)
        env[name] = ""
        with pytest.raises(MissingVariable, match=name):
            effective(env, set())


def generated_config(env: dict[str, str], tmp_path: Path) -> dict[str, Any]:
    """homeserver.yaml as sfm-generate-config writes it from synapse-init's environment."""
    init = effective(env, profiles_of(env))["services"]["synapse-init"]
    assert init["entrypoint"] == ["sfm-generate-config"]
    result = subprocess.run(
        [sys.executable, str(GENERATOR), "--out", str(tmp_path / "data")],
        env={"PATH": os.environ["PATH"], **{k: str(v) for k, v in init["environment"].items()}},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    return yaml.safe_load((tmp_path / "data" / "homeserver.yaml").read_text())


def generated_listeners(env: dict[str, str], tmp_path: Path) -> dict[str, int]:
    """What sfm-generate-config writes for synapse-init's environment: host -> client port."""
    config = generated_config(env, tmp_path)
    (module,) = config["modules"]
    worker = module["config"]["worker"]
    if worker is None:
        return {"synapse": config["listeners"][0]["port"]}
    worker_file = yaml.safe_load((tmp_path / "data" / "workers" / f"{worker}.yaml").read_text())
    return {worker: worker_file["worker_listeners"][0]["port"]}


def test_notifications_go_to_the_instance_running_the_background_work(
    project: tuple[dict[str, str], dict[str, Any]], tmp_path: Path
) -> None:
    env, model = project
    services = model["services"]
    url = urlsplit(services["hapi"]["environment"]["SYNAPSE_NOTIFY_URL"])
    assert url.path == "/_synapse/client/fhir/notify"
    expected_host = "synapse-worker" if "workers" in profiles_of(env) else "synapse"
    assert url.hostname == expected_host and url.hostname in services
    # The port is the client listener the generator gives that instance.
    assert generated_listeners(env, tmp_path) == {url.hostname: url.port}
    # And the secret HAPI presents is the one the module checks.
    assert (
        services["hapi"]["environment"]["SYNAPSE_NOTIFY_SECRET"]
        == services["synapse-init"]["environment"]["FHIR_WEBHOOK_SECRET"]
    )


def test_the_worker_runs_the_file_the_generator_writes_for_it() -> None:
    services = yaml.safe_load(COMPOSE.read_text())["services"]
    command = " ".join(services["synapse-worker"]["entrypoint"])
    assert "--config-path=/data/workers/synapse-worker.yaml" in command
    assert services["synapse-worker"]["environment"]["SYNAPSE_WORKER"] == (
        "synapse.app.generic_worker"
    )


def test_the_image_installs_the_generator_where_the_init_service_calls_it() -> None:
    parser = DockerfileParser(path=str(DOCKER / "Dockerfile"))
    copies = [i["value"] for i in parser.structure if i["instruction"] == "COPY"]
    assert any(
        c.endswith("docker/generate_config.py /usr/local/bin/sfm-generate-config") for c in copies
    )
    assert "--chmod=0755" in " ".join(copies)
    init = yaml.safe_load(COMPOSE.read_text())["services"]["synapse-init"]
    assert init["entrypoint"] == ["sfm-generate-config"]


def test_the_build_context_holds_what_the_dockerfiles_copy_and_little_else() -> None:
    context = build_context()
    for dockerfile in DOCKERFILES:
        for instruction in DockerfileParser(path=str(dockerfile)).structure:
            if instruction["instruction"] != "COPY" or "--from=" in instruction["value"]:
                continue
            *sources, _ = [w for w in instruction["value"].split() if not w.startswith("--")]
            for source in sources:
                assert source in context, f"{dockerfile.name} copies {source}: not in the context"
    assert "synapse_fhir_module/module.py" in context
    assert not [p for p in context if p.startswith((".venv", ".git/", "tests", "bench"))]
    assert not [p for p in context if "/target/" in p or "__pycache__" in p]


# -- hardening ----------------------------------------------------------------------------------


def test_synapse_is_not_the_postgres_superuser(
    project: tuple[dict[str, str], dict[str, Any]],
) -> None:
    """The image's superuser (POSTGRES_USER) is not the role Synapse logs in as, nor its
    password Synapse's; the init script gets Synapse's own password to create its role."""
    env, model = project
    postgres = model["services"]["postgres"]["environment"]
    synapse = model["services"]["synapse-init"]["environment"]
    assert postgres["POSTGRES_USER"] == "postgres" != synapse["POSTGRES_USER"] == "synapse"
    assert postgres["POSTGRES_PASSWORD"] == env["POSTGRES_SUPERUSER_PASSWORD"]
    assert postgres["POSTGRES_PASSWORD"] != synapse["POSTGRES_PASSWORD"]
    assert postgres["SYNAPSE_POSTGRES_PASSWORD"] == synapse["POSTGRES_PASSWORD"]
    assert synapse["POSTGRES_DB"] == "synapse"
    # (tests/integration/test_docker_install.py runs the script against PostgreSQL.)
    script = (DOCKER / "postgres-init" / "10-databases.sh").read_text()
    assert "CREATE ROLE synapse LOGIN NOSUPERUSER" in script
    assert "CREATE DATABASE synapse OWNER synapse" in script


def run_redis_entrypoint(
    env: dict[str, str], tmp_path: Path
) -> tuple[subprocess.CompletedProcess[str], list[str] | None]:
    """The redis service's entrypoint, run with sh as the container would; the image's
    docker-entrypoint.sh is replaced by one that records what it was asked to run."""
    model = effective(env, {"workers"})
    redis = model["services"]["redis"]
    bin_dir, calls = tmp_path / "bin", tmp_path / "calls"
    bin_dir.mkdir(exist_ok=True)
    stub = bin_dir / "docker-entrypoint.sh"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\n" "$@" > {calls}\n')
    stub.chmod(0o755)
    argv = ["sh" if a == "/bin/sh" else a for a in redis["entrypoint"]]
    result = subprocess.run(
        argv,
        env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **redis["environment"]},
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    return result, calls.read_text().splitlines() if calls.exists() else None


def test_redis_demands_the_password_synapse_is_given(tmp_path: Path) -> None:
    env = example_env(workers=True)
    result, ran = run_redis_entrypoint(env, tmp_path)
    assert result.returncode == 0, result.stderr
    assert ran == ["redis-server", "--requirepass", env["REDIS_PASSWORD"]]
    # The generator gives Synapse (main, and the workers through homeserver.yaml) the same.
    assert generated_config(env, tmp_path)["redis"]["password"] == env["REDIS_PASSWORD"]
    # Its health check authenticates (Redis answers NOAUTH to a bare PING).
    (check,) = yaml.safe_load(COMPOSE.read_text())["services"]["redis"]["healthcheck"]["test"][1:]
    assert check.startswith('REDISCLI_AUTH="$$REDIS_PASSWORD" redis-cli ping')


def test_redis_without_a_password_refuses_to_start_saying_why(tmp_path: Path) -> None:
    env = example_env(workers=True)
    env["REDIS_PASSWORD"] = ""
    result, ran = run_redis_entrypoint(env, tmp_path)
    assert result.returncode == 1
    assert ran is None
    assert "REDIS_PASSWORD is empty" in result.stderr and "docker/.env" in result.stderr


def test_the_single_profile_needs_no_redis_password() -> None:
    env = example_env(workers=False)
    assert "REDIS_PASSWORD" not in env
    effective(env, profiles_of(env))  # no MissingVariable


def test_fhir_auth_extra_module_config_and_the_proxy_setting_reach_the_generator(
    tmp_path: Path,
) -> None:
    env = example_env(workers=False) | {
        "FHIR_BEARER_TOKEN": "fhir-bearer-token-6e2a90",
        "FHIR_MODULE_CONFIG_EXTRA": '{"sync": {"poll_interval": "30s"}}',
        "SYNAPSE_BEHIND_PROXY": "true",
    }
    config = generated_config(env, tmp_path)
    (module,) = config["modules"]
    assert module["config"]["fhir"]["auth"] == {"bearer_token": "fhir-bearer-token-6e2a90"}
    assert module["config"]["sync"] == {"poll_interval": "30s"}
    assert config["listeners"][0]["x_forwarded"] is True


def test_by_default_synapse_trusts_no_x_forwarded_for(tmp_path: Path) -> None:
    config = generated_config(example_env(workers=False), tmp_path)
    assert [listener["x_forwarded"] for listener in config["listeners"]] == [False]


def test_the_env_file_with_real_secrets_is_ignored_by_git() -> None:
    ignored = subprocess.run(
        ["git", "check-ignore", "--no-index", "docker/.env", "docker/.env.example"],
        cwd=DOCKER.parent,
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )
    assert ignored.stdout.split() == ["docker/.env"]
