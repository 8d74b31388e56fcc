"""ProxyFrontend against real servers and clients on 127.0.0.1 (ephemeral ports, no mocks).

Each test runs on the default asyncio loop and on uvloop (see conftest.py). Pools and stats are the real ones, built
from a parsed TOML config; the frontend's listen port is replaced by 0 so the kernel picks a free one.
"""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import random
import socket
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any

import pytest

from convey.balancing.pool import Pool
from convey.config import Address, parse_config
from convey.proxy import relay
from convey.proxy.frontend import ProxyFrontend
from convey.stats import Counters, Stats

Handler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]
MB = 1024 * 1024


# -- helpers ------------------------------------------------------------------------------------------------------


def closed_port() -> int:
    """A loopback port nobody listens on (connecting to it is refused)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
    return port


def make_config(servers: list[tuple[str, int, int]], scheduler: str = "wrr") -> str:
    lines = [
        "[frontends.web]",
        'listen_addr = "127.0.0.1:1"',  # replaced by port 0 below
        'backend = "app"',
        "[backends.app]",
        f'scheduler = "{scheduler}"',
    ]
    for name, port, weight in servers:
        lines += [f"[backends.app.servers.{name}]", f'addr = "127.0.0.1:{port}"', f"weight = {weight}"]
    return "\n".join(lines) + "\n"


@dataclasses.dataclass
class Setup:
    fe: ProxyFrontend
    pools: dict[str, Pool]
    stats: Stats
    port: int

    async def connect(self) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        return await asyncio.open_connection("127.0.0.1", self.port)

    def scopes(self) -> dict[str, Counters]:
        s = self.stats
        result = {"total": s.total}
        result.update({f"frontend {k}": v for k, v in s.frontends.items()})
        result.update({f"backend {k}": v for k, v in s.backends.items()})
        result.update({f"server {k}": v for k, v in s.servers.items()})
        return result

    def server(self, name: str) -> Counters:
        return self.stats.server("app", name)


async def eventually(cond: Callable[[], bool], timeout: float = 5.0, what: str = "condition") -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.005)


@asynccontextmanager
async def proxy(
    servers: list[tuple[str, int, int]], scheduler: str = "wrr", connect_timeout: float = 1.0
) -> AsyncIterator[Setup]:
    config = parse_config(make_config(servers, scheduler), "test.toml")
    front = dataclasses.replace(config.frontends["web"], listen_addr=Address("127.0.0.1", 0))
    pools = {name: Pool(backend, "proxy") for name, backend in config.backends.items()}
    stats = Stats(mode="proxy", started=time.time())
    fe = ProxyFrontend(front, pools, stats, connect_timeout=connect_timeout)
    await fe.start()
    port = fe.sockets[0].getsockname()[1]
    setup = Setup(fe, pools, stats, port)
    try:
        yield setup
        # Every connection of the test has ended: nothing may stay open or counted as current.
        await eventually(lambda: fe.active == 0, what="all proxied connections to close")
        for name, counters in setup.scopes().items():
            assert counters.current_connections == 0, f"{name}: {counters}"
        for server in pools["app"].all_servers():
            assert server.active == 0, server
    finally:
        await fe.close(timeout=1.0)


@asynccontextmanager
async def backend(handler: Handler) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()


async def echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(256 * 1024):
            writer.write(data)
            await writer.drain()
        writer.write_eof()
        await writer.drain()
    except ConnectionError:
        pass
    finally:
        writer.close()


async def expect_closed(reader: asyncio.StreamReader, timeout: float = 2.0) -> None:
    """The proxy closes (or resets) the connection without sending anything."""
    try:
        data = await asyncio.wait_for(reader.read(100), timeout)
    except ConnectionResetError:
        return
    assert data == b""


# -- tests --------------------------------------------------------------------------------------------------------


def test_bulk_50mb_each_way_arrives_intact(run: Any) -> None:
    size = 50 * MB
    payload = random.Random(1).randbytes(size)

    async def main() -> None:
        async with backend(echo) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()

            async def send() -> None:
                view = memoryview(payload)
                for i in range(0, size, MB):
                    writer.write(view[i : i + MB])
                    await writer.drain()
                writer.write_eof()

            sender = asyncio.create_task(send())
            digest = hashlib.sha256()
            received = 0
            while chunk := await reader.read(MB):
                digest.update(chunk)
                received += len(chunk)
            await sender
            writer.close()
            assert received == size
            assert digest.digest() == hashlib.sha256(payload).digest()
            await eventually(lambda: p.fe.active == 0, what="close")
            for name, c in p.scopes().items():
                assert (c.bytes_rx, c.bytes_tx) == (size, size), name
                assert c.total_connections == 1, name

    run(main())


def test_200_concurrent_connections_echo(run: Any) -> None:
    async def one(p: Setup, i: int) -> None:
        reader, writer = await p.connect()
        message = f"connection {i} ".encode() * (50 + i)
        writer.write(message)
        writer.write_eof()
        answer = await reader.read(-1)
        writer.close()
        assert answer == message

    async def main() -> None:
        async with backend(echo) as b1, backend(echo) as b2, proxy([("a", b1, 1), ("b", b2, 1)]) as p:
            await asyncio.wait_for(asyncio.gather(*(one(p, i) for i in range(200))), 20)
            assert p.stats.total.total_connections == 200
            assert p.server("a").total_connections == p.server("b").total_connections == 100
            assert p.stats.total.failed == p.stats.total.refused == 0

    run(main())


def test_half_close_client_still_receives_answer_after_eof(run: Any) -> None:
    answer_size = 3 * MB

    async def answer_after_eof(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        request = await reader.read(-1)  # until the client's EOF
        body = hashlib.sha256(request).digest() * (answer_size // 32)
        writer.write(body)
        await writer.drain()
        writer.close()

    async def main() -> None:
        async with backend(answer_after_eof) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            request = b"question? " * 10_000
            writer.write(request)  # sent before the proxy has connected to the server
            writer.write_eof()
            answer = await asyncio.wait_for(reader.read(-1), 10)
            writer.close()
            assert len(answer) == answer_size
            assert answer == hashlib.sha256(request).digest() * (answer_size // 32)

    run(main())


def test_half_close_server_side_client_keeps_sending(run: Any) -> None:
    """The server says its piece and shuts down its write side; the client's later bytes still reach it."""

    async def greet_then_count(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        writer.write(b"hello")
        writer.write_eof()
        data = await reader.read(-1)
        received.append(hashlib.sha256(data).hexdigest())
        writer.close()

    received: list[str] = []

    async def main() -> None:
        async with backend(greet_then_count) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"hello"  # server's EOF arrived
            body = b"x" * (2 * MB)
            writer.write(body)
            writer.write_eof()
            await writer.drain()
            await eventually(lambda: bool(received), what="the server to get the client's bytes")
            assert received == [hashlib.sha256(body).hexdigest()]
            writer.close()

    run(main())


def test_slow_reader_bounded_buffering(run: Any) -> None:
    total = 200 * MB
    chunk = random.Random(2).randbytes(MB)
    progress = {"sent": 0}

    async def source(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(2)
        try:
            for _ in range(total // MB):
                writer.write(chunk)
                await writer.drain()
                progress["sent"] += MB
            writer.write_eof()
            await writer.drain()
        finally:
            writer.close()

    def proxy_buffered(fe: ProxyFrontend) -> int:
        size = 0
        for conn in list(fe._conns):
            size += conn.transport.get_write_buffer_size()
            if conn._up is not None:
                size += conn._up.transport.get_write_buffer_size()
        return size

    async def main() -> None:
        async with backend(source) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            rss_before = rss_bytes()
            writer.write(b"go")
            # Do not read: wait until the server is held back (no progress for 0.3 s), watching the proxy's buffers.
            worst = 0
            last, stable_since = -1, time.monotonic()
            deadline = time.monotonic() + 15
            while time.monotonic() - stable_since < 0.3:
                assert time.monotonic() < deadline, "the server was never held back"
                worst = max(worst, proxy_buffered(p.fe))
                if progress["sent"] != last:
                    last, stable_since = progress["sent"], time.monotonic()
                await asyncio.sleep(0.01)
            held_at = progress["sent"]
            rss_growth = rss_bytes() - rss_before
            assert held_at < 64 * MB, f"the server sent {held_at} bytes to a client that reads nothing"
            assert worst <= 2 * relay.WRITE_HIGH_WATER + 512 * 1024, f"proxy buffered {worst} bytes"
            assert rss_growth < 64 * MB, f"RSS grew by {rss_growth} bytes"
            # Now read everything: all bytes arrive, in order.
            digest = hashlib.sha256()
            received = 0
            while data := await asyncio.wait_for(reader.read(4 * MB), 10):
                digest.update(data)
                received += len(data)
            writer.close()
            assert received == total
            expected = hashlib.sha256()
            for _ in range(total // MB):
                expected.update(chunk)
            assert digest.digest() == expected.digest()

    run(main())


def rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def test_connect_failure_falls_through_to_next_server(run: Any) -> None:
    async def main() -> None:
        dead = closed_port()
        async with backend(echo) as live, proxy([("dead", dead, 1), ("live", live, 1)]) as p:
            for i in range(4):
                reader, writer = await p.connect()
                writer.write(b"ping %d" % i)
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 5) == b"ping %d" % i
                writer.close()
            # Smooth WRR with equal weights picks dead first for every other connection.
            assert p.server("dead").failed == 2
            assert p.server("dead").total_connections == 0
            assert p.server("live").total_connections == 4
            assert p.stats.total.failed == 0  # every client was served in the end
            assert p.stats.total.total_connections == 4

    run(main())


def test_all_servers_failing_closes_client_and_counts(run: Any) -> None:
    async def main() -> None:
        async with proxy([("d1", closed_port(), 1), ("d2", closed_port(), 1)]) as p:
            reader, writer = await p.connect()
            writer.write(b"anyone?")
            await expect_closed(reader)
            writer.close()
            await eventually(lambda: p.stats.total.failed == 1, what="failed counted")
            assert p.server("d1").failed == p.server("d2").failed == 1
            assert p.stats.backend("app").failed == 1

    run(main())


def test_connect_timeout_counts_failed(run: Any) -> None:
    """A server that never answers the SYN (a full accept queue) costs connect_timeout, then the next is tried."""

    async def main() -> None:
        # A listener with backlog 0 that never accepts: once its queue is full, further SYNs are dropped.
        stuck = socket.socket()
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        try:
            for _ in range(4):
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(stuck.getsockname())
                fillers.append(f)
            await asyncio.sleep(0.05)
            async with (
                backend(echo) as live,
                proxy([("stuck", stuck.getsockname()[1], 1), ("live", live, 1)], connect_timeout=0.3) as p,
            ):
                started = time.monotonic()
                reader, writer = await p.connect()
                # Sent at once, while the proxy waits for the stuck server: more than the proxy holds before a
                # link (relay.EARLY_LIMIT), so it must stop reading, then pass everything on in order.
                early = random.Random(3).randbytes(2 * MB)
                writer.write(early)
                writer.write_eof()
                held = 0
                while time.monotonic() - started < 0.2:  # the connect attempt is still pending (0.3 s)
                    for conn in list(p.fe._conns):
                        held = max(held, sum(map(len, conn._pending or ())))
                    await asyncio.sleep(0.01)
                assert held <= relay.EARLY_LIMIT + 256 * 1024, f"held {held} bytes before the link"
                answer = await asyncio.wait_for(reader.read(-1), 5)
                writer.close()
                assert len(answer) == len(early) and answer == early
                assert 0.25 < time.monotonic() - started < 3
                assert p.server("stuck").failed == 1
        finally:
            for f in fillers:
                f.close()
            stuck.close()

    run(main())


def test_no_eligible_server_refused_promptly(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, proxy([("drained", bport, 0)]) as p:
            started = time.monotonic()
            reader, writer = await p.connect()
            await expect_closed(reader)
            writer.close()
            assert time.monotonic() - started < 1.0
            await eventually(lambda: p.stats.total.refused == 1, what="refused counted")
            for name in ("total", "frontend web", "backend app"):
                assert p.scopes()[name].refused == 1, name
                assert p.scopes()[name].total_connections == 1, name

    run(main())


def test_unhealthy_pool_refused(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, proxy([("a", bport, 1)]) as p:
            pool = p.pools["app"]
            for _ in range(pool.config.fall):
                pool.report_check("a", ok=False, error="test")
            reader, writer = await p.connect()
            await expect_closed(reader)
            writer.close()
            await eventually(lambda: p.stats.total.refused == 1, what="refused counted")

    run(main())


def test_pool_swap_applies_to_next_connection(run: Any) -> None:
    async def tagged(tag: bytes) -> Handler:
        async def handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            writer.write(tag)
            writer.close()

        return handler

    async def main() -> None:
        async with (
            backend(await tagged(b"one")) as b1,
            backend(await tagged(b"two")) as b2,
            proxy([("one", b1, 1)]) as p,
        ):
            reader, writer = await p.connect()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"one"
            writer.close()
            new = parse_config(make_config([("two", b2, 1)]), "reloaded.toml")
            p.pools["app"] = Pool(new.backends["app"], "proxy")
            reader, writer = await p.connect()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"two"
            writer.close()
            # A reload that points the frontend at another backend applies to the next connection too.
            p.pools["other"] = Pool(parse_config(make_config([("one", b1, 1)])).backends["app"], "proxy")
            p.fe.config = dataclasses.replace(p.fe.config, backend="other")
            reader, writer = await p.connect()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"one"
            writer.close()
            await eventually(lambda: p.fe.active == 0, what="close")
            assert p.stats.backend("other").total_connections == 1
            assert p.stats.server("other", "one").total_connections == 1

    run(main())


def test_maglev_uses_flow_hash(run: Any) -> None:
    async def main() -> None:
        async with (
            backend(echo) as b1,
            backend(echo) as b2,
            proxy([("a", b1, 1), ("b", b2, 1)], "maglev") as p,
        ):
            for _ in range(6):
                reader, writer = await p.connect()
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 5) == b""
                writer.close()
            assert p.server("a").total_connections + p.server("b").total_connections == 6

    run(main())


def test_tcp_nodelay_on_both_sockets(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            (conn,) = p.fe._conns
            assert conn._up is not None
            for transport in (conn.transport, conn._up.transport):
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) == 1
            writer.close()

    run(main())


def test_server_reset_closes_client(run: Any) -> None:
    async def reset_after_reply(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(4)
        writer.write(b"bye")
        await writer.drain()
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, relay._LINGER_RST)
        writer.transport.abort()

    async def main() -> None:
        async with backend(reset_after_reply) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            writer.write(b"ping")
            data = b""
            try:
                while chunk := await asyncio.wait_for(reader.read(100), 5):
                    data += chunk
            except ConnectionResetError:
                pass
            writer.close()
            assert data in (b"", b"bye")  # the reply may be lost with the reset, never garbled

    run(main())


def test_client_reset_mid_transfer(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, proxy([("a", bport, 1)]) as p:
            for _ in range(5):
                reader, writer = await p.connect()
                writer.write(b"z" * MB)
                await reader.readexactly(1000)
                sock = writer.get_extra_info("socket")
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, relay._LINGER_RST)
                writer.transport.abort()

    run(main())


def test_stop_listening_keeps_connections_and_close_aborts(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, proxy([("a", bport, 1)]) as p:
            reader, writer = await p.connect()
            writer.write(b"1")
            assert await reader.readexactly(1) == b"1"
            await p.fe.stop_listening()
            with pytest.raises(ConnectionRefusedError):
                await p.connect()
            writer.write(b"2")  # the connection in flight continues
            assert await reader.readexactly(1) == b"2"
            assert p.fe.active == 1
            started = time.monotonic()
            await p.fe.close(timeout=0.2)  # the client never closes: aborted after the timeout
            assert 0.15 < time.monotonic() - started < 2
            assert p.fe.active == 0
            await expect_closed(reader)
            writer.close()

    run(main())


def test_bind_failure_names_frontend_and_address(run: Any) -> None:
    async def main() -> None:
        with socket.socket() as taken:
            taken.bind(("127.0.0.1", 0))
            taken.listen()
            port = taken.getsockname()[1]
            config = parse_config(make_config([("a", 9, 1)]))
            front = dataclasses.replace(config.frontends["web"], listen_addr=Address("127.0.0.1", port))
            pools = {"app": Pool(config.backends["app"], "proxy")}
            fe = ProxyFrontend(front, pools, Stats("proxy", 0.0))
            with pytest.raises(OSError, match=rf"frontend web: cannot listen on 127\.0\.0\.1:{port}"):
                await fe.start()

    run(main())
