"""Ephemeral port allocation for passthrough NAT: which (balancer address, port) a new flow uses towards a
server.

A mapping is unique per (source addr, server addr, server port, eport): the server tells flows apart by the
full tuple, so the same eport may serve different servers (or server ports) at once. The allocator keeps one
pool per (source addr, server addr, server port), created on first use; a pool hands out ports never used
before first (in increasing order), then the least recently freed one. A port goes back into its pool when the
flow is removed and is not handed out again until ``reuse_delay`` seconds later: the server may still hold the
old connection in TIME_WAIT, and a SYN reusing its tuple would stall or be answered with a stale ACK.

The range is inclusive at both ends, as in ``ip_local_port_range`` and iptables' ``--dport LO:HI``; reserve it
from the kernel (``ip_local_reserved_ports``) so local sockets never take these ports.

Every call is O(1) amortised (``stats`` excepted): a pool is a counter of never-used ports, a FIFO of freed
ports in release order (so its head is the least recently freed and, if not yet reusable, none behind it is)
and the set of ports in use (which makes a double release harmless).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["PortAllocator", "PortPoolStats", "Ports", "RoutedPorts"]


class Ports(Protocol):
    """What the passthrough decision needs from an allocator."""

    @property
    def source_addrs(self) -> tuple[bytes, ...]: ...

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None: ...

    def release(
        self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float
    ) -> None: ...


@dataclass(frozen=True, slots=True)
class PortPoolStats:
    """One pool's state, for the stats page."""

    source_addr: bytes
    server_addr: bytes
    server_port: int
    in_use: int
    cooling: int  # released less than reuse_delay ago
    available: int  # could be handed out now


class _Pool:
    __slots__ = ("freed", "fresh", "used")

    def __init__(self, lo: int) -> None:
        self.fresh = lo  # the next never-used port
        self.freed: deque[tuple[float, int]] = deque()  # (release time, port), oldest release first
        self.used: set[int] = set()


class PortAllocator:
    """Allocates (source addr, ephemeral port) pairs per server; see the module doc for the policy."""

    def __init__(
        self,
        lo: int = 33768,
        hi: int = 61000,
        source_addrs: Sequence[bytes] = (),
        reuse_delay: float = 60.0,
    ) -> None:
        if not 1 <= lo <= hi <= 65535:
            raise ValueError(f"port range must satisfy 1 <= lo <= hi <= 65535, got {lo}-{hi}")
        addrs = tuple(bytes(a) for a in source_addrs)
        if not addrs:
            raise ValueError("at least one source address is needed")
        if any(len(a) != 4 for a in addrs):
            raise ValueError("source addresses must be 4-byte IPv4 addresses")
        if len(set(addrs)) != len(addrs):
            raise ValueError("a source address is listed twice")
        self.lo = lo
        self.hi = hi
        self.source_addrs = addrs
        self.reuse_delay = max(0.0, reuse_delay)
        self.in_use = 0
        self.double_releases = 0  # releases of ports not in use: a caller bug, made harmless and counted
        self._pools: dict[tuple[bytes, bytes, int], _Pool] = {}

    @property
    def ports_per_pool(self) -> int:
        return self.hi - self.lo + 1

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None:
        """A free (source addr, eport) towards ``server_addr:server_port``, or None when every pool is
        exhausted.

        Source addresses are tried in order; the next one is used only when a pool has no port left that was
        released at least ``reuse_delay`` ago.
        """
        pools = self._pools
        ready = now - self.reuse_delay
        for src in self.source_addrs:
            key = (src, server_addr, server_port)
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = _Pool(self.lo)
            if pool.fresh <= self.hi:
                port = pool.fresh
                pool.fresh = port + 1
            elif pool.freed and pool.freed[0][0] <= ready:
                port = pool.freed.popleft()[1]
            else:
                continue
            pool.used.add(port)
            self.in_use += 1
            return (src, port)
        return None

    def release(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float) -> None:
        """Give a port back; it becomes reusable at ``now + reuse_delay``. Releasing a port not in use is
        ignored (and counted in ``double_releases``)."""
        pool = self._pools.get((src_addr, server_addr, server_port))
        if pool is None or eport not in pool.used:
            self.double_releases += 1
            return
        pool.used.remove(eport)
        pool.freed.append((now, eport))
        self.in_use -= 1

    def is_used(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int) -> bool:
        pool = self._pools.get((src_addr, server_addr, server_port))
        return pool is not None and eport in pool.used

    def stats(self, now: float) -> list[PortPoolStats]:
        """Per-pool counts (O(ports cooling down)), in pool creation order."""
        ready = now - self.reuse_delay
        result = []
        for (src, server, port), pool in self._pools.items():
            cooling = 0
            for released, _ in reversed(pool.freed):
                if released <= ready:
                    break
                cooling += 1
            never_used = self.hi - pool.fresh + 1
            available = never_used + len(pool.freed) - cooling
            result.append(PortPoolStats(src, server, port, len(pool.used), cooling, available))
        return result


class RoutedPorts:
    """Ports with the source address chosen per server by ``source_for(server_addr)`` (the edge asks the kernel
    which address it would use for the route to that server, so replies come back on the right interface). One
    :class:`PortAllocator` per source address; the allocator interface the passthrough decision uses."""

    def __init__(self, lo: int, hi: int, reuse_delay: float, source_for: Callable[[bytes], bytes]) -> None:
        self.lo, self.hi, self.reuse_delay = lo, hi, reuse_delay
        self.source_for = source_for
        self._by_server: dict[bytes, PortAllocator] = {}
        self._by_source: dict[bytes, PortAllocator] = {}

    @property
    def source_addrs(self) -> tuple[bytes, ...]:
        return tuple(self._by_source)

    @property
    def in_use(self) -> int:
        return sum(a.in_use for a in self._by_source.values())

    def allocator(self, server_addr: bytes) -> PortAllocator:
        alloc = self._by_server.get(server_addr)
        if alloc is None:
            src = self.source_for(server_addr)
            alloc = self._by_source.get(src)
            if alloc is None:
                alloc = self._by_source[src] = PortAllocator(self.lo, self.hi, (src,), self.reuse_delay)
            self._by_server[server_addr] = alloc
        return alloc

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None:
        return self.allocator(server_addr).allocate(server_addr, server_port, now)

    def release(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float) -> None:
        alloc = self._by_source.get(src_addr)
        if alloc is not None:
            alloc.release(src_addr, server_addr, server_port, eport, now)
