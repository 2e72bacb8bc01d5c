"""A throwaway PostgreSQL cluster for tests, as a managed process on 127.0.0.1.

``initdb`` into a fresh temporary directory, then ``postgres`` on a free port, with its unix
socket in that directory too. PostgreSQL refuses to run as root: as root, both run as the
``postgres`` system user (``setpriv``, which execs, so the PID we stop is the postmaster's),
and the directory is given to that user. Databases are created the way Synapse requires
(UTF8, C collation, from ``template0``), owned by an ordinary (non-superuser) role that
logs in with a password over TCP, as in a production deployment.

The server binaries come from Debian's ``postgresql`` package (``.ci/run`` installs it):
``initdb`` on ``PATH``, else the newest ``/usr/lib/postgresql/<version>/bin``, or the
directory ``SFM_PG_BINDIR`` names.
"""

from __future__ import annotations

import os
import pwd
import re
import secrets
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import attr

from devstack.ports import free_port
from devstack.processes import ManagedProcess
from devstack.waiting import StopWaiting, wait_until

START_TIMEOUT = 60.0
SYSTEM_USER = "postgres"  # who runs the cluster when we are root
SUPERUSER = "postgres"  # the cluster's superuser (unix socket only, no password)
ROLE = "synapse"  # the role that owns the databases, as an operator would set it up
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class PostgresNotInstalled(RuntimeError):
    pass


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres``."""
    configured = os.environ.get("SFM_PG_BINDIR")
    if configured:
        candidates = [Path(configured)]
    else:
        on_path = shutil.which("initdb")
        # Debian links /usr/lib/postgresql/<v>/bin/initdb from nowhere on PATH (pg_wrapper
        # covers only the clients); some images add links, which we follow.
        candidates = [Path(on_path).resolve().parent] if on_path else []
        candidates += sorted(
            Path("/usr/lib/postgresql").glob("*/bin"),
            key=lambda p: [int(n) for n in re.findall(r"\d+", p.parent.name)],
            reverse=True,
        )
    for bindir in candidates:
        if (bindir / "initdb").is_file() and (bindir / "postgres").is_file():
            return bindir
    raise PostgresNotInstalled(
        "PostgreSQL server binaries (initdb, postgres) not found"
        + (f" in SFM_PG_BINDIR={configured}" if configured else "")
        + ": the tests need a PostgreSQL server. Install Debian's package"
        " (`apt-get install postgresql`, as .ci/run does) or point SFM_PG_BINDIR at the"
        " directory holding initdb and postgres."
    )


@attr.s(frozen=True, auto_attribs=True)
class PostgresDatabase:
    """One database of the cluster, reached over TCP with the owning role's password."""

    host: str
    port: int
    dbname: str
    user: str
    password: str

    def connect_args(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "port": self.port,
            "dbname": self.dbname,
            "user": self.user,
            "password": self.password,
        }

    def synapse_config(self) -> dict[str, Any]:
        """The ``database:`` section of ``homeserver.yaml``."""
        return {"name": "psycopg2", "args": {**self.connect_args(), "cp_min": 1, "cp_max": 5}}

    def connect(self) -> Any:
        """A psycopg2 connection (the caller closes it)."""
        import psycopg2

        return psycopg2.connect(**self.connect_args(), connect_timeout=10)


class PostgresCluster:
    """A cluster of our own; ``log_dir`` keeps its server log (the data goes at ``stop``)."""

    def __init__(self, log_dir: Path, *, port: int | None = None) -> None:
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        self._as_root = os.geteuid() == 0
        if self._as_root:
            try:
                pwd.getpwnam(SYSTEM_USER)
            except KeyError:
                raise PostgresNotInstalled(
                    f"running as root, but there is no '{SYSTEM_USER}' system user to run"
                    " PostgreSQL as (Debian's postgresql package creates it)"
                ) from None
        # Not under pytest's directory: that is private to root, and the postgres user
        # must reach its own data directory and socket.
        self.root = Path(tempfile.mkdtemp(prefix="sfm-pg-"))
        self.data_dir = self.root / "data"
        self.socket_dir = self.root
        self.role_password = secrets.token_hex(16)
        self.process = ManagedProcess(
            "postgres",
            [
                *self._run_as(),
                str(self.bindir / "postgres"),
                "-D",
                str(self.data_dir),
                "-p",
                str(self.port),
                "-c",
                f"listen_addresses={self.host}",
                "-c",
                f"unix_socket_directories={self.socket_dir}",
                # Throwaway data: no need to survive a power cut.
                "-c",
                "fsync=off",
                "-c",
                "synchronous_commit=off",
                "-c",
                "full_page_writes=off",
            ],
            log_dir / f"postgres-{self.port}.log",
            cwd=self.root,
            stop_signal=signal.SIGINT,  # "fast" shutdown: do not wait for clients
        )

    def start(self, timeout: float = START_TIMEOUT) -> None:
        if not (self.data_dir / "PG_VERSION").exists():
            self._initdb()
        self.process.start()
        wait_until(
            self._ready,
            timeout=timeout,
            what=f"PostgreSQL accepting connections on {self.host}:{self.port}"
            f" (log: {self.process.log_path})",
            interval=0.05,
        )
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (ROLE,))
            if cur.fetchone() is None:
                cur.execute(f"CREATE ROLE {ROLE} LOGIN PASSWORD %s", (self.role_password,))

    def create_database(self, name: str) -> PostgresDatabase:
        """A new, empty database as Synapse requires it (UTF8, C collation and ctype)."""
        if not _NAME.fullmatch(name):
            raise ValueError(f"not a plain database name: {name!r}")
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute(
                f"CREATE DATABASE {name} ENCODING 'UTF8' LC_COLLATE='C' LC_CTYPE='C'"
                f" TEMPLATE template0 OWNER {ROLE}"
            )
        return PostgresDatabase(self.host, self.port, name, ROLE, self.role_password)

    def stop(self) -> None:
        """Stop the server (by its PID) and delete its data."""
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _run_as(self) -> list[str]:
        if not self._as_root:
            return []
        return ["setpriv", f"--reuid={SYSTEM_USER}", f"--regid={SYSTEM_USER}", "--init-groups"]

    def _initdb(self) -> None:
        pwfile = self.root / "superuser-password"
        pwfile.write_text(secrets.token_hex(16) + "\n")  # required by scram on TCP; unused
        if self._as_root:
            user = pwd.getpwnam(SYSTEM_USER)
            os.chown(self.root, user.pw_uid, user.pw_gid)
            os.chown(pwfile, user.pw_uid, user.pw_gid)
        result = subprocess.run(
            [
                *self._run_as(),
                str(self.bindir / "initdb"),
                "-D",
                str(self.data_dir),
                "-U",
                SUPERUSER,
                f"--pwfile={pwfile}",
                "--auth-local=trust",  # the socket lives in a directory only we can enter
                "--auth-host=scram-sha-256",
                "--encoding=UTF8",
                "--no-locale",
                "--no-sync",
            ],
            cwd=self.root,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        pwfile.unlink()
        if result.returncode != 0:
            raise RuntimeError(
                f"initdb failed with code {result.returncode}:\n{result.stdout}{result.stderr}"
            )

    def _admin(self) -> Any:
        """A superuser connection over the unix socket, in autocommit (CREATE DATABASE)."""
        import psycopg2

        conn = psycopg2.connect(
            host=str(self.socket_dir),
            port=self.port,
            user=SUPERUSER,
            dbname="postgres",
            connect_timeout=10,
        )
        conn.autocommit = True
        return _Closing(conn)

    def _ready(self) -> bool:
        if not self.process.running:
            raise StopWaiting(
                f"PostgreSQL exited with code {self.process.exit_code()}:\n"
                f"{self.process.log_tail()}"
            )
        with self._admin() as conn, conn.cursor() as cur:
            cur.execute("SELECT 1")
            return cur.fetchone() == (1,)


class _Closing:
    """``with`` closes a psycopg2 connection (its own ``with`` only ends the transaction)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __enter__(self) -> Any:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
