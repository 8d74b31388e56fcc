"""Internet checksum and RFC 1624 incremental updates, checked against full recomputes and scapy."""

from __future__ import annotations

import random

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from scapy.layers.inet import IP, TCP
from scapy.utils import checksum as scapy_checksum

from convey.packet.checksum import (
    apply,
    delta,
    internet_checksum,
    ip_header_checksum,
    ones_sum,
    tcp_checksum,
)


def slow_ones_sum(data: bytes) -> int:
    """RFC 1071 by the book: add 16-bit words, fold the carries back in."""
    if len(data) % 2:
        data += b"\x00"
    total = 0
    for i in range(0, len(data), 2):
        total += (data[i] << 8) | data[i + 1]
        total = (total & 0xFFFF) + (total >> 16)
    return total


@given(st.binary(max_size=200))
@example(b"")
@example(b"\x00\x00")
@example(b"\xff\xff")
@example(b"\x12\x34\xed\xcb")  # words that cancel: the sum is -0
@example(b"\x01")
def test_ones_sum_matches_rfc1071_loop(data: bytes) -> None:
    assert ones_sum(data) == slow_ones_sum(data)


@given(st.binary(max_size=200))
def test_internet_checksum_matches_scapy(data: bytes) -> None:
    assert internet_checksum(data) == scapy_checksum(data)


def test_checksum_over_data_with_its_checksum_is_zero() -> None:
    data = bytearray(random.Random(1).randbytes(40))
    data[10:12] = b"\x00\x00"
    data[10:12] = internet_checksum(data).to_bytes(2, "big")
    assert internet_checksum(data) == 0


def test_zero_sum_corner_cases() -> None:
    assert ones_sum(b"") == 0
    assert ones_sum(b"\x00" * 8) == 0
    assert ones_sum(b"\xff\xff") == 0xFFFF
    assert ones_sum(b"\x80\x00\x7f\xff") == 0xFFFF  # a nonzero sum never folds to +0
    assert internet_checksum(b"\x80\x00\x7f\xff") == 0x0000


def test_delta_range_and_identity() -> None:
    assert delta(b"\x12\x34", b"\x12\x34") == 0xFFFF  # a change that cancels is -0, never +0
    assert delta(b"\x00\x00", b"\x00\x00") == 0xFFFF
    assert delta(b"\x00\x00", b"\x00\x01") == 1
    with pytest.raises(ValueError):
        delta(b"\x00", b"\x01")
    with pytest.raises(ValueError):
        delta(b"\x00\x00", b"\x00\x00\x00\x00")


@pytest.mark.parametrize("d", [1, 2, 0x7FFF, 0x8000, 0xFFFE, 0xFFFF, 0x1234, 0xEDCB])
def test_apply_equals_the_inlined_modulo_form_for_every_checksum(d: int) -> None:
    for c in range(0x10000):
        assert apply(c, d) == (c - d) % 0xFFFF


def test_apply_rfc1624_eqn3_corner_cases() -> None:
    # RFC 1624 section 4: header sum becomes -0 after the update; eqn 3 gives +0 (0x0000), never -0 (0xFFFF).
    assert apply(0x0001, 0x0001) == 0x0000
    assert apply(0x0000, 0xFFFF) == 0x0000
    assert apply(0xFFFF, 0xFFFF) == 0x0000
    # a no-op update (delta -0) keeps every correct checksum
    for c in (0x0000, 0x0001, 0x8000, 0xFFFE):
        assert apply(c, delta(b"\xab\xcd", b"\xab\xcd")) == c


def _update_matches_recompute(data: bytearray, csum_at: int, changes: list[tuple[int, bytes]]) -> None:
    """Put a correct checksum at ``csum_at``, replace words, compare incremental and full recompute."""
    data[csum_at : csum_at + 2] = b"\x00\x00"
    old_csum = internet_checksum(data)
    data[csum_at : csum_at + 2] = old_csum.to_bytes(2, "big")
    old_words = b""
    new_words = b""
    for at, new in changes:
        old_words += bytes(data[at : at + 2])
        new_words += new
        data[at : at + 2] = new
    data[csum_at : csum_at + 2] = b"\x00\x00"
    expected = internet_checksum(data)
    assert apply(old_csum, delta(old_words, new_words)) == expected
    assert (old_csum - delta(old_words, new_words)) % 0xFFFF == expected


@settings(max_examples=400)
@given(st.data())
def test_incremental_update_equals_full_recompute(data: st.DataObject) -> None:
    words = data.draw(st.integers(min_value=3, max_value=40))
    raw = bytearray(data.draw(st.binary(min_size=2 * words, max_size=2 * words)))
    if not any(raw):
        raw[0] = 0x45  # a real header is never all zero (version, protocol); all-zero has no valid checksum
    csum_word = data.draw(st.integers(min_value=0, max_value=words - 1))
    others = [w for w in range(words) if w != csum_word]
    if raw[2 * others[0]] == 0 and not any(raw[2 * w] or raw[2 * w + 1] for w in others):
        raw[2 * others[0]] = 1
    positions = data.draw(st.lists(st.sampled_from(others), min_size=1, max_size=len(others), unique=True))
    changes = [(2 * w, data.draw(st.binary(min_size=2, max_size=2))) for w in positions]
    updated = bytearray(raw)
    for at, new in changes:
        updated[at : at + 2] = new
    if not any(updated[2 * w] or updated[2 * w + 1] for w in others):
        return  # the rewritten data would be all zero: no valid checksum exists
    _update_matches_recompute(raw, 2 * csum_word, changes)


def test_incremental_update_to_a_zero_checksum() -> None:
    """Make the rewritten header's sum exactly -0: the correct new checksum is 0x0000 (RFC 1624 trap)."""
    rng = random.Random(7)
    for _ in range(200):
        raw = bytearray(rng.randbytes(20))
        raw[0] = 0x45
        raw[10:12] = b"\x00\x00"
        # choose the new value of word 6 so that the new sum is 0xFFFF
        rest = bytearray(raw)
        rest[12:14] = b"\x00\x00"
        need = (0xFFFF - ones_sum(rest)) % 0xFFFF or 0xFFFF
        _update_matches_recompute(raw, 10, [(12, need.to_bytes(2, "big"))])
        raw[10:12] = b"\x00\x00"
        assert internet_checksum(raw) == 0x0000


def test_incremental_update_from_a_zero_checksum() -> None:
    """Start from a header whose correct checksum is 0x0000 and rewrite it."""
    rng = random.Random(8)
    for _ in range(200):
        raw = bytearray(rng.randbytes(20))
        raw[0] = 0x45
        raw[10:12] = b"\x00\x00"
        rest = bytearray(raw)
        rest[12:14] = b"\x00\x00"
        need = (0xFFFF - ones_sum(rest)) % 0xFFFF or 0xFFFF
        raw[12:14] = need.to_bytes(2, "big")
        assert internet_checksum(raw) == 0
        _update_matches_recompute(raw, 10, [(12, rng.randbytes(2)), (16, rng.randbytes(2))])


@given(
    st.ip_addresses(v=4),
    st.ip_addresses(v=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.binary(max_size=64),
)
def test_ip_and_tcp_checksums_match_scapy(
    src: object, dst: object, sport: int, dport: int, payload: bytes
) -> None:
    raw = bytes(IP(src=str(src), dst=str(dst)) / TCP(sport=sport, dport=dport, flags="PA") / payload)
    pkt = IP(raw)
    assert ip_header_checksum(raw[:20]) == pkt.chksum
    assert tcp_checksum(raw[:20], raw[20:]) == pkt[TCP].chksum


def test_tcp_checksum_rejects_short_input() -> None:
    with pytest.raises(ValueError):
        tcp_checksum(b"\x45" * 10, b"\x00" * 20)
    with pytest.raises(ValueError):
        tcp_checksum(b"\x45" * 20, b"\x00" * 10)
