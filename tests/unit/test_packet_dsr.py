"""DSR decisions, both flavours: ``ip`` rewrites the destination, ``mac`` returns the server's fwmark."""

from __future__ import annotations

import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert

from convey.balancing.schedulers import flow_hash
from convey.modes import Rewrite
from convey.packet.dsr import Dsr
from convey.packet.flows import Flow, FlowState, FlowTable
from convey.packet.ipv4 import addr_to_bytes
from convey.packet.passthrough import RST_QUEUE_LIMIT, Verdict
from tests.unit.scapy_packets import check, tcp_packet, tuple_of

CLIENT = "198.51.100.7"
VIP = "198.18.0.10"
S1 = "10.0.1.11"
S2 = "10.0.1.12"
SERVERS = {"web1": (addr_to_bytes(S1), 80), "web2": (addr_to_bytes(S2), 8080)}
MARKS = {"web1": 0x101, "web2": 0x102}

ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP


def packet(
    sport: int,
    flags: str,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
    src: str = CLIENT,
    dst: str = VIP,
    dport: int = 80,
    ip_options: list[object] | None = None,
) -> bytearray:
    return tcp_packet(src, dst, sport, dport, flags, seq, ack, payload, ip_options)


class Env:
    def __init__(
        self,
        rewrite: Rewrite = Rewrite.IP,
        healthy: tuple[str, ...] = ("web1", "web2"),
        capacity: int = 100,
        marks: dict[str, int] | None = None,
    ) -> None:
        self.healthy = list(healthy)
        self.flows = FlowTable(capacity, syn_timeout=10.0, idle_timeout=300.0, linger=2.0)
        self.opened: list[Flow] = []
        self.closed: list[Flow] = []
        self.dsr = Dsr(
            {(addr_to_bytes(VIP), 80): "front"},
            self.flows,
            self.choose,
            rewrite,
            MARKS if marks is None else marks,
            on_flow_open=self.opened.append,
            on_flow_close=self.closed.append,
        )

    def choose(self, frontend: str, h: int) -> tuple[str, bytes, int] | None:
        if not self.healthy:
            return None
        server = self.healthy[h % len(self.healthy)]
        return (server, *SERVERS[server])


def expected_server(cport: int, healthy: tuple[str, ...] = ("web1", "web2")) -> str:
    h = flow_hash(int.from_bytes(addr_to_bytes(CLIENT), "big"), cport, 0xC612000A, 80)
    return healthy[h % len(healthy)]


def ports_for(server: str, count: int = 1) -> list[int]:
    """Client ports whose flow hash picks ``server`` among web1, web2."""
    return [p for p in range(40000, 41000) if expected_server(p) == server][:count]


# -- ip


def test_ip_rewrites_destination_keeps_client_source() -> None:
    env = Env()
    (cport,) = ports_for("web2")
    syn = packet(cport, "S", 1000)
    assert env.dsr.ingress(syn, 0.0) == (ACCEPT, 0)
    pkt = check(syn)
    assert tuple_of(pkt) == (CLIENT, S2, cport, 8080)  # web2 listens on another port: rewritten too
    assert env.opened[0].state == FlowState.EMBRYONIC
    ack = packet(cport, "A", 1001, 5001)
    assert env.dsr.ingress(ack, 0.1) == (ACCEPT, 0)
    assert tuple_of(check(ack)) == (CLIENT, S2, cport, 8080)
    assert env.opened[0].state == FlowState.ESTABLISHED
    data = packet(cport, "PA", 1001, 5001, b"q" * 321)
    assert env.dsr.ingress(data, 0.2) == (ACCEPT, 0)
    pkt = check(data)
    assert tuple_of(pkt) == (CLIENT, S2, cport, 8080) and bytes(pkt[TCP].payload) == b"q" * 321
    c = env.dsr.counters
    assert (c.accepted, c.rewrites, c.bytes_tx, c.flows_opened) == (3, 3, 321, 1)
    assert env.flows.per_server() == {"web2": 1}
    flow = env.opened[0]
    assert (flow.fwd_packets, flow.fwd_bytes) == (3, 321)


def test_ip_same_port_server_keeps_the_port() -> None:
    env = Env()
    (cport,) = ports_for("web1")
    syn = packet(cport, "S", 1)
    env.dsr.ingress(syn, 0.0)
    assert tuple_of(check(syn)) == (CLIENT, S1, cport, 80)


def test_pinned_flows_survive_server_set_changes() -> None:
    env = Env()
    (cport,) = ports_for("web2")
    env.dsr.ingress(packet(cport, "S", 1), 0.0)
    env.healthy = ["web1"]
    data = packet(cport, "A", 2, 2)
    env.dsr.ingress(data, 1.0)
    assert check(data).dst == S2
    assert len(env.opened) == 1


def test_unknown_non_syn_is_scheduled_by_flow_hash_like_a_syn() -> None:
    """A restarted balancer (empty table) sends mid-flow packets where the SYN went."""
    first = Env()
    (cport,) = ports_for("web2")
    first.dsr.ingress(packet(cport, "S", 1), 0.0)
    restarted = Env()
    data = packet(cport, "PA", 500, 600, b"mid-flow")
    assert restarted.dsr.ingress(data, 100.0) == (ACCEPT, 0)
    assert check(data).dst == S2
    assert restarted.dsr.counters.rescheduled == 1
    flow = restarted.opened[0]
    assert flow.state == FlowState.ESTABLISHED and flow.server_id == "web2"


def test_fin_closes_after_linger_and_acks_extend_it() -> None:
    env = Env()
    (cport,) = ports_for("web1")
    env.dsr.ingress(packet(cport, "S", 1), 0.0)
    env.dsr.ingress(packet(cport, "A", 2, 2), 0.1)
    env.dsr.ingress(packet(cport, "FA", 2, 2), 1.0)
    assert env.opened[0].state == FlowState.CLOSING
    env.dsr.ingress(packet(cport, "A", 3, 900), 2.5)  # the server still sends; the client ACKs
    env.dsr.expire(4.4)
    assert len(env.flows) == 1
    env.dsr.expire(4.5)
    assert len(env.flows) == 0 and env.closed == env.opened
    assert env.dsr.counters.flows_closed == 1


def test_rst_closes_and_unknown_rst_is_forwarded_unpinned() -> None:
    env = Env()
    (cport,) = ports_for("web1")
    env.dsr.ingress(packet(cport, "S", 1), 0.0)
    assert env.dsr.ingress(packet(cport, "R", 2), 0.5) == (ACCEPT, 0)
    assert env.opened[0].state == FlowState.CLOSING
    (other,) = ports_for("web2")
    rst = packet(other, "RA", 5, 5)
    assert env.dsr.ingress(rst, 0.5) == (ACCEPT, 0)
    assert check(rst).dst == S2
    assert len(env.flows) == 1 and env.dsr.counters.flows_opened == 1


def test_syn_on_a_closing_flow_opens_a_new_one() -> None:
    env = Env()
    (cport,) = ports_for("web1")
    env.dsr.ingress(packet(cport, "S", 1), 0.0)
    env.dsr.ingress(packet(cport, "R", 2), 0.5)
    env.dsr.ingress(packet(cport, "S", 9000), 1.0)
    assert len(env.opened) == 2 and env.closed == [env.opened[0]]
    assert env.opened[1].state == FlowState.EMBRYONIC


def test_embryonic_flow_expires() -> None:
    env = Env()
    env.dsr.ingress(packet(40000, "S", 1), 0.0)
    env.dsr.expire(10.0)
    assert len(env.flows) == 0


def test_no_server_drops_and_resets() -> None:
    env = Env(healthy=())
    syn = packet(40000, "S", 1000)
    assert env.dsr.ingress(syn, 0.0) == (DROP, 0)
    (rst,) = env.dsr.rst_out
    pkt = check(rst)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40000)
    assert (str(pkt[TCP].flags), pkt[TCP].ack) == ("RA", 1001)
    assert env.dsr.counters.no_server == 1 and env.dsr.counters.dropped == 1
    assert sum(env.dsr.refused.values()) == 1
    assert env.dsr.ingress(packet(40000, "R", 1), 0.0) == (DROP, 0)
    assert len(env.dsr.rst_out) == 1  # never answer a reset
    for i in range(RST_QUEUE_LIMIT + 3):
        env.dsr.ingress(packet(1024 + i, "S", 1), 0.0)
    assert len(env.dsr.rst_out) == RST_QUEUE_LIMIT and env.dsr.counters.rst_overflow == 4


def test_full_table_forwards_unpinned() -> None:
    env = Env(capacity=1)
    env.dsr.ingress(packet(40000, "S", 1), 0.0)
    second = packet(40001, "S", 1)
    assert env.dsr.ingress(second, 0.0)[0] == ACCEPT
    assert check(second).dst in (S1, S2)
    assert env.dsr.counters.unpinned == 1 and len(env.flows) == 1


def test_not_a_vip_and_malformed_are_dropped() -> None:
    env = Env()
    assert env.dsr.ingress(packet(40000, "S", 1, dst="198.18.0.99"), 0.0) == (DROP, 0)
    assert env.dsr.ingress(bytearray(b"\x45" + b"\x00" * 10), 0.0) == (DROP, 0)
    frag = bytearray(bytes(IP(src=CLIENT, dst=VIP, flags="MF") / TCP(sport=1, dport=80)))
    assert env.dsr.ingress(frag, 0.0) == (DROP, 0)
    c = env.dsr.counters
    assert (c.not_vip, c.malformed, c.fragment, c.dropped, c.errors) == (1, 1, 1, 3, 0)


def test_ip_options_accepted_and_counted() -> None:
    env = Env()
    (cport,) = ports_for("web1")
    syn = packet(cport, "S", 1, ip_options=[IPOption_Router_Alert()])
    assert env.dsr.ingress(syn, 0.0) == (ACCEPT, 0)
    assert tuple_of(check(syn)) == (CLIENT, S1, cport, 80)
    assert env.dsr.counters.ip_options == 1


def test_unknown_rewrite_flavour_is_refused() -> None:
    with pytest.raises(ValueError):
        Dsr({}, FlowTable(1), lambda f, h: None, "nat")


# -- mac


def test_mac_leaves_the_packet_alone_and_returns_the_mark() -> None:
    env = Env(Rewrite.MAC)
    (cport,) = ports_for("web2")
    for flags, t in (("S", 0.0), ("A", 0.1), ("PA", 0.2)):
        raw = packet(cport, flags, 1, 1, b"data" if flags == "PA" else b"")
        original = bytes(raw)
        assert env.dsr.ingress(raw, t) == (ACCEPT, MARKS["web2"])
        assert bytes(raw) == original
    c = env.dsr.counters
    assert (c.accepted, c.rewrites, c.bytes_tx) == (3, 0, 4)
    assert env.opened[0].fwmark == MARKS["web2"] and env.opened[0].state == FlowState.ESTABLISHED


def test_mac_server_without_mark_is_dropped() -> None:
    env = Env(Rewrite.MAC, marks={"web1": 0x101})
    (cport,) = ports_for("web2")
    assert env.dsr.ingress(packet(cport, "S", 1), 0.0) == (DROP, 0)
    assert env.dsr.counters.no_mark == 1 and len(env.flows) == 0


def test_mac_pinned_flow_keeps_its_mark_after_a_restart_by_hash() -> None:
    (cport,) = ports_for("web1")
    env = Env(Rewrite.MAC)
    assert env.dsr.ingress(packet(cport, "A", 5, 5), 0.0) == (ACCEPT, MARKS["web1"])
    assert env.dsr.counters.rescheduled == 1


# -- properties


def _mutate(raw: bytearray, rng: random.Random) -> bytearray:
    out = bytearray(raw)
    for _ in range(rng.randint(1, 4)):
        kind = rng.randrange(4)
        if kind == 0 and out:
            out[rng.randrange(len(out))] = rng.randrange(256)
        elif kind == 1 and out:
            out[rng.randrange(min(len(out), 40))] ^= 1 << rng.randrange(8)
        elif kind == 2:
            del out[rng.randrange(len(out) + 1) :]
        else:
            out += bytes(rng.randrange(256) for _ in range(rng.randint(1, 8)))
    return out


@settings(max_examples=300, deadline=None)
@given(
    st.integers(0, 2**32 - 1), st.sampled_from(list(Rewrite)), st.sampled_from(["A", "PA", "S", "FA", "R"])
)
def test_mutated_packets_never_raise_and_fast_path_equals_full_path(
    seed: int, flavour: Rewrite, flags: str
) -> None:
    rng = random.Random(seed)
    fast, full = Env(flavour), Env(flavour)
    for env in (fast, full):
        env.dsr.ingress(packet(40001, "S", 1), 0.0)
        env.dsr.ingress(packet(40001, "A", 2, 2), 0.0)
    raw = packet(40001, flags, 2, 2, rng.randbytes(rng.randrange(60)))
    mutated = _mutate(raw, rng) if rng.random() < 0.8 else raw
    a, b = bytearray(mutated), bytearray(mutated)
    assert fast.dsr.ingress(a, 1.0) == full.dsr._full(b, 1.0)
    assert a == b
    assert fast.dsr.counters == full.dsr.counters and fast.dsr.counters.errors == 0
    assert fast.dsr.rst_out == full.dsr.rst_out


@settings(max_examples=200)
@given(st.binary(max_size=100), st.sampled_from(list(Rewrite)))
def test_random_bytes_never_raise(data: bytes, flavour: Rewrite) -> None:
    env = Env(flavour)
    verdict, mark = env.dsr.ingress(bytearray(data), 0.0)
    assert verdict in (ACCEPT, DROP) and isinstance(mark, int)
    assert env.dsr.counters.errors == 0
