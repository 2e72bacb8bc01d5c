"""The PostgreSQL the tests run comes from the project's own setup and needs no manual step:
as root on a machine without Debian's ``postgres`` user, from a virtualenv in a directory only
root may enter, and with the client programs (pg_dump, pg_restore, psql) of the same version
beside the server (devstack/postgres.py)."""

from __future__ import annotations

import os
import pwd
import subprocess
from pathlib import Path

import pytest

from devstack import postgres as pg
from devstack.postgres import PostgresCluster, PostgresDatabase


def _proc_uid(pid: int) -> int:
    status = Path(f"/proc/{pid}/status").read_text()
    line = next(line for line in status.splitlines() if line.startswith("Uid:"))
    return int(line.split()[1])


def test_root_without_a_postgres_user_runs_the_cluster_as_nobody_from_a_copy_it_can_reach(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    wheel = pg._wheel_bindir()
    assert wheel is not None and (wheel / "postgres").is_file(), (
        "the pgserver wheel is not installed: `make setup` installs it (the services extra)"
    )
    # The wheel seen through a directory only its owner may enter, as a venv under /root is.
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / "site-packages").symlink_to(wheel.parents[2], target_is_directory=True)
    bindir = home / "site-packages" / wheel.relative_to(wheel.parents[2])
    monkeypatch.setenv("SFM_PG_BINDIR", str(bindir))
    monkeypatch.setattr(pg, "SERVER_USERS", ("sfm-no-such-user", "nobody"))

    cluster = PostgresCluster(run_dir)
    try:
        cluster.start()
        database = cluster.create_database("reachable_copy")
        conn = database.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW server_version")
                (version,) = cur.fetchone()
        finally:
            conn.close()
        assert cluster.process.process is not None
        pid = cluster.process.process.pid
        executable = Path(os.readlink(f"/proc/{pid}/exe"))
        if os.geteuid() == 0:
            assert cluster.run_as is not None and cluster.run_as.pw_name == "nobody"
            assert _proc_uid(pid) == pwd.getpwnam("nobody").pw_uid
            assert executable.is_relative_to(cluster.root / "install"), executable
        else:  # nobody to hand it to: it runs as us, where it is
            assert cluster.run_as is None
            assert _proc_uid(pid) == os.geteuid()
            assert executable == (wheel / "postgres").resolve()
        server = subprocess.run(
            [str(wheel / "postgres"), "--version"], capture_output=True, text=True, check=True
        )
        assert server.stdout.split()[-1] == version
    finally:
        cluster.stop()
    assert not cluster.root.exists()  # the copy went with the cluster


def test_pg_dump_pg_restore_and_psql_of_the_same_installation_work_on_the_cluster(
    postgres: PostgresCluster, postgres_database: PostgresDatabase, tmp_path: Path
) -> None:
    restored = postgres.create_database(f"{postgres_database.dbname}_restored")
    dump = tmp_path / "dump.pgc"
    env = {**os.environ, "PGPASSWORD": postgres_database.password}

    def run(program: str, *args: str, database: PostgresDatabase) -> str:
        result = subprocess.run(
            [
                str(pg.find_program(program)),
                f"--host={database.host}",
                f"--port={database.port}",
                f"--username={database.user}",
                *args,
                f"--dbname={database.dbname}",
            ],
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
        assert result.returncode == 0, f"{program} failed: {result.stderr}"
        return result.stdout

    run(
        "psql",
        "--no-psqlrc",
        "--command=CREATE TABLE kept (n integer); INSERT INTO kept SELECT generate_series(1, 3)",
        database=postgres_database,
    )
    run("pg_dump", "--format=custom", f"--file={dump}", database=postgres_database)
    run("pg_restore", "--no-owner", str(dump), database=restored)
    count = run(
        "psql",
        "--no-psqlrc",
        "--tuples-only",
        "--no-align",
        "--command=SELECT sum(n) FROM kept",
        database=restored,
    )
    assert count.strip() == "6"
