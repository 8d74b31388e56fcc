"""Load clients for robustness tests, run in a client namespace against :mod:`testbed.httpd` servers behind
the balancer: one process, one asyncio loop, thousands of sockets (no thread per connection).

    python -m testbed.conn_load soak  '{"addr": ..., "port": 80, "n": 10000, "batch": 500, ...}'
    python -m testbed.conn_load mixed '{"addr": ..., "port": 80, "seconds": 60, "short": 12, "long": 4, ...}'

``soak``: opens ``n`` connections in batches of ``batch`` concurrent connects and keeps them all open, prints
``CONNECTED {json}`` and waits for a line on stdin (the caller looks at the balancer while every connection is
open), then runs one checksummed exchange on each (at most ``inflight`` at a time) and prints the result as
JSON. Even connections ``POST /upload`` random bytes and compare the sha256 the server answers with their own;
odd ones ``GET /bytes/N`` and compare the body's sha256 with :func:`testbed.httpd.payload_sha256`. Sizes are
drawn from ``sizes``. Nothing is retried: a connection that fails or a body that differs is reported.

``mixed``: for ``seconds`` (or until a line on stdin), ``short`` workers loop ``GET /`` on a fresh connection
and ``long`` workers download ``GET /bytes/long_size`` read slowly (``long_read_pause`` s per 64 KiB), each
checked; prints one record per connection (start and end on this machine's monotonic clock, which the test
shares, the server that answered, the error). Bounded by ``max_records`` and by a timeout per connection.

Both raise RLIMIT_NOFILE to the hard limit first. Standard library plus :mod:`testbed.httpd`.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import random
import resource
import socket
import sys
import time
from typing import Any

from testbed.httpd import payload_sha256

CHUNK = 1 << 16


def raise_nofile() -> int:
    """Raise this process's open-file limit to its hard limit; returns the new soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def error_name(exc: BaseException) -> str:
    return "Timeout" if isinstance(exc, TimeoutError) else type(exc).__name__


async def connect(addr: str, port: int, timeout: float) -> socket.socket:
    sock = socket.socket()
    sock.setblocking(False)
    try:
        async with asyncio.timeout(timeout):
            await asyncio.get_running_loop().sock_connect(sock, (addr, port))
    except BaseException:
        sock.close()
        raise
    return sock


def split_response(data: bytes) -> tuple[str, dict[str, str], bytes]:
    """(status line, lower-cased headers, body) of an HTTP response; ValueError when there is no head."""
    head, sep, body = data.partition(b"\r\n\r\n")
    if not sep:
        raise ValueError(f"no complete response head in {len(data)} bytes")
    lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines[1:]:
        key, _, value = line.partition(":")
        headers[key.strip().lower()] = value.strip()
    return lines[0], headers, body


def server_name(headers: dict[str, str]) -> str | None:
    server = headers.get("server", "")
    return server.rpartition("/")[2] if server.startswith("convey-test-httpd/") else None


async def read_all(sock: socket.socket, pause: float = 0.0) -> bytes:
    loop = asyncio.get_running_loop()
    chunks = []
    while chunk := await loop.sock_recv(sock, CHUNK):
        chunks.append(chunk)
        if pause:
            await asyncio.sleep(pause)
    return b"".join(chunks)


# -- soak ----------------------------------------------------------------------------------------------------


class Soak:
    def __init__(self, a: dict[str, Any]) -> None:
        self.a = a
        self.rng = random.Random(a.get("seed", 1))
        self.errors: dict[str, int] = {}
        self.samples: list[str] = []
        self.corrupted = 0
        self.ok = 0
        self.sent = 0
        self.received = 0
        self.servers: dict[str, int] = {}

    def fail(self, what: str, detail: str) -> None:
        self.errors[what] = self.errors.get(what, 0) + 1
        if len(self.samples) < 20:
            self.samples.append(f"{what}: {detail}"[:300])

    async def open_one(self) -> socket.socket | None:
        try:
            return await connect(self.a["addr"], self.a["port"], self.a.get("connect_timeout", 10.0))
        except (OSError, TimeoutError) as exc:
            self.fail("connect " + error_name(exc), str(exc))
            return None

    async def exchange(self, index: int, sock: socket.socket, gate: asyncio.Semaphore) -> None:
        size = self.rng.choice(self.a["sizes"])
        if index % 2 == 0:
            body = self.rng.randbytes(size)
            request = f"POST /upload HTTP/1.1\r\nHost: vip\r\nContent-Length: {size}\r\n\r\n".encode() + body
            expected = hashlib.sha256(body).hexdigest()
        else:
            request = f"GET /bytes/{size} HTTP/1.1\r\nHost: vip\r\n\r\n".encode()
            expected = payload_sha256(size)
        loop = asyncio.get_running_loop()
        async with gate:
            try:
                async with asyncio.timeout(self.a.get("exchange_timeout", 20.0)):
                    await loop.sock_sendall(sock, request)
                    self.sent += len(request)
                    data = await read_all(sock)
            except (OSError, TimeoutError) as exc:
                self.fail("exchange " + error_name(exc), str(exc))
                return
            finally:
                sock.close()
        self.received += len(data)
        try:
            status, headers, answer = split_response(data)
        except ValueError as exc:
            self.fail("no response", str(exc))
            return
        got = answer.decode("latin-1") if index % 2 == 0 else hashlib.sha256(answer).hexdigest()
        if not status.startswith("HTTP/1.1 200") or got != expected:
            self.corrupted += 1
            self.fail("corrupted", f"#{index} {status!r} size {size} got {got[:70]!r}")
            return
        name = server_name(headers) or "?"
        self.servers[name] = self.servers.get(name, 0) + 1
        self.ok += 1

    async def run(self) -> dict[str, Any]:
        n, batch = self.a["n"], self.a.get("batch", 500)
        started = time.monotonic()
        socks: list[socket.socket] = []
        for first in range(0, n, batch):
            opened = await asyncio.gather(*(self.open_one() for _ in range(first, min(n, first + batch))))
            socks += [sock for sock in opened if sock is not None]
        ramp = time.monotonic() - started
        print("CONNECTED " + json.dumps({"connected": len(socks), "seconds": round(ramp, 3)}), flush=True)
        await asyncio.get_running_loop().run_in_executor(None, sys.stdin.readline)
        started = time.monotonic()
        gate = asyncio.Semaphore(self.a.get("inflight", 1000))
        await asyncio.gather(*(self.exchange(i, sock, gate) for i, sock in enumerate(socks)))
        return {
            "n": n,
            "connected": len(socks),
            "ok": self.ok,
            "corrupted": self.corrupted,
            "errors": self.errors,
            "samples": self.samples,
            "sent": self.sent,
            "received": self.received,
            "servers": self.servers,
            "ramp_seconds": round(ramp, 3),
            "exchange_seconds": round(time.monotonic() - started, 3),
        }


# -- mixed ---------------------------------------------------------------------------------------------------


class Mixed:
    def __init__(self, a: dict[str, Any]) -> None:
        self.a = a
        self.records: list[dict[str, Any]] = []
        self.end = time.monotonic() + a["seconds"]
        self.stop = asyncio.Event()

    def running(self) -> bool:
        return (
            not self.stop.is_set()
            and time.monotonic() < self.end
            and len(self.records) < self.a["max_records"]
        )

    async def one(self, kind: str) -> None:
        a, start = self.a, time.monotonic()
        long = kind == "long"
        path = f"/bytes/{a['long_size']}" if long else "/"
        record: dict[str, Any] = {"kind": kind, "start": start, "server": None, "error": None}
        try:
            async with asyncio.timeout(a["long_timeout"] if long else a["short_timeout"]):
                sock = await connect(a["addr"], a["port"], a["short_timeout"])
                record["connected"] = time.monotonic()
                with sock:
                    await asyncio.get_running_loop().sock_sendall(
                        sock, f"GET {path} HTTP/1.1\r\n\r\n".encode()
                    )
                    data = await read_all(sock, a["long_read_pause"] if long else 0.0)
            status, headers, body = split_response(data)
            record["server"] = server_name(headers)
            if not status.startswith("HTTP/1.1 200"):
                record["error"] = f"status {status!r}"
            elif long and hashlib.sha256(body).hexdigest() != payload_sha256(a["long_size"]):
                record["error"] = f"body differs ({len(body)} bytes)"
            elif not long and not body.decode("latin-1").startswith(record["server"] or "?"):
                record["error"] = f"body {body[:80]!r}"
        except (OSError, TimeoutError, ValueError) as exc:
            record["error"] = f"{error_name(exc)}: {exc}"
        record["end"] = time.monotonic()
        self.records.append(record)

    async def worker(self, kind: str) -> None:
        while self.running():
            await self.one(kind)
            await asyncio.sleep(self.a["short_pause"] if kind == "short" else 0.0)

    async def run(self) -> dict[str, Any]:
        loop = asyncio.get_running_loop()
        loop.run_in_executor(None, sys.stdin.readline).add_done_callback(lambda _f: self.stop.set())
        kinds = ["short"] * self.a["short"] + ["long"] * self.a["long"]
        await asyncio.gather(*(self.worker(kind) for kind in kinds))
        return {"records": self.records}


MIXED_DEFAULTS: dict[str, Any] = {
    "short_timeout": 5.0,
    "short_pause": 0.05,
    "long_size": 4 << 20,
    "long_read_pause": 0.04,
    "long_timeout": 20.0,
    "max_records": 50_000,
}


def main(argv: list[str]) -> int:
    op, args = argv[0], json.loads(argv[1])
    args["nofile"] = raise_nofile()
    if op == "soak":
        result = asyncio.run(Soak(args).run())
    elif op == "mixed":
        result = asyncio.run(Mixed(MIXED_DEFAULTS | args).run())
    else:
        raise SystemExit(f"unknown operation {op!r}: soak or mixed")
    result["nofile"] = args["nofile"]
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
