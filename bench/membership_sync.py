"""CareTeam change → membership applied, three ways side by side (issue 5, "Measure").

    python -m bench.membership_sync [--smoke] [--samples 20] [--poll-interval 5]
        [--matching-ms 5000 1000] [--arms shim subscription polling]
        [--observe longpoll|poll] [--subscriptions auto|module|bench]

One sample: a CareTeam that already has its space gets one more participant (a
Practitioner whose telecom names an existing Matrix account) by a PUT to HAPI. Its
latency runs from the moment the PUT starts until that account's ``/sync`` shows the
invite to the team's space. The arms differ only in how Synapse learns of the change:

- shim: HAPI's notify shim POSTs ``/_synapse/client/fhir/notify`` after the commit. The
  module's sweep runs every hour, so nothing else delivers the change. The baseline.
- subscription: a HAPI whose shim is off; rest-hook Subscriptions, one per type the
  module syncs (criteria ``<Type>?``, channel rest-hook to ``<synapse>/…/notify``, payload
  ``application/fhir+json``, ``Authorization: Bearer <secret>``, HAPI's
  send-delete-messages extension), make HAPI PUT ``…/notify/CareTeam/<id>``. They are
  registered by the module (``sync: {subscription: true, subscription_base_url}``) when
  it has ``synapse_fhir_module.sync.subscriptions``, else by the bench, same shape
  (``--subscriptions``). HAPI feeds stored changes to its subscription matcher every
  ``fhir.subscription.matching-interval-ms``: 5000 in stock HAPI, 1000 in our dev server.
  The full run measures each ``--matching-ms`` value in a HAPI of its own.
- polling: no shim, no Subscription; the module's reconcile sweep every
  ``--poll-interval`` seconds (``sync.poll_interval``) finds the change.

Observation: the invited user long-polls ``/sync`` (incremental, ``since`` its last
token, presence and account data filtered out) from the moment the PUT starts, the way
a client waits; Synapse answers as soon as the invite is there. ``--observe poll``
instead polls with ``timeout=0`` every 15 ms (each poll costs Synapse CPU on the core
the module also needs). Samples are spaced by a pause spread evenly, in shuffled order,
over the arm's period (poll interval, matching interval; 0.3 s for the shim), so a
periodic arm's samples do not all land at the same phase of its timer.

Where the time goes: the PUT starts → the notification arrives (shim, Subscription: the
module's DEBUG log line) or the sweep that queued the team logs (polling) → the module
has read the team from FHIR and built the space's new power levels event (its
``origin_server_ts``, read back through the admin API) → it has stored that and built
the invite → the invite is seen on ``/sync``. After each arm the bench also times the
module's membership search (``team_directory``) against HAPI itself, 10 times.

Stacks, one after another (each HAPI ~1.1 GB, 15-60 s to start): a HAPI with the shim
for the shim arm; a HAPI without (HAPI's 5000 ms matching) for the polling arm and then
the subscription arm; another without (1000 ms) for the second subscription arm. Each
arm has a Synapse of its own (SQLite). Pinning as in every benchmark here: each HAPI on
one CPU (pinned once it answers), Synapse and this process on the other.

Smoke (CI, ~90 s): one HAPI with the shim (1000 ms matching) for all three arms, 1
sample each, no warm-up: after the shim arm its Synapse is stopped, so the shim's later
POSTs fail (connection refused, 5 attempts) and reach neither of the other arms.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import random
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import requests

from bench._common import Pinning, Row, Stack, Target, report
from devstack.fhir_seed import FHIR_JSON, FhirSeeder
from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixUser, register_user
from devstack.ports import free_port
from devstack.synapse import SynapseServer, module_config
from devstack.waiting import NeverHappened, wait_until
from synapse_fhir_module.fhir.team_directory import MEMBERSHIP_INCLUDES
from synapse_fhir_module.sync.fhir_to_matrix import SYNCED_TYPES
from synapse_fhir_module.sync.reconcile import LOOK_BACK
from synapse_fhir_module.web.webhook import NOTIFY_PATH
from tests.integration.care_network import CareNetwork, via_telecom

NAME = "membership_sync"
SECRET = "bench-webhook-secret"
CARE_TEAM_STATE = "org.synapse_fhir.care_team"
SEND_DELETE_MESSAGES = (
    "http://hapifhir.io/fhir/StructureDefinition/subscription-send-delete-messages"
)
MATCHING_PROPERTY = "fhir.subscription.matching-interval-ms"
DEV_SERVER_MATCHING_MS = 1000  # hapi/server application.properties
HAPI_DEFAULT_MATCHING_MS = 5000  # stock HAPI: what a deployment without our tuning gets
SMOKE_POLL_INTERVAL = 2.0  # s
SHIM_PERIOD = 0.3  # s: the shim arm has no timer; a short, varied pause between samples
SETTLE = 0.3  # s: before every sample, whatever the arm
POLL_EVERY = 0.015  # s: --observe poll
# /sync as a waiting client would ask: no presence or account data to wake it early.
SYNC_FILTER = json.dumps(
    {
        "presence": {"types": []},
        "account_data": {"types": []},
        "room": {
            "timeline": {"limit": 1},
            "ephemeral": {"types": []},
            "account_data": {"types": []},
        },
    },
    separators=(",", ":"),
)


# --- Arms and the HAPIs they run on ---------------------------------------------------------


@dataclass
class Arm:
    key: str  # in the table and the JSON
    kind: str  # "shim", "subscription", "polling"
    label: str  # how it reached Synapse
    period: float  # s: its timer (the pause before a sample is spread over it)
    matching_ms: int | None = None


@dataclass
class HapiPlan:
    shim: bool
    matching_ms: int
    arms: list[Arm]


def plan_hapis(args: argparse.Namespace) -> list[HapiPlan]:
    poll = Arm(
        "polling",
        "polling",
        f"module sweep every {args.poll_interval:g} s",
        args.poll_interval,
    )
    shim = Arm("shim", "shim", "HAPI shim POST after commit; sweep every 1 h", SHIM_PERIOD)

    def subscription(ms: int) -> Arm:
        which = {
            HAPI_DEFAULT_MATCHING_MS: " (stock HAPI's default)",
            DEV_SERVER_MATCHING_MS: " (our dev server's setting)",
        }.get(ms, "")
        return Arm(
            f"subscription-{ms}ms",
            "subscription",
            f"rest-hook Subscription, HAPI matching every {ms} ms{which}; sweep every 1 h",
            ms / 1000,
            ms,
        )

    if args.smoke:
        # One HAPI (with the shim) for every arm: two HAPI starts do not fit CI's budget.
        ms = DEV_SERVER_MATCHING_MS
        by_name = {"shim": shim, "polling": poll, "subscription": subscription(ms)}
        order = [k for k in ("shim", "polling", "subscription") if k in args.arms]
        return [HapiPlan("shim" in order, ms, [by_name[k] for k in order])]
    plans = []
    if "shim" in args.arms:
        plans.append(HapiPlan(True, DEV_SERVER_MATCHING_MS, [shim]))
    plain: list[list[Arm]] = [[subscription(ms)] for ms in args.matching_ms]
    if "subscription" not in args.arms:
        plain = [[]]
    if "polling" in args.arms:
        plain[0].insert(0, poll)  # before the Subscriptions exist on that HAPI
    for arms, ms in zip(plain, args.matching_ms, strict=False):
        plans.append(HapiPlan(False, ms, arms))
    return [p for p in plans if p.arms]


# --- The invited user's view: incremental /sync ---------------------------------------------


class SyncWatch:
    """One user's /sync, each call incremental from the token of the previous one."""

    def __init__(self, user: MatrixUser, observe: str) -> None:
        self.user = user
        self.observe = observe
        self.since: str | None = None
        self.calls = 0

    def sync(self, timeout_ms: int) -> dict[str, Any]:
        query = {"timeout": str(timeout_ms), "filter": SYNC_FILTER}
        if self.since is not None:
            query["since"] = self.since
        result: dict[str, Any] = self.user.request(
            "GET", f"/_matrix/client/v3/sync?{urlencode(query)}"
        )
        self.since = result["next_batch"]
        self.calls += 1
        return result

    def wait_invite(
        self, matches: Callable[[str, dict[str, Any]], bool], timeout: float, what: str
    ) -> tuple[float, str]:
        """(Unix time the /sync answer showing it arrived, room id) of the first invite
        that ``matches(room_id, invited_room)``."""
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise NeverHappened(f"{what}: not within {timeout:.0f} s")
            long_poll = self.observe == "longpoll"
            answer = self.sync(int(min(10.0, left) * 1000) if long_poll else 0)
            arrived = time.time()
            for room_id, room in answer.get("rooms", {}).get("invite", {}).items():
                if matches(room_id, room):
                    return arrived, room_id
            if not long_poll:
                time.sleep(POLL_EVERY)


def bound_to(team_ref: str) -> Callable[[str, dict[str, Any]], bool]:
    def matches(_room_id: str, room: dict[str, Any]) -> bool:
        return any(
            e.get("type") == CARE_TEAM_STATE and e.get("content", {}).get("reference") == team_ref
            for e in room.get("invite_state", {}).get("events", [])
        )

    return matches


# --- Subscriptions ---------------------------------------------------------------------------


def module_registers_subscriptions() -> bool:
    return importlib.util.find_spec("synapse_fhir_module.sync.subscriptions") is not None


def subscription_resource(resource_type: str, endpoint: str) -> dict[str, Any]:
    return {
        "resourceType": "Subscription",
        "status": "requested",
        "reason": f"membership_sync benchmark: {resource_type} changes",
        "criteria": f"{resource_type}?",
        "channel": {
            "extension": [{"url": SEND_DELETE_MESSAGES, "valueBoolean": True}],
            "type": "rest-hook",
            "endpoint": endpoint,
            "payload": "application/fhir+json",
            "header": [f"Authorization: Bearer {SECRET}"],
        },
    }


def create_subscriptions(fhir_url: str, endpoint: str) -> None:
    for resource_type in SYNCED_TYPES:
        response = requests.post(
            f"{fhir_url}/Subscription",
            json=subscription_resource(resource_type, endpoint),
            headers=FHIR_JSON,
            timeout=60,
        )
        response.raise_for_status()


def active_subscriptions(fhir_url: str, endpoint: str) -> dict[str, str]:
    """criteria → id of the active Subscriptions that notify ``endpoint``."""
    bundle = requests.get(
        f"{fhir_url}/Subscription",
        params={"_count": "200"},
        headers={"Cache-Control": "no-cache"},
        timeout=30,
    ).json()
    found = {}
    for entry in bundle.get("entry", []):
        subscription = entry["resource"]
        if (
            subscription.get("status") == "active"
            and subscription.get("channel", {}).get("endpoint") == endpoint
        ):
            found[str(subscription.get("criteria"))] = str(subscription["id"])
    return found


def wait_subscriptions_active(fhir_url: str, endpoint: str) -> dict[str, str]:
    wanted = {f"{t}?" for t in SYNCED_TYPES}

    def all_active() -> dict[str, str] | None:
        found = active_subscriptions(fhir_url, endpoint)
        return found if found.keys() >= wanted else None

    return wait_until(
        all_active,
        timeout=60,
        what="HAPI's Subscriptions to this Synapse active",
        interval=0.2,
    )


def delete_subscriptions(fhir_url: str, ids: Sequence[str]) -> None:
    for subscription_id in ids:
        requests.delete(f"{fhir_url}/Subscription/{subscription_id}", timeout=30)


# --- What the Synapse log says --------------------------------------------------------------

_LOG_LINE = re.compile(r"^(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3}) - \S+ - \d+ - \w+ - (.*)$")


@dataclass
class LogMarks:
    notified: list[float] = field(default_factory=list)  # a notification about the team
    swept: list[float] = field(default_factory=list)  # a sweep queued changed CareTeams
    planned: list[float] = field(default_factory=list)  # the module decided to invite


def read_log_marks(path: Path, team_ref: str) -> LogMarks:
    notified = re.compile(rf"Notification: \w+ {re.escape(team_ref)}$")
    swept = re.compile(r"Reconcile: \d+ CareTeam changed since the last sweep")
    planned = re.compile(rf"^{re.escape(team_ref)}: inviting [1-9]\d*, removing \d+ in ")
    marks = LogMarks()
    for line in path.read_text(errors="replace").splitlines():
        match = _LOG_LINE.match(line)
        if match is None:
            continue
        # Synapse logs local time, to the millisecond.
        at = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S,%f").timestamp()
        message = match.group(2)
        if notified.search(message):
            marks.notified.append(at)
        elif swept.search(message):
            marks.swept.append(at)
        elif planned.search(message):
            marks.planned.append(at)
    return marks


# --- One arm ---------------------------------------------------------------------------------


@dataclass
class Sample:
    index: int
    warmup: bool
    pause: float  # s before it
    started: float  # Unix time the PUT started
    seen: float  # Unix time the /sync answer with the invite arrived
    put_seconds: float  # the PUT request alone
    delivered: float | None = None  # notification received, or the sweep that queued it
    planned: float | None = None  # "inviting 1" logged
    # origin_server_ts of the events the module sent for it (Synapse's clock = ours):
    levels_built: float | None = None  # the space's power levels with the newcomer
    invite_built: float | None = None  # the newcomer's invite

    @property
    def latency(self) -> float:
        return self.seen - self.started


@dataclass
class ArmResult:
    arm: Arm
    samples: list[Sample]
    synapse_start_seconds: float
    setup_seconds: float
    subscriptions_by: str | None
    sync_calls: int
    search_seconds: list[float]  # the module's membership search, asked by the bench

    def measured(self) -> list[Sample]:
        return [s for s in self.samples if not s.warmup]


def sync_config(arm: Arm, args: argparse.Namespace, synapse_url: str) -> dict[str, Any]:
    interval = f"{args.poll_interval:g}s" if arm.kind == "polling" else "1h"
    config: dict[str, Any] = {"enabled": True, "poll_interval": interval}
    if arm.kind == "subscription" and args.subscriptions_by == "module":
        config |= {"subscription": True, "subscription_base_url": synapse_url}
    return config


def run_arm(
    arm: Arm,
    hapi: HapiDevServer,
    workdir: Path,
    pinning: Pinning,
    args: argparse.Namespace,
    synapse_port: int | None,
) -> ArmResult:
    started = time.monotonic()
    port = synapse_port or free_port()
    synapse_url = f"http://127.0.0.1:{port}"
    server = SynapseServer(
        workdir / arm.key,
        module_config(
            hapi.base_url,
            webhook={"secret": SECRET},
            sync=sync_config(arm, args, synapse_url),
        ),
        port=port,
        # Fast password hashing: only the accounts' setup gets quicker.
        extra_config={"bcrypt_rounds": 4},
    )
    subscription_ids: list[str] = []
    try:
        server.start()
        pinning.pin_local(server.process.pid)
        endpoint = server.url(NOTIFY_PATH)
        subscriptions_by = None
        if arm.kind == "subscription":
            subscriptions_by = args.subscriptions_by
            if subscriptions_by == "bench":
                create_subscriptions(hapi.base_url, endpoint)
            subscription_ids = list(wait_subscriptions_active(hapi.base_url, endpoint).values())

        count = args.samples + args.warmup
        network = CareNetwork(f"{arm.key.replace('-', '')[:12]}{os.getpid() % 1000}")
        admin = register_user(server, network.localpart("admin"), admin=True)
        gp = SyncWatch(register_user(server, network.localpart("anna")), args.observe)
        watches = [
            SyncWatch(register_user(server, network.localpart(f"p{i}")), args.observe)
            for i in range(count)
        ]
        for watch in [gp, *watches]:
            watch.sync(0)  # the token the first incremental /sync starts from
        fhir = FhirSeeder(hapi.base_url)
        newcomers = [
            network.person("Practitioner", f"p{i}", via_telecom(network.localpart(f"p{i}")))
            for i in range(count)
        ]
        seeded = time.monotonic()
        fhir.put_all(newcomers + network.resources())
        # The team's space, made by whichever way this arm delivers changes.
        _, space = gp.wait_invite(
            bound_to(network.team), timeout=120, what="the GP invited to the team's space"
        )
        settle(arm, args, fhir, network.tag, seeded)
        setup_seconds = time.monotonic() - started

        pauses = spread_pauses(arm, count, random.Random(f"{NAME}-{arm.key}"))
        samples = []
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="put") as pool:
            for i, (watch, pause) in enumerate(zip(watches, pauses, strict=True)):
                team = fhir.read(network.team)
                team["participant"].append(
                    network.participant(network.ref("Practitioner", f"p{i}"))
                )
                time.sleep(pause)
                put_started = time.time()
                put = pool.submit(timed, partial(fhir.put, team))
                seen, _ = watch.wait_invite(
                    lambda room_id, _room: room_id == space,
                    timeout=max(60.0, 4 * arm.period),
                    what=f"{arm.key} sample {i}: the newcomer invited",
                )
                samples.append(Sample(i, i < args.warmup, pause, put_started, seen, put.result()))
                print(
                    f"  {arm.key} #{i}{' (warm-up)' if i < args.warmup else ''}: "
                    f"{(seen - put_started) * 1000:.0f} ms",
                    flush=True,
                )
        attribute_log_marks(samples, read_log_marks(server.log_path, network.team), arm)
        attribute_events(samples, space_events(admin, space), [w.user.user_id for w in watches])
        return ArmResult(
            arm,
            samples,
            server.start_seconds or 0.0,
            setup_seconds,
            subscriptions_by,
            sum(w.calls for w in watches),
            time_membership_search(hapi.base_url, network.team),
        )
    finally:
        if subscription_ids and arm.kind == "subscription":
            # Off before this Synapse goes, so HAPI has nobody to retry against.
            delete_subscriptions(hapi.base_url, subscription_ids)
        server.stop()


def settle(arm: Arm, args: argparse.Namespace, fhir: FhirSeeder, tag: str, seeded: float) -> None:
    """Let the setup's own changes be worked off before the first sample.

    A sweep looks back ``LOOK_BACK`` before the newest ``lastUpdated`` it has seen of a
    type, so until a later write of that type, every sweep finds the setup's persons
    again and syncs their teams — which would pick up a sample's change before the
    sweep of CareTeams does. So once the setup is older than that, one unrelated write
    per person type moves each type's watermark past it (every arm writes them; only
    the polling arm waits for two sweeps to pass). Smoke: no waiting.
    """
    if arm.kind == "polling" and not args.smoke:
        time.sleep(max(0.0, seeded + LOOK_BACK.total_seconds() + 0.5 - time.monotonic()))
    fhir.put_all(later_writes(tag))
    if args.smoke:
        return
    sweeps = 2 * arm.period if arm.kind == "polling" else arm.period
    time.sleep(2.0 + sweeps)


def later_writes(tag: str) -> list[dict[str, Any]]:
    """One resource per person type, in no team."""
    rid = f"later-{tag}"
    patient = {"reference": f"Patient/{rid}"}
    return [
        {"resourceType": "Patient", "id": rid, "active": True},
        {"resourceType": "Practitioner", "id": rid, "active": True},
        {"resourceType": "PractitionerRole", "id": rid, "active": True},
        {"resourceType": "RelatedPerson", "id": rid, "active": True, "patient": patient},
    ]


def spread_pauses(arm: Arm, count: int, rng: random.Random) -> list[float]:
    """SETTLE plus evenly spread fractions of the arm's period, shuffled."""
    fractions = [(k + 0.5) / count for k in range(count)]
    rng.shuffle(fractions)
    return [SETTLE + f * arm.period for f in fractions]


def timed(action: Callable[[], object]) -> float:
    clock = time.perf_counter()
    action()
    return time.perf_counter() - clock


def attribute_log_marks(samples: Sequence[Sample], marks: LogMarks, arm: Arm) -> None:
    """The module's log lines that belong to each sample (samples never overlap)."""
    delivered_marks = marks.swept if arm.kind == "polling" else marks.notified
    for sample in samples:
        # (A little slack: the log has millisecond resolution.)
        window = (sample.started - 0.002, sample.seen + 0.002)
        planned = [t for t in marks.planned if window[0] <= t <= window[1]]
        if not planned:
            continue
        sample.planned = planned[0]
        delivered = [t for t in delivered_marks if window[0] <= t <= sample.planned]
        if delivered:
            sample.delivered = delivered[-1]


def space_events(admin: MatrixUser, room_id: str) -> list[dict[str, Any]]:
    """The space's timeline, newest first (the admin API: nobody needs to join)."""
    path = f"/_synapse/admin/v1/rooms/{quote(room_id)}/messages?dir=b&limit=1000"
    return list(admin.request("GET", path)["chunk"])


def attribute_events(
    samples: Sequence[Sample], events: Sequence[dict[str, Any]], newcomers: Sequence[str]
) -> None:
    """Each sample's invite, and the power levels event the module sent just before it."""
    levels = sorted(
        e["origin_server_ts"] / 1000 for e in events if e["type"] == "m.room.power_levels"
    )
    for sample in samples:
        invite = next(
            (
                e
                for e in events
                if e["type"] == "m.room.member"
                and e.get("state_key") == newcomers[sample.index]
                and e["content"].get("membership") == "invite"
            ),
            None,
        )
        if invite is None:
            continue
        sample.invite_built = invite["origin_server_ts"] / 1000
        before = [t for t in levels if sample.started <= t <= sample.invite_built]
        if before:
            sample.levels_built = before[-1]


def time_membership_search(fhir_url: str, team_ref: str, times: int = 10) -> list[float]:
    """The search the module sends for a team's members (``team_directory``), timed from
    here once the arm is over: how much of the module's step is HAPI's."""
    params = [("_id", team_ref.split("/", 1)[1]), *MEMBERSHIP_INCLUDES]
    session = requests.Session()
    session.headers["Cache-Control"] = "no-cache"
    return [
        timed(partial(session.get, f"{fhir_url}/CareTeam", params=params, timeout=30))
        for _ in range(times)
    ]


# --- Running it ------------------------------------------------------------------------------


@contextmanager
def hapi_running(
    plan: HapiPlan, workdir: Path, pinning: Pinning
) -> Iterator[tuple[HapiDevServer, int]]:
    """A HAPI and the port its shim notifies. Started unpinned (a JVM started on one CPU
    picks another garbage collector), then pinned; this process is unpinned meanwhile,
    since HAPI inherits its CPUs."""
    synapse_port = free_port()
    hapi = HapiDevServer(
        workdir / f"hapi-{'shim' if plan.shim else 'plain'}-{plan.matching_ms}",
        notify_url=f"http://127.0.0.1:{synapse_port}{NOTIFY_PATH}" if plan.shim else None,
        notify_secret=SECRET if plan.shim else None,
    )
    hapi.process.argv.append(f"--{MATCHING_PROPERTY}={plan.matching_ms}")
    try:
        pinning.unpin(os.getpid())
        hapi.start()
        pinning.pin_hapi(hapi.process.pid)
        pinning.pin_local(os.getpid())
        print(
            f"HAPI ({'shim on' if plan.shim else 'no shim'}, matching every "
            f"{plan.matching_ms} ms) ready in {hapi.start_seconds:.0f} s",
            flush=True,
        )
        yield hapi, synapse_port
    finally:
        hapi.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes, one HAPI (CI)")
    parser.add_argument("--samples", type=int, help="per arm (default 20; smoke 1)")
    parser.add_argument("--warmup", type=int, help="samples per arm not counted (2; smoke 0)")
    parser.add_argument(
        "--poll-interval",
        type=float,
        help=f"polling arm: sync.poll_interval, s (default 5; smoke {SMOKE_POLL_INTERVAL:g})",
    )
    parser.add_argument(
        "--matching-ms",
        type=int,
        nargs="+",
        default=[5000, DEV_SERVER_MATCHING_MS],
        help="subscription arm(s): HAPI's matching interval, one HAPI each (not in --smoke)",
    )
    parser.add_argument(
        "--arms",
        nargs="+",
        choices=("shim", "subscription", "polling"),
        default=["shim", "subscription", "polling"],
    )
    parser.add_argument("--observe", choices=("longpoll", "poll"), default="longpoll")
    parser.add_argument("--keep-logs", action="store_true", help="keep the servers' logs")
    parser.add_argument(
        "--subscriptions",
        dest="subscriptions_by",
        choices=("auto", "module", "bench"),
        default="auto",
        help="who registers the Subscriptions (auto: the module, when it can)",
    )
    args = parser.parse_args()
    if args.samples is None:
        args.samples = 1 if args.smoke else 20
    if args.poll_interval is None:
        args.poll_interval = SMOKE_POLL_INTERVAL if args.smoke else 5.0
    if args.warmup is None:
        args.warmup = 0 if args.smoke else 2
    if args.subscriptions_by == "auto":
        args.subscriptions_by = "module" if module_registers_subscriptions() else "bench"

    pinning = Pinning.plan()
    workdir = Path(tempfile.mkdtemp(prefix=f"bench-{NAME}-"))
    results: list[ArmResult] = []
    hapi_starts: list[dict[str, Any]] = []
    ok = False
    try:
        for plan in plan_hapis(args):
            with hapi_running(plan, workdir, pinning) as (hapi, shim_port):
                hapi_starts.append(
                    {"shim": plan.shim, "matching_ms": plan.matching_ms}
                    | {"start_seconds": hapi.start_seconds}
                )
                for arm in plan.arms:
                    # Only the shim arm's Synapse listens where the shim posts (smoke: the
                    # later arms run with nothing listening there).
                    port = shim_port if arm.kind == "shim" else None
                    started = time.monotonic()
                    results.append(run_arm(arm, hapi, workdir, pinning, args, port))
                    print(f"({arm.key}: {time.monotonic() - started:.0f} s)", flush=True)
        ok = True
    finally:
        if ok and not args.keep_logs:
            shutil.rmtree(workdir, ignore_errors=True)
        else:
            print(f"(server logs kept in {workdir})")
    print_report(results, hapi_starts, pinning, args, workdir)


def spans(samples: Sequence[Sample], start: str, end: str) -> list[float]:
    """``end - start`` (seconds) of the samples that have both."""
    pairs = [(getattr(s, start), getattr(s, end)) for s in samples]
    return [b - a for a, b in pairs if a is not None and b is not None]


def print_report(
    results: Sequence[ArmResult],
    hapi_starts: list[dict[str, Any]],
    pinning: Pinning,
    args: argparse.Namespace,
    workdir: Path,
) -> None:
    ms = 1000.0
    shim_row: Row | None = None
    rows: list[Row] = []
    for result in results:
        arm = result.arm
        samples = result.measured()
        # A sample whose invite was planned with no notification (or sweep) since its PUT
        # was picked up by other work of the module (e.g. a person's sync still queued).
        stray = sum(1 for s in samples if s.planned is not None and s.delivered is None)
        unseen = sum(1 for s in samples if s.planned is None)
        note = arm.label
        if stray or unseen:
            note += f"; {stray} sample(s) applied without a delivery of their own"
            note += f", {unseen} without the module's log line"
        row = Row(f"{arm.key}: PUT → invite on /sync", "ms", [s.latency * ms for s in samples])
        row.note = note
        if arm.kind == "shim":
            row.target = Target("<=", 300)
            shim_row = row
        else:
            row.baseline = shim_row
            # The target compares with a stock HAPI's Subscription.
            if arm.matching_ms == HAPI_DEFAULT_MATCHING_MS and shim_row is not None:
                row.target = Target(">=", 15, of_ratio=True)
        rows.append(row)
    for result in results:
        arm = result.arm
        samples = result.measured()
        first = "sweep queued it" if arm.kind == "polling" else "notified"
        parts = [
            (f"PUT → {first}", spans(samples, "started", "delivered")),
            (f"{first} → power levels event", spans(samples, "delivered", "levels_built")),
            ("power levels → invite event", spans(samples, "levels_built", "invite_built")),
            ("invite event → on /sync", spans(samples, "invite_built", "seen")),
            ("(FHIR membership search alone)", result.search_seconds),
        ]
        for name, values in parts:
            if values:
                rows.append(Row(f"  {arm.key}: {name}", "ms", [v * ms for v in values]))
    smoke_note = (
        "; smoke: one HAPI for all arms (its shim posts to the shim arm's Synapse only), "
        "tiny sizes, numbers not judged"
        if args.smoke
        else ""
    )
    report(
        NAME,
        "CareTeam participant added (PUT) → the newcomer's /sync shows the invite; "
        f"{args.samples} samples per arm (+{args.warmup} warm-up), observed by "
        f"{'long-polling /sync' if args.observe == 'longpoll' else 'polling /sync every 15 ms'}"
        + smoke_note,
        rows,
        the_stack=Stack("(one HAPI per stack)", pinning, workdir, bool(args.smoke), "sqlite"),
        parameters={
            "samples": args.samples,
            "warmup": args.warmup,
            "poll_interval_s": args.poll_interval,
            "hapis": [
                {"shim": p.shim, "matching_ms": p.matching_ms, "arms": [a.key for a in p.arms]}
                for p in plan_hapis(args)
            ],
            "arms": [asdict(r.arm) for r in results],
            "observe": args.observe,
            "subscriptions_by": args.subscriptions_by,
        },
        details={
            "hapi": hapi_starts,
            "arms": {
                r.arm.key: {
                    "synapse_start_seconds": r.synapse_start_seconds,
                    "setup_seconds": r.setup_seconds,
                    "sync_calls": r.sync_calls,
                    "membership_search_seconds": r.search_seconds,
                    "samples": [asdict(s) | {"latency": s.latency} for s in r.samples],
                }
                for r in results
            },
        },
        show_p95=True,
    )


if __name__ == "__main__":
    main()
