"""Maglev consistent hashing (Eisenbud et al., NSDI 2016, section 3.4, Pseudocode 1), with weights.

Each server has a permutation of the M table slots, ``(offset + j * skip) % M``, where ``offset`` and ``skip``
come from two differently personalised blake2b hashes of the server id (the same in every process and on every
machine). Servers take turns; in its turn a server claims the next slot of its permutation that is still
empty.

Weights decide the order of turns: the turns follow nginx's smooth weighted round robin over the servers
(sorted by id), so over any stretch of ``sum(weights)`` turns a server of weight ``w`` gets exactly ``w``
turns, spread evenly. Every turn fills one slot, so a server ends up with ``M * w / sum(weights)`` slots, give
or take one. With equal weights this is the paper's plain round robin, and every server owns ``floor(M/N)`` or
``ceil(M/N)`` slots. Servers of weight 0 get no turns and no slots. The table depends only on the set of (id,
weight) pairs, not on the order they are given in, so two balancers with the same servers agree on every flow.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence

ServerId = str

DEFAULT_TABLE_SIZE = 65537

_OFFSET_PERSON = b"convey.mglv.off"
_SKIP_PERSON = b"convey.mglv.skip"


def is_prime(n: int) -> bool:
    """Trial division; table sizes are small enough for it."""
    if n < 2:
        return False
    if n < 4:
        return True
    if n % 2 == 0 or n % 3 == 0:
        return False
    i = 5
    while i * i <= n:
        if n % i == 0 or n % (i + 2) == 0:
            return False
        i += 6
    return True


def _hash64(server: ServerId, person: bytes) -> int:
    digest = hashlib.blake2b(server.encode("utf-8"), digest_size=8, person=person).digest()
    return int.from_bytes(digest, "big")


def permutation_params(server: ServerId, table_size: int) -> tuple[int, int]:
    """(offset, skip) of a server's slot permutation for a table of ``table_size`` slots."""
    offset = _hash64(server, _OFFSET_PERSON) % table_size
    skip = _hash64(server, _SKIP_PERSON) % (table_size - 1) + 1 if table_size > 1 else 1
    return offset, skip


def weighted_turns(weights: Sequence[int], count: int) -> list[int]:
    """The first ``count`` picks (as indices) of smooth weighted round robin over positive ``weights``.

    The sequence repeats every ``sum(weights) / gcd(weights)`` picks, so only one period is computed.
    """
    g = math.gcd(*weights)
    reduced = [w // g for w in weights]
    total = sum(reduced)
    period = min(total, count)
    current = [0] * len(reduced)
    order: list[int] = []
    indices = range(len(reduced))
    for _ in range(period):
        best = 0
        best_value = current[0] + reduced[0]
        current[0] = best_value
        for i in indices[1:]:
            value = current[i] + reduced[i]
            current[i] = value
            if value > best_value:
                best, best_value = i, value
        current[best] -= total
        order.append(best)
    if period == count:
        return order
    repeats, rest = divmod(count, period)
    return order * repeats + order[:rest]


def eligible_servers(servers: Sequence[tuple[ServerId, int]]) -> list[tuple[ServerId, int]]:
    """The servers of positive weight, in the given order; rejects negative weights and duplicate ids."""
    seen: set[ServerId] = set()
    for server, weight in servers:
        if weight < 0:
            raise ValueError(f"negative weight {weight} for server {server!r}")
        if server in seen:
            raise ValueError(f"duplicate server {server!r}")
        seen.add(server)
    return [(server, weight) for server, weight in servers if weight > 0]


class Maglev:
    """A Maglev lookup table over weighted servers; ``pick`` maps a flow hash to a server."""

    def __init__(self, servers: Sequence[tuple[ServerId, int]], table_size: int = DEFAULT_TABLE_SIZE) -> None:
        if not is_prime(table_size):
            raise ValueError(f"maglev table size must be prime, got {table_size}")
        eligible = sorted(eligible_servers(servers))
        if table_size < len(eligible):
            raise ValueError(f"maglev table size {table_size} is smaller than the {len(eligible)} servers")
        self._size = table_size
        self._table: tuple[ServerId, ...] = _populate(eligible, table_size)

    @property
    def size(self) -> int:
        """The number of slots M."""
        return self._size

    @property
    def table(self) -> Sequence[ServerId]:
        """The lookup table: slot -> server id (empty when no server has a positive weight)."""
        return self._table

    def pick(self, flow_hash: int = 0) -> ServerId | None:
        """The server owning slot ``flow_hash % M``, or None when there are no servers."""
        table = self._table
        if not table:
            return None
        return table[flow_hash % self._size]


def _populate(servers: Sequence[tuple[ServerId, int]], size: int) -> tuple[ServerId, ...]:
    """Fill all ``size`` slots; ``servers`` are sorted, distinct and of positive weight."""
    if not servers:
        return ()
    params = [permutation_params(server, size) for server, _ in servers]
    position = [offset for offset, _ in params]
    skip = [s for _, s in params]
    entry = [-1] * size
    for s in weighted_turns([weight for _, weight in servers], size):
        c = position[s]
        step = skip[s]
        while entry[c] >= 0:
            c += step
            if c >= size:
                c -= size
        entry[c] = s
        c += step
        if c >= size:
            c -= size
        position[s] = c
    ids = [server for server, _ in servers]
    return tuple([ids[s] for s in entry])
