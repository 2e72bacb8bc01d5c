"""A throwaway PostgreSQL cluster for tests, as a managed process on 127.0.0.1.

``initdb`` into a fresh temporary directory, then ``postgres`` on a free port, with its unix
socket in that directory too. Databases are created the way Synapse requires (UTF8, C
collation, from ``template0``), owned by an ordinary (non-superuser) role that logs in with a
password over TCP, as in a production deployment.

Where the binaries come from (``find_bindir``), first found wins:

1. the directory ``SFM_PG_BINDIR`` names (nothing else is tried then);
2. the PyPI wheel ``pgserver`` in this Python's environment (``make setup`` installs it with
   the ``services`` extra): PostgreSQL 16 under ``site-packages/pgserver/pginstall/bin``;
3. ``initdb`` on ``PATH``, else the newest ``/usr/lib/postgresql/<version>/bin`` (Debian's
   ``postgresql`` package).

That directory also holds the client programs of the same version (``pg_dump``,
``pg_restore``, ``psql``, ...): ``find_program("pg_dump")`` returns one, or says clearly that
it is missing. Those run as anyone, root included, and reach the cluster over TCP with the
role's password (``PostgresDatabase``; ``PGPASSWORD`` for the programs).

PostgreSQL refuses to run as root. As root, ``initdb`` and ``postgres`` run as another user
through ``setpriv`` (which execs, so the PID we stop is the postmaster's): the ``postgres``
system user where Debian's package created it, else ``nobody``, which every Linux system
has. The cluster's directory is given to that user. When that user cannot reach the binaries
(a virtualenv under root's private home, say), the installation is linked (or copied) into
the cluster's directory first, which it can reach; it goes with the cluster at ``stop``.
"""

from __future__ import annotations

import importlib.util
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
# Who runs the cluster when we are root: the first of these that exists.
SERVER_USERS = ("postgres", "nobody")
SUPERUSER = "postgres"  # the cluster's superuser (unix socket only, no password)
ROLE = "synapse"  # the role that owns the databases, as an operator would set it up
_NAME = re.compile(r"[a-z_][a-z0-9_]*")


class PostgresNotInstalled(RuntimeError):
    pass


def find_bindir() -> Path:
    """The directory holding ``initdb`` and ``postgres`` (and their client programs)."""
    configured = os.environ.get("SFM_PG_BINDIR")
    if configured:
        candidates = [Path(configured)]
    else:
        candidates = [wheel] if (wheel := _wheel_bindir()) else []
        on_path = shutil.which("initdb")
        # Debian links /usr/lib/postgresql/<v>/bin/initdb from nowhere on PATH (pg_wrapper
        # covers only the clients); some images add links, which we follow.
        candidates += [Path(on_path).resolve().parent] if on_path else []
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
        + ": the tests need a PostgreSQL server. `make setup` installs one into .venv (the"
        " `services` extra: the pgserver wheel, for Python 3.10 to 3.12); otherwise install"
        " Debian's package (`apt-get install postgresql`) or point SFM_PG_BINDIR at the"
        " directory holding initdb and postgres."
    )


def find_program(name: str) -> Path:
    """A program of the same installation as the server: ``pg_dump``, ``pg_restore``, ``psql``."""
    program = find_bindir() / name
    if not program.is_file():
        raise PostgresNotInstalled(
            f"{name} not found beside the PostgreSQL server in {program.parent}"
            " (Debian: the postgresql-client package of the same version)"
        )
    return program


def _wheel_bindir() -> Path | None:
    """``pgserver``'s binaries, found without importing it (its import sets up locks)."""
    spec = importlib.util.find_spec("pgserver")
    if spec is None or not spec.submodule_search_locations:
        return None
    return Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"


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

    def __init__(self, log_dir: Path, *, port: int | None = None, with_role: bool = True) -> None:
        # with_role=False: only the superuser, as the postgres image's fresh volume.
        self.with_role = with_role
        self.bindir = find_bindir()
        self.port = port or free_port()
        self.host = "127.0.0.1"
        # Who runs the cluster when we are root (None: we run it ourselves).
        self.run_as = _server_user() if os.geteuid() == 0 else None
        # Not under pytest's directory: that is private to root, and the server's user
        # must reach its own data directory and socket.
        self.root = Path(tempfile.mkdtemp(prefix="sfm-pg-"))
        try:
            if self.run_as is not None:
                os.chown(self.root, self.run_as.pw_uid, self.run_as.pw_gid)
            if not self._can_run(self.bindir):
                self.bindir = _reachable_copy(self.bindir, self.root / "install")
        except BaseException:
            shutil.rmtree(self.root, ignore_errors=True)
            raise
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
        if not self.with_role:
            return
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
        if self.run_as is None:
            return []
        return [
            "setpriv",
            f"--reuid={self.run_as.pw_uid}",
            f"--regid={self.run_as.pw_gid}",
            "--init-groups",
        ]

    def _can_run(self, bindir: Path) -> bool:
        """Whether the server's user can run these binaries where they are (as root, the
        user we hand the cluster to may not reach a directory root can).

        Asked of ``test``, run as that user: ``setpriv`` still holds root's capabilities when
        it execs, so the programs themselves would start, then fail to find their files."""
        check = ["test", "-x", str(bindir / "initdb"), "-a", "-x", str(bindir / "postgres")]
        return (
            subprocess.run(
                [*self._run_as(), *check],
                stdin=subprocess.DEVNULL,
                capture_output=True,
                timeout=30,
                check=False,
            ).returncode
            == 0
        )

    def _initdb(self) -> None:
        pwfile = self.root / "superuser-password"
        pwfile.write_text(secrets.token_hex(16) + "\n")  # required by scram on TCP; unused
        if self.run_as is not None:
            os.chown(pwfile, self.run_as.pw_uid, self.run_as.pw_gid)
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


def _server_user() -> pwd.struct_passwd:
    """The user a root-started cluster runs as: Debian's ``postgres``, else ``nobody``."""
    for name in SERVER_USERS:
        try:
            return pwd.getpwnam(name)
        except KeyError:
            continue
    raise PostgresNotInstalled(
        "running as root, and PostgreSQL refuses to: no user to run it as"
        f" (none of {', '.join(SERVER_USERS)} exists); run the tests as an ordinary user"
    )


def _reachable_copy(bindir: Path, dest: Path) -> Path:
    """The installation around ``bindir`` hard-linked (copied across file systems) under
    ``dest`` in the same layout; returns the new ``bin``.

    PostgreSQL finds its ``lib`` and ``share`` relative to its own binaries; the pgserver
    wheel's binaries find libpq in ``pgserver.libs`` beside the package
    (``$ORIGIN/../../../pgserver.libs``)."""
    prefix = bindir.parent
    anchor = prefix.parent.parent
    parts = [prefix / "bin", prefix / "lib", prefix / "share", anchor / "pgserver.libs"]
    for part in parts:
        if part.is_dir():
            shutil.copytree(
                part, dest / part.relative_to(anchor), symlinks=True, copy_function=_link_or_copy
            )
    return dest / bindir.relative_to(anchor)


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


class _Closing:
    """``with`` closes a psycopg2 connection (its own ``with`` only ends the transaction)."""

    def __init__(self, conn: Any) -> None:
        self.conn = conn

    def __enter__(self) -> Any:
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()
