"""The operator console end to end: a real Synapse with the module (its sync on), the real
HAPI dev server, a small care network built in FHIR, a real refusal and a real dead letter;
then headless Chromium (Debian's, driven by playwright-core: tests/browser/console.test.js)
signs in as a server admin and as a member who is not one.

Also: the console's files are in the wheel the module ships as.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import requests

from devstack.hapi import HapiDevServer
from devstack.matrix_client import MatrixError, MatrixUser, login_as, register_user
from devstack.synapse import SERVER_NAME
from devstack.tools import find_tool
from devstack.waiting import wait_until
from synapse_fhir_module.web.admin.page import FILES
from tests.integration.care_network import MATRIX_ID_SYSTEM
from tests.integration.quiet_stack import QuietStack, quiet_stack
from tests.integration.test_communication_recording import communication_of
from tests.integration.test_rooms_the_module_makes import join_space_and_room
from tests.integration.test_sdk_journeys import node_and_sdk, run_node

REPO = Path(__file__).resolve().parents[2]
BROWSER_TEST = REPO / "tests" / "browser" / "console.test.js"
PLAYWRIGHT = REPO / "node_modules" / "playwright-core" / "package.json"
API = "/_synapse/client/fhir/admin/api"
# In every care-team room, with no FHIR person: what they write cannot be attributed.
AUDIT_LOCALPART = "console_audit"
AUDIT = f"@{AUDIT_LOCALPART}:{SERVER_NAME}"
# A Matrix id FHIR may name (an identifier value is free text) that looks like HTML: the
# console must show it as text. (Were it parsed, its handler would set the flag; the CSP
# blocks inline handlers besides.)
ODD_ID = "@<img src=x onerror=window.sfmInjected=1>:evil.example"
SETTLES_WITHIN = 60.0


@pytest.fixture(scope="module")
def console(quiet_hapi: HapiDevServer, run_dir: Path) -> Iterator[QuietStack]:
    """Sync on (changes reach Matrix when the test notifies, else within the hour); the team
    directory's answers kept 2 s, so an unannounced FHIR change shows as pending soon."""
    with quiet_stack(
        run_dir / "console",
        quiet_hapi,
        full_reconcile_interval="1h",
        enforcement={"cache_ttl": "2s", "exempt_users": [AUDIT]},
    ) as stack:
        yield stack


def practitioner(pid: str, user_id: str) -> dict[str, Any]:
    return {
        "resourceType": "Practitioner",
        "id": pid,
        "active": True,
        "identifier": [{"system": MATRIX_ID_SYSTEM, "value": user_id}],
    }


def care_team(team_id: str, *practitioners: str) -> dict[str, Any]:
    return {
        "resourceType": "CareTeam",
        "id": team_id,
        "status": "active",
        "participant": [{"member": {"reference": f"Practitioner/{p}"}} for p in practitioners],
    }


def admin_api(admin: MatrixUser, path: str) -> dict[str, Any]:
    return admin.request("GET", f"{API}/{path}")


def room_of(admin: MatrixUser, team: str, room_id: str) -> dict[str, Any] | None:
    (network,) = admin_api(admin, f"networks?care_team={team}")["networks"]
    return next((r for r in network["rooms"] if r["room_id"] == room_id), None)


def run_browser_test(env: dict[str, str]) -> None:
    """``node --test`` on the browser test (the SDK journeys' runner: its own process group,
    killed whole on timeout, Chromium included); its report printed when it fails."""
    node = node_and_sdk()
    if not PLAYWRIGHT.is_file():
        pytest.fail(f"{PLAYWRIGHT.parent} is missing: run `make setup` (it runs `npm ci`)")
    returncode, output = run_node(
        [node, "--test", "--test-force-exit", "--test-reporter=spec", str(BROWSER_TEST)],
        {**os.environ, **env, "NO_COLOR": "1"},
    )
    print(output)  # (shown with `pytest -rP`)
    assert returncode == 0, f"the browser test failed (node exit {returncode}):\n{output}"


def test_an_admin_sees_the_network_refusals_and_dead_letters_and_nobody_else_sees_anything(
    console: QuietStack, tmp_path: Path
) -> None:
    server = console.synapse
    tag = uuid.uuid4().hex[:8]
    chromium = find_tool("chromium")  # (missing: a clear error, not a skip)
    ops = register_user(server, f"ops_{tag}", admin=True)
    anna, bram, carla, mallory = (
        register_user(server, f"{name}_{tag}") for name in ("anna", "bram", "carla", "mallory")
    )
    audit = register_user(server, AUDIT_LOCALPART)
    team_id, thread_id = f"console-{tag}", f"console-thread-{tag}"
    team, thread = f"CareTeam/{team_id}", f"CommunicationRequest/{thread_id}"
    try:
        # FHIR: a team of Anna and Bram with one thread; Carla is a practitioner, not yet in it.
        console.fhir.put_all(
            [
                practitioner(f"anna-{tag}", anna.user_id),
                practitioner(f"bram-{tag}", bram.user_id),
                practitioner(f"carla-{tag}", carla.user_id),
                practitioner(f"odd-{tag}", ODD_ID),
                care_team(team_id, f"anna-{tag}", f"bram-{tag}"),
                {
                    "resourceType": "CommunicationRequest",
                    "id": thread_id,
                    "status": "active",
                    "recipient": [{"reference": team}],
                },
            ]
        )
        console.notify(team)
        console.notify(thread)
        # Anna joins the space and the thread's room; Bram leaves his invitations open.
        space, room = join_space_and_room(anna, team, thread)
        wait_until(
            lambda: (r := room_of(ops, team, room)) and bram.user_id in r["invited"],
            timeout=SETTLES_WITHIN,
            what="Bram invited to the thread's room, as the console sees it",
        )

        # A real refusal: Anna invites a neighbour who is not in the team.
        with pytest.raises(MatrixError) as refused:
            anna.invite(room, mallory.user_id)
        assert refused.value.reason == "not_in_care_team"

        # A real dead letter: an exempt account with no FHIR person speaks in the room.
        service = login_as(ops, f"@fhir:{SERVER_NAME}")
        service.invite(room, audit.user_id)
        audit.join(room)
        dead_event = audit.send_text(room, "no person can be named for this")
        wait_until(
            lambda: any(
                d["event_id"] == dead_event for d in admin_api(ops, "dead-letters")["dead"]
            ),
            timeout=SETTLES_WITHIN,
            what="the unattributable message listed as a dead letter",
        )
        wait_until(
            lambda: any(
                d["user_id"] == mallory.user_id for d in admin_api(ops, "denials")["denials"]
            ),
            timeout=SETTLES_WITHIN,
            what="the refused invitation in the audit journal",
        )

        # FHIR adds Carla and the odd id to the team, unannounced: the sync has not acted,
        # the console shows them pending invitation.
        console.fhir.put(
            care_team(team_id, f"anna-{tag}", f"bram-{tag}", f"carla-{tag}", f"odd-{tag}")
        )
        wait_until(
            lambda: (
                (r := room_of(ops, team, room))
                and sorted(r["pending_invite"] or []) == sorted([carla.user_id, ODD_ID])
            ),
            timeout=SETTLES_WITHIN,
            what="Carla (and the odd id) pending invitation",
        )
        # Every team, page by page (a second team of Anna's; other tests' teams may share
        # this HAPI): one per page when asked, and each once.
        second = f"CareTeam/console-b-{tag}"
        console.fhir.put(care_team(second.split("/")[1], f"anna-{tag}"))
        console.notify(second)
        wait_until(
            lambda: admin_api(ops, f"networks?care_team={second}")["networks"],
            timeout=SETTLES_WITHIN,
            what="a space for the second team",
        )
        first = admin_api(ops, "networks?limit=1")
        assert len(first["networks"]) == 1 and first["next"] is not None
        after = admin_api(ops, f"networks?limit=1&from={quote(first['next'], safe='')}")
        assert after["networks"][0]["care_team"] > first["networks"][0]["care_team"]
        seen: list[str] = []
        page = admin_api(ops, "networks?limit=20")
        while True:
            assert len(page["networks"]) <= 20
            seen += [n["care_team"] for n in page["networks"]]
            if page["next"] is None:
                break
            page = admin_api(ops, f"networks?limit=20&from={quote(page['next'], safe='')}")
        assert team in seen and len(seen) == len(set(seen))
        with pytest.raises(MatrixError) as too_many:
            admin_api(ops, "networks?limit=51")
        assert too_many.value.status == 400

        # The dead letter's cause fixed: the account gets a FHIR person (then the retry in
        # the browser writes the message).
        console.fhir.put(practitioner(f"audit-{tag}", audit.user_id))

        screenshot = os.environ.get("SFM_CONSOLE_SCREENSHOT") or str(tmp_path / "console.png")
        expected = {
            "admin_localpart": ops.user_id[1:].split(":")[0],
            "admin_password": f"pw-ops_{tag}",
            "admin_id": ops.user_id,
            "member_localpart": anna.user_id[1:].split(":")[0],
            "member_password": f"pw-anna_{tag}",
            "team": team,
            "thread": thread,
            "space_id": space,
            "room_id": room,
            "anna_id": anna.user_id,
            "bram_id": bram.user_id,
            "carla_id": carla.user_id,
            "odd_id": ODD_ID,
            "mallory_id": mallory.user_id,
            "dead_event_id": dead_event,
        }
        run_browser_test(
            {
                "SFM_BASE_URL": server.url("").rstrip("/"),
                "SFM_CHROMIUM": chromium,
                "SFM_CONSOLE_EXPECTED": json.dumps(expected),
                "SFM_CONSOLE_SCREENSHOT": screenshot,
            },
        )
        assert Path(screenshot).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"

        # The retry the admin clicked reached FHIR.
        written = wait_until(
            lambda: communication_of(console.hapi, dead_event),
            timeout=SETTLES_WITHIN,
            what="the retried message written to FHIR",
        )
        assert written["sender"]["reference"] == f"Practitioner/audit-{tag}"
    finally:
        # (The session's quiet HAPI outlives this module: the team and its odd member must
        # not follow the other homeservers that sync every team they find there.)
        for created in (team, f"CareTeam/console-b-{tag}"):
            requests.delete(f"{console.hapi.base_url}/{created}", timeout=30)


def test_a_wheel_carries_the_console_page(tmp_path: Path) -> None:
    """As docker/Dockerfile builds it (``pip wheel --no-deps``, setuptools by pip's build
    isolation)."""
    built = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(tmp_path), str(REPO)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert built.returncode == 0, built.stderr
    (wheel,) = tmp_path.glob("synapse_fhir_module-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for name in FILES:
        assert f"synapse_fhir_module/web/admin/static/{name}" in names, name
