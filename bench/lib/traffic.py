"""Load generators and the servers they talk to, each run as a role in a process of its own (bench/lib/roles.py).

Request/reply: the client connects, sends a request (32 bytes ``Q``, or an HTTP ``GET /`` for the test httpd),
reads the reply until EOF and closes; the server reads the 32-byte request, writes a 32-byte reply and closes
first (HTTP/1.0 style: TIME_WAIT stays on the server, so the clients' port search stays cheap).

Bulk: the client sends one command byte, ``D`` (the server sends until the client goes away) or ``U`` (the server
receives and discards), and counts the bytes moved over ``streams`` connections after a warm-up.

Every client prints one JSON line at its end; every server prints ``ready`` once it listens. Every loop is
bounded in time and count.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import os
import socket
import threading
import time
from typing import Any

REQUEST = b"Q" * 32
REPLY = b"R" * 32
HTTP_GET = b"GET / HTTP/1.1\r\nHost: bench\r\n\r\n"
# what each request kind sends, and how many reply bytes make an answer complete
REQUESTS = {"rr": (REQUEST, len(REPLY)), "http": (HTTP_GET, 1)}
MAX_BULK_SECONDS = 120.0  # a bulk server connection never sends for longer


def new_loop(use_uvloop: bool = True) -> asyncio.AbstractEventLoop:
    """An event loop: uvloop's when wanted and installed, asyncio's otherwise."""
    if use_uvloop:
        with contextlib.suppress(ImportError):
            import uvloop

            return uvloop.new_event_loop()
    return asyncio.new_event_loop()


def listener(addr: str, port: int, backlog: int = 4096) -> socket.socket:
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((addr, port))
    sock.listen(backlog)
    return sock


# -- request/reply -----------------------------------------------------------------------------------------------


class _ReplyProtocol(asyncio.Protocol):
    __slots__ = ("got", "transport")

    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.got = 0

    def data_received(self, data: bytes) -> None:
        if self.got < len(REQUEST) <= self.got + len(data):
            self.transport.write(REPLY)
            self.transport.close()  # the server closes first (see the module docstring)
        self.got += len(data)


def rr_server(addr: str, port: int) -> None:
    """Answer every 32-byte request with a 32-byte reply and close, until killed."""
    loop = new_loop()
    server = loop.run_until_complete(
        loop.create_server(_ReplyProtocol, addr, port, backlog=4096, reuse_address=True)
    )
    print("ready", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


class _AskProtocol(asyncio.Protocol):
    __slots__ = ("done", "got", "need", "request")

    def __init__(self, done: asyncio.Future[None], request: bytes, need: int) -> None:
        self.done = done
        self.request = request
        self.need = need
        self.got = 0

    def connection_made(self, transport: Any) -> None:
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        self.got += len(data)

    def eof_received(self) -> bool:
        if not self.done.done():
            if self.got >= self.need:
                self.done.set_result(None)
            else:
                self.done.set_exception(ConnectionError("EOF before the reply"))
        return False  # close

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.done.done():
            self.done.set_exception(exc or ConnectionError("closed before the reply"))


def rr_client(
    addr: str, port: int, seconds: float, concurrency: int, limit: int, warmup: float = 0.0, kind: str = "rr"
) -> None:
    """``concurrency`` connections in flight for ``warmup`` + ``seconds`` s, at most ``limit`` in all.

    Prints ``ok`` and ``errors`` (connections completed and failed after the warm-up), ``seconds`` (the window
    after the warm-up: ``seconds``, or less when ``limit`` ended the run), ``per_second`` and ``last_error``."""
    request, need = REQUESTS[kind]
    loop = new_loop()
    counts = {"ok": 0, "errors": 0, "started": 0}
    last_error = ""

    async def worker(start: float, end: float) -> None:
        nonlocal last_error
        while loop.time() < end and counts["started"] < limit:
            counts["started"] += 1
            done: asyncio.Future[None] = loop.create_future()
            try:
                async with asyncio.timeout(5):
                    await loop.create_connection(
                        functools.partial(_AskProtocol, done, request, need), addr, port
                    )
                    await done
            except (OSError, TimeoutError) as exc:
                if loop.time() >= start:
                    counts["errors"] += 1
                last_error = repr(exc)
                await asyncio.sleep(0.01)
                continue
            if loop.time() >= start:
                counts["ok"] += 1

    async def main() -> float:
        start = loop.time() + warmup
        end = start + seconds
        await asyncio.gather(*(worker(start, end) for _ in range(concurrency)))
        return max(1e-3, min(loop.time(), end) - start)  # shorter than ``seconds`` when ``limit`` ended it

    elapsed = loop.run_until_complete(main())
    result = {**counts, "seconds": elapsed, "per_second": counts["ok"] / elapsed, "last_error": last_error}
    print(json.dumps(result), flush=True)


# -- bulk --------------------------------------------------------------------------------------------------------


def bulk_server(addr: str, port: int, chunk: int) -> None:
    """Per connection (one thread each): ``D`` -> send ``chunk``-sized buffers, ``U`` -> receive and discard, until
    the peer goes away or MAX_BULK_SECONDS pass."""
    data = memoryview(os.urandom(chunk))

    def serve(conn: socket.socket) -> None:
        sink = bytearray(chunk)
        deadline = time.monotonic() + MAX_BULK_SECONDS
        with conn, contextlib.suppress(OSError):
            conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            command = conn.recv(1)
            if command == b"D":
                while time.monotonic() < deadline:
                    conn.sendall(data)
            elif command == b"U":
                while conn.recv_into(sink) and time.monotonic() < deadline:
                    pass

    with listener(addr, port, 128) as sock:
        print("ready", flush=True)
        while True:
            conn, _ = sock.accept()
            threading.Thread(target=serve, args=(conn,), daemon=True).start()


def bulk_client(
    addr: str, port: int, seconds: float, streams: int, command: str, warmup: float, chunk: int
) -> None:
    """``streams`` connections (one thread each) moving data (``D`` download, ``U`` upload) for ``seconds`` after
    ``warmup``; prints ``bytes``, ``seconds``, ``bytes_per_second`` and the first ``errors``."""
    counts = [0] * streams
    errors: list[str] = []
    start = time.monotonic() + warmup
    end = start + seconds

    def run(i: int) -> None:
        buf = bytearray(chunk)
        data = memoryview(os.urandom(chunk))
        try:
            with socket.create_connection((addr, port), timeout=10) as sock:
                sock.sendall(command.encode())
                counted = 0
                while True:
                    n = sock.recv_into(buf) if command == "D" else sock.send(data)
                    if n == 0:
                        raise ConnectionError("closed by the peer")
                    now = time.monotonic()
                    if now >= end:
                        break
                    if now >= start:
                        counted += n
                counts[i] = counted
        except OSError as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=run, args=(i,)) for i in range(streams)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(warmup + seconds + 10)
    total = sum(counts)
    result = {"bytes": total, "seconds": seconds, "bytes_per_second": total / seconds, "errors": errors[:3]}
    print(json.dumps(result), flush=True)
