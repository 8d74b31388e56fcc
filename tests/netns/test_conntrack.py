"""convey.dataplane.conntrack against a real kernel: a routed bed whose balancer NATs by mark as passthrough
offload does (the mark is set by a rule here instead of a queue verdict, so only the conntrack side is tested).

Checked: events for our entries only (the BPF filter applied by the kernel: NEW, the closing UPDATE, DESTROY);
opens and closes; payload bytes of a 20 MB download and a 20 MB upload within 1% of what the peers sent; dumps;
ENOBUFS on a shrunk socket buffer followed by a resync that ends with the right open count; entries written by
convey (DSR) accepted by the kernel with their DNAT; the kernel check passing here.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from convey.dataplane import conntrack
from convey.dataplane.conntrack_check import missing
from convey.dataplane.conntrack_records import (
    Accounted,
    Change,
    Closed,
    FlowTuple,
    Ledger,
    MarkFilter,
    Opened,
)
from convey.dataplane.decided_ledger import DecidedLedger
from testbed.bed import Testbed
from testbed.httpd_proc import HttpServer, start_httpd
from testbed.process import wait_until

MARK = 0x100
OURS = MarkFilter(mask=0xFF00)
VPORT = 80
SIZE = 20_000_000


def offload_rules(bed: Testbed) -> str:
    """Every NEW connection to VIP:80 gets mark 0x100 (as a verdict would), kept in the entry; the nat table
    sends it to server 0 from the balancer's address towards it."""
    server, src = bed.servers[0].addr, bed.lb_addr_towards(0)
    return "\n".join(
        [
            "*mangle",
            f"-A PREROUTING -d {bed.vip}/32 -p tcp -m tcp --dport {VPORT} -m conntrack --ctstate NEW "
            f"-j MARK --set-mark {MARK:#x}",
            "COMMIT",
            "*nat",
            "-A PREROUTING -m mark ! --mark 0x0/0xff00 -j CONNMARK --save-mark --nfmask 0xff00 --ctmask 0xff00",
            f"-A PREROUTING -p tcp -m mark --mark {MARK:#x}/0xff00 -j DNAT --to-destination {server}:8080",
            f"-A POSTROUTING -p tcp -m mark --mark {MARK:#x}/0xff00 -j SNAT --to-source {src}:33768-61000",
            "COMMIT",
            "",
        ]
    )


@pytest.fixture
def bed(routed_bed: Testbed) -> Iterator[Testbed]:
    lb = routed_bed.lb
    lb.sysctl("net.netfilter.nf_conntrack_acct", 1)
    lb.sysctl("net.netfilter.nf_conntrack_events", 1)
    lb.run(["iptables-restore"], input=offload_rules(routed_bed))
    yield routed_bed


@pytest.fixture
def web(bed: Testbed) -> Iterator[HttpServer]:
    server = start_httpd(bed.servers[0], port=8080)
    yield server
    server.stop()


class Collector:
    def __init__(self) -> None:
        self.changes: list[Change] = []

    def __call__(self, changes: list[Change]) -> None:
        self.changes.extend(changes)

    def of(self, kind: type) -> list[Change]:
        return [c for c in self.changes if isinstance(c, kind)]


def monitor(bed: Testbed, rcvbuf: int = conntrack.EVENT_RCVBUF) -> tuple[conntrack.Monitor, Collector]:
    got = Collector()
    mon = conntrack.Monitor(Ledger(ours=OURS), got, netns=bed.lb.ns, rcvbuf=rcvbuf)
    mon.start(loop=None)
    return mon, got


def expire_closed(bed: Testbed, got: Collector) -> None:
    """Delete the entries of closed connections: their DESTROY would otherwise wait for the TIME_WAIT timeout
    and the kernel's garbage collector (which scans a quiet table only every 60 s)."""
    writer = conntrack.Writer(netns=bed.lb.ns)
    try:
        for change in got.of(Closed):
            assert isinstance(change, Closed)
            writer.delete(change.orig)
    finally:
        writer.close()


def curl_sizes(bed: Testbed, *args: str) -> dict[str, int]:
    fmt = "%{size_request} %{size_upload} %{size_header} %{size_download}"
    out = bed.client.run(["curl", "-sS", "-o", "/dev/null", "-w", fmt, *args], timeout=60).stdout
    request, upload, header, download = (int(v) for v in out.split())
    return {"tx": request + upload, "rx": header + download}


def settle(mon: conntrack.Monitor, got: Collector, condition: object, what: str, timeout: float = 30) -> None:
    def check() -> bool:
        mon.on_readable()
        return bool(condition() if callable(condition) else condition)

    wait_until(check, timeout, what, interval=0.05)


def test_download_and_upload_events_and_payload_bytes(bed: Testbed, web: HttpServer) -> None:
    mon, got = monitor(bed)
    try:
        down = curl_sizes(bed, f"http://{bed.vip}:{VPORT}/bytes/{SIZE}")
        blob = _blob(bed)
        up = curl_sizes(bed, "--data-binary", f"@{blob}", f"http://{bed.vip}:{VPORT}/upload")
        Path(blob).unlink()
        # the bytes come with the close (a GET of the entry), not 120 s later with the DESTROY
        settle(mon, got, lambda: len(got.of(Accounted)) >= 2, "the bytes of both connections")
        at_close = totals(got)
        expire_closed(bed, got)
        settle(mon, got, lambda: mon.counters()["events"] >= 6, "the DESTROY of both connections")
        counters = mon.counters()
    finally:
        mon.stop()
    opened, closed = got.of(Opened), got.of(Closed)
    assert len(opened) == len(closed) == 2 and mon.ledger.open == {}
    first, second = opened
    assert isinstance(first, Opened) and isinstance(second, Opened)
    assert first.mark == MARK and first.orig.src == bed.client.addr and first.orig.dport == VPORT
    assert first.reply.src == bed.servers[0].addr and first.reply.dst == bed.lb_addr_towards(0)
    final = totals(got)
    assert final[first.ct_id][1] >= at_close[first.ct_id][1]  # the DESTROY added at most the last ACKs
    (d_tx, d_rx), (u_tx, u_rx) = final[first.ct_id], final[second.ct_id]
    assert abs(d_rx - down["rx"]) <= down["rx"] * 0.01, (d_rx, down)
    assert abs(u_tx - up["tx"]) <= up["tx"] * 0.01, (u_tx, up)
    # the small sides: the SYN-ACK's options are guessed, and an ACK may carry a SACK block
    assert abs(d_tx - down["tx"]) <= 64 and abs(u_rx - up["rx"]) <= 64
    # three events per connection reached us: everything else was dropped by the kernel (BPF filter)
    assert counters["events"] == 6 and counters["overflows"] == 0 and counters["fetches"] == 2


def totals(got: Collector) -> dict[int, tuple[int, int]]:
    out: dict[int, tuple[int, int]] = {}
    for c in got.of(Accounted):
        assert isinstance(c, Accounted)
        tx, rx = out.get(c.ct_id, (0, 0))
        out[c.ct_id] = (tx + c.tx, rx + c.rx)
    return out


def _blob(bed: Testbed) -> str:
    path = bed.logdir / "upload.bin"
    if not path.exists():
        path.write_bytes(bytes(range(256)) * (SIZE // 256))
    return str(path)


def test_other_connections_are_not_reported(bed: Testbed, web: HttpServer) -> None:
    mon, got = monitor(bed)
    try:
        # the client reaches the server directly: tracked by the balancer, but without our mark
        bed.client.curl(f"http://{bed.servers[0].addr}:8080/")
        bed.client.curl(f"http://{bed.vip}:{VPORT}/")
        settle(mon, got, lambda: got.of(Closed), "our connection closed")
        expire_closed(bed, got)
        settle(mon, got, lambda: got.of(Accounted), "our connection's DESTROY")
        events = mon.counters()["events"]
    finally:
        mon.stop()
    assert len(got.of(Opened)) == 1 and events == 3


def test_dump_lists_our_live_entries(bed: Testbed, web: HttpServer) -> None:
    sock = bed.client.connect(bed.vip, VPORT)
    client_port = sock.getsockname()[1]
    try:
        mine = conntrack.dump(OURS, netns=bed.lb.ns)
        everything = conntrack.dump(None, netns=bed.lb.ns)
        exact = conntrack.dump(MarkFilter(0xFFFFFFFF, MARK), netns=bed.lb.ns)  # filtered by the kernel
    finally:
        sock.close()
    assert [r.orig for r in mine] == [FlowTuple(bed.client.addr, bed.vip, client_port, VPORT)]
    assert [r.orig for r in exact] == [r.orig for r in mine]
    assert mine[0].has_counters and mine[0].packets_orig and mine[0].packets_orig >= 1
    assert len(everything) >= len(mine)


def short_connections(bed: Testbed, count: int) -> None:
    """``count`` short HTTP connections from the client to the VIP, one after another."""
    script = (
        "import socket\n"
        f"for _ in range({count}):\n"
        f"    s = socket.create_connection(({bed.vip!r}, {VPORT}), timeout=10)\n"
        "    s.sendall(b'GET / HTTP/1.0\\r\\n\\r\\n'); s.recv(4096); s.close()\n"
    )
    bed.client.python(["-c", script], timeout=120)


def test_overflow_is_detected_and_resynced(
    bed: Testbed, web: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="convey.conntrack")
    mon, got = monitor(bed, rcvbuf=4096)  # the kernel's minimum: a handful of events
    held = bed.client.connect(bed.vip, VPORT)  # stays open across the overflow
    try:
        short_connections(bed, 300)  # nobody reads the events meanwhile
        settle(mon, got, lambda: mon.resyncs >= 2, "a resync after the overflow")
        assert mon.source is not None and mon.source.overflows >= 1
        assert re.search(r"event=conntrack_resync reason=overflow entries=\d+", caplog.text)
        # the held connection is open, whether its NEW event was lost or not
        settle(mon, got, lambda: len(mon.ledger.open) == 1, "only the held connection open")
    finally:
        held.close()
    try:
        settle(mon, got, lambda: not mon.ledger.open, "no connection open")
        last = mon.counters()["last_resync"]
    finally:
        mon.stop()
    opens = [c.ct_id for c in got.of(Opened)]
    closes = [c.ct_id for c in got.of(Closed)]
    assert len(opens) == len(set(opens)) and sorted(closes) == sorted(opens)  # each open closed exactly once
    assert last["entries"] >= 1


def test_entries_written_for_dsr(bed: Testbed) -> None:
    writer = conntrack.Writer(netns=bed.lb.ns)
    orig = FlowTuple(bed.client.addr, bed.vip, 40000, VPORT)
    server = (bed.servers[1].addr, 8080)
    try:
        writer.replace(orig, 0x101, timeout=300, nat_dst=server)
        writer.replace(orig, 0x102, timeout=300, nat_dst=server)  # replaces the first: no EEXIST
        (entry,) = conntrack.dump(OURS, netns=bed.lb.ns)
        assert entry.orig == orig and entry.mark == 0x102
        assert (entry.reply.src, entry.reply.sport) == server and entry.reply.dst == bed.client.addr
        assert entry.tcp_state is not None and entry.tcp_state.name == "ESTABLISHED"
        writer.delete(orig)
        assert conntrack.dump(OURS, netns=bed.lb.ns) == []
        writer.drain_errors()
        assert writer.errors == {} and writer.sent == 3
    finally:
        writer.close()


def test_kernel_check_passes_here(bed: Testbed) -> None:
    assert conntrack.probe(netns=bed.lb.ns) is None
    assert missing(ctnetlink=lambda: conntrack.probe(netns=bed.lb.ns)) == []


def test_opens_from_decisions_overflow_resync_and_closes(
    bed: Testbed, web: HttpServer, caplog: pytest.LogCaptureFixture
) -> None:
    """Passthrough offload's monitor (``DecidedLedger``, no NEW events, TIME_WAIT DESTROYs dropped by the
    kernel): a connection opened by a decision closes by its UPDATE, with its bytes from the GET; after an
    overflow the dump keeps it open and adopts nothing else that is open; connections nobody decided are
    ignored; each open closes exactly once."""
    caplog.set_level(logging.INFO, logger="convey.conntrack")
    got = Collector()
    ledger = DecidedLedger(ours=OURS)
    mon = conntrack.Monitor(ledger, got, netns=bed.lb.ns, rcvbuf=4096, opens_from_decisions=True)
    mon.start(loop=None)
    held = bed.client.connect(bed.vip, VPORT)
    try:
        addr, port = held.getsockname()[:2]
        key = FlowTuple(addr, bed.vip, port, VPORT).key
        got(ledger.decided(key, MARK, time.monotonic()))  # what the plane does at the verdict
        short_connections(bed, 300)  # nobody reads the events meanwhile
        settle(mon, got, lambda: mon.resyncs >= 2, "a resync after the overflow")
        assert mon.source is not None and mon.source.overflows >= 1
        assert re.search(r"event=conntrack_resync reason=overflow entries=\d+", caplog.text)
        assert list(ledger.open) == [key]  # the decided one; the 300 closed ones were never ours to count
        held.sendall(b"GET / HTTP/1.0\r\n\r\n")
        while held.recv(65536):
            pass
    finally:
        held.close()
    try:
        settle(
            mon, got, lambda: not ledger.open and got.of(Accounted), "the decided connection closed, bytes"
        )
        counters = mon.counters()
    finally:
        mon.stop()
    opens = [c.ct_id for c in got.of(Opened)]
    closes = [c.ct_id for c in got.of(Closed)]
    assert len(opens) == 1 and closes == opens
    assert sum(c.rx for c in got.of(Accounted) if isinstance(c, Accounted)) > 0  # the reply's payload
    assert counters["fetches"] >= 1 and counters["unconfirmed"] == 0
