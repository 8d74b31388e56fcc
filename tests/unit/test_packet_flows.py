"""The flow table: keys both ways, precomputed rewrites, lifecycle, idle expiry, linger, capacity."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP

from convey.packet.checksum import delta
from convey.packet.flows import Flow, FlowState, FlowTable, Rewrite, new_passthrough_flow
from convey.packet.ipv4 import addr_to_bytes, flow_key, rewrite

CLIENT = addr_to_bytes("198.51.100.7")
VIP = addr_to_bytes("198.18.0.10")
LB = addr_to_bytes("10.0.0.1")
SERVER = addr_to_bytes("10.0.1.11")


def make_flow(cport: int = 40001, eport: int = 33768, now: float = 0.0, server: str = "web1") -> Flow:
    return new_passthrough_flow("front", CLIENT, cport, VIP, 80, server, SERVER, 8080, LB, eport, now)


def test_flow_keys_and_rewrites_are_precomputed() -> None:
    flow = make_flow()
    assert flow.fwd_key == CLIENT + VIP + (40001).to_bytes(2, "big") + (80).to_bytes(2, "big")
    assert flow.ret_key == SERVER + LB + (8080).to_bytes(2, "big") + (33768).to_bytes(2, "big")
    assert flow.fwd.head == flow_key(LB, SERVER, 33768, 8080)
    assert flow.ret.head == flow_key(VIP, CLIENT, 80, 40001)
    assert flow.fwd.addrs + flow.fwd.ports == flow.fwd.head
    assert flow.fwd.ip_delta == delta(CLIENT + VIP, LB + SERVER)
    assert flow.fwd.tcp_delta == delta(flow.fwd_key, flow.fwd.head)
    # ``created`` is gone (issue 10, defect 7: nothing read it, and it cost a float per flow)
    assert (flow.state, flow.last_seen) == (FlowState.EMBRYONIC, 0.0)


def test_rewrites_round_trip_a_packet() -> None:
    flow = make_flow()
    raw = bytearray(bytes(IP(src="198.51.100.7", dst="198.18.0.10") / TCP(sport=40001, dport=80) / b"abc"))
    original = bytes(raw)
    rw = flow.fwd
    rewrite(raw, 20, rw.addrs, rw.ports, rw.ip_delta, rw.tcp_delta)
    pkt = IP(bytes(raw))
    assert (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport) == ("10.0.0.1", "10.0.1.11", 33768, 8080)
    back = Rewrite.between(flow.fwd.head, flow.fwd_key)
    rewrite(raw, 20, back.addrs, back.ports, back.ip_delta, back.tcp_delta)
    assert bytes(raw) == original


def test_add_lookup_both_ways_and_remove() -> None:
    table = FlowTable(10)
    flow = make_flow()
    assert table.add(flow)
    assert table.forward[flow.fwd_key] is flow and table.reverse[flow.ret_key] is flow
    assert len(table) == 1 and list(table) == [flow]
    assert table.per_server() == {"web1": 1} and table.count_for("web1") == 1
    assert table.local_in_use(LB, 33768) and not table.local_in_use(LB, 33769)
    assert not table.add(flow), "same forward key"
    table.remove(flow)
    table.remove(flow)  # no-op
    assert len(table) == 0 and not table.reverse and table.per_server() == {}
    assert not table.local_in_use(LB, 33768)


def test_return_key_conflict_is_refused() -> None:
    table = FlowTable(10)
    assert table.add(make_flow(cport=1))
    assert not table.add(make_flow(cport=2))  # same server, LB addr and eport
    assert len(table) == 1


def test_local_in_use_counts_flows_sharing_an_eport() -> None:
    table = FlowTable(10)
    a = make_flow(cport=1)
    b = new_passthrough_flow(
        "front", CLIENT, 2, VIP, 80, "web2", addr_to_bytes("10.0.1.12"), 8080, LB, 33768, 0
    )
    assert table.add(a) and table.add(b)
    table.remove(a)
    assert table.local_in_use(LB, 33768)
    table.remove(b)
    assert not table.local_in_use(LB, 33768)


def test_capacity() -> None:
    table = FlowTable(2)
    assert table.add(make_flow(1, 1)) and table.add(make_flow(2, 2))
    assert table.full
    assert not table.add(make_flow(3, 3))
    assert len(table) == 2


def test_embryonic_flow_expires_after_syn_timeout() -> None:
    table = FlowTable(10, syn_timeout=10.0, idle_timeout=300.0, linger=2.0)
    flow = make_flow(now=100.0)
    table.add(flow)
    assert table.expire(109.9) == []
    assert table.expire(110.0) == [flow]
    assert len(table) == 0 and not flow.in_table


def test_established_flow_expires_after_idle_timeout_from_last_packet() -> None:
    table = FlowTable(10, syn_timeout=10.0, idle_timeout=300.0)
    flow = make_flow(now=0.0)
    table.add(flow)
    table.establish(flow)
    flow.last_seen = 5.0
    assert table.expire(20.0) == []  # past the SYN timeout, but established
    flow.last_seen = 250.0
    assert table.expire(305.0) == []
    assert table.deadline(flow) == 550.0
    assert table.expire(549.0) == []
    assert table.expire(550.0) == [flow]


def test_close_lingers_then_expires_and_packets_extend_the_linger() -> None:
    table = FlowTable(10, linger=2.0)
    flow = make_flow(now=0.0)
    table.add(flow)
    table.establish(flow)
    table.close(flow, 50.0)
    assert flow.state == FlowState.CLOSING and flow.last_seen == 50.0
    table.close(flow, 51.0)  # already closing: nothing changes
    assert table.expire(51.9) == []
    flow.last_seen = 51.5  # a retransmitted final ACK
    assert table.expire(52.0) == []
    assert table.expire(53.5) == [flow]


def test_establish_only_from_embryonic() -> None:
    table = FlowTable(10)
    flow = make_flow()
    table.add(flow)
    table.close(flow, 1.0)
    table.establish(flow)
    assert flow.state == FlowState.CLOSING


def test_expire_is_cheap_when_nothing_is_due() -> None:
    table = FlowTable(100_000)
    for i in range(1000):
        table.add(make_flow(cport=i, eport=i + 1))
    buckets_before = {k: list(v) for k, v in table._buckets.items()}
    assert table.expire(5.0) == []
    assert table._buckets == buckets_before


def test_heap_stays_bounded_under_churn() -> None:
    table = FlowTable(100_000, syn_timeout=10.0, idle_timeout=300.0, linger=2.0)
    now = 0.0
    for i in range(20_000):
        flow = make_flow(cport=i % 60000 + 1, eport=i % 60000 + 1, now=now)
        if flow.fwd_key in table.forward:
            continue
        table.add(flow)
        table.establish(flow)
        table.close(flow, now)
        now += 0.001
        table.expire(now)
    assert table.entries <= 2 * len(table) + 1025
    assert sum(map(len, table._buckets.values())) == table.entries


def test_removed_flows_are_not_expired_again() -> None:
    table = FlowTable(10)
    flow = make_flow()
    table.add(flow)
    table.close(flow, 0.0)
    table.remove(flow)
    assert table.expire(1000.0) == []


@settings(max_examples=100, deadline=None)
@given(
    st.lists(
        st.tuples(
            st.sampled_from(["new", "packet", "establish", "close", "expire"]),
            st.integers(0, 7),
            st.floats(0.0, 4.0),
        ),
        max_size=80,
    )
)
def test_flows_expire_exactly_when_their_deadline_passes(ops: list[tuple[str, int, float]]) -> None:
    table = FlowTable(8, syn_timeout=3.0, idle_timeout=6.0, linger=1.0)
    live: dict[int, Flow] = {}
    now = 0.0
    for op, which, step in ops:
        now += step
        flow = live.get(which)
        if op == "new" and flow is None:
            flow = make_flow(cport=which + 1, eport=which + 1, now=now)
            assert table.add(flow)
            live[which] = flow
        elif op == "packet" and flow is not None and table.deadline(flow) > now:
            flow.last_seen = now
        elif op == "establish" and flow is not None:
            table.establish(flow)
        elif op == "close" and flow is not None and table.deadline(flow) > now:
            table.close(flow, now)
        elif op == "expire":
            due = {k for k, f in live.items() if table.deadline(f) <= now}
            expired = table.expire(now)
            assert {f.client_port - 1 for f in expired} == due
            for k in due:
                del live[k]
            assert all(f.in_table for f in live.values())
    assert len(table) == len(live)
