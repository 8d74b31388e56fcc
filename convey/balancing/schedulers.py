"""Pure scheduling algorithms: smooth weighted round robin, weighted least connections, Maglev, flow hashing.

Schedulers are built from ``(server id, weight)`` pairs; entries of weight 0 are ignored, negative weights and
duplicate ids raise ValueError. A pool builds a new scheduler when its servers or weights change.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Protocol

from convey.balancing.maglev import DEFAULT_TABLE_SIZE, Maglev, ServerId, eligible_servers

__all__ = [
    "SCHEDULERS",
    "LeastConnections",
    "Scheduler",
    "ServerId",
    "SmoothWeightedRoundRobin",
    "flow_hash",
    "make_scheduler",
]

SCHEDULERS: tuple[str, ...] = ("wrr", "least_conn", "maglev")

_MASK64 = 0xFFFFFFFFFFFFFFFF


class Scheduler(Protocol):
    def pick(self, flow_hash: int = 0) -> ServerId | None:
        """The server for a new flow, or None when there is no eligible server."""
        ...


class SmoothWeightedRoundRobin:
    """nginx smooth weighted round robin: deterministic, and evenly interleaved.

    Each pick adds every server's weight to its current value, picks the largest (the first one on ties)
    and subtracts the total weight from it. Over every ``sum(weights)`` picks each server is picked exactly
    ``weight`` times; weights 5, 1, 1 give ``a a b a c a a``.
    """

    def __init__(self, servers: Sequence[tuple[ServerId, int]]) -> None:
        eligible = eligible_servers(servers)
        self._ids = [server for server, _ in eligible]
        self._weights = [weight for _, weight in eligible]
        self._current = [0] * len(eligible)
        self._total = sum(self._weights)
        self.last = 0  # picks made so far: the last pick's turn (GET /flows says "why this server")

    def pick(self, flow_hash: int = 0) -> ServerId | None:
        """The next server in the sequence; ``flow_hash`` is ignored."""
        if not self._ids:
            return None
        current = self._current
        weights = self._weights
        best = 0
        best_value = current[0] = current[0] + weights[0]
        for i in range(1, len(weights)):
            value = current[i] = current[i] + weights[i]
            if value > best_value:
                best, best_value = i, value
        current[best] -= self._total
        self.last += 1
        return self._ids[best]

    def weight_of(self, server: ServerId) -> tuple[int, int]:
        """(the server's weight, the total weight): 0 for a server not in the sequence."""
        try:
            return self._weights[self._ids.index(server)], self._total
        except ValueError:
            return 0, self._total


class LeastConnections:
    """Weighted least connections: the server minimising ``(active + 1) / weight``.

    ``active`` gives a server's current connection count. Scores are compared exactly (cross-multiplied
    integers). Ties go to the first tied server at or after a cursor that moves past each pick, so equal
    servers take turns.
    """

    def __init__(self, servers: Sequence[tuple[ServerId, int]], active: Callable[[ServerId], int]) -> None:
        eligible = eligible_servers(servers)
        self._ids = [server for server, _ in eligible]
        self._weights = [weight for _, weight in eligible]
        self._active = active
        self._cursor = 0
        self.last = 0  # the open connections of the last pick's server when it was picked (for GET /flows)

    def pick(self, flow_hash: int = 0) -> ServerId | None:
        """The least loaded server relative to its weight; ``flow_hash`` is ignored."""
        ids = self._ids
        n = len(ids)
        if n == 0:
            return None
        weights = self._weights
        active = self._active
        best = -1
        best_load = 0
        best_weight = 1
        for k in range(n):
            i = (self._cursor + k) % n
            load = active(ids[i]) + 1
            weight = weights[i]
            # load / weight < best_load / best_weight, without division
            if best < 0 or load * best_weight < best_load * weight:
                best, best_load, best_weight = i, load, weight
        self._cursor = (best + 1) % n
        self.last = best_load - 1
        return ids[best]


def make_scheduler(
    kind: str,
    servers: Sequence[tuple[ServerId, int]],
    active: Callable[[ServerId], int],
    maglev_table_size: int = DEFAULT_TABLE_SIZE,
) -> Scheduler:
    """A scheduler of the named kind (one of ``SCHEDULERS``); ValueError for unknown kinds or bad servers."""
    if kind == "wrr":
        return SmoothWeightedRoundRobin(servers)
    if kind == "least_conn":
        return LeastConnections(servers, active)
    if kind == "maglev":
        return Maglev(servers, maglev_table_size)
    raise ValueError(f"unknown scheduler {kind!r}; expected one of {', '.join(SCHEDULERS)}")


def _mix64(z: int) -> int:
    """splitmix64: add the golden gamma, then the finaliser; a bijection on 64-bit integers."""
    z = (z + 0x9E3779B97F4A7C15) & _MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & _MASK64
    return z ^ (z >> 31)


def flow_hash(src_addr: int, src_port: int, dst_addr: int, dst_port: int) -> int:
    """Deterministic, well mixed 64-bit hash of a client tuple (IPv4 addresses as 32-bit ints, 16-bit ports).

    Two splitmix64 rounds: one over both addresses, one folding in both ports, so every input bit (including
    the low bit of a port: Linux ``connect()`` picks even source ports) reaches every output bit. Bits above
    32 (or 16 for ports) are ignored. The same in every process and on every machine.
    """
    addrs = ((src_addr & 0xFFFFFFFF) << 32) | (dst_addr & 0xFFFFFFFF)
    ports = ((src_port & 0xFFFF) << 16) | (dst_port & 0xFFFF)
    return _mix64(_mix64(addrs) ^ ports)
