"""Fixtures for the integration tests: the real HAPI dev server (once per session)
and real Synapse homeservers with the module loaded, all on 127.0.0.1."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.postgres import PostgresCluster, PostgresDatabase
from devstack.smtp import SmtpServer
from devstack.synapse import SynapseServer, module_config
from synapse_fhir_module.config import FhirConfig
from synapse_fhir_module.fhir.client import FhirClient
from tests.conftest import SERVER_LOGS


@pytest.fixture(scope="session")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("servers")


@pytest.fixture(scope="session")
def hapi(run_dir: Path) -> Iterator[HapiDevServer]:
    """The HAPI dev server shared by the whole session (in-memory H2)."""
    server = HapiDevServer(run_dir)
    SERVER_LOGS.append(server.process.log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def quiet_hapi(run_dir: Path) -> Iterator[HapiDevServer]:
    """A HAPI that notifies nobody and lets a resource others refer to be deleted (as many
    production servers do), for homeservers whose sync runs: each test's own ``notify``
    calls, the sweep and the full reconcile are all that reaches them. (Not the session's
    ``hapi``: a sync at start-up makes spaces for every team it finds, and the other tests
    leave hundreds there.)"""
    server = HapiDevServer(run_dir / "quiet-hapi", integrity_on_delete=False)
    SERVER_LOGS.append(server.process.log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="session")
def own_hapi(run_dir: Path) -> Iterator[HapiDevServer]:
    """A second HAPI, on an H2 file database, for the tests that stop and start it."""
    server = HapiDevServer(run_dir / "own-hapi", database_file=run_dir / "own-hapi" / "fhir")
    SERVER_LOGS.append(server.process.log_path)
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hapi_running(own_hapi: HapiDevServer) -> Iterator[HapiDevServer]:
    """Whatever a test does to HAPI, the next test finds it running."""
    yield own_hapi
    if not own_hapi.process.running:
        own_hapi.start()


@pytest.fixture(scope="session")
def postgres(run_dir: Path) -> Iterator[PostgresCluster]:
    """A throwaway PostgreSQL cluster shared by the session (the pgserver wheel's binaries
    that `make setup` installs, else Debian's: devstack/postgres.py).

    Missing PostgreSQL is an error, never a skip."""
    cluster = PostgresCluster(run_dir)
    SERVER_LOGS.append(cluster.process.log_path)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.stop()  # also after a failed start: no server or data directory left behind


@pytest.fixture(scope="module")
def smtp() -> Iterator[SmtpServer]:
    """A throwaway SMTP server on loopback that keeps what it receives (one per module)."""
    server = SmtpServer()
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def postgres_database(postgres: PostgresCluster) -> PostgresDatabase:
    """A new, empty database of the session's cluster, as Synapse requires it."""
    return postgres.create_database(f"test_{uuid.uuid4().hex[:12]}")


@pytest.fixture(scope="session")
def synapse(hapi: HapiDevServer, run_dir: Path) -> Iterator[SynapseServer]:
    """A Synapse with the module, default config, talking to the session's HAPI."""
    with started_synapse(run_dir / "synapse-main", module_config(hapi.base_url)) as server:
        yield server


@pytest.fixture
def start_synapse(run_dir: Path) -> Iterator[Callable[..., SynapseServer]]:
    """Start extra homeservers for one test (each stopped at the end of it); ``env``: more
    environment for the Synapse process (kept for its restarts)."""
    started: list[SynapseServer] = []

    def start(
        fhir_module: dict[str, Any] | None, env: dict[str, str] | None = None, **kwargs: Any
    ) -> SynapseServer:
        server = SynapseServer(run_dir / f"synapse-{uuid.uuid4().hex[:8]}", fhir_module, **kwargs)
        server.process.env = env
        SERVER_LOGS.extend([server.log_path, server.process.log_path])
        started.append(server)
        server.start()
        return server

    yield start
    for server in started:
        server.stop()


@pytest.fixture(scope="session")
def admin(synapse: SynapseServer) -> MatrixUser:
    return register_user(synapse, "admin", admin=True)


@pytest.fixture
def fhir(hapi: HapiDevServer) -> FhirClient:
    return FhirClient(FhirConfig(base_url=hapi.base_url, timeout=30.0))


@pytest.fixture
def run_tag() -> str:
    """A value unique to this test, to find exactly the resources it wrote."""
    return f"t{uuid.uuid4().hex[:12]}"


@contextmanager
def started_synapse(workdir: Path, fhir_module: dict[str, Any] | None) -> Iterator[SynapseServer]:
    server = SynapseServer(workdir, fhir_module)
    SERVER_LOGS.extend([server.log_path, server.process.log_path])
    server.start()
    try:
        yield server
    finally:
        server.stop()
