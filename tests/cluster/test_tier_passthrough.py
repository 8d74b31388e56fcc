"""Passthrough (full NAT) in a tier: a connection's NAT state lives on the one balancer that opened it. When the
router moves a connection to another balancer (ECMP rehash: here a third balancer announces), that balancer has no
flow for it and answers its next packet with a RST: the client fails at once instead of hanging. Connections the
router leaves where they are complete intact. (DSR keeps them all: tests/cluster/test_tier_dsr.py.)
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from testbed.cluster import Cluster, Downloads, balancer_addr, cluster
from testbed.process import wait_until

RESET = 56  # curl: failure receiving network data (here: connection reset by peer)
MAX_TIME = 60.0


@pytest.fixture(scope="module")
def tier() -> Iterator[Cluster]:
    with cluster(balancers=3, servers=2, mode="passthrough") as built:
        yield built


def test_moved_connections_fail_fast_with_a_reset(tier: Cluster) -> None:
    tier.start_balancer(0)
    tier.start_balancer(1)
    assert tier.next_hops() == [balancer_addr(0), balancer_addr(1)]
    downloads = Downloads(tier, 20, 4_000_000, rate="500k", max_time=MAX_TIME)  # 8 s each, undisturbed

    def carrying(i: int) -> bool:
        return int(tier.convey[i].stats()["current_connections"]) > 0

    wait_until(lambda: carrying(0) and carrying(1), 10.0, "downloads through both balancers")
    tier.start_balancer(2)  # returns once the router's route goes through lb2 too
    rehashed = time.monotonic()
    results = downloads.wait()
    moved = [r for r in results if r.returncode != 0]
    kept = [r for r in results if r.returncode == 0]
    assert moved, "no connection was moved by the rehash (20 flows: this is very unlikely)"
    for r in moved:
        assert r.returncode == RESET and "reset" in r.error.lower(), r
        assert r.ended - rehashed < 5.0, f"a moved connection took {r.ended - rehashed:.1f}s to fail"
    assert all(r.intact for r in kept), kept
    slowest = max(r.ended - rehashed for r in moved)
    print(
        f"moved by the rehash: {len(moved)} of {len(results)}, all reset within {slowest:.2f}s; kept intact: {len(kept)}"
    )
    resets = sum(int(tier.convey[i].stats()["packet"]["verdicts"]["unknown_flow"]) for i in range(3))
    assert resets >= len(moved)
