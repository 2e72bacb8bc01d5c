"""The module with Synapse workers: a main process plus one generic worker, ``background``,
on PostgreSQL with Redis replication.

With ``worker: background`` in the module config, members send through the main process,
which stores their messages; the worker — the one instance that records — takes each
from its ``on_new_event`` callback (replication brings it there) into memory and writes it
to FHIR, and each message is in the session's HAPI exactly once. Restarted after being
down, the worker reads Synapse's event stream on from its saved position (the service
user's ``/sync``, through the main process's client listener), so a message sent in the
meantime is written too.

The other way round: with ``stream_writers.events`` on the worker (it persists every
event) and the module's background work on the main process (no ``worker`` key), members
send through the worker while the main process is stopped; restarted, the main process
reads on from its saved position, and nothing is lost or written twice.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.fhir_seed import FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, register_user
from devstack.postgres import PostgresDatabase
from devstack.redis import RedisServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.care_network import CareNetwork
from tests.integration.matrix_views import invited_space, membership
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    event_ids_in_thread,
    first_written,
    health,
    thread_holding,
)

WORKER = "background"
HEALTH_PATH = "/_synapse/client/fhir/health"
WRITTEN = "synapse_fhir_communications_written_total"


@pytest.fixture
def redis(run_dir: Path) -> Iterator[RedisServer]:
    """A throwaway Redis (devstack/redis.py) for one homeserver (Synapse names its
    channels after server_name: two example.org must not share one). Missing is an error,
    never a skip."""
    server = RedisServer(run_dir)
    SERVER_LOGS.append(server.process.log_path)
    try:
        server.start()
        yield server
    finally:
        server.stop()


@pytest.fixture
def synapse_with_worker(
    hapi: HapiDevServer, run_dir: Path, postgres_database: PostgresDatabase, redis: RedisServer
) -> Iterator[SynapseServer]:
    server = SynapseServer(
        run_dir / f"synapse-workers-{postgres_database.dbname}",
        module_config(hapi.base_url, worker=WORKER),
        postgres=postgres_database,
        redis=redis,
        worker=WORKER,
        metrics=True,
    )
    with running(server):
        yield server


@pytest.fixture
def synapse_syncing_on_worker(
    hapi_running: HapiDevServer,
    run_dir: Path,
    postgres_database: PostgresDatabase,
    redis: RedisServer,
) -> Iterator[SynapseServer]:
    """The FHIR → Matrix sync on the worker, Synapse on PostgreSQL, on the HAPI the outage
    tests share (the session's holds every test's teams, and the first sweep makes a space
    for each)."""
    server = SynapseServer(
        run_dir / f"synapse-sync-{postgres_database.dbname}",
        module_config(
            hapi_running.base_url, worker=WORKER, sync={"enabled": True, "poll_interval": "1h"}
        ),
        postgres=postgres_database,
        redis=redis,
        worker=WORKER,
    )
    with running(server):
        yield server


@pytest.fixture
def synapse_persisting_on_worker(
    hapi: HapiDevServer, run_dir: Path, postgres_database: PostgresDatabase, redis: RedisServer
) -> Iterator[SynapseServer]:
    """The worker persists every event (``stream_writers.events``); the module's background
    work runs on the main process (no ``worker`` key)."""
    server = SynapseServer(
        run_dir / f"synapse-writer-{postgres_database.dbname}",
        module_config(hapi.base_url),
        postgres=postgres_database,
        redis=redis,
        worker=WORKER,
        worker_persists_events=True,
        metrics=True,
    )
    with running(server):
        yield server


@contextmanager
def running(server: SynapseServer) -> Iterator[SynapseServer]:
    """Started, with its logs kept for a failed run; stopped (worker, then main) after."""
    assert server.worker_log_path is not None and server.worker_process is not None
    SERVER_LOGS.extend(
        [
            server.log_path,
            server.process.log_path,
            server.worker_log_path,
            server.worker_process.log_path,
        ]
    )
    try:
        server.start()
        yield server
    finally:
        server.stop()


def metric(url: str | None, name: str) -> float | None:
    assert url is not None
    for line in requests.get(url, timeout=10).text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    return None


def worker_health(server: SynapseServer) -> dict[str, Any]:
    response = requests.get(f"{server.worker_url}{HEALTH_PATH}", timeout=10)
    return dict(response.json())


def test_messages_sent_via_the_main_process_are_written_once_by_the_worker(
    hapi: HapiDevServer, synapse_with_worker: SynapseServer
) -> None:
    server = synapse_with_worker
    _network, _service, room, gp = care_room(server, hapi.base_url)
    assert gp.server is server  # the member talks to the main process, not the worker

    first, thread = first_written(hapi, gp, room, "Eerste bericht via het hoofdproces")
    sent = [first] + [gp.send_text(room, f"Wondzorg dag {n}: rustig verlopen") for n in range(5)]
    for event_id in sent:
        wait_until(
            partial(communication_of, hapi, event_id),  # (asserts at most one)
            timeout=30,
            what="a message sent via the main process written to FHIR",
        )
    gp.redact(room, sent[2])
    wait_until(
        lambda: (c := communication_of(hapi, sent[2])) and c["status"] == "entered-in-error",
        timeout=30,
        what="the redacted message's Communication entered-in-error",
    )

    # The outbox (one table, shared) is empty, seen from either process.
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty (main process's health endpoint)",
    )
    assert worker_health(server)["outbox"] == {"pending": 0, "dead": 0}

    # Exactly once: the thread holds these six events, each one time.
    ids = event_ids_in_thread(hapi, thread)
    assert sorted(ids) == sorted(sent)

    # Only the worker wrote (6 messages + 1 redaction); the main process wrote nothing.
    wait_until(
        lambda: metric(server.worker_metrics_url, WRITTEN) == 7.0,
        timeout=15,
        what="the worker counting 7 writes to FHIR",
    )
    assert metric(server.metrics_url, WRITTEN) == 0.0
    assert metric(server.worker_metrics_url, "synapse_fhir_communications_failed_total") == 0.0


def test_a_message_sent_while_the_worker_is_down_is_written_once_it_is_back(
    hapi: HapiDevServer, synapse_with_worker: SynapseServer
) -> None:
    server = synapse_with_worker
    _network, _service, room, gp = care_room(server, hapi.base_url)
    first, thread = first_written(hapi, gp, room, "Voor de onderbreking")
    server.stop_worker()
    during = gp.send_text(room, "Terwijl de worker stil staat")  # the main process accepts it
    server.start_worker()
    after = gp.send_text(room, "Na de onderbreking")
    wait_until(
        lambda: communication_of(hapi, after),
        timeout=30,
        what="the message sent after the worker came back written",
    )
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty",
    )
    # No callback brought `during` (the worker was down): the restarted worker read it
    # from the stream, from its saved position, and takes callbacks (`after`) only once
    # that read is in, so each room's order holds and `during` is written by now, once.
    assert sorted(event_ids_in_thread(hapi, thread)) == sorted([first, during, after])


def test_messages_persisted_by_the_worker_while_the_main_process_is_down_are_written_once(
    hapi: HapiDevServer, synapse_persisting_on_worker: SynapseServer
) -> None:
    server = synapse_persisting_on_worker
    assert server.worker_url is not None
    _network, _service, room, gp = care_room(server, hapi.base_url)
    first, thread = first_written(hapi, gp, room, "Voor de herstart van het hoofdproces")

    server.stop_main()
    assert not server.process.running and server.worker_process is not None
    assert server.worker_process.running
    # The same member, through the worker's client listener: the worker creates and
    # persists each message itself (it is the events stream writer). Its own module's
    # callback drops them (it runs no background work); the main process is not there.
    via_worker = gp.through(server.worker_url)
    sent = [via_worker.send_text(room, f"Wondzorg ronde {n}: rustig verlopen") for n in range(20)]

    server.start_main()
    # No callback tells the restarted main process of them (it starts at the stream's
    # current position): it reads on from its saved position in the stream.
    thread_holding(
        hapi, thread, 1 + len(sent), timeout=60, what="the 20 messages sent while main was down"
    )
    wait_until(
        lambda: health(server)["outbox"] == {"pending": 0, "dead": 0},
        timeout=30,
        what="the outbox empty",
    )
    # Written by the restarted main process, each once (the first, if read again, was
    # already in FHIR: a replay, not a write); none refused.
    wait_until(
        lambda: metric(server.metrics_url, WRITTEN) == 20.0,
        timeout=15,
        what="the restarted main process counting 20 writes to FHIR",
    )
    assert metric(server.metrics_url, "synapse_fhir_communications_failed_total") == 0.0
    ids = event_ids_in_thread(hapi, thread)
    assert sorted(ids) == sorted([first, *sent]), "missing or duplicate Communications"


def test_a_change_notified_to_the_worker_is_forgotten_by_the_main_process_at_once(
    synapse_with_worker: SynapseServer, hapi: HapiDevServer
) -> None:
    """Decisions on the main process come from its cache (5 minutes by default); the shim's
    notification reaches the worker (``/notify`` routed there), whose invalidation Synapse
    replicates: the main process asks FHIR again long before its answer would expire."""
    server = synapse_with_worker
    network, service, room, _ = care_room(server, hapi.base_url)
    lena = register_user(server, network.localpart("lena"))
    with pytest.raises(MatrixError) as caught:
        service.invite(room, lena.user_id)  # (the team is now cached on the main process)
    assert caught.value.reason == "not_in_care_team"

    leaver = network.participant(network.ref("Practitioner", "leaver"))
    FhirSeeder(hapi.base_url).put(network.care_team(*network.standard_participants(), leaver))
    server.notify(network.team, via=server.worker_url)
    wait_until(
        lambda: _invites(service, room, lena.user_id),
        timeout=30,
        what="the main process admitting the new participant after the worker's notification",
    )


def _invites(service: MatrixUser, room: str, user_id: str) -> bool:
    try:
        service.invite(room, user_id)
    except MatrixError as e:
        if e.reason == "not_in_care_team":
            return False
        raise
    return True


def test_the_sync_on_a_worker_with_postgresql_gives_a_team_its_space_and_invites(
    synapse_syncing_on_worker: SynapseServer, hapi_running: HapiDevServer
) -> None:
    server = synapse_syncing_on_worker
    network = CareNetwork(uuid.uuid4().hex[:8])
    anna = register_user(server, network.localpart("anna"))  # the GP, named by FHIR
    network.seed(FhirSeeder(hapi_running.base_url))
    server.notify(network.team, via=server.worker_url)
    space = wait_until(
        lambda: invited_space(anna, network.team),
        timeout=60,
        what="the GP invited to the team's space, made by the sync on the worker",
    )
    anna.join(space)
    assert membership(anna, space, anna.user_id) == "join"
