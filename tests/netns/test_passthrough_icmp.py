"""Path-MTU discovery through passthrough: ICMP "fragmentation needed" errors about NATed flows reach the right
endpoint, translated (convey.packet.icmp; issue 10 defect 8). Root only.

The bed is the routed one with a narrower path behind the balancer, invisible to the endpoints' MSS: the
balancer's routes to the server and to the client carry ``mtu 1280`` while every interface stays at 1500. So
both endpoints announce an MSS of 1460, a full-size segment (1500 bytes, DF: Linux sets it with path-MTU
discovery on) leaves one side, and the balancer's own kernel refuses to forward it and sends "fragmentation
needed, MTU 1280" to the segment's source, one of its own addresses:

- upload: the client's segment, rewritten to ``LB:eport -> server:8080``, is too big towards the server; the
  error goes to the LB address quoting that packet, and must reach the client quoting ``client -> VIP:80``;
- download: the server's segment, rewritten to ``VIP:80 -> client``, is too big towards the client; the error
  goes to the VIP quoting that packet, and must reach the server quoting ``server:8080 -> LB:eport``.

Neither endpoint retries with smaller segments on its own (``tcp_mtu_probing`` is 0 by default), so without the
translation the transfer stalls: the first test shows that with the ICMP rules taken out. With ``offload``
conntrack's NAT translates the errors of its connections (they are RELATED) and the same transfers complete.
"""

from __future__ import annotations

import re
import socket
import time
from collections.abc import Iterator

import pytest
from pyroute2 import netns
from scapy.layers.inet import ICMP, IP, TCP
from scapy.packet import Raw

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.host import Host
from testbed.httpd import payload_sha256
from testbed.process import wait_until
from tests.netns.test_passthrough import (
    assert_clean,
    client,
    counters,
    make_config,
    start_servers,
    stop_clean,
)

SIZE = 20 * 1024 * 1024
NARROW = 1280


@pytest.fixture
def bed() -> Iterator[Testbed]:
    """One client, the balancer, one server (namespaces cvy-icmp-*), with the narrow routes on the balancer."""
    made = Testbed.create(kind="routed", servers=1, prefix="cvy-icmp-")
    try:
        server, lb = made.servers[0], made.lb
        lb.run(["ip", "route", "add", f"{server.addr}/32", "dev", "s0", "src", made.lb_addr_towards(0),
                "mtu", str(NARROW)])  # fmt: skip
        lb.run(["ip", "route", "add", f"{made.client.addr}/32", "dev", "c0", "src", lb.addr,
                "mtu", str(NARROW)])  # fmt: skip
        yield made
    finally:
        made.destroy()


def path_mtu(host: Host, dst: str) -> int | None:
    """The path MTU the host learnt for ``dst`` (its route cache), or None."""
    found = re.search(r"\bmtu (\d+)", host.run(["ip", "route", "get", dst]).stdout)
    return int(found.group(1)) if found else None


def queued_icmp(lb: Host) -> int:
    """ICMP packets the rules queued (both chains), from the rule counters."""
    lines = lb.run(["iptables-save", "-c", "-t", "raw"]).stdout.splitlines()
    found = [re.match(r"\[(\d+):\d+\] -A CONVEY-\S+ .*-p icmp .*-j NFQUEUE", line) for line in lines]
    return sum(int(m.group(1)) for m in found if m)


def icmp_counts(doc: dict[str, object]) -> tuple[int, int, int]:
    c = counters(doc)  # type: ignore[arg-type]
    return c["icmp_translated"], c["icmp_unrelated"], c["icmp_malformed"]


def test_without_translation_an_upload_stalls(bed: Testbed) -> None:
    """The control: the balancer's own errors never reach convey (its OUTPUT chain emptied), and an upload
    makes no progress past the first full-size segments."""
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed)).start()
    bed.lb.run(["iptables", "-t", "raw", "-F", "CONVEY-OUTPUT"])
    up = client(bed, "upload", size=2 * 1024 * 1024, timeout=6.0, run_timeout=30.0)
    assert up["error"] is not None and "timed out" in up["error"], up
    assert path_mtu(bed.client, bed.vip) is None  # the client never heard of the narrow path
    assert icmp_counts(convey.stats())[0] == 0
    convey.stop()


@pytest.mark.parametrize("offload", [False, True], ids=["per_packet", "offload"])
def test_path_mtu_discovery_works_both_ways(bed: Testbed, offload: bool) -> None:
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, offload=offload, fin_linger=2.0)).start()

    up = client(bed, "upload", size=SIZE, timeout=25.0, run_timeout=40.0)
    assert up["error"] is None and up["status"].startswith("HTTP/1.1 200"), up
    assert up["body_start"] == payload_sha256(SIZE)  # the server's sha256 of what it received
    assert path_mtu(bed.client, bed.vip) == NARROW  # the client learnt it from the translated error

    # forget it: with it the client would announce an MSS of 1240 and the server never send too much
    bed.client.sysctl("net.ipv4.route.flush", 1)
    assert path_mtu(bed.client, bed.vip) is None
    down = client(bed, "get", n=1, path=f"/bytes/{SIZE}", timeout=25.0, run_timeout=40.0)[0]
    assert down["error"] is None and down["status"].startswith("HTTP/1.1 200"), down
    assert down["received"] - down["header_len"] == SIZE
    assert down["sha256"] == payload_sha256(SIZE)
    assert path_mtu(bed.servers[0], bed.lb_addr_towards(0)) == NARROW

    doc = convey.stats()
    assert_clean(doc)
    if not offload:
        translated, _, malformed = icmp_counts(doc)
        assert translated >= 2 and malformed == 0, counters(doc)  # at least one error each way
        assert queued_icmp(bed.lb) == sum(icmp_counts(doc))  # every queued error got one verdict
    stop_clean(convey)


def frag_needed(src: str, dst: str, quoted: tuple[str, str, int, int]) -> bytes:
    """A "fragmentation needed, MTU 1280" error from ``src`` to ``dst`` quoting 548 bytes of a full-size
    segment ``quoted`` (src, dst, sport, dport), as a router would send it."""
    qsrc, qdst, sport, dport = quoted
    segment = bytes(
        IP(src=qsrc, dst=qdst, flags="DF") / TCP(sport=sport, dport=dport, flags="A") / (b"x" * 1460)
    )
    return bytes(IP(src=src, dst=dst) / ICMP(type=3, code=4, nexthopmtu=NARROW) / Raw(segment[:548]))


def valid(pkt: IP) -> bool:
    """The outer IPv4, the ICMP and the quoted IPv4 checksums equal scapy's full recompute."""
    fresh = IP(bytes(pkt))
    del fresh.chksum
    del fresh[ICMP].chksum
    quoted = IP(bytes(pkt[ICMP].payload))
    requoted = quoted.copy()
    del requoted.chksum
    rebuilt = IP(bytes(fresh))
    return bool(
        rebuilt.chksum == pkt.chksum
        and rebuilt[ICMP].chksum == pkt[ICMP].chksum
        and IP(bytes(requoted)).chksum == quoted.chksum
    )


def receive_error(sock: socket.socket, deadline: float) -> IP:
    """The next "fragmentation needed" the raw ICMP socket sees (within ``deadline`` seconds)."""
    end = time.monotonic() + deadline
    while time.monotonic() < end:
        sock.settimeout(max(0.01, end - time.monotonic()))
        try:
            pkt = IP(sock.recv(65535))
        except TimeoutError:
            break
        if pkt[ICMP].type == 3 and pkt[ICMP].code == 4:
            return pkt
    raise AssertionError("no ICMP error arrived")


def test_errors_from_either_side_reach_the_other_translated(bed: Testbed) -> None:
    """Errors from outside (through raw PREROUTING): one the server's side sends to the LB address about
    ``LB:eport -> server``, one the client's side sends to the VIP about ``VIP -> client``; each arrives at the
    other endpoint translated, its checksums valid, and the flow goes on."""
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed)).start()
    server, lb_addr = bed.servers[0], bed.lb_addr_towards(0)
    conn = bed.client.connect(bed.vip, 80)
    cport = conn.getsockname()[1]

    def eport() -> int | None:
        found = re.search(
            rf"{re.escape(lb_addr)}:(\d+)", server.run(["ss", "-tnH", "state", "established"]).stdout
        )
        return int(found.group(1)) if found else None

    wait_until(lambda: eport() is not None, 5, "the server's side of the connection")
    port = eport()
    assert port is not None
    sockets = []
    try:
        at_client, at_server, from_client, from_server = (
            netns.create_socket(host.ns, socket.AF_INET, socket.SOCK_RAW, proto)
            for host, proto in (
                (bed.client, socket.IPPROTO_ICMP),
                (server, socket.IPPROTO_ICMP),
                (bed.client, socket.IPPROTO_RAW),
                (server, socket.IPPROTO_RAW),
            )
        )
        sockets += [at_client, at_server, from_client, from_server]
        from_server.sendto(
            frag_needed(server.addr, lb_addr, (lb_addr, server.addr, port, 8080)), (lb_addr, 0)
        )
        got = receive_error(at_client, 5)
        assert (got.src, got.dst, got[ICMP].nexthopmtu) == (bed.vip, bed.client.addr, NARROW)
        quoted = IP(bytes(got[ICMP].payload))
        assert (quoted.src, quoted.dst, quoted[TCP].sport, quoted[TCP].dport) == (
            bed.client.addr,
            bed.vip,
            cport,
            80,
        )
        assert valid(got)

        from_client.sendto(
            frag_needed(bed.client.addr, bed.vip, (bed.vip, bed.client.addr, 80, cport)), (bed.vip, 0)
        )
        got = receive_error(at_server, 5)
        assert (got.src, got.dst) == (lb_addr, server.addr)
        quoted = IP(bytes(got[ICMP].payload))
        assert (quoted.src, quoted.dst, quoted[TCP].sport, quoted[TCP].dport) == (
            server.addr,
            lb_addr,
            8080,
            port,
        )
        assert valid(got)
    finally:
        for sock in sockets:
            sock.close()
    # the flow is untouched: a request on it is answered
    conn.sendall(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
    assert conn.recv(100).startswith(b"HTTP/1.1 200")
    conn.close()
    doc = convey.stats()
    assert icmp_counts(doc) == (2, 0, 0)
    assert_clean(doc)
    stop_clean(convey)
