"""What the Docker images do, done here without a Docker engine.

- docker/Dockerfile's install step: the wheel built as its first stage builds it (from the files
  it copies), installed as its second stage installs it (with .ci/constraints.txt, so the pinned
  Synapse) into a clean venv outside the repository; sfm-generate-config writes the config
  from the variables Compose gives it; that venv's Synapse starts on it against PostgreSQL and
  the HAPI dev server, and the module answers with FHIR reachable and the webhook secret set.
- docker/postgres-init/10-databases.sh, run as the postgres image runs it on a fresh volume
  (only the superuser exists), leaves Synapse and HAPI each a role (no superuser) owning a
  database of its own, C collation.
- docker/HapiHealthCheck.java, compiled as docker/hapi.Dockerfile compiles it, tells a FHIR
  server that answers from one that does not; that file's Maven stage builds the shim jar from
  what it copies.
- The workers profile's files (main + one generic worker, Redis with a password) run: both
  authenticate to Redis, the worker takes the module's background work and /notify.
- The redis service's entrypoint starts Redis with the password, and its health check
  authenticates.
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import zipfile
from functools import partial
from pathlib import Path

import psycopg2
import pytest
import requests
import yaml

from devstack.hapi import HapiDevServer
from devstack.ports import free_port
from devstack.postgres import PostgresCluster, PostgresDatabase
from devstack.processes import ManagedProcess
from devstack.redis import RedisServer, find_redis_server
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.docker_files import DOCKER, REPO, build_context, final_stage, stage

WEBHOOK_SECRET = "compose-webhook-secret-5c1d"
REDIS_PASSWORD = "compose-redis-password-8a4e"


def generator_env(
    server_name: str, port: int, database: PostgresDatabase, fhir_base_url: str
) -> dict[str, str]:
    """What sfm-generate-config reads, for a Synapse on 127.0.0.1:``port`` and ``database``."""
    return {
        "PATH": os.environ["PATH"],
        "SYNAPSE_SERVER_NAME": server_name,
        "SYNAPSE_PUBLIC_BASEURL": f"http://127.0.0.1:{port}/",
        "SYNAPSE_HTTP_PORT": str(port),
        "SYNAPSE_BIND_ADDRESS": "127.0.0.1",
        "POSTGRES_HOST": database.host,
        "POSTGRES_PORT": str(database.port),
        "POSTGRES_DB": database.dbname,
        "POSTGRES_USER": database.user,
        "POSTGRES_PASSWORD": database.password,
        "FHIR_BASE_URL": fhir_base_url,
        "FHIR_WEBHOOK_SECRET": WEBHOOK_SECRET,
    }


def run(argv: list[str], *, cwd: Path, timeout: float, env: dict[str, str] | None = None) -> str:
    result = subprocess.run(
        argv, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )
    assert result.returncode == 0, f"{argv[:4]} failed:\n{result.stdout}\n{result.stderr}"
    return result.stdout + result.stderr


def replay_copies(instructions: list[dict], into: Path) -> Path:
    """The stage's ``WORKDIR`` and ``COPY <repo paths> <dest>``, into a directory standing
    for its image's file system; returns the working directory."""
    workdir = into
    context = build_context()
    for x in instructions:
        if x["instruction"] == "WORKDIR":
            workdir = into / x["value"].lstrip("/")
            workdir.mkdir(parents=True, exist_ok=True)
        if x["instruction"] != "COPY" or "--from=" in x["value"]:
            continue
        *sources, dest = [w for w in x["value"].split() if not w.startswith("--")]
        target = into / dest.lstrip("/") if dest.startswith("/") else workdir / dest
        for source in sources:
            path = REPO / source
            # (Docker copies a directory's contents, and a file into a destination "dir/".)
            where = target / path.name if dest.endswith("/") and not path.is_dir() else target
            # What the build context holds of it (.dockerignore applied), nothing else.
            for included in sorted(context):
                if included == source or included.startswith(source.rstrip("/") + "/"):
                    file = REPO / included
                    if file.is_file():
                        copied = where / file.relative_to(path) if path.is_dir() else where
                        copied.parent.mkdir(parents=True, exist_ok=True)
                        shutil.copy(file, copied)
    return workdir


@pytest.mark.slow
def test_the_dockerfile_install_step_loads_the_module(
    tmp_path_factory: pytest.TempPathFactory,
    hapi: HapiDevServer,
    postgres_database: PostgresDatabase,
) -> None:
    root = tmp_path_factory.mktemp("docker-install")  # outside the repository
    # Stage "wheel": its COPYs, then its RUN, word for word.
    wheel_stage = stage(DOCKER / "Dockerfile", "wheel")
    assert replay_copies(wheel_stage, root) == root  # (no WORKDIR: /)
    (command,) = [x["value"] for x in wheel_stage if x["instruction"] == "RUN"]
    assert command == "pip wheel --no-cache-dir --no-deps --wheel-dir /wheels /src"
    wheels = root / "wheels"
    run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-cache-dir",
            "--no-deps",
            "--wheel-dir",
            str(wheels),
        ]
        + [str(root / "src")],
        cwd=root,
        timeout=300,
    )
    (wheel,) = wheels.glob("synapse_fhir_module-*.whl")

    # Stage 2's install, into a clean venv. (The image has Synapse's own psycopg2; the venv
    # gets the same module from psycopg2-binary.)
    dockerfile = (DOCKER / "Dockerfile").read_text()
    assert "pip install --no-cache-dir -c /tmp/constraints.txt /tmp/wheels/*.whl" in dockerfile
    venv = root / "venv"
    run([sys.executable, "-m", "venv", str(venv)], cwd=root, timeout=120)
    python = str(venv / "bin" / "python")
    run(
        [
            python,
            "-m",
            "pip",
            "install",
            "-q",
            "--no-cache-dir",
            "-c",
            str(REPO / ".ci" / "constraints.txt"),
        ]
        + [str(wheel), "psycopg2-binary"],
        cwd=root,
        timeout=600,
    )
    where = run(
        [
            python,
            "-c",
            "import synapse, synapse_fhir_module as m; print(synapse.__version__, m.__file__)",
        ],
        cwd=root,
        timeout=60,
    ).split()
    constraints = (REPO / ".ci" / "constraints.txt").read_text()
    assert f"matrix-synapse=={where[0]}\n" in constraints
    assert Path(where[1]).is_relative_to(venv), "the module came from elsewhere than the venv"

    # sfm-generate-config (the image runs it with its Python), as synapse-init calls it.
    data = root / "data"
    port = free_port()
    env = {
        **generator_env("compose.test", port, postgres_database, hapi.base_url),
        # (The session's HAPI is shared: no sync making spaces for every team in it.)
        "FHIR_MODULE_CONFIG_EXTRA": '{"sync": {"enabled": false}}',
    }
    printed = run(
        [python, str(DOCKER / "generate_config.py"), "--out", str(data)],
        cwd=root,
        timeout=60,
        env=env,
    )
    assert postgres_database.password not in printed and WEBHOOK_SECRET not in printed

    synapse = ManagedProcess(
        "synapse-from-wheel",
        [python, "-m", "synapse.app.homeserver", "-c", str(data / "homeserver.yaml")],
        root / "synapse.log",
        cwd=data,
        env={"PATH": os.environ["PATH"]},
    )
    SERVER_LOGS.append(synapse.log_path)
    base = f"http://127.0.0.1:{port}"
    synapse.start()
    try:
        wait_until(
            lambda: _answers(synapse, f"{base}/health"),
            timeout=180,
            what=f"the venv's Synapse answering {base}/health (log: {synapse.log_path})",
            interval=0.2,
        )
        health = wait_until(
            lambda: _fhir_reachable(f"{base}/_synapse/client/fhir/health"),
            timeout=60,
            what="the module reporting FHIR reachable",
            interval=0.5,
        )
        assert health["fhir"] == {"reachable": True}
        # The webhook secret the generator wrote is the one the module checks.
        notify = f"{base}/_synapse/client/fhir/notify"
        body = {"resourceType": "CareTeam", "id": "compose-1", "versionId": "1", "action": "update"}
        wrong = requests.post(
            notify, json=body, headers={"Authorization": "Bearer nope"}, timeout=10
        )
        right = requests.post(
            notify, json=body, headers={"Authorization": f"Bearer {WEBHOOK_SECRET}"}, timeout=10
        )
        assert (wrong.status_code, right.status_code) == (401, 202)
    finally:
        synapse.stop()


def _answers(process: ManagedProcess, url: str) -> bool:
    assert process.running, (
        f"Synapse exited ({process.exit_code()}):\n{process.log_path.read_text()[-3000:]}"
    )
    try:
        return requests.get(url, timeout=2).status_code == 200
    except requests.RequestException:
        return False


def _subscribers(redis: RedisServer) -> int:
    """Redis' clients subscribed to a channel (CLIENT LIST's sub=N)."""
    listing = redis.command("CLIENT", "LIST").decode()
    return sum(1 for line in listing.splitlines() if re.search(r" sub=[1-9]", line))


def _fhir_reachable(url: str) -> dict | None:
    health = requests.get(url, timeout=10).json()
    return health if health["fhir"]["reachable"] else None


def test_the_postgres_init_script_gives_synapse_and_hapi_their_own_databases(
    run_dir: Path,
) -> None:
    # A cluster of its own: as the postgres image's fresh volume, only the superuser.
    postgres = PostgresCluster(run_dir, with_role=False)
    SERVER_LOGS.append(postgres.process.log_path)
    postgres.start()
    try:
        _run_init_script(postgres)
    finally:
        postgres.stop()


def _run_init_script(postgres: PostgresCluster) -> None:
    psql = postgres.bindir / "psql"
    if not psql.exists():
        psql = Path(shutil.which("psql") or psql)
    assert psql.exists(), f"psql not found beside {postgres.bindir}/postgres or on PATH"
    passwords = {"synapse": "synapse-db-password-7b3f", "hapi": "hapi-db-password-2e9a"}
    env = {
        "PATH": f"{psql.parent}:{os.environ['PATH']}",
        # As the postgres image runs it (docker-compose.yml): the superuser, over the socket.
        "POSTGRES_USER": "postgres",
        "POSTGRES_DB": "postgres",
        "PGHOST": str(postgres.socket_dir),
        "PGPORT": str(postgres.port),
        "SYNAPSE_POSTGRES_PASSWORD": passwords["synapse"],
        "HAPI_POSTGRES_PASSWORD": passwords["hapi"],
    }
    # As ourselves: the socket trusts local connections, and the cluster's user (when we are
    # root) might not be able to read a checkout in a private directory.
    run(
        ["sh", str(DOCKER / "postgres-init" / "10-databases.sh")],
        cwd=Path("/"),
        timeout=60,
        env=env,
    )
    for role, password in passwords.items():
        conn = psycopg2.connect(
            host=postgres.host,
            port=postgres.port,
            dbname=role,
            user=role,
            password=password,
            connect_timeout=10,
        )
        try:
            with conn.cursor() as cur:
                cur.execute(
                    "SELECT current_user, pg_get_userbyid(datdba),"
                    " pg_encoding_to_char(encoding), datcollate, datctype"
                    " FROM pg_database WHERE datname = current_database()"
                )
                assert cur.fetchone() == (role, role, "UTF8", "C", "C")
                cur.execute(
                    "SELECT rolsuper, rolcreatedb, rolcreaterole FROM pg_roles"
                    " WHERE rolname = current_user"
                )
                assert cur.fetchone() == (False, False, False), f"{role} has powers"
                # The owner makes its tables (PostgreSQL 15+: public belongs to the owner).
                cur.execute("CREATE TABLE made_by_owner (x int)")
                # And cannot reach the other's database.
                other = "hapi" if role == "synapse" else "synapse"
                cur.execute("SELECT has_database_privilege(%s, 'CREATE')", (other,))
                assert cur.fetchone() == (False,)
        finally:
            conn.close()


def test_the_hapi_health_check_tells_up_from_down(hapi: HapiDevServer, tmp_path: Path) -> None:
    (javac,) = [
        x["value"] for x in stage(DOCKER / "hapi.Dockerfile", "shim") if "javac" in x["value"]
    ]
    assert javac == "javac --release 17 -d /build/healthcheck /build/HapiHealthCheck.java"
    classes = tmp_path / "healthcheck"
    run(
        ["javac", "--release", "17", "-d", str(classes), str(DOCKER / "HapiHealthCheck.java")],
        cwd=tmp_path,
        timeout=120,
    )

    def check(url: str) -> int:
        return subprocess.run(
            [
                "java",
                "-XX:TieredStopAtLevel=1",
                "-XX:+UseSerialGC",
                "-Xmx32m",
                "-cp",
                str(classes),
                "HapiHealthCheck",
                url,
            ],
            capture_output=True,
            timeout=60,
            check=False,
        ).returncode

    assert check(f"{hapi.base_url}/metadata") == 0
    assert check(f"{hapi.base_url}/no-such-thing") == 1
    assert check(f"http://127.0.0.1:{free_port()}/fhir/metadata") == 1


def test_the_shim_stage_builds_the_jar_from_what_it_copies(tmp_path: Path) -> None:
    """docker/hapi.Dockerfile's Maven stage, replayed from its own COPYs and RUN: the files it
    copies are all the build needs. (Offline, from the Maven repository `make setup` filled;
    in Docker the same command downloads.)"""
    shim = stage(DOCKER / "hapi.Dockerfile", "shim")
    workdir = replay_copies(shim, tmp_path)
    (mvn,) = [
        x["value"] for x in shim if x["instruction"] == "RUN" and x["value"].startswith("mvn")
    ]
    assert mvn == "mvn -B -ntp -f hapi/pom.xml -pl interceptor package -DskipTests"
    run([*mvn.split(), "-o", "-q"], cwd=workdir, timeout=300)
    jar = workdir / "hapi" / "interceptor" / "target" / "synapse-notify-interceptor.jar"
    (copy_jar,) = [
        x["value"]
        for x in final_stage(DOCKER / "hapi.Dockerfile")
        if "interceptor.jar" in x["value"]
    ]
    assert copy_jar.split()[1] == "/build/" + str(jar.relative_to(workdir))
    with zipfile.ZipFile(jar) as contents:
        assert "org/synapse_fhir/notify/SynapseNotifyInterceptor.class" in contents.namelist()


def test_the_generated_worker_setup_gives_the_worker_the_background_work(
    tmp_path: Path,
    quiet_hapi: HapiDevServer,
    postgres_database: PostgresDatabase,
    run_dir: Path,
) -> None:
    """What the workers profile runs, from sfm-generate-config's files: main and the worker
    replicate through Redis, and the worker — where HAPI's notifications go — runs the sync."""
    redis = RedisServer(run_dir, password=REDIS_PASSWORD)
    SERVER_LOGS.append(redis.process.log_path)
    main_port, replication_port, worker_port = free_port(), free_port(), free_port()
    data = tmp_path / "data"
    env = {
        **generator_env("workers.compose.test", main_port, postgres_database, quiet_hapi.base_url),
        "SYNAPSE_WORKERS": "synapse-worker",
        "REDIS_HOST": redis.host,
        "REDIS_PORT": str(redis.port),
        "REDIS_PASSWORD": REDIS_PASSWORD,
        "SYNAPSE_MAIN_HOST": "127.0.0.1",
        "SYNAPSE_REPLICATION_PORT": str(replication_port),
        "SYNAPSE_WORKER_PORT_BASE": str(worker_port),
    }
    generator = [sys.executable, str(DOCKER / "generate_config.py"), "--out", str(data)]
    run(generator, cwd=tmp_path, timeout=60, env=env)
    config = str(data / "homeserver.yaml")
    main = ManagedProcess(
        "synapse-generated-main",
        [sys.executable, "-m", "synapse.app.homeserver", "-c", config],
        tmp_path / "main.log",
        cwd=data,
    )
    worker = ManagedProcess(
        "synapse-generated-worker",
        [sys.executable, "-m", "synapse.app.generic_worker", "-c", config]
        + ["-c", str(data / "workers" / "synapse-worker.yaml")],
        tmp_path / "worker.log",
        cwd=data,
    )
    SERVER_LOGS.extend([main.log_path, worker.log_path])
    main_url, worker_url = f"http://127.0.0.1:{main_port}", f"http://127.0.0.1:{worker_port}"
    try:
        redis.start()
        for process, url in ((main, main_url), (worker, worker_url)):
            process.start()
            wait_until(
                lambda p=process, u=url: _answers(p, f"{u}/health"),
                timeout=180,
                what=f"{process.name} answering {url}/health (log: {process.log_path})",
                interval=0.2,
            )
        # Both replicate through Redis, which takes only authenticated clients: each has
        # subscribed (a client that did not AUTH could not).
        wait_until(
            lambda: _subscribers(redis) >= 2,
            timeout=60,
            what="main and the worker subscribed to Redis with the generated password",
            interval=0.5,
        )
        on_worker = wait_until(
            lambda: _fhir_reachable(f"{worker_url}/_synapse/client/fhir/health"),
            timeout=60,
            what="the worker's module reporting FHIR reachable",
            interval=0.5,
        )
        on_main = requests.get(f"{main_url}/_synapse/client/fhir/health", timeout=10).json()
        assert (on_worker["sync"]["running"], on_main["sync"]["running"]) == (True, False)
        notified = requests.post(
            f"{worker_url}/_synapse/client/fhir/notify",
            json={
                "resourceType": "CareTeam",
                "id": "compose-2",
                "versionId": "1",
                "action": "update",
            },
            headers={"Authorization": f"Bearer {WEBHOOK_SECRET}"},
            timeout=10,
        )
        assert notified.status_code == 202
    finally:
        worker.stop()
        main.stop()
        redis.stop()


def test_the_compose_redis_demands_its_password_and_its_health_check_gives_it(
    tmp_path: Path, run_dir: Path
) -> None:
    """docker-compose.yml's redis entrypoint and health check, run with sh against a real
    redis-server: the image's docker-entrypoint.sh and redis-cli are stood in for by ones that
    add only a free port on 127.0.0.1 (the container has its own network)."""
    service = yaml.safe_load((DOCKER / "docker-compose.yml").read_text())["services"]["redis"]
    server = Path(find_redis_server())
    cli = server.parent / "redis-cli"
    if not cli.exists():
        cli = Path(shutil.which("redis-cli") or cli)
    assert cli.exists(), f"redis-cli not found beside {server} or on PATH"
    port = free_port()
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    (bin_dir / "docker-entrypoint.sh").write_text(
        f'#!/bin/sh\n[ "$1" = redis-server ] && shift\nexec {server} "$@"'
        f" --port {port} --bind 127.0.0.1 --save '' --appendonly no --dir {tmp_path}\n"
    )
    (bin_dir / "redis-cli").write_text(f'#!/bin/sh\nexec {cli} -p {port} "$@"\n')
    for stub in bin_dir.iterdir():
        stub.chmod(0o755)
    path = f"{bin_dir}:{os.environ['PATH']}"
    # Compose's $$ is a $ in the container.
    entrypoint = [word.replace("$$", "$") for word in service["entrypoint"]]
    check = service["healthcheck"]["test"][1].replace("$$", "$")

    def healthy(password: str) -> bool:
        result = subprocess.run(
            ["sh", "-c", check],
            env={"PATH": path, "REDIS_PASSWORD": password},
            capture_output=True,
            timeout=30,
            check=False,
        )
        return result.returncode == 0

    redis = ManagedProcess(
        "compose-redis",
        entrypoint,
        tmp_path / "redis.log",
        env={"PATH": path, "REDIS_PASSWORD": REDIS_PASSWORD},
    )
    SERVER_LOGS.append(redis.log_path)
    redis.start()
    try:
        wait_until(
            partial(healthy, REDIS_PASSWORD),
            timeout=30,
            what=f"the health check passing (log: {redis.log_path})",
            interval=0.2,
        )
        assert not healthy("wrong-password-0000")
        with socket.create_connection(("127.0.0.1", port), timeout=5) as anonymous:
            anonymous.sendall(b"PING\r\n")
            assert anonymous.recv(64).startswith(b"-NOAUTH")
    finally:
        redis.stop()
