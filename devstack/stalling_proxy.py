"""An HTTP/1.1 proxy on 127.0.0.1 that can hold every request before forwarding it: a
FHIR server that hangs, for the benchmarks (``bench/send_fhir_stall.py``); and, for the
tests, one whose data changes under a client at a chosen moment.

    proxy = StallingProxy("http://127.0.0.1:8080")   # upstream origin
    proxy.start()                  # pass-through; FHIR base URL: proxy.url("/fhir")
    proxy.stall(10.0)              # from now on every request waits 10 s, then goes on
    proxy.stall(0)                 # pass-through again; requests being held go on at once
    proxy.before_forwarding(lambda head: head.startswith(b"PUT "), write_elsewhere)
                                   # once: write_elsewhere() runs, then that PUT goes on
    proxy.exchanges                # (request head, response status) of each one relayed
    proxy.stop()

It understands just enough HTTP/1.1 to find where each request and response ends
(``Content-Length``, ``chunked``, or the connection closing), so persistent connections
keep working and the hold applies per request, not per TCP segment. One upstream
connection per client connection. It runs an asyncio loop in a thread of the calling
process; ``python -m devstack.stalling_proxy`` runs it on its own.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import signal
import threading
from collections import deque
from collections.abc import AsyncIterator, Callable
from urllib.parse import urlsplit

from devstack.ports import free_port

LOOPBACK = "127.0.0.1"
MAX_HEAD = 64 * 1024
MAX_EXCHANGES_KEPT = 10_000
_CHUNK = 64 * 1024


class _ConnectionDone(Exception):
    """The client or the upstream closed the connection: stop relaying it."""


class StallingProxy:
    def __init__(self, upstream: str, *, port: int | None = None) -> None:
        parts = urlsplit(upstream)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError("upstream must be an http:// origin, e.g. http://127.0.0.1:8080")
        self._upstream = (parts.hostname, parts.port or 80)
        self.port = port or free_port()
        self._stall_seconds = 0.0
        self._loop: asyncio.AbstractEventLoop | None = None
        self._release: asyncio.Event | None = None  # set = pass-through
        self._thread: threading.Thread | None = None
        self._server: asyncio.AbstractServer | None = None
        self._connections: set[asyncio.Task[None]] = set()
        self._ready = threading.Event()
        self._startup_error: BaseException | None = None
        self.forwarded = 0  # requests passed upstream
        self.held = 0  # requests being held right now
        # (request head, response status) of the latest exchanges (bounded: benchmarks
        # relay many).
        self.exchanges: deque[tuple[bytes, int]] = deque(maxlen=MAX_EXCHANGES_KEPT)
        self._interception: tuple[Callable[[bytes], bool], Callable[[], None]] | None = None

    def url(self, path: str = "") -> str:
        return f"http://{LOOPBACK}:{self.port}{path}"

    @property
    def stall_seconds(self) -> float:
        return self._stall_seconds

    def start(self, timeout: float = 10.0) -> None:
        self._thread = threading.Thread(target=self._run, name="stalling-proxy", daemon=True)
        self._thread.start()
        # Waiting on the loop's own signal that it listens (not a guess of how long).
        if not self._ready.wait(timeout):
            raise RuntimeError(f"the stalling proxy did not listen on port {self.port}")
        if self._startup_error is not None:
            raise RuntimeError("the stalling proxy could not start") from self._startup_error

    def stall(self, seconds: float) -> None:
        """Hold each request ``seconds`` before forwarding it; 0 = pass-through."""
        loop = self._loop
        if loop is None:
            raise RuntimeError("start the proxy first")
        done = threading.Event()

        def switch() -> None:
            self._stall_seconds = max(0.0, seconds)
            assert self._release is not None
            if self._stall_seconds > 0:
                self._release.clear()
            else:
                self._release.set()  # whatever is held goes on now
            done.set()

        loop.call_soon_threadsafe(switch)
        done.wait(5.0)

    def before_forwarding(
        self, matches: Callable[[bytes], bool], action: Callable[[], None]
    ) -> None:
        """Once: run ``action`` (in a thread) before forwarding the first request whose head
        ``matches``, e.g. another client's write that must land just before that one."""
        self._interception = (matches, action)

    def stop(self) -> None:
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        with contextlib.suppress(RuntimeError):  # the loop already ended
            loop.call_soon_threadsafe(self._shutdown)
        thread.join(10.0)
        self._loop = self._thread = None

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self._listen(loop))
        except BaseException as e:
            self._startup_error = e
            self._ready.set()
            loop.close()
            return
        self._ready.set()
        try:
            loop.run_forever()
        finally:
            for task in list(self._connections):
                task.cancel()
            if self._connections:  # (gather() of nothing needs a current loop: none here)
                loop.run_until_complete(asyncio.gather(*self._connections, return_exceptions=True))
            loop.close()

    async def _listen(self, loop: asyncio.AbstractEventLoop) -> None:
        self._loop = loop
        self._release = asyncio.Event()
        self._release.set()
        self._server = await asyncio.start_server(
            self._on_client, LOOPBACK, self.port, limit=MAX_HEAD
        )

    def _shutdown(self) -> None:
        if self._server is not None:
            self._server.close()
        for task in list(self._connections):
            task.cancel()
        assert self._loop is not None
        self._loop.stop()

    async def _on_client(
        self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter
    ) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._connections.add(task)
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter] | None = None
        try:
            while True:
                head, body = await _read_request(client_reader)
                await self._hold()
                await self._intercept(head)
                # A connection the upstream closed while idle is replaced, not reused.
                if upstream is None or upstream[1].is_closing() or upstream[0].at_eof():
                    if upstream is not None:
                        upstream[1].close()
                    upstream = await asyncio.open_connection(*self._upstream, limit=MAX_HEAD)
                up_reader, up_writer = upstream
                up_writer.write(head + body)
                await up_writer.drain()
                self.forwarded += 1
                method = head.split(b" ", 1)[0].upper()
                keep_alive, status = await _relay_response(up_reader, client_writer, method)
                self.exchanges.append((head, status))
                if not keep_alive or _wants_close(head):
                    break
        except (_ConnectionDone, ConnectionError, ValueError, asyncio.IncompleteReadError):
            pass
        except asyncio.CancelledError:
            pass
        finally:
            for writer in (client_writer, upstream[1] if upstream else None):
                if writer is not None:
                    writer.close()
            self._connections.discard(task)

    async def _intercept(self, head: bytes) -> None:
        interception = self._interception
        if interception is None or not interception[0](head):
            return
        self._interception = None
        assert self._loop is not None
        await self._loop.run_in_executor(None, interception[1])

    async def _hold(self) -> None:
        seconds = self._stall_seconds
        if seconds <= 0:
            return
        assert self._release is not None
        self.held += 1
        try:
            # The stall is the behaviour being simulated; switching back releases early.
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self._release.wait(), seconds)
        finally:
            self.held -= 1


async def _read_request(reader: asyncio.StreamReader) -> tuple[bytes, bytes]:
    """One request (head, whole body as sent) from a client connection."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as e:
        raise _ConnectionDone() from e
    headers = _headers(head)
    if b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        body = b"".join([chunk async for chunk in _chunks(reader)])
    elif b"content-length" in headers:
        body = await reader.readexactly(int(headers[b"content-length"]))
    else:
        body = b""  # a request without a body
    return head, body


async def _relay_response(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, method: bytes
) -> tuple[bool, int]:
    """Copy one response upstream → client; (whether the connection stays open, status)."""
    while True:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
        except asyncio.IncompleteReadError as e:
            raise _ConnectionDone() from e
        status = int(head.split(b" ", 2)[1])
        writer.write(head)
        if status >= 200 or status == 101:
            break  # 1xx interim answers are followed by the real one
    headers = _headers(head)
    keep_alive = not _wants_close(head)
    if method == b"HEAD" or status in (204, 304) or 100 <= status < 200:
        pass
    elif b"chunked" in headers.get(b"transfer-encoding", b"").lower():
        async for chunk in _chunks(reader):
            writer.write(chunk)
            await writer.drain()
    elif b"content-length" in headers:
        remaining = int(headers[b"content-length"])
        while remaining:
            data = await reader.read(min(remaining, _CHUNK))
            if not data:
                raise _ConnectionDone()
            writer.write(data)
            remaining -= len(data)
            await writer.drain()
    else:  # the body ends when the upstream closes
        while data := await reader.read(_CHUNK):
            writer.write(data)
            await writer.drain()
        keep_alive = False
    await writer.drain()
    return keep_alive, status


async def _chunks(reader: asyncio.StreamReader) -> AsyncIterator[bytes]:
    """The raw bytes of a chunked body, chunk by chunk, trailers included."""
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";", 1)[0].strip(), 16)
        if size == 0:
            trailers = size_line
            while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                trailers += line
            yield trailers + b"\r\n"
            return
        yield size_line + await reader.readexactly(size + 2)


def _headers(head: bytes) -> dict[bytes, bytes]:
    headers: dict[bytes, bytes] = {}
    for line in head.split(b"\r\n")[1:]:
        name, sep, value = line.partition(b":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    return headers


def _wants_close(head: bytes) -> bool:
    first_line = head.split(b"\r\n", 1)[0]
    connection = _headers(head).get(b"connection", b"").lower()
    if first_line.endswith(b"HTTP/1.0") or first_line.startswith(b"HTTP/1.0"):
        return connection != b"keep-alive"
    return connection == b"close"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    parser.add_argument("upstream", help="upstream origin, e.g. http://127.0.0.1:8080")
    parser.add_argument("--port", type=int, default=0, help="listen port (default: a free one)")
    parser.add_argument("--stall", type=float, default=10.0, help="seconds to hold a request")
    args = parser.parse_args()
    proxy = StallingProxy(args.upstream, port=args.port or None)
    proxy.start()
    stalling = threading.Event()

    def toggle(*_: object) -> None:
        if stalling.is_set():
            stalling.clear()
            proxy.stall(0)
        else:
            stalling.set()
            proxy.stall(args.stall)
        print(f"{'stalling' if stalling.is_set() else 'pass-through'}", flush=True)

    signal.signal(signal.SIGUSR1, toggle)
    print(f"{proxy.url()} → {args.upstream}, pass-through; SIGUSR1 toggles a {args.stall} s stall")
    stop = threading.Event()
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    stop.wait()
    proxy.stop()


if __name__ == "__main__":
    main()
