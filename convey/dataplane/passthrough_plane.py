"""The passthrough (full NAT) data plane: ``convey.packet.passthrough.Passthrough`` bound to an NFQUEUE.

Both directions arrive on one queue: client -> VIP packets and the servers' replies to the balancer's ephemeral
ports. ``Passthrough.decide`` tells them apart, rewrites and counts; the queue callback only does the I/O: the
payload in, ``set_payload`` and ``accept`` with the rewritten bytes, or ``drop``.

What is particular to this mode's edge:

- Source addresses: without ``[passthrough] source_addrs``, the address towards each server is the one the
  kernel would pick for the route to it (learnt with pyroute2 in a worker thread, at start and on reload), and
  ports are allocated per source address (``RoutedPorts``).
- Retired servers: a server removed from the config keeps its return-path rules while it still carries flows,
  so its open connections complete; the rules go when its last flow closes.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from convey import stats as st
from convey.balancing.pool import Pool
from convey.config import Config, ServerConfig
from convey.dataplane.nfqueue import Batch
from convey.dataplane.plane import PacketPlane, inet
from convey.errors import StartupError
from convey.modes import Mode
from convey.packet.flows import FlowTable
from convey.packet.passthrough import Passthrough
from convey.packet.ports import PortAllocator, RoutedPorts

__all__ = ["PassthroughPlane"]

log = logging.getLogger("convey.packet")


def _lookup_sources(addrs: list[bytes]) -> dict[bytes, bytes]:
    """The source address the kernel picks for the route to each server. Runs in a worker thread: pyroute2's
    synchronous API drives an event loop of its own and cannot run inside ours."""
    from pyroute2 import IPRoute

    found: dict[bytes, bytes] = {}
    with IPRoute() as ipr:
        for server_addr in addrs:
            dst = socket.inet_ntoa(server_addr)
            try:
                routes = ipr.route("get", dst=dst)
            except Exception as exc:
                raise StartupError(f"no route towards server {dst}: {exc}") from None
            src = next((r.get_attr("RTA_PREFSRC") for r in routes if r.get_attr("RTA_PREFSRC")), None)
            if src is None:
                raise StartupError(f"no route with a source address towards server {dst}")
            found[server_addr] = inet(src)
    return found


class PassthroughPlane(PacketPlane[Passthrough]):
    mode = Mode.PASSTHROUGH

    def __init__(self, pools: dict[str, Pool], stats: st.Stats, **options: bool) -> None:
        super().__init__(pools, stats, **options)
        self.ports: PortAllocator | RoutedPorts | None = None
        self._routed: RoutedPorts | None = None  # the ports, when their source address follows the routes
        self._sources: dict[bytes, bytes] = {}  # server addr -> our source addr towards it

    # -- the decision and its queue ---------------------------------------------------------------------------

    def _queue_num(self, config: Config) -> int:
        return config.passthrough.queue_num

    async def _prepare(self, config: Config) -> None:
        pt = config.passthrough
        lo, hi = pt.port_range
        if pt.source_addrs:
            self.ports = PortAllocator(lo, hi, tuple(inet(a) for a in pt.source_addrs), pt.port_reuse_delay)
        else:
            await self._learn_sources(config)
            self.ports = self._routed = RoutedPorts(lo, hi, pt.port_reuse_delay, self._source_for)

    def _new_decider(self, config: Config) -> Passthrough:
        pt = config.passthrough
        assert self.ports is not None  # made by _prepare
        flows = FlowTable(pt.connection_tracker_capacity, pt.syn_timeout, pt.idle_timeout, pt.fin_linger)
        return Passthrough(
            self.vips,
            self.ports.source_addrs,
            self.ports,
            flows,
            self._choose,
            on_flow_open=self._flow_opened,
            on_flow_close=self.accounting.closed,
        )

    def _callback(self, decider: Passthrough, batch: Batch) -> Callable[[Any], None]:
        decide = decider.decide
        rst_out = decider.rst_out
        send_resets = self._send_resets
        monotonic = time.monotonic
        plane = self

        def on_packet(pkt: Any) -> None:
            left = batch.left - 1
            batch.left = left
            if left <= 0:
                batch.end()
            try:
                out = decide(pkt.get_payload(), monotonic())
                if out is None:
                    pkt.drop()
                else:
                    pkt.set_payload(out)
                    pkt.accept()
            except Exception:  # the queue's I/O failed; the decision never raises
                plane.io_errors += 1
                with contextlib.suppress(Exception):
                    pkt.drop()
            if rst_out:
                send_resets(rst_out)

        return on_packet

    # -- source addresses -------------------------------------------------------------------------------------

    async def _learn_sources(self, config: Config) -> None:
        wanted = [
            self._server_addr(s.addr)
            for b in config.backends.values()
            for s in b.servers
            if self._server_addr(s.addr) not in self._sources
        ]
        if wanted:
            self._sources.update(await asyncio.to_thread(_lookup_sources, wanted))

    def _source_for(self, server_addr: bytes) -> bytes:
        src = self._sources.get(server_addr)
        if src is None:  # not learnt (cannot happen for configured servers): any address we know of
            src = next(iter(self._sources.values()))
        return src

    async def _prepare_reload(self, config: Config) -> None:
        if self._routed is not None:
            try:
                await self._learn_sources(config)
            except StartupError as exc:
                log.error("event=route_lookup_failed error=%r", str(exc))

    def _loaded(self, config: Config) -> None:
        if self._routed is not None:  # an allocator (and so a source address) for every server now
            for pool in self.pools.values():
                for server in pool.servers.values():
                    self._routed.allocator(self._server_addr(server.addr))

    # -- rules ------------------------------------------------------------------------------------------------

    def _rules_config(self, config: Config) -> Config:
        """``config`` plus the servers removed from it that still carry flows. Their replies must keep reaching
        the queue until their last flow ends (the open connections of a removed server complete); the accounting
        calls ``_server_drained`` then, which renders the rules again."""
        backends = dict(config.backends)
        for name, backend in config.backends.items():
            pool = self.pools.get(name)
            if pool is None or not pool.retired:
                continue
            known = {s.addr for s in backend.servers}
            extra = tuple(
                ServerConfig(s.name, s.addr, 0) for s in pool.retired.values() if s.addr not in known
            )
            if extra:
                backends[name] = replace(backend, servers=backend.servers + extra)
        return replace(config, backends=backends) if backends != dict(config.backends) else config

    # -- stats ------------------------------------------------------------------------------------------------

    def _section_extras(self) -> dict[str, Any]:
        if self.ports is None:
            return {}
        return {
            "ports_in_use": self.ports.in_use,
            "port_pools": self.ports.pools,
            "port_pools_freed": self.ports.pools_freed,
            "port_range": f"{self.ports.lo}-{self.ports.hi}",
            "source_addrs": [socket.inet_ntoa(a) for a in self.ports.source_addrs],
        }
