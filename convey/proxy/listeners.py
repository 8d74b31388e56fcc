"""Proxy mode's data plane: one :class:`ProxyFrontend` per ``[frontends.<name>]``, kept in step with reloads."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator, Mapping
from typing import Any

from convey.balancing.pool import Pool
from convey.config import Config, FrontendConfig
from convey.control.flows import FlowRow, Query, Selection, select
from convey.proxy.frontend import ProxyFrontend
from convey.stats import Stats

log = logging.getLogger("convey.proxy")


class ProxyPlane:
    def __init__(
        self,
        pools: Mapping[str, Pool],
        stats: Stats,
        connect_timeout: float | None = None,
        reuse_port: bool = False,
    ) -> None:
        self.pools = pools
        self.stats = stats
        self.connect_timeout = connect_timeout  # None: each backend's connect_timeout
        self.reuse_port = reuse_port  # worker processes share each listening address
        self.frontends: dict[str, ProxyFrontend] = {}
        self._closing: list[ProxyFrontend] = []
        stats.sections["proxy"] = self.section

    async def start(self, config: Config) -> None:
        for front in config.frontends.values():
            listener = ProxyFrontend(
                front,
                self.pools,
                self.stats,
                connect_timeout=self.connect_timeout,
                reuse_port=self.reuse_port,
            )
            await listener.start()
            self.frontends[front.name] = listener  # ProxyFrontend.start logged event=listening

    async def apply(self, config: Config) -> list[str]:
        """Add, remove and re-point listeners. Connections in flight on a removed listener continue."""
        changes: list[str] = []
        for name, listener in list(self.frontends.items()):
            new = config.frontends.get(name)
            if new is None or new.listen_addr != listener.config.listen_addr:
                await listener.stop_listening()
                self._closing.append(listener)
                del self.frontends[name]
                changes.append(f"frontend {name} stopped listening on {listener.config.listen_addr}")
            elif new != listener.config:
                changes += [f"frontend {name} {change}" for change in _describe(listener.config, new)]
                listener.config = new
        for name, front in config.frontends.items():
            if name in self.frontends:
                continue
            listener = ProxyFrontend(
                front,
                self.pools,
                self.stats,
                connect_timeout=self.connect_timeout,
                reuse_port=self.reuse_port,
            )
            try:
                await listener.start()
            except OSError as exc:
                log.error(
                    "event=listen_failed frontend=%s addr=%s error=%r", name, front.listen_addr, str(exc)
                )
                continue
            self.frontends[name] = listener
            changes.append(f"frontend {name} listening on {front.listen_addr} -> backend {front.backend}")
        self._closing = [c for c in self._closing if c.active > 0]
        return changes

    async def stop(self, timeout: float) -> None:
        for listener in [*self.frontends.values(), *self._closing]:
            await listener.close(timeout)
        self.frontends.clear()
        self._closing.clear()

    def sections(self) -> dict[str, Any]:
        return {}

    def flows(self, query: Query) -> Selection:
        """The connections in flight that ``query`` asks for, for GET /flows."""
        return select(self._rows(), query)

    def _rows(self) -> Iterator[FlowRow]:
        """Every connection in flight (those of listeners closed by a reload included)."""
        for listener in [*self.frontends.values(), *self._closing]:
            now = listener._loop.time() if listener._loop is not None else 0.0
            listen = listener.config.listen_addr
            for conn in list(listener._conns):
                peer = conn.transport.get_extra_info("peername") or ("?", 0)
                server, pool = conn._server, conn._pool
                linked = server is not None and conn._up is not None
                own = conn._scopes[-1] if linked else None  # the connection's own scope (relay.Client._link)
                up_eof = conn._up is not None and conn._up._eof
                state = "connecting" if not linked else "closing" if conn._eof or up_eof else "established"
                yield FlowRow(
                    str(peer[0]),
                    int(peer[1]),
                    listen.host,
                    listen.port,
                    listener.config.name,
                    f"{pool.name}/{server.name}" if server is not None and pool is not None else "-",
                    state,
                    now - conn._born,
                    own.bytes_tx if own is not None else 0,
                    own.bytes_rx if own is not None else 0,
                    conn._why,
                )

    def section(self) -> dict[str, Any]:
        """/stats ``proxy``: per frontend, its limits and what they did (see ProxyFrontend.section)."""
        return {"frontends": {name: listener.section() for name, listener in self.frontends.items()}}


def _describe(old: FrontendConfig, new: FrontendConfig) -> list[str]:
    """What changed between two configs of one frontend (same listen address), one line per field."""
    return [
        f"{f.name} {getattr(old, f.name)} -> {getattr(new, f.name)}"
        for f in dataclasses.fields(new)
        if getattr(old, f.name) != getattr(new, f.name)
    ]
