"""What only passthrough with flow offload has: the real ``convey --passthrough`` with ``[passthrough] offload =
true`` on a routed test bed. Only a connection's first packet reaches convey; conntrack NAT carries the rest,
and the counters come from conntrack events. Root only.

Everything test_passthrough.py checks runs there with offload too (its ``offload`` fixture); here: how many
packets reach convey per connection, /stats bytes against what the client received, a convey restart under a
running download (the connection is adopted from a conntrack dump), ``source_addrs`` carried by the mark, and
2 x 30,000 connections to one server through one source address (the kernel picks the port; conntrack's
TIME_WAIT keeps it from the server's).
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.httpd import payload_sha256
from testbed.process import wait_until
from tests.netns.test_passthrough import (
    VIP_PORT,
    assert_clean,
    client,
    counters,
    make_config,
    queued_packets,
    served_by,
    settled,
    start_servers,
    stop_clean,
)

LOADGEN_PORT = 9000
LOADGEN_VIP_PORT = 82


@pytest.fixture
def bed() -> Iterator[Testbed]:
    made = Testbed.create(kind="routed", servers=1)
    try:
        yield made
    finally:
        made.destroy()


def offload_config(bed: Testbed, **passthrough: Any) -> str:
    return make_config(bed, offload=True, **passthrough)


def first_packets(doc: dict[str, Any]) -> int:
    """Packets convey gave a verdict (its own counters)."""
    verdicts = counters(doc)
    return int(verdicts["ingress_accepted"] + verdicts["ingress_dropped"])


@pytest.mark.parametrize("verdicts", ["inline", "thread"])
def test_a_20mb_download_sends_at_most_3_packets_to_convey_and_stats_bytes_match(
    bed: Testbed, verdicts: str
) -> None:
    start_servers(bed)
    # "thread": the verdicts from a thread of their own (convey/dataplane/verdict_sender.py; off by default)
    env = {"CONVEY_OFFLOAD_VERDICTS": verdicts}
    convey = ConveyProcess(bed, offload_config(bed), extra_env=env).start()
    served_by(client(bed, "get", n=1)[0])  # warm: ARP, the health checks, the monitor
    before = convey.wait_stats(settled, 10, "the warm-up connection closed")
    queued_before = queued_packets(bed.lb)["convey frontend web"]
    size = 20_000_000
    down = client(bed, "get", n=1, path=f"/bytes/{size}", timeout=60)[0]
    assert down["error"] is None and down["sha256"] == payload_sha256(size), down
    received = down["received"]
    doc = convey.wait_stats(
        lambda d: settled(d) and d["bytes_rx"] - before["bytes_rx"] >= 0.99 * received,
        10,
        "the download's bytes from conntrack",
    )
    per_connection = first_packets(doc) - first_packets(before)
    assert 1 <= per_connection <= 3, f"{per_connection} packets of one connection reached convey"
    assert queued_packets(bed.lb)["convey frontend web"] - queued_before == per_connection
    rx = doc["bytes_rx"] - before["bytes_rx"]
    tx = doc["bytes_tx"] - before["bytes_tx"]
    assert abs(rx - received) <= 0.01 * received, (rx, received)
    # Payload = IP bytes - packets x the header size of the SYN (timestamps: 52). The client's ACKs during the
    # download carry SACK blocks when a segment is reordered or lost (12-36 option bytes each, counted as
    # payload): measured +12 bytes on one run. Bound that noise by 0.1% of the download.
    assert abs(tx - down["sent"]) <= max(0.01 * down["sent"], 0.001 * received), (tx, down["sent"])
    assert doc["total_connections"] == 2 and doc["offload"]["monitor"]["resyncs"] == 1  # the start's dump
    assert doc["offload"]["lost"] == 0 and doc["offload"]["unknown_mark"] == 0
    sender = doc["offload"].get("verdicts")
    if verdicts == "thread":
        assert (
            sender is not None and sender["verdicts_sent"] == first_packets(doc) and not sender["send_errors"]
        )
    else:
        assert sender is None
    assert_clean(doc)
    stop_clean(convey)


def test_a_restart_keeps_a_running_download_and_adopts_it(bed: Testbed) -> None:
    """SIGKILL convey in the middle of a download, start it again: the download never notices (conntrack
    carries it), and the new convey counts the connection from its first dump and sees it close."""
    start_servers(bed)
    convey = ConveyProcess(bed, offload_config(bed)).start()
    size = 30_000_000
    sock = bed.client.connect(bed.vip, VIP_PORT)
    try:
        sock.settimeout(20)
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        data = sock.recv(1 << 16)
        convey.wait_stats(lambda d: d["current_connections"] == 1, 5, "the download counted open")
        assert convey.proc is not None
        os.killpg(convey.proc.pid, signal.SIGKILL)  # no goodbye: the rules stay
        convey.kill()  # reaps it
        again = ConveyProcess(bed, offload_config(bed), name="again").start()
        doc = again.wait_stats(lambda d: d["current_connections"] == 1, 5, "the download adopted")
        assert doc["offload"]["monitor"]["last_resync"]["entries"] >= 1
        deadline = time.monotonic() + 30
        while chunk := sock.recv(1 << 18):
            data += chunk
            assert time.monotonic() < deadline, "the download stalled"
    finally:
        sock.close()
    head, _, body = data.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200") and len(body) == size
    assert f"x-sha256: {payload_sha256(size)}".encode() in head.lower()
    doc = again.wait_stats(settled, 10, "the adopted connection closed")
    assert doc["total_connections"] == 1 and doc["offload"]["closed"] == 1
    # and new connections go through the restarted convey
    assert served_by(client(bed, "get", n=1)[0])[0] == "server0"
    stop_clean(again)


def test_source_addrs_spread_connections_and_servers_see_them(bed: Testbed) -> None:
    """With ``source_addrs`` each connection's mark also names its source address (the client tuple's hash
    picks it), and the nat table SNATs to it."""
    start_servers(bed)
    extra = "198.18.1.101"
    with bed.lb.iproute() as ipr:
        ipr.addr("add", index=ipr.link_lookup(ifname="s0")[0], address=extra, prefixlen=24)
    sources = [bed.lb_addr_towards(0), extra]
    convey = ConveyProcess(bed, offload_config(bed, source_addrs=sources)).start()
    seen = [served_by(r) for r in client(bed, "get", n=20)]
    assert {name for name, _, _ in seen} == {"server0"}
    assert {addr for _, addr, _ in seen} == set(sources)
    doc = convey.wait_stats(
        lambda d: settled(d) and d["total_connections"] == 20, 10, "20 connections counted"
    )
    assert doc["offload"]["unknown_mark"] == 0
    assert_clean(doc)
    stop_clean(convey)


def _loadgen(bed: Testbed) -> str:
    from bench.lib.l4 import compile_loadgen

    binary = compile_loadgen(bed.logdir)
    if binary is None:
        pytest.skip("no C compiler for bench/loadgen.c")
    return binary


def test_twice_30000_connections_to_one_server_through_one_source_address(bed: Testbed) -> None:
    """The kernel's SNAT picks the port. 30,000 short connections (the server closes first, so it holds each
    (balancer addr, port) tuple in TIME_WAIT for 60 s), then 30,000 more at once, through one source address and
    a 27,233-port range: none may fail. conntrack keeps a closed entry 120 s, so nf_nat does not hand a port to
    a new connection towards the server while the server may still hold it (docs/modes.md)."""
    loadgen = _loadgen(bed)
    server = bed.servers[0]
    server.popen([loadgen, "server", str(LOADGEN_PORT), server.addr])
    wait_until(
        lambda: bool(server.run(["ss", "-Hltn", f"sport = :{LOADGEN_PORT}"]).stdout.strip()),
        10,
        "the loadgen server",
    )
    text = (
        offload_config(bed)
        .replace(':8080"', f':{LOADGEN_PORT}"')
        .replace(f':{VIP_PORT}"', f':{LOADGEN_VIP_PORT}"')
    )
    convey = ConveyProcess(bed, text).start()
    started = time.monotonic()
    for batch in (1, 2):
        out = bed.client.run(
            [loadgen, "client", str(LOADGEN_VIP_PORT), "120", "32", "0", bed.vip, "30000"], timeout=150
        ).stdout
        result = json.loads(out.strip().splitlines()[-1])
        assert result["errors"] == 0 and result["ok"] == 30000, f"batch {batch}: {result}"
    took = time.monotonic() - started
    assert took < 240, f"2 x 30,000 connections took {took:.0f}s"
    # every close reported; the counts come from conntrack events
    doc = convey.wait_stats(
        lambda d: (
            d["current_connections"] == 0
            and (d["total_connections"] >= 60_000 or d["offload"]["monitor"]["overflows"] > 0)
        ),
        30,
        "every connection counted and closed",
    )
    monitor = doc["offload"]["monitor"]
    if monitor["overflows"] == 0:
        # a connection whose first SYN met a server TIME_WAIT from another port (PAWS) has two entries: ~1%
        assert 60_000 <= doc["total_connections"] <= 61_200, doc["total_connections"]
    else:  # the event socket overflowed: convey resynchronised from a dump and says so (/stats, log)
        assert monitor["resyncs"] == monitor["overflows"] + 1
        assert "event=conntrack_resync reason=overflow" in convey.log()
    doc = convey.wait_stats(lambda d: d["current_connections"] == 0, 30, "current connections back to 0")
    assert counters(doc)["ingress_accepted"] >= 60_000 and doc["refused"] == 0
    assert_clean(doc)
    stop_clean(convey)


def test_a_first_packet_dropped_after_its_verdict_is_closed_by_the_check(bed: Testbed) -> None:
    """Convey counts a connection open when it accepts its first packet. If the kernel then drops that packet (here
    a filter rule after the nat table), conntrack never makes an entry and never reports a close: convey's check
    of connections it decided more than 10 s ago and never heard of finds no entry and closes it."""
    start_servers(bed)
    server = bed.servers[0].addr
    drop = ["FORWARD", "-p", "tcp", "--syn", "-d", f"{server}/32", "-j", "DROP"]
    convey = ConveyProcess(bed, offload_config(bed)).start()
    bed.lb.run(["iptables", "-I", *drop])
    try:
        proc = bed.client.run(
            ["curl", "-sS", "--max-time", "2", "-o", "/dev/null", f"http://{bed.vip}:{VIP_PORT}/"],
            check=False,
        )
        assert proc.returncode != 0  # never connected
        doc = convey.stats()
        assert doc["current_connections"] == 1 and doc["total_connections"] == 1  # counted at the decision
    finally:
        bed.lb.run(["iptables", "-D", *drop])
    doc = convey.wait_stats(lambda d: d["current_connections"] == 0, 30, "the check to close it")
    monitor = doc["offload"]["monitor"]
    assert monitor["checks"] >= 1 and monitor["unconfirmed"] == 1 and doc["offload"]["lost"] == 1
    assert "event=offload_unconfirmed" in convey.log()  # the operator hears of it
    assert all(r["error"] is None for r in client(bed, "get", n=5))  # the path works again
    doc = convey.wait_stats(lambda d: settled(d) and d["total_connections"] == 6, 10, "5 more, closed")
    assert doc["offload"]["monitor"]["unconfirmed"] == 1
    stop_clean(convey)
