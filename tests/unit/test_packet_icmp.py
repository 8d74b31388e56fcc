"""ICMP error translation (convey.packet.icmp): every rewritten checksum checked against a full recompute (the
expected packet is built from scratch by scapy, so byte equality checks every field and checksum), and any
bytes at all give an outcome, never an exception."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import ICMP, IP, TCP, UDP
from scapy.packet import Raw

from convey.packet.checksum import internet_checksum, ip_header_checksum
from convey.packet.flows import FlowState, FlowTable, new_passthrough_flow
from convey.packet.icmp import Outcome, full_nat_lookup, translate
from convey.packet.ipv4 import addr_to_bytes, flow_key
from convey.packet.passthrough import Passthrough
from convey.packet.ports import PortAllocator
from tests.unit.scapy_packets import tcp_packet

CLIENT, VIP, LB, SERVER, ROUTER = "198.51.100.7", "198.18.0.10", "10.0.0.1", "10.0.1.11", "10.0.9.1"
CPORT, VPORT, EPORT, SPORT = 40000, 80, 33768, 8080


def key(src: str, dst: str, sport: int, dport: int) -> bytes:
    return flow_key(addr_to_bytes(src), addr_to_bytes(dst), sport, dport)


# The flow: C:cp -> VIP:vp becomes LB:ep -> S:sp, and S:sp -> LB:ep becomes VIP:vp -> C:cp.
TO_SERVER, TO_CLIENT = key(LB, SERVER, EPORT, SPORT), key(VIP, CLIENT, VPORT, CPORT)
FROM_CLIENT, FROM_SERVER = key(CLIENT, VIP, CPORT, VPORT), key(SERVER, LB, SPORT, EPORT)
MAPPING = {TO_SERVER: FROM_CLIENT, TO_CLIENT: FROM_SERVER}


def lookup(quoted: bytes) -> bytes | None:
    return MAPPING.get(quoted)


def quoted_tcp(src: str, dst: str, sport: int, dport: int, payload: bytes, options: bool = False) -> bytes:
    """The packet an error quotes, with correct checksums (scapy computes them)."""
    ip = IP(src=src, dst=dst, id=7, ttl=63, flags="DF")
    if options:
        ip = IP(src=src, dst=dst, id=7, ttl=63, flags="DF", options=b"\x94\x04\x00\x00")
    return bytes(ip / TCP(sport=sport, dport=dport, flags="PA", seq=1000, ack=2000) / payload)


def icmp_error(src: str, dst: str, quote: bytes, type_: int = 3, code: int = 4, mtu: int = 1280) -> bytearray:
    icmp = ICMP(type=type_, code=code, nexthopmtu=mtu) if type_ == 3 else ICMP(type=type_, code=code)
    return bytearray(bytes(IP(src=src, dst=dst, id=99, ttl=64) / icmp / Raw(quote)))


def assert_checksums(raw: bytes | bytearray) -> None:
    """Full recompute of the outer IPv4 and the ICMP checksum, and of the quoted IPv4 header's."""
    ihl = (raw[0] & 15) * 4
    assert ip_header_checksum(raw[:ihl]) == int.from_bytes(raw[10:12], "big")
    assert internet_checksum(raw[ihl:]) == 0
    q = ihl + 8
    qihl = (raw[q] & 15) * 4
    assert ip_header_checksum(raw[q : q + qihl]) == int.from_bytes(raw[q + 10 : q + 12], "big")


CUTS = [28, 38, 40, 41, 60, 548, None]  # bytes of the quoted packet kept (None: all of it)


def cut(raw: bytes, n: int | None) -> bytes:
    return raw if n is None else raw[:n]


def test_fragmentation_needed_from_the_server_side_goes_to_the_client() -> None:
    for options in (False, True):
        for n in CUTS:
            if options and n == 41:
                continue  # half the quoted TCP checksum: left as it is (below)
            payload = b"x" * 1400
            sent = quoted_tcp(LB, SERVER, EPORT, SPORT, payload, options)
            buf = icmp_error(ROUTER, LB, cut(sent, n))
            assert translate(buf, lookup) == Outcome.TRANSLATED
            # what the client sent, quoted the same way, in an error from the VIP to the client
            expected = icmp_error(
                VIP, CLIENT, cut(quoted_tcp(CLIENT, VIP, CPORT, VPORT, payload, options), n)
            )
            assert buf == expected, (options, n)
            assert_checksums(buf)
            assert IP(bytes(buf))[ICMP].nexthopmtu == 1280


def test_error_from_the_client_side_goes_to_the_server() -> None:
    for type_, code in ((3, 4), (3, 1), (11, 0), (12, 0)):
        for n in CUTS:
            sent = quoted_tcp(VIP, CLIENT, VPORT, CPORT, b"y" * 700)
            buf = icmp_error(ROUTER, VIP, cut(sent, n), type_, code)
            assert translate(buf, lookup) == Outcome.TRANSLATED
            expected = icmp_error(
                LB, SERVER, cut(quoted_tcp(SERVER, LB, SPORT, EPORT, b"y" * 700), n), type_, code
            )
            assert buf == expected, (type_, code, n)
            assert_checksums(buf)


def test_the_balancers_own_error_keeps_working() -> None:
    """The balancer's kernel, forwarding a too-big packet towards the server, sends the error to its own
    address (from it too): translated like a router's."""
    buf = icmp_error(LB, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"z" * 1452)[:548])
    assert translate(buf, lookup) == Outcome.TRANSLATED
    assert IP(bytes(buf)).src == VIP and IP(bytes(buf)).dst == CLIENT
    assert_checksums(buf)


def test_a_full_quote_keeps_a_valid_tcp_checksum() -> None:
    buf = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"abc"))
    assert translate(buf, lookup) == Outcome.TRANSLATED
    inner = IP(bytes(buf)[28:])
    fresh = inner.copy()
    del fresh[TCP].chksum
    assert IP(bytes(fresh))[TCP].chksum == inner[TCP].chksum


def test_half_a_quoted_tcp_checksum_is_left_as_it_is() -> None:
    """A quote cut inside the TCP checksum (no real sender cuts there: RFC 792 asks for 8 bytes, Linux and
    RFC 1812 routers quote up to 576 bytes, and a shorter packet whole): the byte stays, the rest is right."""
    buf = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"x" * 100)[:37])
    assert translate(buf, lookup) == Outcome.TRANSLATED
    expected = icmp_error(VIP, CLIENT, quoted_tcp(CLIENT, VIP, CPORT, VPORT, b"x" * 100)[:36] + buf[-1:])
    assert buf == expected
    assert_checksums(buf)


def test_a_wrong_checksum_stays_wrong() -> None:
    buf = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"abc"))
    buf[22] ^= 0x55  # the ICMP checksum
    assert translate(buf, lookup) == Outcome.TRANSLATED
    assert internet_checksum(buf[20:]) != 0


UNRELATED = {
    "echo request": bytearray(bytes(IP(src=CLIENT, dst=VIP) / ICMP(type=8) / b"ping")),
    "echo reply": bytearray(bytes(IP(src=SERVER, dst=LB) / ICMP(type=0) / b"pong")),
    "redirect": icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b""), 5, 1),
    "source quench": icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b""), 4, 0),
    "no flow": icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT + 1, SPORT, b"")),
    "the forward key itself": icmp_error(ROUTER, CLIENT, quoted_tcp(CLIENT, VIP, CPORT, VPORT, b"")),
    "not to the quoted source": icmp_error(ROUTER, VIP, quoted_tcp(LB, SERVER, EPORT, SPORT, b"")),
    "quotes udp": icmp_error(ROUTER, LB, bytes(IP(src=LB, dst=SERVER) / UDP(sport=EPORT, dport=SPORT))),
    "quotes a later fragment": icmp_error(
        ROUTER, LB, bytes(IP(src=LB, dst=SERVER, frag=100, proto=6) / Raw(b"\x83\xe8\x1f\x90" + b"\0" * 16))
    ),
}


def test_unrelated_icmp_is_left_alone() -> None:
    for name, raw in UNRELATED.items():
        before = bytes(raw)
        assert translate(raw, lookup) == Outcome.UNRELATED, name
        assert bytes(raw) == before, name


def malformed_cases() -> dict[str, bytearray]:
    good = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"abc"))
    cases = {
        "empty": bytearray(),
        "short": good[:19],
        "ipv6": bytearray(b"\x60" + good[1:]),
        "ihl below 5": bytearray(b"\x44" + good[1:]),
        "tcp": bytearray(bytes(IP(src=CLIENT, dst=VIP) / TCP())),
        "cut copy": good[:-1],
        "trailing bytes": good + b"\0",
        "fragment": bytearray(
            bytes(IP(src=ROUTER, dst=LB, flags="MF") / ICMP(type=3, code=4) / (b"\0" * 28))
        ),
        "no icmp header": bytearray(bytes(IP(src=ROUTER, dst=LB, proto=1) / b"\3\4\0")),
        "quote cut in its header": icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"")[:19]),
        "quote without ports": icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"")[:23]),
        "quote not ipv4": icmp_error(ROUTER, LB, b"\x65" + quoted_tcp(LB, SERVER, EPORT, SPORT, b"")[1:]),
        "quote ihl below 5": icmp_error(ROUTER, LB, b"\x43" + quoted_tcp(LB, SERVER, EPORT, SPORT, b"")[1:]),
    }
    return cases


def test_malformed_icmp_is_counted_and_left_alone() -> None:
    for name, raw in malformed_cases().items():
        before = bytes(raw)
        assert translate(raw, lookup) == Outcome.MALFORMED, name
        assert bytes(raw) == before, name


def test_a_lookup_that_raises_or_answers_nonsense_does_not_escape() -> None:
    buf = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"abc"))

    def boom(quoted: bytes) -> bytes | None:
        raise RuntimeError("bug")

    assert translate(buf, boom) == Outcome.MALFORMED
    assert translate(buf, lambda quoted: b"short") == Outcome.UNRELATED


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=120))
def test_random_bytes_never_raise(raw: bytes) -> None:
    buf = bytearray(raw)
    assert translate(buf, lookup) in (Outcome.UNRELATED, Outcome.MALFORMED, Outcome.TRANSLATED)


GOOD = [
    icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, EPORT, SPORT, b"q" * 30)),
    icmp_error(ROUTER, VIP, quoted_tcp(VIP, CLIENT, VPORT, CPORT, b"q" * 30, options=True)[:44]),
]


@settings(max_examples=600, deadline=None)
@given(
    st.sampled_from(GOOD),
    st.lists(st.tuples(st.integers(0, 200), st.integers(0, 255)), max_size=4),
    st.integers(0, 120),
    st.booleans(),
)
def test_mutated_errors_never_raise_and_translations_stay_valid(
    good: bytearray, flips: list[tuple[int, int]], keep: int, shorten: bool
) -> None:
    buf = bytearray(good)
    for at, value in flips:
        if at < len(buf):
            buf[at] = value
    if shorten:
        del buf[keep:]
    result = translate(buf, lookup)
    if result == Outcome.TRANSLATED and not flips and not shorten:
        assert_checksums(buf)
    if result == Outcome.TRANSLATED and not flips:
        ihl = (buf[0] & 15) * 4
        assert buf[16:20] in (addr_to_bytes(CLIENT), addr_to_bytes(SERVER))
        assert buf[ihl] in (3, 11, 12)


@settings(max_examples=300, deadline=None)
@given(st.sampled_from(GOOD), st.integers(0, 2000), st.integers(0, 0xFFFF), st.integers(1, 0xFFFF))
def test_checksums_match_a_full_recompute_for_any_flow(
    good: bytearray, payload_len: int, eport: int, cport: int
) -> None:
    """Random ports on both sides and random quote lengths: the translated error equals the one scapy builds."""
    to_server, from_client = key(LB, SERVER, eport, SPORT), key(CLIENT, VIP, cport, VPORT)
    sent = quoted_tcp(LB, SERVER, eport, SPORT, b"p" * payload_len)[:548]
    buf = icmp_error(ROUTER, LB, sent)
    assert translate(buf, {to_server: from_client}.get) == Outcome.TRANSLATED
    expected = icmp_error(VIP, CLIENT, quoted_tcp(CLIENT, VIP, cport, VPORT, b"p" * payload_len)[:548])
    assert buf == expected
    assert_checksums(buf)


# -- over the flow table, and through Passthrough.decide ---------------------------------------------------------


def test_full_nat_lookup_finds_the_flow_from_either_side() -> None:
    flows = FlowTable(10)
    b = addr_to_bytes
    flow = new_passthrough_flow(
        "web", b(CLIENT), CPORT, b(VIP), VPORT, "s", b(SERVER), SPORT, b(LB), EPORT, 0.0
    )
    assert flows.add(flow)
    lookup = full_nat_lookup(flows.forward, flows.reverse)
    assert lookup(TO_SERVER) == FROM_CLIENT
    assert lookup(TO_CLIENT) == FROM_SERVER
    for other in (FROM_CLIENT, FROM_SERVER, key(LB, SERVER, EPORT + 1, SPORT), b"\0" * 12):
        assert lookup(other) is None


VERDICTS = ("ingress_accepted", "ingress_dropped", "return_accepted", "return_dropped")
ICMP_VERDICTS = ("icmp_translated", "icmp_unrelated", "icmp_malformed")


def connected() -> tuple[Passthrough, int]:
    """A Passthrough with one established flow C:CPORT -> VIP:VPORT via LB:eport -> SERVER:SPORT."""
    ports = PortAllocator(EPORT, EPORT + 10, [addr_to_bytes(LB)], 60.0, start=lambda n: 0)
    pt = Passthrough(
        {(addr_to_bytes(VIP), VPORT): "web"},
        [addr_to_bytes(LB)],
        ports,
        FlowTable(10),
        lambda frontend, flow_hash: ("s", addr_to_bytes(SERVER), SPORT),
    )
    assert pt.decide(bytes(tcp_packet(CLIENT, VIP, CPORT, VPORT, "S", 1000)), 1.0) is not None
    (flow,) = pt.flows
    assert pt.decide(bytes(tcp_packet(SERVER, LB, SPORT, flow.eport, "SA", 5000, 1001)), 1.0) is not None
    return pt, flow.eport


def test_decide_translates_accepts_and_counts_icmp_without_touching_the_flow() -> None:
    pt, eport = connected()
    (flow,) = pt.flows
    state = (flow.state, flow.last_seen, flow.count, flow.fwd_head, flow.ret_head)
    up = icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, eport, SPORT, b"u" * 1448)[:548])
    out = pt.decide(bytes(up), 2.0)
    assert out == icmp_error(VIP, CLIENT, quoted_tcp(CLIENT, VIP, CPORT, VPORT, b"u" * 1448)[:548])
    down = icmp_error(LB, VIP, quoted_tcp(VIP, CLIENT, VPORT, CPORT, b"d" * 1448)[:548], 11, 0)
    out = pt.decide(bytes(down), 2.0)
    assert out == icmp_error(LB, SERVER, quoted_tcp(SERVER, LB, SPORT, eport, b"d" * 1448)[:548], 11, 0)
    # a forged error with a RST inside, port unreachable: translated at most, never a change of state
    rst = icmp_error(
        ROUTER, LB, bytes(IP(src=LB, dst=SERVER) / TCP(sport=eport, dport=SPORT, flags="R")), 3, 3
    )
    assert pt.decide(bytes(rst), 2.0) is not None
    unrelated = [raw for raw in UNRELATED.values()]
    for raw in unrelated:
        assert pt.decide(bytes(raw), 2.0) == bytes(raw)
    malformed = [raw for name, raw in malformed_cases().items() if name != "tcp" and len(raw) >= 20]
    for raw in malformed:  # accepted as they came, or (not even IPv4: no protocol to go by) dropped as before
        out = pt.decide(bytes(raw), 2.0)
        if raw[0] == 0x45 and int.from_bytes(raw[2:4], "big") > len(raw):
            assert out is None  # a cut copy: set_payload would truncate the packet
        else:
            assert out in (bytes(raw), None)
    assert (flow.state, flow.last_seen, flow.count, flow.fwd_head, flow.ret_head) == state
    assert flow.state == FlowState.ESTABLISHED and len(pt.flows) == 1
    c = pt.counters.as_dict()
    assert (c["icmp_translated"], c["icmp_unrelated"]) == (3, len(unrelated))
    assert c["icmp_malformed"] + c["ingress_dropped"] + c["return_dropped"] == len(malformed)
    assert sum(c[k] for k in VERDICTS + ICMP_VERDICTS) == 2 + 3 + len(unrelated) + len(malformed)
    assert sum(c[k] for k in pt.counters.DROP_REASONS) == c["ingress_dropped"] + c["return_dropped"]
    assert c["errors"] == 0


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=20, max_size=100), st.integers(0, 80))
def test_decide_never_raises_on_icmp_like_bytes(tail: bytes, at: int) -> None:
    pt, eport = connected()
    raw = bytearray(icmp_error(ROUTER, LB, quoted_tcp(LB, SERVER, eport, SPORT, b"x" * 40)))
    raw[at : at + len(tail) // 4] = tail[: len(tail) // 4]
    pt.decide(bytes(raw), 2.0)
    c = pt.counters.as_dict()
    assert sum(c[k] for k in VERDICTS + ICMP_VERDICTS) == 3 and c["errors"] == 0
    assert len(pt.flows) == 1 and next(iter(pt.flows)).state == FlowState.ESTABLISHED
