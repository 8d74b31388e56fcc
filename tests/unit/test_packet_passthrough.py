"""Passthrough (full NAT) decisions at the byte level: packets built and checked with scapy."""

from __future__ import annotations

import random

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert

from convey.packet.flows import Flow, FlowState, FlowTable
from convey.packet.ipv4 import addr_to_bytes, bytes_to_addr
from convey.packet.passthrough import RST_QUEUE_LIMIT, Passthrough, Verdict
from convey.packet.ports import PortAllocator
from tests.unit.scapy_packets import check, tcp_packet, tuple_of

CLIENT = "198.51.100.7"
CLIENT2 = "198.51.100.8"
VIP = "198.18.0.10"
LB = "10.0.0.1"
S1 = "10.0.1.11"
S2 = "10.0.1.12"
SERVERS = {"web1": (addr_to_bytes(S1), 8080), "web2": (addr_to_bytes(S2), 8080)}
EPORT = 33768

ACCEPT = Verdict.ACCEPT
DROP = Verdict.DROP


def packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
    ip_options: list[object] | None = None,
) -> bytearray:
    return tcp_packet(src, dst, sport, dport, flags, seq, ack, payload, ip_options)


class Env:
    """A Passthrough with one VIP (VIP:80 -> "front"), one LB address and a chooser over ``healthy``."""

    def __init__(
        self,
        capacity: int = 100,
        healthy: tuple[str, ...] = ("web1",),
        lo: int = EPORT,
        hi: int = 61000,
        reuse_delay: float = 60.0,
        rst_unknown: bool = True,
    ) -> None:
        self.healthy = list(healthy)
        self.ports = PortAllocator(lo, hi, [addr_to_bytes(LB)], reuse_delay, start=lambda n: 0)
        self.flows = FlowTable(capacity, syn_timeout=10.0, idle_timeout=300.0, linger=2.0)
        self.opened: list[Flow] = []
        self.closed: list[Flow] = []
        self.hashes: list[int] = []
        self.pt = Passthrough(
            {(addr_to_bytes(VIP), 80): "front"},
            [addr_to_bytes(LB)],
            self.ports,
            self.flows,
            self.choose,
            rst_unknown=rst_unknown,
            on_flow_open=self.opened.append,
            on_flow_close=self.closed.append,
        )

    def choose(self, frontend: str, flow_hash: int) -> tuple[str, bytes, int] | None:
        assert frontend == "front"
        self.hashes.append(flow_hash)
        if not self.healthy:
            return None
        server = self.healthy[flow_hash % len(self.healthy)]
        return (server, *SERVERS[server])

    def connect(self, cport: int = 40001, now: float = 1.0) -> Flow:
        """SYN and SYN-ACK through the balancer; returns the established flow."""
        assert self.pt.ingress(packet(CLIENT, VIP, cport, 80, "S", 1000), now) == ACCEPT
        flow = self.flows.forward[bytes(packet(CLIENT, VIP, cport, 80, "S")[12:24])]
        server = "10.0.1.11" if flow.server_id == "web1" else "10.0.1.12"
        synack = packet(server, LB, 8080, flow.eport, "SA", 5000, 1001)
        assert self.pt.ret(synack, now) == ACCEPT
        return flow


def test_full_tcp_exchange_through_the_balancer() -> None:
    env = Env()
    pt = env.pt

    syn = packet(CLIENT, VIP, 40001, 80, "S", seq=1000)
    assert pt.ingress(syn, 1.0) == ACCEPT
    pkt = check(syn)
    assert tuple_of(pkt) == (LB, S1, EPORT, 8080)
    assert (pkt[TCP].seq, str(pkt[TCP].flags)) == (1000, "S")
    assert len(env.opened) == 1
    flow = env.opened[0]
    assert (flow.server_id, flow.eport, flow.state) == ("web1", EPORT, FlowState.EMBRYONIC)

    synack = packet(S1, LB, 8080, EPORT, "SA", seq=5000, ack=1001)
    assert pt.ret(synack, 1.001) == ACCEPT
    pkt = check(synack)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40001)
    assert (pkt[TCP].seq, pkt[TCP].ack, str(pkt[TCP].flags)) == (5000, 1001, "SA")
    assert flow.state == FlowState.ESTABLISHED

    ack = packet(CLIENT, VIP, 40001, 80, "A", 1001, 5001)
    assert pt.ingress(ack, 1.002) == ACCEPT
    assert tuple_of(check(ack)) == (LB, S1, EPORT, 8080)

    request = packet(CLIENT, VIP, 40001, 80, "PA", 1001, 5001, b"G" * 100)
    assert pt.ingress(request, 1.003) == ACCEPT
    pkt = check(request)
    assert tuple_of(pkt) == (LB, S1, EPORT, 8080)
    assert bytes(pkt[TCP].payload) == b"G" * 100

    response = packet(S1, LB, 8080, EPORT, "PA", 5001, 1101, b"R" * 500)
    assert pt.ret(response, 1.004) == ACCEPT
    pkt = check(response)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40001)
    assert bytes(pkt[TCP].payload) == b"R" * 500

    fin = packet(CLIENT, VIP, 40001, 80, "FA", 1101, 5501)
    assert pt.ingress(fin, 1.005) == ACCEPT
    assert str(check(fin)[TCP].flags) == "FA"
    assert flow.fin_fwd and flow.state == FlowState.ESTABLISHED

    fin_back = packet(S1, LB, 8080, EPORT, "FA", 5501, 1102)
    assert pt.ret(fin_back, 1.006) == ACCEPT
    assert tuple_of(check(fin_back)) == (VIP, CLIENT, 80, 40001)
    assert flow.state == FlowState.CLOSING

    last_ack = packet(CLIENT, VIP, 40001, 80, "A", 1102, 5502)
    assert pt.ingress(last_ack, 1.007) == ACCEPT
    assert tuple_of(check(last_ack)) == (LB, S1, EPORT, 8080)
    # the final ACK retransmitted during the linger still passes
    again = packet(CLIENT, VIP, 40001, 80, "A", 1102, 5502)
    assert pt.ingress(again, 2.0) == ACCEPT

    pt.expire(3.9)
    assert len(env.flows) == 1 and env.ports.in_use == 1
    pt.expire(4.0)
    assert len(env.flows) == 0 and env.closed == [flow]
    assert env.ports.in_use == 0 and not env.ports.is_used(addr_to_bytes(LB), addr_to_bytes(S1), 8080, EPORT)

    c = pt.counters
    assert (c.ingress_accepted, c.return_accepted, c.rewrites) == (6, 3, 9)
    assert (c.bytes_tx, c.bytes_rx) == (100, 500)
    assert (c.flows_opened, c.flows_closed) == (1, 1)
    assert (flow.fwd_packets, flow.ret_packets, flow.fwd_bytes, flow.ret_bytes) == (6, 3, 100, 500)
    assert c.ingress_dropped == c.return_dropped == c.errors == 0
    assert pt.rst_out == []
    assert c.as_dict()["rewrites"] == 9

    # the port cools down: the next flow to the same server gets a fresh one
    assert pt.ingress(packet(CLIENT, VIP, 40002, 80, "S", 1), 5.0) == ACCEPT
    assert env.opened[-1].eport == EPORT + 1


def test_flow_hash_is_over_the_client_tuple() -> None:
    from convey.balancing.schedulers import flow_hash

    env = Env()
    env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0)
    expected = flow_hash(int.from_bytes(addr_to_bytes(CLIENT), "big"), 40001, 0xC612000A, 80)
    assert env.hashes == [expected]


def test_no_server_refuses_with_a_reset() -> None:
    env = Env(healthy=())
    syn = packet(CLIENT, VIP, 40001, 80, "S", seq=1000, payload=b"tfo")
    original = bytes(syn)
    assert env.pt.ingress(syn, 0.0) == DROP
    assert bytes(syn) == original
    assert env.pt.counters.no_server == 1 and env.pt.counters.ingress_dropped == 1
    assert env.pt.refused == {next(iter(env.pt.vips.values())): 1}
    (rst,) = env.pt.rst_out
    pkt = check(rst)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40001)
    assert (str(pkt[TCP].flags), pkt[TCP].seq, pkt[TCP].ack) == ("RA", 0, 1004)
    assert len(env.flows) == 0 and env.ports.in_use == 0


def test_full_table_refuses_with_a_reset() -> None:
    env = Env(capacity=1)
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0) == ACCEPT
    assert env.pt.ingress(packet(CLIENT, VIP, 40002, 80, "S", 77), 0.0) == DROP
    assert env.pt.counters.table_full == 1
    (rst,) = env.pt.rst_out
    pkt = check(rst)
    assert (tuple_of(pkt), pkt[TCP].ack) == ((VIP, CLIENT, 80, 40002), 78)
    assert env.ports.in_use == 1


def test_no_free_port_refuses_with_a_reset() -> None:
    env = Env(lo=EPORT, hi=EPORT)
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0) == ACCEPT
    assert env.pt.ingress(packet(CLIENT, VIP, 40002, 80, "S", 1), 0.0) == DROP
    assert env.pt.counters.no_port == 1 and len(env.pt.rst_out) == 1
    assert len(env.flows) == 1


def test_unknown_flow_is_dropped_and_reset() -> None:
    env = Env()
    ack = packet(CLIENT, VIP, 40001, 80, "PA", 1000, 4242, b"late")
    assert env.pt.ingress(ack, 0.0) == DROP
    assert env.pt.counters.unknown_flow == 1
    (rst,) = env.pt.rst_out
    pkt = check(rst)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40001)
    assert (str(pkt[TCP].flags), pkt[TCP].seq) == ("R", 4242)
    # never answer a reset, and never open a flow for a SYN with ACK, RST or FIN
    for flags in ("R", "RA", "SA", "SF", "SR"):
        assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, flags, 1, 1), 0.0) == DROP
    assert len(env.flows) == 0
    assert len(env.pt.rst_out) == 1 + 2  # SA and SF are answered; R, RA and SR (a reset) are not


def test_unknown_flow_reset_can_be_turned_off() -> None:
    env = Env(rst_unknown=False)
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "A", 1, 1), 0.0) == DROP
    assert env.pt.rst_out == [] and env.pt.counters.unknown_flow == 1


def test_not_a_vip_is_dropped_without_reset() -> None:
    env = Env()
    assert env.pt.ingress(packet(CLIENT, "198.18.0.99", 40001, 80, "S", 1), 0.0) == DROP
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 81, "S", 1), 0.0) == DROP
    assert env.pt.counters.not_vip == 2 and env.pt.rst_out == []


def test_wrong_server_and_unknown_return_are_dropped() -> None:
    env = Env()
    env.connect()
    for raw in (packet(S2, LB, 8080, EPORT, "A", 1, 1), packet(S1, LB, 9999, EPORT, "A", 1, 1)):
        original = bytes(raw)
        assert env.pt.ret(raw, 2.0) == DROP
        assert bytes(raw) == original
    assert env.pt.counters.wrong_server == 2
    assert env.pt.ret(packet(S1, LB, 8080, EPORT + 7, "A", 1, 1), 2.0) == DROP
    assert env.pt.ret(packet(S1, "10.0.0.2", 8080, EPORT, "A", 1, 1), 2.0) == DROP
    assert env.pt.counters.unknown_return == 2
    assert env.pt.counters.return_dropped == 4 and env.pt.rst_out == []


def test_retransmitted_syn_goes_to_the_same_server() -> None:
    env = Env(healthy=("web1", "web2"))
    first = packet(CLIENT, VIP, 40001, 80, "S", 1000)
    env.pt.ingress(first, 0.0)
    env.healthy.reverse()  # the pool changes: a new choice would differ
    again = packet(CLIENT, VIP, 40001, 80, "S", 1000)
    assert env.pt.ingress(again, 1.0) == ACCEPT
    assert bytes(first) == bytes(again)
    assert env.pt.counters.flows_opened == 1 and len(env.hashes) == 1


def test_flows_to_a_removed_server_continue() -> None:
    env = Env()
    env.connect()
    env.healthy.clear()
    data = packet(CLIENT, VIP, 40001, 80, "PA", 1001, 5001, b"x")
    assert env.pt.ingress(data, 2.0) == ACCEPT
    assert tuple_of(check(data)) == (LB, S1, EPORT, 8080)


def test_reset_closes_the_flow_after_the_linger() -> None:
    env = Env()
    flow = env.connect()
    rst = packet(S1, LB, 8080, EPORT, "R", 5001)
    assert env.pt.ret(rst, 10.0) == ACCEPT
    assert tuple_of(check(rst)) == (VIP, CLIENT, 80, 40001)
    assert flow.state == FlowState.CLOSING
    env.pt.expire(11.9)
    assert len(env.flows) == 1
    env.pt.expire(12.0)
    assert len(env.flows) == 0 and env.ports.in_use == 0 and env.closed == [flow]


def test_client_reset_closes_too() -> None:
    env = Env()
    flow = env.connect()
    rst = packet(CLIENT, VIP, 40001, 80, "RA", 1001, 5001)
    assert env.pt.ingress(rst, 3.0) == ACCEPT
    assert tuple_of(check(rst)) == (LB, S1, EPORT, 8080)
    assert flow.state == FlowState.CLOSING


def test_syn_on_a_closing_flow_starts_a_new_flow() -> None:
    env = Env(healthy=("web1", "web2"))
    old = env.connect()
    env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "FA", 1001, 5001), 2.0)
    env.pt.ret(packet(S1, LB, 8080, EPORT, "FA", 5001, 1002), 2.0)  # closed by FINs both ways
    syn = packet(CLIENT, VIP, 40001, 80, "S", 9000)
    assert env.pt.ingress(syn, 2.5) == ACCEPT
    assert env.closed == [old] and len(env.opened) == 2
    new = env.opened[1]
    assert new is not old and new.eport != old.eport
    assert check(syn)[TCP].sport == new.eport
    assert env.ports.in_use == 1 and len(env.flows) == 1


def test_embryonic_flow_expires_when_the_server_never_answers() -> None:
    env = Env()
    env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0)
    env.pt.expire(9.9)
    assert len(env.flows) == 1
    env.pt.expire(10.0)
    assert len(env.flows) == 0 and env.ports.in_use == 0 and env.pt.counters.flows_closed == 1


def test_ip_options_are_accepted_rewritten_and_counted() -> None:
    env = Env()
    opts = [IPOption_Router_Alert()]
    syn = packet(CLIENT, VIP, 40001, 80, "S", 1000, ip_options=opts)
    assert env.pt.ingress(syn, 0.0) == ACCEPT
    pkt = check(syn)
    assert tuple_of(pkt) == (LB, S1, EPORT, 8080) and pkt.ihl == 6
    data = packet(S1, LB, 8080, EPORT, "PA", 1, 1, b"abc", ip_options=opts)
    assert env.pt.ret(data, 0.0) == ACCEPT
    pkt = check(data)
    assert tuple_of(pkt) == (VIP, CLIENT, 80, 40001) and bytes(pkt[TCP].payload) == b"abc"
    assert env.pt.counters.ip_options == 2 and env.pt.counters.bytes_rx == 3


def test_fragments_and_cut_copies_are_dropped_and_counted() -> None:
    env = Env()
    env.connect()
    frag = bytearray(
        bytes(IP(src=CLIENT, dst=VIP, flags="MF") / TCP(sport=40001, dport=80, flags="A") / b"x")
    )
    assert env.pt.ingress(frag, 2.0) == DROP
    big = packet(CLIENT, VIP, 40001, 80, "PA", 1001, 5001, b"z" * 5000)[:4016]
    assert env.pt.ingress(big, 2.0) == DROP
    assert env.pt.ret(bytearray(b"\x45\x00"), 2.0) == DROP
    c = env.pt.counters
    assert (c.fragment, c.too_long, c.malformed, c.errors) == (1, 1, 1, 0)
    assert env.pt.parse_errors[next(k for k in env.pt.parse_errors if k.name == "TRUNCATED")] == 1


def test_unexpected_exceptions_count_as_errors_and_drop() -> None:
    env = Env()

    def broken(frontend: str, flow_hash: int) -> tuple[str, bytes, int] | None:
        raise RuntimeError("bug")

    env.pt.choose = broken
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0) == DROP
    assert env.pt.counters.errors == 1 and env.pt.counters.ingress_dropped == 1


def test_callback_failures_do_not_break_the_path() -> None:
    env = Env()

    def boom(flow: Flow) -> None:
        raise RuntimeError("stats bug")

    env.pt.on_flow_open = boom
    env.pt.on_flow_close = boom
    assert env.pt.ingress(packet(CLIENT, VIP, 40001, 80, "S", 1), 0.0) == ACCEPT
    env.pt.expire(100.0)
    # not a packet's verdict: counted apart from ``errors`` (a drop reason)
    assert env.pt.counters.callback_errors == 2 and env.ports.in_use == 0
    assert env.pt.counters.errors == 0


def test_reset_queue_is_bounded() -> None:
    env = Env(healthy=())
    for i in range(RST_QUEUE_LIMIT + 5):
        env.pt.ingress(packet(CLIENT, VIP, 1024 + i, 80, "S", 1), 0.0)
    assert len(env.pt.rst_out) == RST_QUEUE_LIMIT
    assert env.pt.counters.rst_queued == RST_QUEUE_LIMIT and env.pt.counters.rst_overflow == 5
    env.pt.rst_out.clear()
    env.pt.ingress(packet(CLIENT, VIP, 999, 80, "S", 1), 0.0)
    assert len(env.pt.rst_out) == 1


def test_constructor_checks_source_addresses() -> None:
    ports = PortAllocator(source_addrs=[addr_to_bytes("10.9.9.9")])
    with pytest.raises(ValueError):
        Passthrough({}, [addr_to_bytes(LB)], ports, FlowTable(1), lambda f, h: None)


# -- properties


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=100), st.booleans())
def test_random_bytes_never_raise(data: bytes, ingress: bool) -> None:
    env = Env()
    env.connect()
    buf = bytearray(data)
    verdict = env.pt.ingress(buf, 2.0) if ingress else env.pt.ret(buf, 2.0)
    assert verdict in (ACCEPT, DROP)
    assert env.pt.counters.errors == 0


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


def _established_pair() -> tuple[Env, Env]:
    pair = (Env(healthy=("web1", "web2")), Env(healthy=("web1", "web2")))
    for env in pair:
        env.connect(40001)
        env.connect(40002)
    return pair


@settings(max_examples=400, deadline=None)
@given(st.integers(0, 2**32 - 1), st.sampled_from(["A", "PA", "S", "FA", "R"]), st.booleans())
def test_mutated_packets_never_raise_and_fast_path_equals_full_path(
    seed: int, flags: str, ingress: bool
) -> None:
    rng = random.Random(seed)
    fast, full = _established_pair()
    flow = fast.flows.forward[bytes(packet(CLIENT, VIP, 40001, 80, "S")[12:24])]
    payload = rng.randbytes(rng.randrange(60))
    if ingress:
        raw = packet(CLIENT, VIP, 40001, 80, flags, 1001, 5001, payload)
    else:
        raw = packet(bytes_to_addr(flow.server_addr), LB, 8080, flow.eport, flags, 5001, 1001, payload)
    mutated = _mutate(raw, rng) if rng.random() < 0.8 else raw
    a, b = bytearray(mutated), bytearray(mutated)
    if ingress:
        va = fast.pt.ingress(a, 3.0)
        vb = full.pt._ingress_full(b, 3.0)
    else:
        va = fast.pt.ret(a, 3.0)
        vb = full.pt._ret_full(b, 3.0)
    assert va == vb
    assert a == b
    assert fast.pt.counters == full.pt.counters
    assert fast.pt.rst_out == full.pt.rst_out
    assert fast.pt.counters.errors == 0
    assert [(f.state, f.last_seen, f.fwd_packets, f.ret_packets) for f in fast.flows] == [
        (f.state, f.last_seen, f.fwd_packets, f.ret_packets) for f in full.flows
    ]


@settings(max_examples=100, deadline=None)
@given(st.binary(max_size=1400), st.sampled_from(["A", "PA", "FA", "RA", "AU"]), st.booleans())
def test_established_packets_are_rewritten_with_valid_checksums(
    payload: bytes, flags: str, ingress: bool
) -> None:
    env = Env()
    env.connect()
    if ingress:
        raw = packet(CLIENT, VIP, 40001, 80, flags, 1001, 5001, payload)
        assert env.pt.ingress(raw, 2.0) == ACCEPT
        expected = (LB, S1, EPORT, 8080)
    else:
        raw = packet(S1, LB, 8080, EPORT, flags, 5001, 1001, payload)
        assert env.pt.ret(raw, 2.0) == ACCEPT
        expected = (VIP, CLIENT, 80, 40001)
    pkt = check(raw)
    assert tuple_of(pkt) == expected
    assert bytes(pkt[TCP].payload) == payload and str(pkt[TCP].flags) == flags
