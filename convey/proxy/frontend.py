"""One proxy frontend: listens on a ``[frontends.<name>]`` address and hands each accepted client to a relay
(:mod:`convey.proxy.relay`), which connects it to a server of the frontend's backend and passes bytes both ways.

The frontend owns what outlives one connection: the listening socket and its acceptor
(:mod:`convey.proxy.accept`), the set of live connections (for a graceful close), the counters of its scopes, the
flow hash of a client (for hashing schedulers) and the frontend's limits:

* ``max_connections``: a client accepted while that many are open is reset at once (RST) and counted as
  ``refused`` (and in the proxy section's ``refused_max_connections``);
* ``idle_timeout``: a sweep every second (every quarter of the timeout when shorter) closes connections that moved
  no byte either way for that long. The relay's per-chunk cost is one attribute store (``_idle = 0``); the sweep
  counts the sweeps each connection has been quiet for. A connection is closed between ``idle_timeout`` and
  ``idle_timeout`` + one sweep period after its last byte;
* ``tcp_keepalive``: SO_KEEPALIVE on both sockets of each connection (see :mod:`convey.proxy.resources`).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import socket
from collections.abc import Mapping
from typing import Any

from convey.balancing.pool import Pool
from convey.balancing.schedulers import flow_hash
from convey.config import FrontendConfig
from convey.proxy.accept import Acceptor
from convey.proxy.relay import Client, limited
from convey.proxy.resources import LINGER_RST, is_local_error, set_keepalive
from convey.stats import Counters, Stats

log = logging.getLogger("convey.proxy.relay")

__all__ = ["ProxyFrontend"]

SWEEP_PERIOD = 1.0  # seconds between idle sweeps (shorter for an idle_timeout under 4 s)
LOCAL_RETRY = 0.1  # seconds between connect attempts while this host is out of descriptors


def _ipv4_int(host: str) -> int:
    try:
        return int.from_bytes(socket.inet_aton(host), "big")
    except OSError:
        return 0


class ProxyFrontend:
    """Listens on one frontend's address and relays each client to a server of its backend's pool."""

    def __init__(
        self,
        config: FrontendConfig,
        pools: Mapping[str, Pool],
        stats: Stats,
        connect_timeout: float | None = None,
        max_attempts: int = 3,
        reuse_port: bool = False,
    ) -> None:
        self.reuse_port = reuse_port  # worker processes: every worker listens on the address (SO_REUSEPORT)
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if connect_timeout is not None and connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        # The engine may replace ``config`` on reload; it is read for every new connection and every sweep.
        self.config = config
        self.pools = pools
        self.stats = stats
        # None: each backend's ``connect_timeout``; a number overrides it for every backend (tests).
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self._sock: socket.socket | None = None
        self._acceptor: Acceptor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._factory = functools.partial(Client, self)
        self._conns: set[Client] = set()
        self._drained: asyncio.Future[None] | None = None
        self._sweep_timer: asyncio.TimerHandle | None = None
        # Counters of this frontend's limits (the proxy section of /stats).
        self.refused_max_connections = 0
        self.idle_closed = 0
        self.local_errors = 0
        # Cached per config object: the (total, frontend, backend) counters and the listen address as an int.
        self._scopes_config: FrontendConfig | None = None
        self._scopes: tuple[Counters, ...] = ()
        self._listen_int = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._sock is not None:
            raise RuntimeError(f"frontend {self.config.name}: already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        addr = self.config.listen_addr
        # IPPROTO_TCP: accepted sockets inherit it, and asyncio sets TCP_NODELAY only on sockets that say TCP.
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
        try:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind((addr.host, addr.port))
            sock.listen(1024)
            sock.setblocking(False)
        except OSError as exc:
            sock.close()
            raise OSError(
                exc.errno, f"frontend {self.config.name}: cannot listen on {addr}: {exc.strerror or exc}"
            ) from exc
        self._sock = sock
        self._acceptor = Acceptor(loop, sock, self._on_client, self.config.name)
        self._acceptor.start()
        if self._sweep_timer is None:
            self._arm_sweep()
        log.info(
            "frontend=%s event=listening addr=%s backend=%s", self.config.name, addr, self.config.backend
        )

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets (empty when not listening); tests use them to learn an ephemeral port."""
        return (self._sock,) if self._sock is not None else ()

    @property
    def accept_pauses(self) -> int:
        return self._acceptor.pauses if self._acceptor is not None else 0

    async def stop_listening(self) -> None:
        """Stop accepting new connections; connections in flight continue."""
        sock = self._sock
        if sock is None:
            return
        self._sock = None
        if self._acceptor is not None:
            self._acceptor.stop()
        sock.close()
        await asyncio.sleep(0)
        log.info("frontend=%s event=stopped_listening active=%d", self.config.name, len(self._conns))

    async def close(self, timeout: float) -> None:
        """Stop listening, wait up to ``timeout`` seconds for connections to end, then abort the rest."""
        await self.stop_listening()
        if self._conns:
            loop = asyncio.get_running_loop()
            self._drained = loop.create_future()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(asyncio.shield(self._drained), timeout)
        if self._conns:
            log.info("frontend=%s event=aborting connections=%d", self.config.name, len(self._conns))
            for conn in list(self._conns):
                conn.abort()
            # connection_lost callbacks run on the next iterations; give them a bounded moment.
            for _ in range(100):
                if not self._conns:
                    break
                await asyncio.sleep(0.001)
        self._drained = None
        if self._sweep_timer is not None:
            self._sweep_timer.cancel()
            self._sweep_timer = None

    def section(self) -> dict[str, Any]:
        """This frontend's limits and what they did, for /stats."""
        config = self.config
        return {
            "active": len(self._conns),
            "max_connections": config.max_connections,
            "idle_timeout": config.idle_timeout,
            "refused_max_connections": self.refused_max_connections,
            "idle_closed": self.idle_closed,
            "local_errors": self.local_errors,
            "accept_pauses": self.accept_pauses,
            "accept_paused": self._acceptor is not None and self._acceptor.paused,
        }

    @property
    def active(self) -> int:
        """Connections accepted and not yet fully closed (connecting ones included)."""
        return len(self._conns)

    # -- per connection -----------------------------------------------------------------------------------------

    def _refresh(self) -> FrontendConfig:
        config = self.config
        stats = self.stats
        self._scopes = (stats.total, stats.frontend(config.name), stats.backend(config.backend))
        self._listen_int = _ipv4_int(config.listen_addr.host)
        self._scopes_config = config
        return config

    def _flow_hash(self, transport: asyncio.BaseTransport) -> int:
        peer = transport.get_extra_info("peername")
        if not peer:
            return 0
        return flow_hash(_ipv4_int(peer[0]), peer[1], self._listen_int, self.config.listen_addr.port)

    def _forget(self, conn: Client) -> None:
        self._conns.discard(conn)
        drained = self._drained
        if drained is not None and not self._conns and not drained.done():
            drained.set_result(None)

    def _on_client(self, sock: socket.socket, addr: object) -> None:
        """A client was accepted (see Acceptor): refuse it past ``max_connections``, else give it to a relay."""
        config = self.config
        limit = config.max_connections
        if limit and len(self._conns) >= limit:
            self.refused_max_connections += 1
            if config is not self._scopes_config:
                self._refresh()
            for c in self._scopes:
                c.total_connections += 1
                c.refused += 1
            with contextlib.suppress(OSError):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, LINGER_RST)
            sock.close()
            limited.log(logging.WARNING, (config.name, "max_connections"), "event=refused frontend=%s reason=max_connections client=%s", config.name, addr)  # fmt: skip
            return
        sock.setblocking(False)
        if config.tcp_keepalive:
            set_keepalive(sock)
        loop = self._loop
        assert loop is not None
        loop.create_task(self._attach(sock))

    async def _attach(self, sock: socket.socket) -> None:
        loop = self._loop
        assert loop is not None
        try:
            await loop.connect_accepted_socket(self._factory, sock)
        except Exception as exc:  # the client went away meanwhile, or the loop could not take the socket
            sock.close()
            if isinstance(exc, OSError) and is_local_error(exc) and self._acceptor is not None:
                self._acceptor.pause(exc)
            log.debug("frontend=%s event=attach_failed error=%r", self.config.name, exc)

    async def local_error(self, exc: OSError, server: str, deadline: float) -> bool:
        """Connecting to ``server`` failed for lack of a local resource: count it, pause accepting, and wait
        ``LOCAL_RETRY`` seconds. True: try again (the deadline is not reached); False: give up."""
        self.local_errors += 1
        if log.isEnabledFor(logging.DEBUG):
            log.debug(
                "frontend=%s event=connect_local_error server=%s error=%r", self.config.name, server, exc
            )
        if self._acceptor is not None:
            self._acceptor.pause(exc)
        loop = self._loop
        assert loop is not None
        if loop.time() + LOCAL_RETRY > deadline:
            return False
        await asyncio.sleep(LOCAL_RETRY)
        return True

    # -- idle connections ---------------------------------------------------------------------------------------

    def _arm_sweep(self) -> None:
        idle = self.config.idle_timeout
        period = min(SWEEP_PERIOD, idle / 4) if idle > 0 else SWEEP_PERIOD
        loop = self._loop
        assert loop is not None
        self._sweep_timer = loop.call_later(period, self._sweep, period)

    def _sweep(self, period: float) -> None:
        """Count one more quiet sweep for every relayed connection; close those quiet for ``idle_timeout``."""
        idle = self.config.idle_timeout
        if idle > 0 and self._conns:
            limit = math.ceil(idle / period - 1e-9)
            expired = []
            for conn in self._conns:
                if conn._task is not None:
                    continue  # still connecting: connect_timeout applies
                quiet = conn._idle = conn._idle + 1
                up = conn._up
                if up is not None:
                    up._idle += 1
                    quiet = min(quiet, up._idle)
                if quiet > limit:
                    expired.append(conn)
            for conn in expired:
                self.idle_closed += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("frontend=%s event=idle_timeout seconds=%g", self.config.name, idle)
                conn.abort()
        self._arm_sweep()
