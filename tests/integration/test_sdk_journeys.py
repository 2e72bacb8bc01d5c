"""Clinician journeys in Element's own SDK (matrix-js-sdk, tests/sdk/*.test.js), run by Node
against the real stack: Synapse with the module, and a HAPI whose shim notifies it.

Pytest starts the stack and registers the journey's accounts through Synapse's shared-secret
admin API (registration is closed on this server, as it is for clinicians in production:
their accounts exist before FHIR names them). Node gets URLs, the accounts' access tokens
and a tag for its FHIR ids through the environment, writes the FHIR resources itself (as
an integrator would) and acts in Matrix only through the SDK. See docs/clinician-journeys.md.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from devstack.matrix_client import register_user
from tests.integration.test_fhir_drives_matrix import ShimStack

ROOT = Path(__file__).resolve().parents[2]
JOURNEYS = ROOT / "tests" / "sdk"
SDK = ROOT / "node_modules" / "matrix-js-sdk" / "package.json"
# Each journey's steps wait at most a minute each; this bounds a journey that hangs.
NODE_TIMEOUT = 300


@pytest.fixture(scope="module")
def stack(run_dir: Path) -> Iterator[ShimStack]:
    stack = ShimStack(run_dir / "sdk-stack")
    stack.hapi.start()
    try:
        stack.synapse.start()
        try:
            yield stack
        finally:
            stack.synapse.stop()
    finally:
        stack.hapi.stop()


@pytest.mark.parametrize(
    ("journey", "accounts"),
    [
        pytest.param(f"{name}.test.js", accounts, id=name)
        for name, accounts in [
            ("gp_joins_the_care_network", ("gp", "nurse")),
            ("neighbour_is_refused", ("gp", "neighbour")),
            ("message_from_another_system", ("gp",)),
        ]
    ],
)
def test_journey(stack: ShimStack, journey: str, accounts: tuple[str, ...]) -> None:
    node = node_and_sdk()
    tag = uuid.uuid4().hex[:8]
    users = {name: register_user(stack.synapse, f"{name}_{tag}") for name in accounts}
    env = {
        **os.environ,
        "SDK_SYNAPSE_URL": stack.synapse.base_url,
        "SDK_FHIR_URL": stack.hapi.base_url,
        "SDK_SERVICE_USER_ID": stack.synapse.user_id("fhir"),
        "SDK_ACCOUNTS": json.dumps(
            {
                name: {"userId": user.user_id, "accessToken": user.access_token}
                for name, user in users.items()
            }
        ),
        "SDK_TAG": tag,
        "NO_COLOR": "1",
    }
    returncode, output = run_node(
        # --test-force-exit: the SDK's request timeouts are timers it never clears (up to
        # 110 s after a /sync), which would keep Node alive long after the clients stopped.
        [node, "--test", "--test-force-exit", "--test-reporter=spec", str(JOURNEYS / journey)],
        env,
    )
    print(output)  # (node's step-by-step report: shown with `pytest -rP`)
    assert returncode == 0, f"{journey} failed (node exit {returncode}):\n{output}"


def node_and_sdk() -> str:
    """Node's path, once Node and the SDK are there; a clear failure otherwise (never a skip)."""
    node = shutil.which("node")
    if node is None:
        pytest.fail("node is not on PATH: install Node.js 20.14 or later to run the SDK journeys")
    if not SDK.is_file():
        pytest.fail(f"{SDK.parent} is missing: run `make setup` (it runs `npm ci`)")
    return node


def run_node(command: list[str], env: dict[str, str]) -> tuple[int, str]:
    """Run ``command`` in its own process group (node --test runs each file in a child
    process); on timeout the whole group is killed and what it printed is returned."""
    process = subprocess.Popen(
        command,
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        output, _ = process.communicate(timeout=NODE_TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        output, _ = process.communicate()
        pytest.fail(f"node still running after {NODE_TIMEOUT} s, killed:\n{output}")
    return process.returncode, output


def test_without_node_the_journeys_fail_saying_what_is_missing(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # (an empty directory: no node on it)
    with pytest.raises(pytest.fail.Exception, match="node is not on PATH"):
        node_and_sdk()


def test_without_node_modules_the_journeys_fail_saying_what_to_run(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    if shutil.which("node") is None:
        pytest.fail("node is not on PATH: install Node.js 20.14 or later")
    monkeypatch.setattr(
        "tests.integration.test_sdk_journeys.SDK", tmp_path / "matrix-js-sdk" / "package.json"
    )
    with pytest.raises(pytest.fail.Exception, match=r"run `make setup` \(it runs `npm ci`\)"):
        node_and_sdk()
