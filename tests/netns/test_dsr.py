"""DSR end to end: the real ``convey --dsr`` in a balancer namespace, servers prepared with the setup script.

Topologies (testbed/dsr.py): ``l2`` (one bridge; both flavours) and ``routed`` with a return router
(``rewrite = "ip"`` only), where replies go server -> gw -> client and cannot enter the balancer's namespace.
Each test asserts that the reply bytes never crossed the balancer: its interfaces' receive counters grow by
the client's ACKs only, and on L2 a capture at the client shows every reply frame coming from a server's MAC.
The tests run twice: per packet, and with flow offload (``[dsr] offload = true``: convey decides the SYN and
writes the conntrack entry, the kernel steers the rest; at most 3 packets of a connection reach convey).
"""

from __future__ import annotations

import hashlib
import math
import os
import re
import signal
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.dsr import (
    VIP_PORT,
    add_return_router,
    capture,
    download,
    dsr_config,
    fetch_many,
    frame_sources,
    iface_bytes,
    prepare_servers,
    rx_total,
    start_servers,
    unprepare_servers,
)
from testbed.httpd import payload_sha256
from testbed.httpd_proc import HttpServer
from testbed.process import wait_until

BIG = 50_000_000
WEIGHTS = [1, 3]
REQUESTS = 400


@dataclass
class DsrBed:
    bed: Testbed
    rewrite: str
    web: list[HttpServer]  # the test httpd of each server


def dsr_bed(kind: str, rewrite: str) -> Iterator[DsrBed]:
    bed = Testbed.create(kind=kind, servers=2)
    try:
        if kind == "routed":
            add_return_router(bed)
        web = start_servers(bed, rewrite)
        prepare_servers(bed, rewrite)
        yield DsrBed(bed, rewrite, web)
    finally:
        try:
            unprepare_servers(bed)
        finally:
            bed.destroy()


@pytest.fixture(params=[("l2", "ip"), ("l2", "mac"), ("routed", "ip")], ids=lambda p: f"{p[0]}-{p[1]}")
def any_dsr_bed(request: pytest.FixtureRequest) -> Iterator[DsrBed]:
    kind, rewrite = request.param
    yield from dsr_bed(kind, rewrite)


@pytest.fixture(params=[False, True], ids=["per-packet", "offload"])
def offload(request: pytest.FixtureRequest) -> bool:
    return bool(request.param)


COUNTERS = re.compile(r"\[\d+:\d+\]")


def kernel_rules(bed: Testbed) -> tuple[list[str], str]:
    """The balancer's iptables rules and chains of its own (every table, "*table" then its lines, without
    counters; a table that merely exists is no rule) and its policy rules, to compare."""
    lines: list[str] = []
    table = ""
    for line in bed.lb.run(["iptables-save"]).stdout.splitlines():
        if line.startswith("*"):
            table = line
        elif line.startswith("-A") or re.match(r":\S+ - ", line):
            lines.append(table + " " + COUNTERS.sub("", line))
    return lines, bed.lb.run(["ip", "rule", "show"]).stdout


def queued(doc: dict[str, object]) -> int:
    """Packets that reached convey (its own verdict counters)."""
    verdicts = doc["packet"]["verdicts"]  # type: ignore[index]
    return int(verdicts["accepted"]) + int(verdicts["dropped"])


def assert_spread(counts: dict[str, int], weights: list[int], total: int) -> None:
    """Each server's share within 4.5 binomial sigmas of its weight's.

    DSR hashes each flow (maglev over the client's address and port), so a server's count is binomial: for
    weight 1 of 4 over 400 flows one sigma is 2.2 points. 4.5 sigmas (9.7 points) fail a correct spread about
    once in 150,000 runs (a fixed 6 points, 2.8 sigmas, failed CI once) and still fail an unweighted spread
    (25 points off)."""
    assert sum(counts.values()) == total, counts
    for i, weight in enumerate(weights):
        expected = weight / sum(weights)
        sigma = math.sqrt(expected * (1 - expected) / total)
        share = counts.get(f"server{i}", 0) / total
        assert abs(share - expected) < 4.5 * sigma, (counts, weights)


def test_dsr_spreads_by_weight_and_replies_bypass_the_balancer(any_dsr_bed: DsrBed, offload: bool) -> None:
    bed, rewrite = any_dsr_bed.bed, any_dsr_bed.rewrite
    rules_before = kernel_rules(bed)
    config = dsr_config(bed, rewrite, weights=WEIGHTS, offload=offload)
    with ConveyProcess(bed, config, mode="dsr") as lb:
        # Requests spread in weight proportion; each server saw the client's own address (no source NAT).
        before = iface_bytes(bed.lb)
        if bed.kind == "l2":
            pcap = bed.logdir / "client.pcap"
            with capture(
                bed.client, "eth0", f"tcp and src host {bed.vip} and src port {VIP_PORT}", 2000, pcap
            ):
                result = fetch_many(bed.client, bed.vip, VIP_PORT, REQUESTS)
            # every reply frame the client got from the VIP came from a server's MAC, none from the balancer's
            frames = frame_sources(pcap)
            assert len(frames) >= REQUESTS, len(frames)
            macs = {mac for mac, _, _ in frames}
            assert macs <= {s.mac for s in bed.servers}, (macs, bed.lb.mac)
            assert {(src, port) for _, src, port in frames} == {(bed.vip, VIP_PORT)}
        else:
            result = fetch_many(bed.client, bed.vip, VIP_PORT, REQUESTS)
        assert result["failed"] == 0, result
        assert_spread(result["counts"], WEIGHTS, REQUESTS)
        assert result["peers"] == [bed.client.addr]

        # 50 MB intact; the balancer received only the client's side (requests and ACKs), not the data.
        url = f"http://{bed.vip}:{VIP_PORT}/bytes/{BIG}"
        start = iface_bytes(bed.lb)
        assert download(bed.client, url, bed.logdir / "big") == payload_sha256(BIG)
        received = rx_total(start, iface_bytes(bed.lb))
        assert received < BIG // 20, f"the balancer received {received} bytes during a {BIG}-byte download"
        assert rx_total(before, iface_bytes(bed.lb)) < BIG // 10
        if bed.kind == "routed":
            # the client got the data on its link to gw
            client = iface_bytes(bed.client)
            assert client["eth1"][0] > BIG > client["eth0"][0]

        if offload:
            # a 20 MB download: at most 3 of its packets reached convey (the SYN; the kernel steered the rest)
            reached = queued(lb.stats())
            size = 20_000_000
            assert download(bed.client, f"http://{bed.vip}:{VIP_PORT}/bytes/{size}", bed.logdir / "mid") == (
                payload_sha256(size)
            )
            assert queued(lb.stats()) - reached <= 3
            # connections and bytes come from conntrack: every connection closed (one-way: the client's FIN)
            doc = lb.wait_stats(
                lambda d: d["total_connections"] >= REQUESTS + 2 and d["current_connections"] == 0,
                15,
                "conntrack to report every connection opened and closed",
            )
            assert doc["dsr"]["offload"]["entries_written"] >= REQUESTS + 2
            assert doc["dsr"]["offload"]["write_errors"] == {}
            assert doc["offload"]["unknown_mark"] == 0
        doc = lb.stats()
        verdicts = doc["packet"]["verdicts"]
        assert verdicts["dropped"] == 0 and verdicts["errors"] == 0, verdicts
        if offload:  # the SYNs (a retransmitted one at most per connection)
            assert REQUESTS + 2 <= verdicts["accepted"] <= 2 * (REQUESTS + 2), verdicts
        else:
            assert verdicts["accepted"] > REQUESTS * 3
        assert verdicts["rewrites"] == (verdicts["accepted"] if rewrite == "ip" else 0)
        assert doc["dsr"]["rewrite"] == rewrite
        per_server = doc["dsr"]["flows_per_server"]
        assert set(per_server) <= {"web_servers/s0", "web_servers/s1"}, per_server
        if rewrite == "mac":
            assert verdicts["no_mark"] == 0  # the marks the plane sets are the ones the rules route
        # bytes_tx: the requests (client -> server); bytes_rx (server -> client) stays 0: replies bypass us
        backend = doc["backends"]["web_servers"]
        for scope in (doc, doc["frontends"]["web"], backend, *backend["server_detail"].values()):
            assert scope["bytes_rx"] == 0, scope
        assert 0 < doc["bytes_tx"] < BIG // 100 and doc["bytes_tx"] == backend["bytes_tx"]
        assert "bytes_rx" in doc["dsr"]["unknown"]
        lb.stop()
    # convey installed its rules at start (--install-rules) and removed exactly those at exit
    assert kernel_rules(bed) == rules_before


@pytest.fixture
def l2_ip_bed() -> Iterator[DsrBed]:
    yield from dsr_bed("l2", "ip")


@pytest.fixture
def l2_mac_bed() -> Iterator[DsrBed]:
    yield from dsr_bed("l2", "mac")


@pytest.mark.parametrize("flavour", ["ip", "mac"])
def test_a_balancer_restarted_mid_download_keeps_the_download(
    flavour: str, offload: bool, request: pytest.FixtureRequest
) -> None:
    """SIGKILL convey while a rate-limited download runs, start it again: Maglev on the client tuple sends the
    flow's next packets to the same server, so the download completes intact. While no convey is bound, the
    kernel holds nothing back: the queue rule drops (no --queue-bypass in DSR) and TCP retransmits.

    With offload the rules are installed once (``convey rules install --dsr --offload``, as docs/dsr.md says
    for restarts) and convey runs without --install-rules: the connection's conntrack entry steers its
    packets while convey is gone, and none of them reaches the restarted convey."""
    bed: Testbed = request.getfixturevalue(f"l2_{flavour}_bed").bed
    size = 30_000_000
    config = dsr_config(bed, flavour, offload=offload)
    if offload:
        path = bed.logdir / "rules.toml"
        path.write_text(config)
        bed.lb.run(
            [sys.executable, "-m", "convey", "rules", "install", "--dsr", "--offload", f"--config={path}"]
        )
    lb = ConveyProcess(bed, config, mode="dsr", install_rules=not offload).start()
    out = bed.logdir / "restart.bin"
    curl = bed.client.popen(
        ["curl", "-sS", "--fail", "--max-time", "60", "--limit-rate", "6M", "-o", str(out),
         f"http://{bed.vip}:{VIP_PORT}/bytes/{size}"],
    )  # fmt: skip
    try:
        wait_until(
            lambda: out.exists() and out.stat().st_size > 3_000_000, 20, "the download to be under way"
        )
        assert lb.proc is not None
        os.killpg(lb.proc.pid, signal.SIGKILL)
        lb.proc.wait(10)
        lb.proc = None
        killed_at = out.stat().st_size
        time.sleep(0.3)  # the client keeps ACKing into the void meanwhile
        lb = ConveyProcess(
            bed, config, mode="dsr", name="convey-restarted", install_rules=not offload
        ).start()
        assert curl.wait(60) == 0, "the download failed across the balancer restart"
        assert killed_at < size
        digest = _sha256(out)
        assert digest == payload_sha256(size)
        doc = lb.stats()
        if offload:
            # the kernel's entry carried the connection: not one of its packets reached the restarted convey,
            # which adopted it from the conntrack table at start
            assert queued(doc) == 0, doc["packet"]["verdicts"]
            assert doc["offload"]["opened"] >= 1, doc["offload"]
        else:
            # the restarted balancer knew nothing of the flow: it scheduled it again by its hash, to the same server
            assert doc["packet"]["verdicts"]["rescheduled"] >= 1, doc["packet"]["verdicts"]
    finally:
        if curl.poll() is None:
            curl.kill()
            curl.wait(5)
        lb.kill()
        out.unlink(missing_ok=True)
        if offload:
            bed.lb.run([sys.executable, "-m", "convey", "rules", "remove"], check=False)


FLUSH_OUR_ENTRIES = """
from convey.dataplane import conntrack
from convey.dataplane.conntrack_records import MarkFilter
writer = conntrack.Writer()
entries = conntrack.dump(MarkFilter())
for entry in entries:
    writer.delete(entry.orig)
print(len(entries))
"""


@pytest.mark.parametrize("flavour", ["ip", "mac"])
def test_offload_a_connection_whose_entry_is_gone_is_rescheduled(
    flavour: str, request: pytest.FixtureRequest
) -> None:
    """Delete convey's conntrack entries while a download runs: the client's next packet is picked up unmarked,
    queued, sent by the same hash to the same server with its mark (the nat table saves it in the new entry;
    ``ip`` also DNATs by it), and the download completes intact with one more packet through convey."""
    bed: Testbed = request.getfixturevalue(f"l2_{flavour}_bed").bed
    size = 20_000_000
    out = bed.logdir / "pickup.bin"
    with ConveyProcess(bed, dsr_config(bed, flavour, offload=True), mode="dsr") as lb:
        curl = bed.client.popen(
            ["curl", "-sS", "--fail", "--max-time", "60", "--limit-rate", "5M", "-o", str(out),
             f"http://{bed.vip}:{VIP_PORT}/bytes/{size}"],
        )  # fmt: skip
        try:
            wait_until(
                lambda: out.exists() and out.stat().st_size > 2_000_000, 20, "the download to be under way"
            )
            reached = queued(lb.stats())
            assert int(bed.lb.python(["-c", FLUSH_OUR_ENTRIES]).stdout) >= 1
            assert curl.wait(60) == 0, "the download failed after its conntrack entry was deleted"
        finally:
            if curl.poll() is None:
                curl.kill()
                curl.wait(5)
        assert _sha256(out) == payload_sha256(size)
        out.unlink(missing_ok=True)
        doc = lb.stats()
        assert 1 <= queued(doc) - reached <= 3, doc["packet"]["verdicts"]
        assert doc["packet"]["verdicts"]["rescheduled"] >= 1 and doc["dsr"]["offload"]["pickups"] >= 1
        lb.stop()


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def connect_refused_quickly(bed: Testbed, deadline: float = 1.0) -> None:
    """A connection to the VIP from the client is refused (a RST) within ``deadline`` seconds."""
    sock = bed.client.socket()
    sock.settimeout(5.0)
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionRefusedError):
            sock.connect((bed.vip, VIP_PORT))
    finally:
        sock.close()
    took = time.monotonic() - start
    assert took < deadline, f"refusal took {took:.2f}s"


def test_a_server_down_by_health_checks_gets_no_new_flows(l2_ip_bed: DsrBed, offload: bool) -> None:
    bed = l2_ip_bed.bed
    config = dsr_config(bed, "ip", health_interval=0.5, fall=2, rise=1, offload=offload)
    with ConveyProcess(bed, config, mode="dsr") as lb:
        assert fetch_many(bed.client, bed.vip, VIP_PORT, 40)["counts"].get("server1", 0) > 0
        # stop server1's web server (the machine stays up: only the health checks can tell)
        l2_ip_bed.web[1].stop()
        lb.wait_stats(
            lambda doc: doc["backends"]["web_servers"]["server_detail"]["s1"]["state"] == "down",
            15,
            "server s1 to be marked down by the health checks",
        )
        result = fetch_many(bed.client, bed.vip, VIP_PORT, 100)
        assert result["failed"] == 0, result
        assert result["counts"] == {"server0": 100}
        assert lb.stats()["backends"]["web_servers"]["scheduler"] == "maglev"
        # no healthy server left: the client is refused at once with a RST, counted per frontend and backend
        l2_ip_bed.web[0].stop()
        lb.wait_stats(
            lambda doc: doc["backends"]["web_servers"]["server_detail"]["s0"]["state"] == "down",
            15,
            "server s0 to be marked down by the health checks",
        )
        connect_refused_quickly(bed)
        doc = lb.stats()
        assert doc["refused"] == 1 and doc["frontends"]["web"]["refused"] == 1
        assert doc["backends"]["web_servers"]["refused"] == 1
        lb.stop()


def test_configs_dsr_cannot_serve_are_rejected_clearly() -> None:
    """A port the chosen egress NAT cannot restore (tc); a ``mac`` server behind a gateway (not on the segment)."""
    bed = Testbed.create(kind="routed", servers=1)
    try:
        path = bed.logdir / "mismatch.toml"
        path.write_text(dsr_config(bed, "ip", egress_nat="tc"))  # VIP port 80, server port 8080
        proc = bed.lb.run(
            [sys.executable, "-m", "convey", "--dsr", f"--config={path}"], check=False, timeout=30
        )
        assert proc.returncode == 1, proc
        assert (
            "backends.web_servers.servers.s0.addr: port 8080 differs from frontends.web.listen_addr port 80"
            in (proc.stderr)
        )
        assert 'dsr.egress_nat = "tc" cannot restore ports' in proc.stderr
        # the same with nft (auto) is fine: it restores the port too
        path.write_text(dsr_config(bed, "ip", egress_nat="auto"))
        check = bed.lb.run(
            [sys.executable, "-m", "convey", "check", "--dsr", f"--config={path}"], check=False
        )
        assert check.returncode == 0, check.stderr

        # rewrite = "mac" with a server the balancer reaches through a router
        with bed.lb.iproute() as ipr:
            ipr.route("add", dst="198.18.250.0/24", gateway=bed.servers[0].addr)
        text = dsr_config(bed, "mac").replace(f'"{bed.servers[0].addr}:80"', '"198.18.250.5:80"')
        path.write_text(text)
        rules = bed.lb.run(
            [sys.executable, "-m", "convey", "rules", "install", "--dsr", f"--config={path}"], check=False
        )
        assert rules.returncode == 1, rules
        assert "198.18.250.5 is reached via the gateway 198.18.1.2" in rules.stderr
        assert "one L2 segment" in rules.stderr
        assert "CONVEY" not in bed.lb.run(["iptables-save", "-t", "raw"]).stdout  # nothing installed
    finally:
        bed.destroy()
