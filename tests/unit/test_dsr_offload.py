"""DSR offload without a kernel: the core's unpinned decision (``Dsr(pin=False)``) and the offload plane's
hand-over (the conntrack entry it writes at a SYN, the marks its verdicts carry), on fake packets and a fake
``Writer``."""

from __future__ import annotations

import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from convey import stats as st
from convey.config import load_config
from convey.dataplane.conntrack_records import FlowTuple
from convey.dataplane.nfqueue import Batch
from convey.modes import Rewrite
from convey.packet.dsr import Dsr
from convey.packet.flows import Flow, FlowState, FlowTable
from convey.packet.ipv4 import addr_to_bytes
from convey.packet.passthrough import Verdict
from tests.unit.scapy_packets import check, tuple_of
from tests.unit.test_packet_dsr import CLIENT, MARKS, S2, SERVERS, VIP, packet, ports_for

# -- the core: nothing pinned, every decided flow handed over ---------------------------------------------


class Unpinned:
    def __init__(self, rewrite: Rewrite = Rewrite.IP) -> None:
        self.healthy = ["web1", "web2"]
        self.opened: list[Flow] = []
        self.dsr = Dsr(
            {(addr_to_bytes(VIP), 80): "front"},
            FlowTable(1),
            self.choose,
            rewrite,
            MARKS,
            on_flow_open=self.opened.append,
            pin=False,
        )

    def choose(self, frontend: str, h: int) -> tuple[str, bytes, int] | None:
        if not self.healthy:
            return None
        server = self.healthy[h % len(self.healthy)]
        return (server, *SERVERS[server])


def test_unpinned_syns_are_decided_each_time_and_handed_over() -> None:
    env = Unpinned()
    (cport,) = ports_for("web2")
    syn = packet(cport, "S", 1000)
    assert env.dsr.ingress(syn, 0.0) == (Verdict.ACCEPT, 0)
    assert tuple_of(check(syn)) == (CLIENT, S2, cport, 8080)  # the SYN's verdict is today's
    flow = env.opened[0]
    assert (flow.server_id, flow.state, flow.server_port) == ("web2", FlowState.EMBRYONIC, 8080)
    assert len(env.dsr.flows) == 0  # nothing pinned: the kernel's entry holds the connection
    env.dsr.ingress(packet(cport, "S", 1000), 1.0)  # a retransmitted SYN (or a reused port): decided again
    assert len(env.opened) == 2 and env.opened[1].state == FlowState.EMBRYONIC
    c = env.dsr.counters
    assert (c.accepted, c.rewrites, c.flows_opened, c.rescheduled, c.unpinned) == (2, 2, 0, 0, 0)


def test_unpinned_pickups_are_rescheduled_by_the_hash_and_rst_no_server_as_pinned() -> None:
    env = Unpinned(Rewrite.MAC)
    (cport,) = ports_for("web2")
    assert env.dsr.ingress(packet(cport, "PA", 5, 5, b"mid-flow"), 0.0) == (Verdict.ACCEPT, MARKS["web2"])
    assert env.opened[-1].state == FlowState.ESTABLISHED and env.dsr.counters.rescheduled == 1
    assert env.dsr.ingress(packet(cport, "RA", 6, 6), 0.1) == (Verdict.ACCEPT, MARKS["web2"])
    assert len(env.opened) == 1  # a RST is forwarded, nothing handed over
    env.healthy = []
    assert env.dsr.ingress(packet(cport + 1, "S", 1), 0.2) == (Verdict.DROP, 0)
    assert env.dsr.refused == {"front": 1} and len(env.dsr.rst_out) == 1
    assert len(env.opened) == 1


# -- the plane: entries and marks ------------------------------------------------------------------------


@dataclass
class FakeWriter:
    calls: list[tuple[FlowTuple, int, int, tuple[str, int] | None]] = field(default_factory=list)
    sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def replace(
        self, orig: FlowTuple, mark: int, timeout: int, nat_dst: tuple[str, int] | None = None
    ) -> None:
        self.calls.append((orig, mark, timeout, nat_dst))
        self.sent += 1

    def drain_errors(self) -> None:
        pass

    def close(self) -> None:
        pass


class FakePlan:
    mask = 0xFFFF

    def __init__(self, marks: dict[str, int]) -> None:
        self.marks = marks

    def mark(self, server_id: str) -> int:
        return self.marks[server_id]

    def server_of(self, mark: int) -> str | None:
        return next((s for s, m in self.marks.items() if m == mark), None)


class FakePacket:
    def __init__(self, payload: bytes) -> None:
        self.payload = payload
        self.out: bytes | None = None
        self.mark = 0
        self.verdict: str | None = None

    def get_payload(self) -> bytes:
        return self.payload

    def set_payload(self, payload: bytes) -> None:
        self.out = payload

    def set_mark(self, mark: int) -> None:
        self.mark = mark

    def accept(self) -> None:
        self.verdict = "accept"

    def drop(self) -> None:
        self.verdict = "drop"


LB_CLIENT, LB_VIP, LB_S0, LB_S1 = "198.18.0.2", "198.18.0.1", "198.18.1.2", "198.18.2.2"


def offload_plane(tmp_path: Path, rewrite: str) -> Any:
    from convey.balancing.pool import Pool
    from convey.dataplane.dsr_offload_plane import DsrOffloadPlane

    path = tmp_path / "c.toml"
    path.write_text(
        f'[frontends.web]\nlisten_addr = "{LB_VIP}:80"\nbackend = "b"\n[backends.b.servers.s0]\n'
        f'addr = "{LB_S0}:8080"\n[backends.b.servers.s1]\naddr = "{LB_S1}:8080"\n'
        f'[dsr]\nrewrite = "{rewrite}"\noffload = true\nidle_timeout = 120\n'
    )
    config = load_config(path)
    pools = {name: Pool(b, "dsr") for name, b in config.backends.items()}
    plane = DsrOffloadPlane(pools, st.Stats("dsr", 0.0))
    plane._new_plan = lambda config: FakePlan({"b/s0": 0x100, "b/s1": 0x101})
    plane._load(config)
    plane.decider = plane._new_decider(config)
    plane.writer = FakeWriter()
    return plane


def to_vip(sport: int, flags: str, payload: bytes = b"") -> bytes:
    from scapy.layers.inet import IP, TCP

    return bytes(IP(src=LB_CLIENT, dst=LB_VIP) / TCP(sport=sport, dport=80, flags=flags, seq=7) / payload)


@pytest.mark.parametrize("rewrite", ["ip", "mac"])
def test_a_syn_gets_its_entry_before_its_verdict_and_a_pickup_its_mark(tmp_path: Path, rewrite: str) -> None:
    plane = offload_plane(tmp_path, rewrite)
    writer: FakeWriter = plane.writer
    batch = Batch(size=64)
    batch.begin()
    seen_at_verdict: list[int] = []

    class Watching(FakePacket):
        def accept(self) -> None:
            seen_at_verdict.append(len(writer.calls))
            super().accept()

    callback = plane._callback(plane.decider, batch)
    syn = Watching(to_vip(40000, "S"))
    callback(syn)
    assert syn.verdict == "accept" and seen_at_verdict == [1]  # the entry was written before the verdict
    ((orig, mark, timeout, nat_dst),) = writer.calls
    server = LB_S0 if mark == 0x100 else LB_S1
    assert orig == FlowTuple(LB_CLIENT, LB_VIP, 40000, 80) and mark in (0x100, 0x101) and timeout == 120
    if rewrite == "ip":
        assert nat_dst == (server, 8080)
        assert syn.out is not None and socket.inet_ntoa(syn.out[16:20]) == server  # rewritten as today
    else:
        assert nat_dst is None and syn.out is None and syn.mark == mark  # the policy routing's mark

    # a packet whose entry is gone: rescheduled to the same server, accepted with its mark; no entry written
    pickup = FakePacket(to_vip(40000, "PA", b"more"))
    callback(pickup)
    assert pickup.verdict == "accept" and pickup.mark == mark and len(writer.calls) == 1
    if rewrite == "ip":
        assert pickup.out is not None and socket.inet_ntoa(pickup.out[16:20]) == server
    doc = plane.dsr_section()
    assert doc["offload"]["entries_written"] == 1 and doc["offload"]["pickups"] == 1
    assert doc["rewrite"] == rewrite and "bytes_rx" in doc["unknown"]
    assert plane.decider.counters.accepted == 2 and plane.io_errors == 0


def test_no_server_refuses_with_a_rst_and_writes_nothing(tmp_path: Path) -> None:
    plane = offload_plane(tmp_path, "ip")
    for pool in plane.pools.values():
        for server in pool.all_servers():
            pool.report_check(server.name, False)
            pool.report_check(server.name, False)
            pool.report_check(server.name, False)
    sent: list[bytes] = []
    plane._send_resets = lambda out: (sent.extend(out), out.clear())
    batch = Batch(size=8)
    batch.begin()
    pkt = FakePacket(to_vip(40001, "S"))
    plane._callback(plane.decider, batch)(pkt)
    assert pkt.verdict == "drop" and len(sent) == 1 and plane.writer.calls == []
    assert plane.decider.refused == {"web": 1}


def test_the_kernel_check_names_what_dsr_offload_needs() -> None:
    from convey.dataplane.dsr_offload_plane import kernel_needs

    assert "DNAT" in kernel_needs(Rewrite.IP) and "DNAT" not in kernel_needs(Rewrite.MAC)
    assert {"NFQUEUE", "CONNMARK", "CT"} <= set(kernel_needs(Rewrite.MAC))
