"""A small real HTTP/1.1 test server: run it in a server namespace (or on loopback) behind the balancer.

    python -m testbed.httpd --bind ADDR:PORT --name NAME

- ``GET /`` -> ``NAME <peer_ip>:<peer_port>\\n``: which server answered and which source address it saw.
- ``GET /bytes/N`` -> N deterministic bytes (:func:`payload`), with their sha256 in the ``X-Sha256`` header.
- ``POST /upload`` (with Content-Length) -> the hex sha256 of the body (64 characters, no newline).

Every response closes the connection (HTTP/1.0 style). Prints ``READY ADDR:PORT`` on stdout once listening
(port 0 picks a free port) and nothing else there; errors go to stderr. asyncio, so hundreds of concurrent
connections and 50 MB bodies are fine. SIGTERM or SIGINT stops it.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import hashlib
import random
import signal
import sys
from collections.abc import Iterator

BLOCK = 64 * 1024
MAX_BYTES = 1 << 34  # 16 GiB: more than any test sends
READ_TIMEOUT = 30.0


@functools.lru_cache(maxsize=256)
def _block(index: int) -> bytes:
    return random.Random(0xC0FFEE + index).randbytes(BLOCK)


def payload_chunks(n: int) -> Iterator[bytes]:
    """The bytes of ``GET /bytes/n`` in chunks: 64 KiB blocks, block i from ``random.Random(0xC0FFEE + i)``.

    Deterministic and prefix-stable (``/bytes/10`` is the start of ``/bytes/1000``), and not periodic.
    """
    index = 0
    while n > 0:
        block = _block(index)
        yield block if n >= BLOCK else block[:n]
        n -= BLOCK
        index += 1


def payload(n: int) -> bytes:
    """What ``GET /bytes/n`` returns."""
    return b"".join(payload_chunks(n))


@functools.lru_cache(maxsize=64)
def payload_sha256(n: int) -> str:
    digest = hashlib.sha256()
    for chunk in payload_chunks(n):
        digest.update(chunk)
    return digest.hexdigest()


class Server:
    def __init__(self, name: str) -> None:
        self.name = name

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        transport = writer.transport
        if isinstance(transport, asyncio.WriteTransport):
            transport.set_write_buffer_limits(high=1 << 20)
        try:
            await self.respond(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # a test server: say what broke and keep serving
            print(f"httpd {self.name}: error: {exc!r}", file=sys.stderr, flush=True)
        finally:
            writer.close()
            with contextlib.suppress(Exception):
                await asyncio.wait_for(writer.wait_closed(), 5)

    async def respond(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), READ_TIMEOUT)
        except asyncio.LimitOverrunError:
            await self.send(writer, 431, b"request header too large\n")
            return
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split()
        if len(parts) != 3:
            await self.send(writer, 400, b"bad request line\n")
            return
        method, target, _version = parts
        headers = {}
        for line in lines[1:]:
            key, sep, value = line.partition(":")
            if sep:
                headers[key.strip().lower()] = value.strip()
        if method == "GET" and target == "/":
            peer = writer.get_extra_info("peername")
            await self.send(writer, 200, f"{self.name} {peer[0]}:{peer[1]}\n".encode())
        elif method == "GET" and target.startswith("/bytes/"):
            text = target[len("/bytes/") :]
            if not text.isdigit() or int(text) > MAX_BYTES:
                await self.send(writer, 400, b"/bytes/N needs 0 <= N <= 2**34\n")
                return
            n = int(text)
            sha = await asyncio.get_running_loop().run_in_executor(None, payload_sha256, n)
            writer.write(self.head(200, n, "application/octet-stream", {"X-Sha256": sha}))
            for chunk in payload_chunks(n):
                writer.write(chunk)
                await writer.drain()
        elif method == "POST" and target == "/upload":
            length = headers.get("content-length", "")
            if not length.isdigit():
                await self.send(writer, 411, b"POST /upload needs Content-Length\n")
                return
            if headers.get("expect", "").lower() == "100-continue":
                writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # curl waits a second for this otherwise
            remaining = int(length)
            digest = hashlib.sha256()
            while remaining > 0:
                chunk = await asyncio.wait_for(reader.read(min(remaining, 1 << 18)), READ_TIMEOUT)
                if not chunk:
                    raise asyncio.IncompleteReadError(b"", remaining)
                digest.update(chunk)
                remaining -= len(chunk)
            await self.send(writer, 200, digest.hexdigest().encode())
        else:
            await self.send(writer, 404, f"no route for {method} {target}\n".encode())

    def head(self, status: int, length: int, ctype: str, extra: dict[str, str] | None = None) -> bytes:
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 411: "Length Required"}.get(
            status, "Error"
        )
        lines = [
            f"HTTP/1.1 {status} {reason}",
            f"Server: convey-test-httpd/{self.name}",
            f"Content-Type: {ctype}",
            f"Content-Length: {length}",
            "Connection: close",
        ]
        lines += [f"{k}: {v}" for k, v in (extra or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")

    async def send(self, writer: asyncio.StreamWriter, status: int, body: bytes) -> None:
        writer.write(self.head(status, len(body), "text/plain; charset=utf-8") + body)
        await writer.drain()


def parse_bind(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise argparse.ArgumentTypeError(f"--bind needs ADDR:PORT, got {text!r}")
    return host or "0.0.0.0", int(port)


async def serve(host: str, port: int, name: str) -> None:
    server = await asyncio.start_server(
        Server(name).handle, host, port, backlog=4096, reuse_address=True, limit=1 << 20
    )
    bound = server.sockets[0].getsockname()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    print(f"READY {bound[0]}:{bound[1]}", flush=True)
    async with server:
        await stop.wait()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m testbed.httpd", description=__doc__.splitlines()[0])
    parser.add_argument("--bind", type=parse_bind, required=True, help="ADDR:PORT to listen on (port 0: any)")
    parser.add_argument("--name", required=True, help="the name GET / answers with")
    args = parser.parse_args(argv)
    host, port = args.bind
    try:
        asyncio.run(serve(host, port, args.name))
    except OSError as exc:
        print(f"httpd {args.name}: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
