"""The module with Synapse workers: a main process plus one generic worker, ``background``,
on PostgreSQL with Redis replication, the module configured with ``worker: background``.

Members send through the main process; the module enqueues their messages there (the
process that stores them), drains the outbox on the worker only, and each message is in the
session's HAPI exactly once, also when it was sent while the worker was down.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.postgres import PostgresDatabase
from devstack.redis import RedisServer
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import wait_until
from tests.conftest import SERVER_LOGS
from tests.integration.test_communication_recording import (
    care_room,
    communication_of,
    event_ids_in_thread,
    first_written,
    health,
)

WORKER = "background"
HEALTH_PATH = "/_synapse/client/fhir/health"
WRITTEN = "synapse_fhir_communications_written_total"


@pytest.fixture
def redis(run_dir: Path) -> Iterator[RedisServer]:
    """A throwaway Redis (Debian's redis-server) for one homeserver (Synapse names its
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
    # The main process enqueued `during` (the worker, down, never saw it); the drain keeps
    # each room's order, so it is written by now, once.
    assert sorted(event_ids_in_thread(hapi, thread)) == sorted([first, during, after])
