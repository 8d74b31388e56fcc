"""Ephemeral port allocation: uniqueness, unpredictable choice, reuse delay, source address pool, pools freed."""

from __future__ import annotations

from itertools import pairwise

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convey.packet.ports import PortAllocator

LB1 = b"\x0a\x00\x00\x01"
LB2 = b"\x0a\x00\x00\x02"
S1 = b"\x0a\x00\x01\x0b"
S2 = b"\x0a\x00\x01\x0c"


def lowest(n: int) -> int:
    """The search for a free port starts at the bottom of the range: the lowest free port (deterministic)."""
    return 0


def test_defaults_and_validation() -> None:
    ports = PortAllocator(source_addrs=[LB1], start=lowest)
    assert (ports.lo, ports.hi, ports.reuse_delay, ports.ports_per_pool) == (33768, 61000, 60.0, 27233)
    assert ports.allocate(S1, 80, 0.0) == (LB1, 33768)
    with pytest.raises(ValueError):
        PortAllocator(source_addrs=[])
    with pytest.raises(ValueError):
        PortAllocator(10, 5, [LB1])
    with pytest.raises(ValueError):
        PortAllocator(0, 5, [LB1])
    with pytest.raises(ValueError):
        PortAllocator(1, 5, [LB1, LB1])
    with pytest.raises(ValueError):
        PortAllocator(1, 5, [b"\x01\x02"])


def test_range_is_inclusive_and_exhausts_to_none() -> None:
    ports = PortAllocator(1000, 1003, [LB1], start=lowest)
    got = [ports.allocate(S1, 80, 0.0) for _ in range(4)]
    assert got == [(LB1, 1000), (LB1, 1001), (LB1, 1002), (LB1, 1003)]
    assert ports.allocate(S1, 80, 0.0) is None
    assert ports.in_use == 4


def test_same_eport_serves_different_servers_and_server_ports() -> None:
    ports = PortAllocator(1000, 1000, [LB1])
    assert ports.allocate(S1, 80, 0.0) == (LB1, 1000)
    assert ports.allocate(S2, 80, 0.0) == (LB1, 1000)
    assert ports.allocate(S1, 81, 0.0) == (LB1, 1000)
    assert ports.allocate(S1, 80, 0.0) is None
    assert ports.in_use == 3


def test_next_source_address_when_one_is_exhausted() -> None:
    ports = PortAllocator(1000, 1001, [LB1, LB2], start=lowest)
    got = [ports.allocate(S1, 80, 0.0) for _ in range(5)]
    assert got == [(LB1, 1000), (LB1, 1001), (LB2, 1000), (LB2, 1001), None]
    ports.release(LB1, S1, 80, 1001, 1.0)
    assert ports.allocate(S1, 80, 100.0) == (LB1, 1001)


def test_reuse_delay_is_respected() -> None:
    ports = PortAllocator(1000, 1000, [LB1], reuse_delay=60.0)
    assert ports.allocate(S1, 80, 0.0) == (LB1, 1000)
    ports.release(LB1, S1, 80, 1000, 10.0)
    assert ports.allocate(S1, 80, 10.0) is None
    assert ports.allocate(S1, 80, 69.999) is None
    assert ports.allocate(S1, 80, 70.0) == (LB1, 1000)


def test_zero_or_negative_delay_means_immediate_reuse() -> None:
    ports = PortAllocator(1000, 1000, [LB1], reuse_delay=-1.0)
    assert ports.allocate(S1, 80, 0.0) == (LB1, 1000)
    ports.release(LB1, S1, 80, 1000, 5.0)
    assert ports.allocate(S1, 80, 5.0) == (LB1, 1000)


def test_freed_ports_come_back_once_cooled_down() -> None:
    ports = PortAllocator(1000, 1004, [LB1], reuse_delay=1.0)
    for _ in range(5):
        ports.allocate(S1, 80, 0.0)
    for t, port in enumerate([1003, 1000, 1004]):
        ports.release(LB1, S1, 80, port, float(t))
    assert ports.allocate(S1, 80, 1.5) == (LB1, 1003)  # the only one released a second ago
    got = {ports.allocate(S1, 80, 100.0) for _ in range(2)}
    assert got == {(LB1, 1000), (LB1, 1004)} and ports.allocate(S1, 80, 100.0) is None


def test_a_cooled_down_port_is_as_good_as_a_never_used_one() -> None:
    ports = PortAllocator(1000, 1002, [LB1], reuse_delay=0.0, start=lowest)
    assert ports.allocate(S1, 80, 0.0) == (LB1, 1000)
    ports.release(LB1, S1, 80, 1000, 0.0)
    assert ports.allocate(S1, 80, 1.0) == (LB1, 1000)
    assert ports.allocate(S1, 80, 1.0) == (LB1, 1001)
    assert ports.allocate(S1, 80, 1.0) == (LB1, 1002)
    assert ports.allocate(S1, 80, 1.0) is None


def test_ports_are_unpredictable() -> None:
    """RFC 6056: the balancer side of a new flow's tuple cannot be guessed from the previous ones (issue 10,
    defect 2: ports were handed out in order from 33768)."""
    a, b = PortAllocator(source_addrs=[LB1]), PortAllocator(source_addrs=[LB1])
    seq_a = [a.allocate(S1, 80, 0.0)[1] for _ in range(50)]  # type: ignore[index]
    seq_b = [b.allocate(S1, 80, 0.0)[1] for _ in range(50)]  # type: ignore[index]
    assert seq_a != seq_b
    steps = {y - x for x, y in pairwise(seq_a)}
    assert len(steps) > 40, "not in order, not a fixed stride"
    assert len(set(seq_a)) == 50 and all(33768 <= p <= 61000 for p in seq_a)


def test_pools_are_freed_when_nothing_uses_them() -> None:
    """Issue 10, defect 6: a pool (per source addr, server, server port) was kept forever, ~4.75 MB once it
    had cycled through the range, also after its server went away."""
    ports = PortAllocator(source_addrs=[LB1], reuse_delay=60.0)
    taken = [ports.allocate(bytes([10, 0, 2, i]), 80, 0.0) for i in range(20)]
    assert ports.pools == 20
    for i, got in enumerate(taken):
        assert got is not None
        ports.release(LB1, bytes([10, 0, 2, i]), 80, got[1], 10.0)
    ports.expire(69.0)
    assert ports.pools == 20  # the ports still cool down: the pools keep them
    assert ports.allocate(bytes([10, 0, 2, 0]), 80, 69.0) is not None  # a pool in use again stays
    ports.expire(70.0)
    assert ports.pools == 1 and ports.pools_freed == 19
    assert ports.in_use == 1


def test_a_pool_is_small_even_after_cycling_through_the_range() -> None:
    import tracemalloc

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    ports = PortAllocator(source_addrs=[LB1], reuse_delay=60.0)
    now = 0.0
    for _ in range(ports.ports_per_pool):
        got = ports.allocate(S1, 80, now)
        assert got is not None
        ports.release(LB1, S1, 80, got[1], now)
        now += 0.001
    held = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    assert held < 400_000, held  # was ~4.75 MB: a bytearray of the range and 10 bytes per cooling port


def test_double_release_is_ignored_and_counted() -> None:
    ports = PortAllocator(1000, 1001, [LB1], reuse_delay=0.0, start=lowest)
    ports.allocate(S1, 80, 0.0)
    ports.release(LB1, S1, 80, 1000, 0.0)
    ports.release(LB1, S1, 80, 1000, 0.0)
    ports.release(LB2, S1, 80, 1000, 0.0)
    assert ports.double_releases == 2
    assert ports.in_use == 0
    assert [ports.allocate(S1, 80, 1.0) for _ in range(3)] == [(LB1, 1000), (LB1, 1001), None]


def test_stats_per_pool() -> None:
    ports = PortAllocator(1000, 1009, [LB1], reuse_delay=10.0, start=lowest)
    for _ in range(4):
        ports.allocate(S1, 80, 0.0)
    ports.release(LB1, S1, 80, 1000, 0.0)
    ports.release(LB1, S1, 80, 1001, 5.0)
    (pool,) = ports.stats(12.0)
    assert (pool.source_addr, pool.server_addr, pool.server_port) == (LB1, S1, 80)
    assert (pool.in_use, pool.cooling, pool.available) == (2, 1, 6 + 1)
    assert ports.is_used(LB1, S1, 80, 1002) and not ports.is_used(LB1, S1, 80, 1000)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["alloc", "release"]),
            st.sampled_from([(S1, 80), (S2, 80), (S1, 81)]),
            st.integers(0, 20),  # which in-use port to release
            st.floats(0.0, 3.0),  # time step
        ),
        max_size=150,
    ),
    st.sampled_from([0.0, 1.0, 5.0]),
)
def test_random_sequences_keep_the_invariants(
    ops: list[tuple[str, tuple[bytes, int], int, float]], delay: float
) -> None:
    lo, hi = 2000, 2005
    ports = PortAllocator(lo, hi, [LB1, LB2], reuse_delay=delay)
    in_use: set[tuple[bytes, bytes, int, int]] = set()
    released_at: dict[tuple[bytes, bytes, int, int], float] = {}
    ever: set[tuple[bytes, bytes, int, int]] = set()
    now = 0.0
    for op, (server, sport), pick, step in ops:
        now += step
        if op == "alloc":
            got = ports.allocate(server, sport, now)
            candidates = [
                (src, server, sport, p)
                for src in (LB1, LB2)
                for p in range(lo, hi + 1)
                if (src, server, sport, p) not in in_use
                and now - released_at.get((src, server, sport, p), float("-inf")) >= delay
            ]
            if got is None:
                assert not candidates
                continue
            src, eport = got
            tup = (src, server, sport, eport)
            assert lo <= eport <= hi
            assert tup not in in_use, "unique while in use"
            assert now - released_at.get(tup, float("-inf")) >= delay, "reuse delay"
            # the first source address with a candidate is used
            assert src == candidates[0][0]
            assert tup in candidates, "a free port, cooled down"
            in_use.add(tup)
            ever.add(tup)
        else:
            mine = sorted(t for t in in_use if (t[1], t[2]) == (server, sport))
            if not mine:
                continue
            tup = mine[pick % len(mine)]
            ports.release(*tup, now)
            in_use.remove(tup)
            released_at[tup] = now
        ports.expire(now)
        assert ports.in_use == len(in_use)
