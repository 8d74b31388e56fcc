"""A tier of DSR balancers behind a router with ECMP (testbed/cluster.py): BGP announcements by health, the same
server from every balancer, connections that survive a balancer's death, a drain, a withdrawal and a new balancer.

One tier for the module; each test starts from lb0 and lb1 running and announcing, lb2 stopped. Downloads are
rate limited (curl --limit-rate) so they are long enough to be in flight while a balancer changes, without
loading the machine.
"""

from __future__ import annotations

import random
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from testbed.cluster import (
    HOLD_TIME,
    VIP,
    VIP_PORT,
    Cluster,
    Downloads,
    RequestLoop,
    balancer_addr,
    choose,
    cluster,
    convey_config,
    http,
    wait_seconds,
)
from testbed.dsr import IP_SERVER_PORT, fetch_many
from testbed.process import wait_until

LB0, LB1, LB2 = (balancer_addr(i) for i in range(3))


@pytest.fixture(scope="module")
def tier() -> Iterator[Cluster]:
    with cluster(balancers=3, servers=2) as built:
        yield built


@pytest.fixture
def two(tier: Cluster) -> Cluster:
    """lb0 and lb1 running and announcing (started again when a test stopped one), lb2 stopped."""
    if 2 in tier.convey:
        tier.kill_balancer(2)
    for i in (0, 1):
        proc = tier.convey.get(i)
        if proc is None or not proc.running:
            tier.convey.pop(i, None)
            tier.start_balancer(i)
    wait_until(lambda: tier.next_hops() == [LB0, LB1], 15.0, "the router's route via lb0 and lb1")
    return tier


def opened(tier: Cluster, i: int) -> int:
    return int(tier.convey[i].stats()["frontends"]["web"]["total_connections"])


def carrying(tier: Cluster, i: int) -> bool:
    return int(tier.convey[i].stats()["current_connections"]) > 0


def rescheduled(tier: Cluster, i: int) -> int:
    """Packets of flows balancer ``i`` had not seen open, scheduled by the flow hash (taken over mid-stream)."""
    return int(tier.convey[i].stats()["packet"]["verdicts"]["rescheduled"])


def alive(pid: int) -> bool:
    return Path(f"/proc/{pid}").exists()


def failures(results: list) -> list:  # type: ignore[type-arg]
    return [r for r in results if r.returncode != 0 or not r.intact]


def test_both_announce_and_connections_spread(two: Cluster) -> None:
    tier = two
    assert tier.next_hops() == [LB0, LB1], tier.router_route()
    before = [opened(tier, i) for i in (0, 1)]
    result = fetch_many(tier.client, VIP, VIP_PORT, 200)  # type: ignore[arg-type]
    assert result["failed"] == 0, result
    spread = [opened(tier, i) - before[i] for i in (0, 1)]
    assert sum(spread) == 200 and min(spread) >= 50, spread  # binomial(200, 1/2): 50 is > 7 sigma away
    assert result["peers"] == [tier.client.addr]  # type: ignore[union-attr]  # DSR: the client's own address
    for i in (0, 1):
        bgp = tier.convey[i].stats()["bgp"]
        assert bgp["peers"]["r1"]["state"] == "Established", bgp
        assert bgp["peers"]["r1"]["announced"] == [f"{VIP}/32"], bgp
        assert bgp["router_id"] == balancer_addr(i)
        status, metrics = http(tier.balancers[i], tier.convey[i].stats_port, "GET", "/metrics")
        assert status == 200 and re.search(rb"\nconvey_bgp_\S*established\S* 1\.0\n", metrics), metrics[
            -3000:
        ]


def test_every_balancer_picks_the_same_server(two: Cluster) -> None:
    rnd = random.Random(7)
    tuples = [
        [
            f"198.18.{100 + rnd.randrange(8)}.{rnd.randrange(2, 250)}",
            rnd.randrange(1024, 65536),
            VIP,
            VIP_PORT,
        ]
        for _ in range(1000)
    ]
    picks = [choose(two, i, tuples) for i in (0, 1)]
    assert picks[0] == picks[1]
    assert {p: picks[0].count(p) > 400 for p in ("web/s0", "web/s1")} == {"web/s0": True, "web/s1": True}


def test_sigkill_during_downloads(two: Cluster) -> None:
    """20 downloads; convey on lb0 SIGKILLed: its BIRD dies with it, the router drops lb0 within the hold time,
    every download completes intact through lb1 (Maglev picks the same server there)."""
    tier = two
    downloads = Downloads(tier, 20, 3_000_000, rate="600k")
    wait_until(lambda: carrying(tier, 0) and carrying(tier, 1), 10.0, "downloads through both balancers")
    birds = tier.bird_pids(0)
    assert birds, "no BIRD process in lb0"
    tier.kill_balancer(0)
    wait_until(lambda: not any(alive(p) for p in birds), 2.0, "lb0's BIRD to die with convey")
    took = wait_seconds(lambda: tier.next_hops() == [LB1], HOLD_TIME + 2, "the router to drop lb0")
    assert took <= HOLD_TIME, f"the router kept the dead next hop {took:.1f}s"
    results = downloads.wait()
    assert not failures(results), failures(results)
    assert rescheduled(tier, 1) > 0  # lb0's flows, picked up mid-stream


def test_a_balancer_without_servers_withdraws(two: Cluster) -> None:
    tier = two
    lb0 = tier.balancers[0]
    reject = [
        "OUTPUT",
        "-p",
        "tcp",
        "--dport",
        str(IP_SERVER_PORT),
        "-j",
        "REJECT",
        "--reject-with",
        "tcp-reset",
    ]
    lb0.run(["iptables", "-I", *reject])  # lb0's health checks fail; nothing else changes
    try:
        wait_seconds(lambda: tier.next_hops() == [LB1], 10.0, "lb0 to withdraw the VIP")
        bgp = tier.convey[0].stats()["bgp"]
        assert bgp["wanted"] == [] and bgp["peers"]["r1"]["announced"] == [], bgp
        before = [opened(tier, i) for i in (0, 1)]
        result = fetch_many(tier.client, VIP, VIP_PORT, 50)  # type: ignore[arg-type]
        assert result["failed"] == 0, result
        assert [opened(tier, i) - before[i] for i in (0, 1)] == [0, 50]
    finally:
        lb0.run(["iptables", "-D", *reject], check=False)
    wait_seconds(lambda: tier.next_hops() == [LB0, LB1], 10.0, "lb0 to announce again")
    log = tier.convey[0].log()
    assert f"event=bgp_withdraw vip={VIP}/32" in log and f"event=bgp_announce vip={VIP}/32" in log


def test_a_silent_balancer_is_dropped_after_the_hold_time(two: Cluster) -> None:
    """A balancer whose host goes silent (no FIN, no Cease: here its BGP packets are dropped) is dropped when the
    router's hold timer expires: the negotiated hold time is the tier's 3 s."""
    tier = two
    lb0 = tier.balancers[0]
    drops = [
        [chain, "-p", "tcp", port, "179"] for chain in ("INPUT", "OUTPUT") for port in ("--sport", "--dport")
    ]
    for rule in drops:
        lb0.run(["iptables", "-I", *rule, "-j", "DROP"])
    try:
        silent = time.monotonic()
        took = wait_seconds(lambda: tier.next_hops() == [LB1], HOLD_TIME + 3, "the router's hold timer")
        assert HOLD_TIME - 2 <= took <= HOLD_TIME + 1, f"dropped {took:.1f}s after going silent"
        assert time.monotonic() - silent >= HOLD_TIME - 2
    finally:
        for rule in drops:
            lb0.run(["iptables", "-D", *rule, "-j", "DROP"], check=False)
    wait_seconds(lambda: tier.next_hops() == [LB0, LB1], 15.0, "lb0's session to come back")


def test_sigterm_drains_with_no_failed_connection(two: Cluster) -> None:
    tier = two
    downloads = Downloads(tier, 10, 2_000_000, rate="500k")
    loop = RequestLoop(tier, 5.0)
    wait_until(lambda: carrying(tier, 0) and carrying(tier, 1), 10.0, "downloads through both balancers")
    stopped = time.monotonic()
    log = tier.stop_balancer(0)  # withdraw, 1 s of grace, then the usual drain
    assert "event=bgp_withdraw_all" in log
    assert "event=bgp_configured announced=-" in log and "bgp_withdraw_failed" not in log  # through BIRD
    assert time.monotonic() - stopped >= 1.0  # withdraw_grace
    assert tier.next_hops() == [LB1]
    result = loop.result()
    assert result["failed"] == 0 and result["done"] > 20, result
    results = downloads.wait()
    assert not failures(results), failures(results)


def test_a_dead_peer_and_a_reload(two: Cluster) -> None:
    """A peer that never comes up changes nothing else (logged, shown); a reload that moves the VIP withdraws
    the old address and announces the new one."""
    tier = two
    dead_peer = '[bgp.peers.r2]\naddress = "198.18.5.99"\nas = 65099\n'
    config = convey_config(len(tier.servers), extra=dead_peer)
    lb2 = tier.start_balancer(2, config)  # returns once the router routes via lb2 (peer r1)
    doc = lb2.wait_stats(lambda d: d["bgp"]["peers"]["r1"]["established"], 5.0, "lb2's session with r1")
    peers = doc["bgp"]["peers"]
    assert peers["r2"]["state"] != "Established", peers
    assert peers["r2"]["announced"] == [] and peers["r2"]["established"] is False
    wait_until(lambda: "event=bgp_session peer=r2" in lb2.log(), 5.0, "r2's session state in lb2's log")
    moved = "198.18.50.2"
    lb2.write_config(config.replace(f'"{VIP}:', f'"{moved}:'))
    wait_until(lambda: tier.next_hops() == [LB0, LB1], 10.0, f"lb2 to withdraw {VIP}")
    wait_until(lambda: tier.next_hops(moved) == [LB2], 10.0, f"lb2 to announce {moved}")
    assert lb2.stats()["bgp"]["peers"]["r1"]["announced"] == [f"{moved}/32"]


def test_a_third_balancer_joins_under_load(two: Cluster) -> None:
    """ECMP rehashes some connections to lb2 when it announces; Maglev there picks their server: none breaks."""
    tier = two
    downloads = Downloads(tier, 20, 4_000_000, rate="600k")
    wait_until(lambda: carrying(tier, 0) and carrying(tier, 1), 10.0, "downloads through both balancers")
    tier.start_balancer(2)
    assert tier.next_hops() == [LB0, LB1, LB2]
    results = downloads.wait()
    assert not failures(results), failures(results)
    assert rescheduled(tier, 2) > 0  # lb2 took flows over mid-stream
    tuples = [[tier.client.addr, port, VIP, VIP_PORT] for port in range(40000, 41000)]
    picks = [choose(tier, i, tuples) for i in range(3)]
    assert picks[0] == picks[1] == picks[2]  # the newcomer agrees, whatever the start order
