"""The passthrough queue callback (the edge) on fake packets: it gives exactly the verdicts and bytes the core's
``decide`` gives, counts its batch down, sends the resets the core queued, and counts only failed verdict calls.
Needs no root and no queue."""

from __future__ import annotations

import time
from typing import Any

import pytest

from tests.unit.test_fastpath import FakePacket


class FakeRaw:
    """The plane's raw socket for resets: keeps what it was given."""

    def __init__(self) -> None:
        self.packets: list[bytes] = []

    def send(self, packet: bytes) -> None:
        self.packets.append(packet)

    def close(self) -> None:
        pass


def test_queue_callback_gives_the_verdicts_decide_gives() -> None:
    """The passthrough plane's queue callback only does the I/O: fed the same packets, it gives the same verdicts,
    bytes, resets and counters as the decision's ``decide`` called directly, and counts the queue's batch down."""
    from scapy.all import IP, TCP, IPOption_NOP, Raw, fragment

    from convey import stats as st
    from convey.dataplane.nfqueue import Batch
    from convey.dataplane.passthrough_plane import PassthroughPlane
    from convey.packet.flows import FlowTable
    from convey.packet.passthrough import Passthrough
    from convey.packet.ports import PortAllocator

    client, vip, lb, server = "198.18.0.2", "198.18.0.1", "198.18.1.1", "198.18.1.2"
    b = {a: bytes(int(x) for x in a.split(".")) for a in (client, vip, lb, server)}
    vips = {(b[vip], 80): "web"}

    def decider() -> Passthrough:
        return Passthrough(
            vips, [b[lb]], PortAllocator(40000, 40099, (b[lb],), 60, start=lambda n: 0), FlowTable(100, 10, 300, 2),
            lambda frontend, flow_hash: ("web_servers/s0", b[server], 8080),
        )  # fmt: skip

    def to_vip(sport: int, flags: str, payload: bytes = b"", **ip: Any) -> bytes:
        return bytes(IP(src=client, dst=vip, **ip) / TCP(sport=sport, dport=80, flags=flags, seq=7) / payload)

    def back(eport: int, flags: str, payload: bytes = b"") -> bytes:
        return bytes(IP(src=server, dst=lb) / TCP(sport=8080, dport=eport, flags=flags, seq=9) / payload)

    packets = [
        to_vip(50000, "S"), back(40000, "SA"), to_vip(50000, "A"), to_vip(50000, "PA", b"GET / HTTP/1.0\r\n\r\n"),
        back(40000, "PA", b"x" * 1000), back(40000, "A"), to_vip(50000, "A", options=[IPOption_NOP()] * 4),
        to_vip(50001, "S"), back(40001, "SA", b""), to_vip(50001, "PA", b"y" * 100), back(40001, "R"),
        to_vip(50000, "FA"), back(40000, "FA"), to_vip(50000, "A"), to_vip(50002, "A", b"no flow"),
        back(40050, "A"), to_vip(50000, "PA", b"z" * 20, tos=4),
        *(bytes(f) for f in fragment(IP(src=client, dst=vip) / TCP(sport=50000, dport=80) / Raw(b"f" * 300), 200)),
        to_vip(50000, "PA", b"after")[:30], to_vip(50003, "S"), back(40002, "SA"), to_vip(50003, "PA", b"q" * 7),
    ]  # fmt: skip
    plane = PassthroughPlane({}, st.Stats("passthrough", 0.0))
    plane.vips = vips
    queued = plane.decider = decider()
    raw = FakeRaw()
    plane._raw = raw  # type: ignore[assignment]
    direct = decider()

    def sock_recv(size: int) -> bytes:
        raise AssertionError("not called here")

    batch = Batch(size=4)  # the callback counts the queue's batch down: after 4 packets, recv says EAGAIN
    batch.bind(sock_recv)
    callback = plane._callback(queued, batch)
    resets: list[bytes] = []
    for i, packet in enumerate(packets):
        if i % 4 == 0:
            batch.begin()
        assert batch.recv is sock_recv
        pkt = FakePacket(packet)
        callback(pkt)
        out = direct.decide(packet, time.monotonic())
        expected = ("drop", None) if out is None else ("accept", out)
        assert (pkt.verdict, pkt.out) == expected, f"packet {i}: {IP(packet).summary()}"
        resets += direct.rst_out
        direct.rst_out.clear()
        assert queued.rst_out == [] and raw.packets == resets, f"packet {i}: resets"
        if i % 4 == 3:
            with pytest.raises(BlockingIOError):
                batch.recv(4096)
    assert len(resets) >= 1  # the packet of no flow was answered with a RST
    assert queued.counters == direct.counters
    assert queued.counters.ingress_accepted > 5 and queued.counters.return_accepted > 5
    assert plane.io_errors == 0
    assert sorted(queued.flows.forward) == sorted(direct.flows.forward)
    assert [(f.fwd_bytes, f.ret_bytes, f.fwd_packets, f.ret_packets, f.state) for f in queued.flows] == [
        (f.fwd_bytes, f.ret_bytes, f.fwd_packets, f.ret_packets, f.state) for f in direct.flows
    ]

    # a verdict call that fails is counted by the edge, and the packet dropped
    class Refusing(FakePacket):
        def set_payload(self, payload: bytes) -> None:
            raise OSError("netlink: no buffer space")

    batch.begin()
    pkt = Refusing(to_vip(50003, "A"))
    callback(pkt)
    assert (pkt.verdict, plane.io_errors) == ("drop", 1)
