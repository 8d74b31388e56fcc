"""IPv4 + TCP parsing, in-place rewriting and reset generation, checked with scapy."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP, IPOption_NOP, IPOption_Router_Alert

from convey.packet.checksum import delta
from convey.packet.ipv4 import (
    ACK,
    FIN,
    HOT_HEADER,
    PSH,
    RST,
    SYN,
    Malformed,
    Parsed,
    addr_from_int,
    addr_to_bytes,
    addr_to_int,
    build_rst,
    bytes_to_addr,
    flow_key,
    parse,
    reset_for,
    rewrite,
)
from tests.unit.scapy_packets import check, tcp_packet

CLIENT = "198.51.100.7"
VIP = "198.18.0.10"


def packet(
    src: str = CLIENT,
    dst: str = VIP,
    sport: int = 40001,
    dport: int = 80,
    flags: str = "S",
    seq: int = 1000,
    ack: int = 0,
    payload: bytes = b"",
    ip_options: list[object] | None = None,
    tcp_options: list[tuple[str, object]] | None = None,
) -> bytearray:
    return tcp_packet(src, dst, sport, dport, flags, seq, ack, payload, ip_options, tcp_options)


assert_checksums_valid = check


# -- parse


def test_parse_fields_match_scapy() -> None:
    raw = packet(flags="PA", seq=123456789, ack=987654321, payload=b"x" * 77, tcp_options=[("MSS", 1460)])
    parsed = parse(raw)
    assert not isinstance(parsed, Malformed)
    assert isinstance(parsed, Parsed)
    ihl, src, dst, sport, dport, seq, ack, flags, thl, size = parsed
    assert (ihl, thl, size) == (20, 24, 77)
    assert (parsed.ihl, parsed.tcp_header_len, parsed.payload_len) == (20, 24, 77)
    assert (parsed.src, parsed.dst, parsed.sport, parsed.dport) == (src, dst, 40001, 80)
    assert (parsed.seq, parsed.ack, parsed.flags) == (123456789, 987654321, PSH | ACK)
    assert (bytes_to_addr(src), bytes_to_addr(dst), sport, dport) == (CLIENT, VIP, 40001, 80)
    assert (seq, ack, flags) == (123456789, 987654321, PSH | ACK)


def test_parse_accepts_ip_options_and_reports_the_ihl() -> None:
    raw = packet(ip_options=[IPOption_Router_Alert()], payload=b"abc")
    parsed = parse(raw)
    assert not isinstance(parsed, Malformed)
    assert parsed.ihl == 24
    assert (parsed.sport, parsed.dport) == (40001, 80)
    assert parsed.payload_len == 3


def test_parse_allows_df() -> None:
    raw = bytes(IP(src=CLIENT, dst=VIP, flags="DF") / TCP())
    assert not isinstance(parse(bytearray(raw)), Malformed)


def _with(raw: bytearray, offset: int, fmt: str, value: int) -> bytearray:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value)
    return out


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: bytearray(19), Malformed.TRUNCATED),
        (lambda: packet()[:30], Malformed.TRUNCATED),  # TCP header cut
        (lambda: _with(packet(), 0, "!B", 0x65), Malformed.BAD_VERSION),
        (lambda: bytearray(bytes(packet())).replace(b"\x45", b"\x60", 1), Malformed.BAD_VERSION),
        (lambda: _with(packet(), 0, "!B", 0x44), Malformed.BAD_IHL),
        (lambda: _with(packet(), 0, "!B", 0x4F), Malformed.TRUNCATED),  # IHL 60 > 40 bytes
        (lambda: bytearray(bytes(IP(src=CLIENT, dst=VIP, proto=17) / (b"\x00" * 20))), Malformed.NOT_TCP),
        (lambda: bytearray(bytes(IP(src=CLIENT, dst=VIP, flags="MF") / TCP())), Malformed.FRAGMENT),
        (
            lambda: bytearray(bytes(IP(src=CLIENT, dst=VIP, frag=100, proto=6) / (b"\x00" * 8))),
            Malformed.FRAGMENT,
        ),
        (lambda: _with(packet(), 2, "!H", 39), Malformed.TRUNCATED),  # total length < IHL + 20
        (lambda: _with(packet(), 32, "!B", 0x40), Malformed.BAD_TCP_HEADER),  # data offset 4
        (lambda: _with(packet(), 32, "!B", 0x60), Malformed.TRUNCATED),  # data offset beyond the packet
        (lambda: _with(packet(payload=b"x" * 100), 2, "!H", 5000)[:140], Malformed.TOO_LONG),  # cut copy
        (lambda: packet() + b"\x00\x00", Malformed.BAD_LENGTH),  # trailing bytes
        (lambda: bytearray(), Malformed.TRUNCATED),
    ],
)
def test_parse_rejects_each_malformed_kind(make: object, error: Malformed) -> None:
    assert callable(make)
    assert parse(make()) == error


def test_too_long_is_what_a_cut_netfilterqueue_copy_looks_like() -> None:
    raw = packet(payload=b"y" * 8000)
    assert parse(raw[:4016]) == Malformed.TOO_LONG
    assert not isinstance(parse(raw), Malformed)


@given(st.binary(max_size=120))
def test_parse_never_raises(data: bytes) -> None:
    result = parse(bytearray(data))
    assert isinstance(result, Malformed | Parsed)


def test_hot_header_agrees_with_parse_and_flow_key() -> None:
    raw = packet(flags="A", payload=b"hello")
    vihl, total, frag, proto, ip_csum, key, offset, flags, tcp_csum = HOT_HEADER.unpack_from(raw)
    parsed = parse(raw)
    assert not isinstance(parsed, Malformed)
    assert key == flow_key(parsed.src, parsed.dst, parsed.sport, parsed.dport) == bytes(raw[12:24])
    assert (vihl, total, frag, proto, flags) == (0x45, len(raw), 0, 6, ACK)
    assert ip_csum == IP(bytes(raw)).chksum
    assert tcp_csum == IP(bytes(raw))[TCP].chksum
    assert (offset >> 4) * 4 == parsed.tcp_header_len


# -- rewrite

ipv4s = st.ip_addresses(v=4).map(str)
ports = st.integers(0, 65535)


@settings(max_examples=150)
@given(
    ipv4s,
    ipv4s,
    ports,
    ports,
    ipv4s,
    ipv4s,
    ports,
    ports,
    st.binary(max_size=300),
    st.sampled_from(["S", "SA", "A", "PA", "FA", "R", "RA"]),
    st.booleans(),
)
def test_rewrite_gives_valid_checksums_and_the_new_fields(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    new_src: str,
    new_dst: str,
    new_sport: int,
    new_dport: int,
    payload: bytes,
    flags: str,
    with_options: bool,
) -> None:
    options = [IPOption_Router_Alert(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_NOP()]
    raw = packet(src, dst, sport, dport, flags, 42, 43, payload, options if with_options else None)
    parsed = parse(raw)
    assert not isinstance(parsed, Malformed)
    ihl = parsed.ihl
    old_key = flow_key(addr_to_bytes(src), addr_to_bytes(dst), sport, dport)
    new_key = flow_key(addr_to_bytes(new_src), addr_to_bytes(new_dst), new_sport, new_dport)
    rewrite(raw, ihl, new_key[:8], new_key[8:], delta(old_key[:8], new_key[:8]), delta(old_key, new_key))
    pkt = assert_checksums_valid(raw)
    assert (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport) == (new_src, new_dst, new_sport, new_dport)
    assert (pkt[TCP].seq, pkt[TCP].ack, bytes(pkt[TCP].payload)) == (42, 43, payload)
    assert str(pkt[TCP].flags) == flags
    assert pkt.ihl * 4 == ihl


def test_rewrite_keeps_a_bad_tcp_checksum_bad() -> None:
    raw = packet(flags="A", payload=b"data")
    raw[36] ^= 0x55  # corrupt the TCP checksum
    old_key = bytes(raw[12:24])
    new_key = flow_key(addr_to_bytes("10.0.0.1"), addr_to_bytes("10.0.1.11"), 33768, 8080)
    rewrite(raw, 20, new_key[:8], new_key[8:], delta(old_key[:8], new_key[:8]), delta(old_key, new_key))
    pkt = IP(bytes(raw))
    fresh = IP(bytes(raw))
    del fresh.chksum
    del fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert pkt.chksum == fresh.chksum  # the IPv4 header checksum is right
    assert pkt[TCP].chksum != fresh[TCP].chksum  # the TCP one stays wrong


# -- resets


def test_build_rst_is_valid() -> None:
    raw = build_rst(addr_to_bytes(VIP), addr_to_bytes(CLIENT), 80, 40001, 0, 1001, True)
    assert len(raw) == 40
    pkt = assert_checksums_valid(raw)
    assert (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport) == (VIP, CLIENT, 80, 40001)
    assert (pkt[TCP].seq, pkt[TCP].ack, str(pkt[TCP].flags)) == (0, 1001, "RA")
    assert pkt.ttl == 64 and pkt.flags == "DF" and pkt[TCP].window == 0
    plain = IP(build_rst(addr_to_bytes(VIP), addr_to_bytes(CLIENT), 80, 40001, 5555, 0, False))
    assert str(plain[TCP].flags) == "R" and plain[TCP].seq == 5555


def test_build_rst_wraps_sequence_numbers() -> None:
    pkt = assert_checksums_valid(
        build_rst(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2, 2**32 + 5, 2**32, True)
    )
    assert (pkt[TCP].seq, pkt[TCP].ack) == (5, 0)


def _answer(flags: int, seq: int = 1000, ack: int = 0, size: int = 0) -> IP:
    raw = reset_for(addr_to_bytes(CLIENT), addr_to_bytes(VIP), 40001, 80, seq, ack, flags, size)
    assert raw is not None
    pkt = assert_checksums_valid(raw)
    assert (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport) == (VIP, CLIENT, 80, 40001)
    return pkt


def test_reset_for_a_syn_acks_it() -> None:
    pkt = _answer(SYN, seq=1000)
    assert (str(pkt[TCP].flags), pkt[TCP].seq, pkt[TCP].ack) == ("RA", 0, 1001)
    pkt = _answer(SYN, seq=2**32 - 1, size=10)  # SYN with data, wrapping
    assert pkt[TCP].ack == 10


def test_reset_for_an_ack_takes_its_ack_number() -> None:
    pkt = _answer(ACK | PSH, seq=5000, ack=777, size=100)
    assert (str(pkt[TCP].flags), pkt[TCP].seq, pkt[TCP].ack) == ("R", 777, 0)


def test_reset_for_a_bare_fin_counts_the_fin() -> None:
    pkt = _answer(FIN, seq=50, size=3)
    assert (str(pkt[TCP].flags), pkt[TCP].seq, pkt[TCP].ack) == ("RA", 0, 54)


def test_no_reset_for_a_reset() -> None:
    assert reset_for(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2, 3, 4, RST, 0) is None
    assert reset_for(b"\x01\x02\x03\x04", b"\x05\x06\x07\x08", 1, 2, 3, 4, RST | ACK, 0) is None


# -- addresses


def test_address_helpers() -> None:
    raw = addr_to_bytes("198.18.0.1")
    assert raw == b"\xc6\x12\x00\x01"
    assert bytes_to_addr(raw) == "198.18.0.1"
    assert addr_to_int(raw) == 0xC6120001
    assert addr_from_int(0xC6120001) == raw
    for bad in ("1", "256.0.0.1", "::1", "1.2.3"):
        with pytest.raises(ValueError):
            addr_to_bytes(bad)
    with pytest.raises(ValueError):
        bytes_to_addr(b"\x01\x02\x03")
