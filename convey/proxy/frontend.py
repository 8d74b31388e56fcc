"""One proxy frontend: listens on a ``[frontends.<name>]`` address and hands each accepted client to a relay
(:mod:`convey.proxy.relay`), which connects it to a server of the frontend's backend and passes bytes both ways.

The frontend owns what outlives one connection: the listening socket, the set of live connections (for a
graceful close), the counters of its scopes and the flow hash of a client (for hashing schedulers).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import socket
from collections.abc import Mapping
from typing import Any, cast

from convey.balancing.pool import Pool
from convey.balancing.schedulers import flow_hash
from convey.config import FrontendConfig
from convey.proxy.relay import Client
from convey.stats import Counters, Stats

log = logging.getLogger("convey.proxy.relay")

__all__ = ["ProxyFrontend"]


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
        connect_timeout: float = 3.0,
        max_attempts: int = 3,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be at least 1, got {max_attempts}")
        if connect_timeout <= 0:
            raise ValueError(f"connect_timeout must be positive, got {connect_timeout}")
        # The engine may replace ``config`` on reload; it is read for every new connection.
        self.config = config
        self.pools = pools
        self.stats = stats
        self.connect_timeout = connect_timeout
        self.max_attempts = max_attempts
        self._server: asyncio.AbstractServer | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._conns: set[Client] = set()
        self._drained: asyncio.Future[None] | None = None
        # Cached per config object: the (total, frontend, backend) counters and the listen address as an int.
        self._scopes_config: FrontendConfig | None = None
        self._scopes: tuple[Counters, ...] = ()
        self._listen_int = 0

    # -- lifecycle ----------------------------------------------------------------------------------------------

    async def start(self) -> None:
        if self._server is not None:
            raise RuntimeError(f"frontend {self.config.name}: already started")
        loop = asyncio.get_running_loop()
        self._loop = loop
        addr = self.config.listen_addr
        try:
            self._server = await loop.create_server(
                functools.partial(Client, self), addr.host, addr.port, reuse_address=True, backlog=1024
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"frontend {self.config.name}: cannot listen on {addr}: {exc.strerror or exc}"
            ) from exc
        log.info(
            "frontend=%s event=listening addr=%s backend=%s", self.config.name, addr, self.config.backend
        )

    @property
    def sockets(self) -> tuple[Any, ...]:
        """The listening sockets (empty when not listening); tests use them to learn an ephemeral port."""
        return tuple(cast(asyncio.Server, self._server).sockets) if self._server is not None else ()

    async def stop_listening(self) -> None:
        """Stop accepting new connections; connections in flight continue."""
        server = self._server
        if server is None:
            return
        self._server = None
        server.close()
        # uvloop closes its handles on the next loop iteration: let it, so the port is free when this returns.
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
