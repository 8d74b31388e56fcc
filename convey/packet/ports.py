"""Ephemeral port allocation for passthrough NAT: which (balancer address, port) a new flow uses towards a
server.

A mapping is unique per (source addr, server addr, server port, eport): the server tells flows apart by the
full tuple, so the same eport may serve different servers (or server ports) at once. The allocator keeps one
pool per (source addr, server addr, server port), created on first use and freed as soon as it has no port in
use and none cooling down (a pool in that state is indistinguishable from a new one), so memory follows live
use, also when a server goes away.

The choice is unpredictable (RFC 6056 section 3.3.2, "simple port randomization"): a random start in the
range (``secrets``), then the first free port from there, wrapping around. An attacker who knows a flow's
server side cannot guess the balancer's side of its tuple. A port goes back into its pool when the flow is
removed and is not handed out again until ``reuse_delay`` seconds later: the server may still hold the old
connection in TIME_WAIT, and a SYN reusing its tuple would stall or be answered with a stale ACK.

The range is inclusive at both ends, as in ``ip_local_port_range`` and iptables' ``--dport LO:HI``; reserve it
from the kernel (``ip_local_reserved_ports``) so local sockets never take these ports.

A pool is compact: one byte per port of the range (free, in use, cooling: ``bytearray.find`` looks for the next
free one in C) and the cooling ports in release order (two ``array`` columns, 10 bytes a port), so releasing and
maturing are O(1) amortised and a port costs no Python object.
"""

from __future__ import annotations

import secrets
from array import array
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

__all__ = ["PortAllocator", "PortPoolStats", "Ports", "RoutedPorts"]

_FREE, _USED, _COOLING = 0, 1, 2


class Ports(Protocol):
    """What the passthrough decision needs from an allocator."""

    @property
    def source_addrs(self) -> tuple[bytes, ...]: ...

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None: ...

    def release(
        self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float
    ) -> None: ...

    def expire(self, now: float) -> None: ...


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
    __slots__ = ("head", "ports", "queued", "state", "times", "used")

    def __init__(self, size: int) -> None:
        self.state = bytearray(size)  # per port (index = port - lo): _FREE, _USED or _COOLING
        self.times = array("d")  # release times of the cooling ports, oldest first, from ``head`` on
        self.ports = array("H")  # their indexes
        self.head = 0
        self.used = 0
        self.queued = False  # in the allocator's queue of pools that may be freed

    def mature(self, ready: float) -> None:
        """Ports released at or before ``ready`` become free."""
        times, ports, state = self.times, self.ports, self.state
        head, n = self.head, len(times)
        while head < n and times[head] <= ready:
            state[ports[head]] = _FREE
            head += 1
        if head == n:
            del times[:], ports[:]
            head = 0
        elif head > 1024 and head * 2 > n:
            del times[:head], ports[:head]
            head = 0
        self.head = head

    @property
    def cooling(self) -> int:
        return len(self.times) - self.head


def _random_start(n: int) -> int:
    return secrets.randbelow(n)


class PortAllocator:
    """Allocates (source addr, ephemeral port) pairs per server; see the module doc for the policy.

    ``start(n)`` gives where the search for a free port begins, an index in ``range(n)``: random by default
    (RFC 6056); ``lambda n: 0`` gives the lowest free port (tests).
    """

    def __init__(
        self,
        lo: int = 33768,
        hi: int = 61000,
        source_addrs: Sequence[bytes] = (),
        reuse_delay: float = 60.0,
        *,
        start: Callable[[int], int] = _random_start,
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
        self.start = start
        self.in_use = 0
        self.double_releases = 0  # releases of ports not in use: a caller bug, made harmless and counted
        self.pools_freed = 0
        self._pools: dict[tuple[bytes, bytes, int], _Pool] = {}
        self._idle: deque[tuple[float, tuple[bytes, bytes, int]]] = deque()  # pools whose last port went back

    @property
    def ports_per_pool(self) -> int:
        return self.hi - self.lo + 1

    @property
    def pools(self) -> int:
        """Port pools held now (per source address, server address and port; freed when unused)."""
        return len(self._pools)

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None:
        """A free (source addr, eport) towards ``server_addr:server_port``, or None when every pool is
        exhausted.

        Source addresses are tried in order; the next one is used only when a pool has no port left that is
        free (never used, or released at least ``reuse_delay`` ago).
        """
        pools = self._pools
        ready = now - self.reuse_delay
        size = self.hi - self.lo + 1
        for src in self.source_addrs:
            key = (src, server_addr, server_port)
            pool = pools.get(key)
            if pool is None:
                pool = pools[key] = _Pool(size)
            elif pool.head < len(pool.times):
                pool.mature(ready)
            if pool.used + pool.cooling >= size:
                continue
            state = pool.state
            first = self.start(size)
            index = state.find(_FREE, first)
            if index < 0:
                index = state.find(_FREE, 0, first)
            state[index] = _USED
            pool.used += 1
            self.in_use += 1
            return (src, self.lo + index)
        return None

    def release(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float) -> None:
        """Give a port back; it becomes reusable at ``now + reuse_delay``. Releasing a port not in use is
        ignored (and counted in ``double_releases``)."""
        key = (src_addr, server_addr, server_port)
        pool = self._pools.get(key)
        index = eport - self.lo
        if pool is None or not 0 <= index < len(pool.state) or pool.state[index] != _USED:
            self.double_releases += 1
            return
        pool.state[index] = _COOLING
        pool.times.append(now)
        pool.ports.append(index)
        pool.used -= 1
        self.in_use -= 1
        if not pool.used and not pool.queued:
            pool.queued = True
            self._idle.append((now + self.reuse_delay, key))

    def expire(self, now: float) -> None:
        """Free the pools with no port in use or cooling down. Cheap when nothing is due; the passthrough
        decision calls it from its own ``expire``."""
        idle, pools = self._idle, self._pools
        ready = now - self.reuse_delay
        while idle and idle[0][0] <= now:
            _, key = idle.popleft()
            pool = pools.get(key)
            if pool is None:
                continue
            pool.queued = False
            if pool.used:
                continue  # queued again when its last port comes back
            pool.mature(ready)
            if not pool.cooling:
                del pools[key]
                self.pools_freed += 1
            else:
                pool.queued = True
                idle.append((pool.times[-1] + self.reuse_delay, key))

    def is_used(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int) -> bool:
        pool = self._pools.get((src_addr, server_addr, server_port))
        index = eport - self.lo
        return pool is not None and 0 <= index < len(pool.state) and pool.state[index] == _USED

    def stats(self, now: float) -> list[PortPoolStats]:
        """Per-pool counts (O(ports cooling down)), in pool creation order."""
        ready = now - self.reuse_delay
        result = []
        size = self.hi - self.lo + 1
        for (src, server, port), pool in self._pools.items():
            cooling = sum(1 for t in pool.times[pool.head :] if t > ready)
            available = size - pool.used - cooling
            result.append(PortPoolStats(src, server, port, pool.used, cooling, available))
        return result


class RoutedPorts:
    """Ports with the source address chosen per server by ``source_for(server_addr)`` (the edge asks the kernel
    which address it would use for the route to that server, so replies come back on the right interface). One
    :class:`PortAllocator` per source address; the allocator interface the passthrough decision uses."""

    def __init__(
        self,
        lo: int,
        hi: int,
        reuse_delay: float,
        source_for: Callable[[bytes], bytes],
        *,
        start: Callable[[int], int] = _random_start,
    ) -> None:
        self.lo, self.hi, self.reuse_delay, self.start = lo, hi, reuse_delay, start
        self.source_for = source_for
        self._by_server: dict[bytes, PortAllocator] = {}
        self._by_source: dict[bytes, PortAllocator] = {}

    @property
    def source_addrs(self) -> tuple[bytes, ...]:
        return tuple(self._by_source)

    @property
    def in_use(self) -> int:
        return sum(a.in_use for a in self._by_source.values())

    @property
    def pools(self) -> int:
        return sum(a.pools for a in self._by_source.values())

    @property
    def pools_freed(self) -> int:
        return sum(a.pools_freed for a in self._by_source.values())

    def allocator(self, server_addr: bytes) -> PortAllocator:
        alloc = self._by_server.get(server_addr)
        if alloc is None:
            src = self.source_for(server_addr)
            alloc = self._by_source.get(src)
            if alloc is None:
                alloc = self._by_source[src] = PortAllocator(
                    self.lo, self.hi, (src,), self.reuse_delay, start=self.start
                )
            self._by_server[server_addr] = alloc
        return alloc

    def allocate(self, server_addr: bytes, server_port: int, now: float) -> tuple[bytes, int] | None:
        return self.allocator(server_addr).allocate(server_addr, server_port, now)

    def release(self, src_addr: bytes, server_addr: bytes, server_port: int, eport: int, now: float) -> None:
        alloc = self._by_source.get(src_addr)
        if alloc is not None:
            alloc.release(src_addr, server_addr, server_port, eport, now)

    def expire(self, now: float) -> None:
        for alloc in self._by_source.values():
            alloc.expire(now)
