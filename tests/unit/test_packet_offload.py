"""The offload first-packet decision (packets built and checked with scapy) and the conntrack accounting."""

from __future__ import annotations

import socket
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_Router_Alert

from convey import stats as stats_mod
from convey.balancing.pool import Pool
from convey.config import Address, BackendConfig, ServerConfig
from convey.dataplane.conntrack_records import Accounted, Closed, Opened
from convey.dataplane.offload_accounting import OffloadAccounting
from convey.modes import Mode
from convey.packet.ipv4 import addr_to_bytes
from convey.packet.offload import OffloadDecision, syn_timestamps
from convey.packet.passthrough import RST_QUEUE_LIMIT
from tests.unit.scapy_packets import check, tcp_packet

CLIENT = "198.51.100.7"
VIP = "198.18.0.10"
S1 = "10.0.1.11"
MARKS = {"b/web1": 0x100, "b/web2": 0x200}


class Env:
    def __init__(self, healthy: tuple[str, ...] = ("b/web1",), full: bool = False) -> None:
        self.healthy = list(healthy)
        self.is_full = full
        self.hashes: list[int] = []
        self.d = OffloadDecision(
            {(addr_to_bytes(VIP), 80): "front"}, self.choose, self.mark_of, lambda: self.is_full
        )

    def choose(self, frontend: str, flow_hash: int) -> tuple[str, bytes, int] | None:
        assert frontend == "front"
        self.hashes.append(flow_hash)
        if not self.healthy:
            return None
        return (self.healthy[flow_hash % len(self.healthy)], addr_to_bytes(S1), 8080)

    def mark_of(self, server_id: str, flow_hash: int) -> int | None:
        return MARKS.get(server_id)


def syn(
    sport: int = 40000,
    dst: str = VIP,
    flags: str = "S",
    options: list[tuple[str, object]] | None = None,
    ip_options: list[object] | None = None,
) -> bytes:
    return bytes(tcp_packet(CLIENT, dst, sport, 80, flags, 1000, 0, b"", ip_options, options))


def test_a_syn_gets_its_servers_mark_and_is_counted() -> None:
    env = Env()
    assert env.d.decide(syn(), 0.0) == 0x100
    c = env.d.counters
    assert (c.ingress_accepted, c.flows_opened, c.ingress_dropped) == (1, 1, 0)
    assert env.d.rst_out == [] and env.d.refused == {}


def test_the_flow_hash_is_the_client_tuples() -> None:
    env = Env(healthy=("b/web1", "b/web2"))
    marks = {env.d.decide(syn(sport), 0.0) for sport in range(40000, 40020)}
    assert marks == {0x100, 0x200}
    again = Env(healthy=("b/web1", "b/web2"))
    for sport in range(40000, 40020):
        again.d.decide(syn(sport), 0.0)
    assert again.hashes == env.hashes  # the same tuple, the same hash


def test_no_server_and_a_full_table_refuse_with_a_reset() -> None:
    for env, reason in ((Env(healthy=()), "no_server"), (Env(full=True), "table_full")):
        assert env.d.decide(syn(), 0.0) is None
        c = env.d.counters.as_dict()
        assert c[reason] == 1 and c["ingress_dropped"] == 1 and c["rst_queued"] == 1
        assert env.d.refused == {"front": 1}
        (rst,) = env.d.rst_out
        pkt = check(rst)
        assert (pkt[IP].src, pkt[IP].dst, pkt[TCP].sport, pkt[TCP].dport) == (VIP, CLIENT, 80, 40000)
        assert pkt[TCP].flags == "RA" and pkt[TCP].ack == 1001


def test_a_server_without_a_mark_is_refused_as_no_port() -> None:
    env = Env(healthy=("b/gone",))
    assert env.d.decide(syn(), 0.0) is None
    assert env.d.counters.no_port == 1 and env.d.refused == {"front": 1} and len(env.d.rst_out) == 1


def test_a_packet_conntrack_could_not_attribute_gets_a_reset() -> None:
    env = Env()
    assert env.d.decide(syn(flags="A"), 0.0) is None
    assert env.d.counters.unknown_flow == 1 and env.d.refused == {}
    (rst,) = env.d.rst_out
    assert check(rst)[TCP].flags == "R"
    env.d.rst_out.clear()
    assert env.d.decide(syn(flags="R"), 0.0) is None  # never a RST for a RST
    assert env.d.rst_out == [] and env.d.counters.unknown_flow == 2


def test_not_a_vip_and_malformed_are_dropped_without_reset() -> None:
    env = Env()
    assert env.d.decide(syn(dst="198.18.0.99"), 0.0) is None
    assert env.d.decide(syn()[:30], 0.0) is None
    c = env.d.counters
    assert (c.not_vip, c.malformed, c.ingress_dropped, c.rst_queued) == (1, 1, 2, 0)
    assert env.d.parse_errors[next(k for k, v in env.d.parse_errors.items() if v)] == 1


def test_header_sizes_come_from_the_syn() -> None:
    env = Env()
    env.d.decide(syn(options=[("MSS", 1460), ("SAckOK", b""), ("Timestamp", (1, 0)), ("WScale", 7)]), 0.0)
    assert env.d.header_sizes == (20, 40, True)
    env.d.decide(syn(options=[("MSS", 1460)], ip_options=[IPOption_Router_Alert()]), 0.0)
    assert env.d.header_sizes == (24, 24, False)
    assert env.d.counters.ip_options == 1


def test_syn_timestamps_walks_the_options() -> None:
    assert not syn_timestamps(bytes(40), 20, 20)
    assert syn_timestamps(syn(options=[("NOP", None), ("Timestamp", (1, 0))]), 20, 32)
    assert not syn_timestamps(syn(options=[("MSS", 1460), ("EOL", None)]), 20, 28)


def test_the_reset_queue_is_bounded() -> None:
    env = Env(healthy=())
    for sport in range(RST_QUEUE_LIMIT + 5):
        env.d.decide(syn(30000 + sport), 0.0)
    assert len(env.d.rst_out) == RST_QUEUE_LIMIT and env.d.counters.rst_overflow == 5


@settings(max_examples=300, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=120))
def test_decide_never_raises_and_counts_every_packet(data: bytes) -> None:
    env = Env()
    env.d.decide(data, 0.0)
    c = env.d.counters
    assert c.ingress_accepted + c.ingress_dropped == 1 and c.errors == 0


# -- accounting ----------------------------------------------------------------------------------------------


def _acc() -> tuple[OffloadAccounting, Pool, stats_mod.Stats, list[str]]:
    backend = BackendConfig(
        "b",
        (ServerConfig("web1", Address(S1, 8080), 1), ServerConfig("web2", Address("10.0.1.12", 8080), 1)),
        scheduler="least_conn",
    )
    pool = Pool(backend, Mode.PASSTHROUGH)
    stats = stats_mod.Stats(mode="passthrough", started=0.0)
    drained: list[str] = []
    acc = OffloadAccounting({"b": pool}, stats, drained.append)
    acc.vips = {(addr_to_bytes(VIP), 80): "front"}
    acc.backend_of = {"front": "b"}
    acc.server_of = {0x100: "b/web1", 0x200: "b/web2"}.get
    return acc, pool, stats, drained


def _key(sport: int) -> bytes:
    return (
        socket.inet_aton(CLIENT) + socket.inet_aton(VIP) + sport.to_bytes(2, "big") + (80).to_bytes(2, "big")
    )


def test_accounting_opens_closes_and_counts_bytes_in_every_scope() -> None:
    acc, pool, stats, _ = _acc()
    acc.apply(
        [Opened(1, 0x100, _key(1), b""), Opened(2, 0x100, _key(2), b""), Opened(2, 0x100, _key(2), b"")]
    )
    assert pool.servers["web1"].active == 2 and len(acc) == 2 and acc.open_on("b/web1") == 2
    assert pool.pick().name == "web2"  # type: ignore[union-attr]  # least_conn sees the kernel's connections
    acc.apply([Accounted(1, 0x100, _key(1), 10, 2000), Closed(1, 0x100, _key(1))])
    acc.apply([Accounted(1, 0x100, _key(1), 0, 52)])  # after the close (the GET, the DESTROY): same scopes
    for scope in (stats.total, stats.frontend("front"), stats.backend("b"), stats.server("b", "web1")):
        assert (scope.total_connections, scope.current_connections) == (2, 1)
        assert (scope.bytes_tx, scope.bytes_rx) == (10, 2052)
    acc.apply([Closed(2, 0x100, _key(2), lost=True), Closed(2, 0x100, _key(2))])
    assert stats.total.current_connections == 0 and pool.servers["web1"].active == 0
    assert acc.section()["lost"] == 1 and acc.servers_in_use() == set()


def test_accounting_ignores_unknown_marks_and_reports_drained_removed_servers() -> None:
    acc, pool, stats, drained = _acc()
    acc.apply([Opened(1, 0x900, _key(1), b""), Opened(2, 0x200, _key(2), b"")])
    assert acc.unknown_mark == 1 and stats.total.current_connections == 1
    pool.update(BackendConfig("b", (ServerConfig("web1", Address(S1, 8080), 1),)))  # web2 removed
    assert pool.find("web2") is not None and pool.find("web2").removed  # type: ignore[union-attr]
    acc.apply([Closed(2, 0x200, _key(2))])
    assert drained == ["b/web2"] and pool.find("web2") is None


def test_accounting_close_all_and_refusals() -> None:
    acc, _, stats, _ = _acc()
    acc.apply([Opened(1, 0x100, _key(1), b"")])
    acc.fold_refused({"front": 3})
    acc.close_all()
    assert stats.total.current_connections == 0 and stats.total.refused == 3
    assert stats.backend("b").refused == 3 and stats.frontend("front").refused == 3


def test_the_ledger_counts_a_new_entry_that_reuses_a_destroyed_entrys_id() -> None:
    """A client reusing its port reopens a TIME_WAIT entry: the kernel destroys it and makes a new one, which
    may get the same id (same slab object, same tuples). The NEW must count as a new connection."""
    from convey.dataplane.conntrack_records import CtKind, CtRecord, Ledger, MarkFilter, TcpState

    ledger = Ledger(ours=MarkFilter(mask=0xFFFFFF))

    def rec(kind: CtKind, state: TcpState | None) -> CtRecord:
        return CtRecord(kind, 7, _key(1), _key(2), 0x100, 0, state)

    kinds = [
        [type(c).__name__ for c in ledger.apply(rec(kind, state))]
        for kind, state in (
            (CtKind.NEW, TcpState.SYN_SENT),
            (CtKind.UPDATE, TcpState.TIME_WAIT),
            (CtKind.DESTROY, None),
            (CtKind.NEW, TcpState.SYN_SENT),  # the reopened connection, same id
            (CtKind.UPDATE, TcpState.TIME_WAIT),
        )
    ]
    assert kinds == [["Opened"], ["Closed"], [], ["Opened"], ["Closed"]]


def test_the_offload_plane_refuses_to_start_on_a_kernel_without_conntrack(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Before anything changes (rules, queue, monitor): the message names what is missing and how to get it."""
    import asyncio

    from convey.config import parse_config
    from convey.dataplane import passthrough_offload_plane as plane_mod
    from convey.dataplane.conntrack_check import Missing, OffloadUnavailable, require
    from convey.engine import build_plane

    def no_conntrack(config: object, mode: object) -> None:
        require([Missing("sysctl net.netfilter.nf_conntrack_acct", "counters", "modprobe nf_conntrack")], "x")

    monkeypatch.setattr(plane_mod, "require_kernel", no_conntrack)
    config = parse_config(
        '[frontends.web]\nlisten_addr = "198.18.0.1:80"\nbackend = "b"\n'
        '[backends.b.servers.s0]\naddr = "198.18.1.2:8080"\n[passthrough]\noffload = true\n'
    )
    stats = stats_mod.Stats(mode="passthrough", started=0.0)
    plane = build_plane(Mode.PASSTHROUGH, {}, stats, {}, offload=True)
    assert isinstance(plane, plane_mod.PassthroughOffloadPlane)
    with pytest.raises(OffloadUnavailable, match=r"nf_conntrack_acct.*modprobe nf_conntrack"):
        asyncio.run(plane.start(config))


def test_accounting_is_on_unless_the_measurement_knob_turns_it_off(monkeypatch: pytest.MonkeyPatch) -> None:
    from convey.dataplane.passthrough_offload_plane import accounting_on

    monkeypatch.delenv("CONVEY_OFFLOAD_ACCOUNTING", raising=False)
    assert accounting_on()
    monkeypatch.setenv("CONVEY_OFFLOAD_ACCOUNTING", "on")
    assert accounting_on()
    monkeypatch.setenv("CONVEY_OFFLOAD_ACCOUNTING", "off")
    assert not accounting_on()


def test_accounting_remembers_the_latest_closes_and_stays_cheap_when_full() -> None:
    """Late bytes find the scopes of the last RECENT_MAX closed connections, the oldest forgotten first; and a
    close costs the same when that memory is full. A plain dict used as the FIFO made each close scan every key
    deleted before the oldest live one: ~40 us per close once full, convey's CPU per connection doubled within
    a minute of load. Compared within this test (no wall-clock limit): closes before the memory fills and
    after it has turned over twice; the old FIFO measured ~15x here."""
    from convey.dataplane.offload_accounting import RECENT_MAX

    acc, _, stats, _ = _acc()
    key = _key(1)

    def block(first: int, count: int) -> float:
        start = time.perf_counter()
        for ct_id in range(first, first + count):
            acc.apply([Opened(ct_id, 0x100, key, b""), Closed(ct_id, 0x100, key)])
        return time.perf_counter() - start

    count = 20000
    before = min(block(1 + i * count, count) for i in range(2))  # the memory is not full yet
    done = 1 + 2 * count
    while done < 2 * RECENT_MAX:
        done += count
        block(done - count, count)
    after = min(block(done + i * count, count) for i in range(2))
    last = done + 2 * count - 1
    assert after < 4 * before, f"a close costs {after / before:.1f}x once the memory of closes is full"
    acc.apply([Accounted(last, 0x100, key, 5, 7), Accounted(last - RECENT_MAX, 0x100, key, 11, 13)])
    assert (stats.total.bytes_tx, stats.total.bytes_rx) == (
        5,
        7,
    )  # the newest close counted, the forgotten not
