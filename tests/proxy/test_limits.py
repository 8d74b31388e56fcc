"""Proxy limits over loopback (issue 10, defect 1): idle timeout, max_connections, TCP keepalive, the backend's
connect_timeout and local resource errors on connect. Each test runs on asyncio and uvloop (conftest.py)."""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import socket
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import pytest

from convey.balancing.pool import Pool
from convey.config import Address, parse_config
from convey.proxy import relay
from convey.proxy.frontend import ProxyFrontend
from convey.stats import Stats
from tests.proxy.test_relay import MB, Setup, backend, echo, eventually, expect_closed, make_config


@asynccontextmanager
async def limited(
    servers: list[tuple[str, int, int]], backend_keys: str = "", **front: Any
) -> AsyncIterator[Setup]:
    """A frontend on an ephemeral port with the given frontend fields and backend keys (TOML lines)."""
    text = make_config(servers).replace("[backends.app]\n", f"[backends.app]\n{backend_keys}\n")
    config = parse_config(text, "limits.toml")
    config_front = dataclasses.replace(config.frontends["web"], listen_addr=Address("127.0.0.1", 0), **front)
    pools = {name: Pool(b, "proxy") for name, b in config.backends.items()}
    stats = Stats(mode="proxy", started=time.time())
    fe = ProxyFrontend(config_front, pools, stats)
    await fe.start()
    setup = Setup(fe, pools, stats, fe.sockets[0].getsockname()[1])
    try:
        yield setup
        await eventually(lambda: fe.active == 0, what="all proxied connections to close")
        for name, counters in setup.scopes().items():
            assert counters.current_connections == 0, f"{name}: {counters}"
    finally:
        await fe.close(timeout=1.0)


class Silent:
    """A server that accepts and never answers; it records what it read and when its connections ended."""

    def __init__(self, read: bool = True) -> None:
        self.read = read
        self.ended: list[float] = []  # when a connection's incoming side ended
        self.received = 0
        self._never = asyncio.Event()

    async def __call__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            if self.read:
                while data := await reader.read(65536):
                    self.received += len(data)
                self.ended.append(time.monotonic())  # EOF: the client's, relayed, or the proxy closed
            await self._never.wait()  # holds the connection open, never answers
        except (ConnectionError, asyncio.CancelledError):
            self.ended.append(time.monotonic())
        finally:
            writer.close()


# -- idle_timeout -------------------------------------------------------------------------------------------------


def test_idle_timeout_closes_a_server_that_never_answers(run: Any) -> None:
    async def main() -> None:
        silent = Silent()
        async with backend(silent) as bport, limited([("a", bport, 1)], idle_timeout=0.5) as p:
            reader, writer = await p.connect()
            writer.write(b"GET / HTTP/1.0\r\n\r\n")
            sent = time.monotonic()
            await expect_closed(reader, timeout=5)
            waited = time.monotonic() - sent
            writer.close()
            assert 0.4 < waited < 3, waited
            await eventually(lambda: bool(silent.ended), what="the server side to be closed too")
            assert p.fe.idle_closed == 1
            assert p.fe.section()["idle_closed"] == 1

    run(main())


def test_idle_timeout_closes_a_half_closed_client(run: Any) -> None:
    """The client sent its request and FIN; the server reads it and never answers: both sides are closed."""

    async def main() -> None:
        silent = Silent()
        async with backend(silent) as bport, limited([("a", bport, 1)], idle_timeout=0.5) as p:
            reader, writer = await p.connect()
            writer.write(b"request")
            writer.write_eof()
            await expect_closed(reader, timeout=5)
            writer.close()
            await eventually(lambda: p.fe.active == 0, what="the server side to be closed")
            assert silent.received == len(b"request")
            assert p.fe.idle_closed == 1

    run(main())


def test_idle_timeout_frees_a_client_reset_with_data_buffered_towards_the_server(run: Any) -> None:
    """The server never reads; the client sends more than the socket buffers hold, then resets. The proxy is
    left flushing to a server that never reads: without the idle timeout that connection is held forever."""

    async def main() -> None:
        silent = Silent(read=False)
        async with backend(silent) as bport, limited([("a", bport, 1)], idle_timeout=0.5) as p:
            _reader, writer = await p.connect()
            writer.write(b"z" * (16 * MB))
            # Wait until the proxy holds bytes for the server (its buffer towards the server is not empty).
            await eventually(
                lambda: any(
                    c._up is not None and c._up.transport.get_write_buffer_size() > 0 for c in p.fe._conns
                ),
                what="bytes buffered towards the server",
            )
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, relay._LINGER_RST)
            writer.transport.abort()
            await eventually(lambda: p.fe.active == 0, timeout=5, what="the connection to be freed")
            assert p.fe.idle_closed == 1

    run(main())


def test_idle_timeout_spares_a_slow_but_live_connection(run: Any) -> None:
    """A byte every 0.1 s for 1.5 s through a 0.5 s idle timeout: the connection lives."""

    async def main() -> None:
        async with backend(echo) as bport, limited([("a", bport, 1)], idle_timeout=0.5) as p:
            reader, writer = await p.connect()
            started = time.monotonic()
            while time.monotonic() - started < 1.5:
                writer.write(b"x")
                assert await asyncio.wait_for(reader.readexactly(1), 2) == b"x"
                await asyncio.sleep(0.1)  # the pacing of a slow client, not synchronisation
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 2) == b""
            writer.close()
            assert p.fe.idle_closed == 0

    run(main())


# -- max_connections ----------------------------------------------------------------------------------------------


def test_max_connections_refuses_new_clients_and_counts_them(run: Any) -> None:
    async def main() -> None:
        async with backend(echo) as bport, limited([("a", bport, 1)], max_connections=2) as p:
            open_ = []
            for i in range(2):
                reader, writer = await p.connect()
                writer.write(b"%d" % i)
                assert await asyncio.wait_for(reader.readexactly(1), 5) == b"%d" % i
                open_.append((reader, writer))
            started = time.monotonic()
            try:
                reader, writer = await p.connect()
            except ConnectionResetError:
                pass  # the RST came before the client's loop saw its connect complete
            else:
                await expect_closed(reader)
                writer.close()
            assert time.monotonic() - started < 1
            await eventually(lambda: p.stats.total.refused == 1, what="refused counted")
            for name in ("total", "frontend web", "backend app"):
                assert p.scopes()[name].refused == 1, name
            assert p.fe.refused_max_connections == 1
            assert p.server("a").total_connections == 2
            # One leaves: a new client is served again.
            open_[0][1].close()
            await eventually(lambda: p.fe.active == 1, what="one connection to end")
            reader, writer = await p.connect()
            writer.write(b"again")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"again"
            writer.close()
            open_[1][1].close()

    run(main())


# -- tcp_keepalive -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("keepalive", [True, False])
def test_tcp_keepalive_on_both_sockets(run: Any, keepalive: bool) -> None:
    async def main() -> None:
        async with backend(echo) as bport, limited([("a", bport, 1)], tcp_keepalive=keepalive) as p:
            reader, writer = await p.connect()
            writer.write(b"x")
            assert await reader.readexactly(1) == b"x"
            (conn,) = p.fe._conns
            assert conn._up is not None
            for transport in (conn.transport, conn._up.transport):
                sock = transport.get_extra_info("socket")
                assert sock.getsockopt(socket.SOL_SOCKET, socket.SO_KEEPALIVE) == int(keepalive)
                if keepalive:
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPIDLE) == 60
                    assert sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_KEEPCNT) == 6
            writer.close()

    run(main())


# -- connect_timeout ----------------------------------------------------------------------------------------------


def test_connect_timeout_is_the_backends(run: Any) -> None:
    """``connect_timeout`` in [backends.app] bounds an attempt on a server that never answers the SYN."""

    async def main() -> None:
        stuck = socket.socket()
        stuck.bind(("127.0.0.1", 0))
        stuck.listen(0)
        fillers = []
        try:
            for _ in range(4):  # fill its accept queue: later SYNs are dropped
                f = socket.socket()
                f.setblocking(False)
                f.connect_ex(stuck.getsockname())
                fillers.append(f)
            await asyncio.sleep(0.05)
            async with (
                backend(echo) as live,
                limited(
                    [("stuck", stuck.getsockname()[1], 1), ("live", live, 1)], "connect_timeout = 0.3"
                ) as p,
            ):
                assert p.fe.connect_timeout is None
                started = time.monotonic()
                reader, writer = await p.connect()
                writer.write(b"hi")
                writer.write_eof()
                assert await asyncio.wait_for(reader.read(-1), 5) == b"hi"
                writer.close()
                assert 0.25 < time.monotonic() - started < 2.5  # not the 3 s default
                assert p.server("stuck").failed == 1
        finally:
            for f in fillers:
                f.close()
            stuck.close()

    run(main())


# -- local resource errors on connect -----------------------------------------------------------------------------


def test_local_error_on_connect_is_not_the_servers_failure() -> None:
    """EMFILE when connecting to the server: the server is not blamed, accepting pauses, the attempt is repeated
    and the client is served once descriptors are back (asyncio only: uvloop's loop methods cannot be patched)."""

    async def main() -> None:
        async with backend(echo) as bport, limited([("a", bport, 1)], "connect_timeout = 5") as p:
            loop = asyncio.get_running_loop()
            real = loop.create_connection
            failures = {"left": 3}

            async def out_of_descriptors(*args: Any, **kwargs: Any) -> Any:
                if args[2] == bport and failures["left"] > 0:  # the proxy towards the server, not the client
                    failures["left"] -= 1
                    raise OSError(errno.EMFILE, "Too many open files")
                return await real(*args, **kwargs)

            loop.create_connection = out_of_descriptors  # type: ignore[method-assign]
            reader, writer = await p.connect()
            writer.write(b"hello")
            writer.write_eof()
            assert await asyncio.wait_for(reader.read(-1), 5) == b"hello"
            writer.close()
            assert p.fe.local_errors == 3
            assert p.fe.accept_pauses >= 1
            assert p.server("a").failed == 0 and p.stats.total.failed == 0
            assert p.pools["app"].servers["a"].healthy

            # Descriptors never come back within connect_timeout: the client is reset and counted as refused.
            failures["left"] = 10**6
            p.pools["app"].config = dataclasses.replace(p.pools["app"].config, connect_timeout=0.3)
            started = time.monotonic()
            reader, writer = await p.connect()
            await expect_closed(reader, timeout=5)
            writer.close()
            assert time.monotonic() - started < 3
            await eventually(lambda: p.stats.total.refused == 1, what="refused counted")
            assert p.server("a").failed == 0 and p.stats.total.failed == 0
            loop.create_connection = real  # type: ignore[method-assign]

    asyncio.run(asyncio.wait_for(main(), 20))
