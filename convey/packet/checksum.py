"""Internet checksums (RFC 1071) and their incremental update (RFC 1624).

All values are 16-bit one's complement numbers held in Python ints. A one's complement sum has two zeros,
0x0000 (+0) and 0xFFFF (-0); a sum of words that are not all zero, computed with end-around carry, is never
+0, so a correctly computed checksum (the complement of such a sum) is never 0xFFFF.

The packet path never recomputes a checksum over a whole packet: a flow's rewrite replaces the same words by
the same words for every packet of one direction, so its RFC 1624 delta is computed once (``delta``) and
applied per packet (``apply``, or the equivalent ``(checksum - delta) % 0xFFFF`` inlined in ``ipv4.rewrite``
and in ``fastpath``). An incremental update keeps a wrong checksum wrong: a corrupted packet stays corrupted
and the server's stack drops it, as it would have without the balancer.
"""

from __future__ import annotations

__all__ = [
    "apply",
    "delta",
    "internet_checksum",
    "ip_header_checksum",
    "ipv4_tcp_checksum",
    "ones_sum",
    "tcp_checksum",
]

_PROTO_TCP = b"\x00\x06"


def ones_sum(data: bytes | bytearray | memoryview) -> int:
    """One's complement sum of ``data`` as big-endian 16-bit words (an odd last byte is padded with zero).

    Computed with end-around carry, so the result is 0 only when every word is 0, and 0xFFFF for any other
    data whose words cancel. Uses ``2**16 == 1 (mod 0xFFFF)``: the big integer ``data`` is congruent to the
    sum of its words, so one C-level modulo replaces a Python loop.
    """
    raw = bytes(data)
    if len(raw) & 1:
        raw += b"\x00"
    value = int.from_bytes(raw, "big")
    if value == 0:
        return 0
    folded = value % 0xFFFF
    return folded if folded else 0xFFFF


def internet_checksum(data: bytes | bytearray | memoryview) -> int:
    """The RFC 1071 checksum of ``data``: the complement of its one's complement sum.

    The checksum field itself must be zero in ``data`` (or be left out) when computing a checksum to store;
    over a whole header or segment with a correct checksum in place it gives 0.
    """
    return ~ones_sum(data) & 0xFFFF


def delta(old: bytes, new: bytes) -> int:
    """The RFC 1624 delta ``~m + m'`` for replacing the 16-bit-aligned words ``old`` by ``new``.

    ``old`` and ``new`` have the same even length; their words need not be contiguous in the packet (only the
    sum matters), so the addresses of the TCP pseudo-header and the ports of the TCP header go in one delta.
    The result is in 1..0xFFFF: a sum that contains the complemented words ``~m`` is never +0, and a change
    that cancels out gives 0xFFFF (-0). Keeping the delta away from 0 is what makes ``(checksum - delta) %
    0xFFFF`` equal to ``apply`` for every checksum value (see ``apply``).
    """
    if len(old) != len(new) or len(old) & 1:
        raise ValueError(f"delta needs old and new of the same even length, got {len(old)} and {len(new)}")
    # Only residues mod 0xFFFF matter here (see ``ones_sum``), so the big integers stand in for the word sums.
    folded = (int.from_bytes(new, "big") - int.from_bytes(old, "big")) % 0xFFFF
    return folded if folded else 0xFFFF


def apply(checksum: int, delta: int) -> int:
    """RFC 1624 eqn. 3: ``HC' = ~(~HC + delta)``, the sum taken with end-around carry.

    Eqn. 3 (unlike eqn. 2, ``HC - ~m - m'``) never turns a correct checksum into -0 (0xFFFF): when the
    header's new sum is -0 the result is +0 (0x0000), exactly what a full recompute gives. For a correct
    ``checksum`` the result equals the full recompute over the rewritten data, for every delta. For ``delta``
    in 1..0xFFFF (what ``delta`` returns) it also equals ``(checksum - delta) % 0xFFFF`` for every 16-bit
    ``checksum``, which is the form the fast path inlines.
    """
    total = (~checksum & 0xFFFF) + delta
    total = (total & 0xFFFF) + (total >> 16)
    return ~total & 0xFFFF


def ip_header_checksum(header: bytes | bytearray | memoryview) -> int:
    """The checksum an IPv4 header should carry; its checksum field (bytes 10-11) is taken as zero."""
    raw = bytes(header)
    return internet_checksum(raw[:10] + b"\x00\x00" + raw[12:])


def tcp_checksum(
    ip_header: bytes | bytearray | memoryview, tcp_segment: bytes | bytearray | memoryview
) -> int:
    """The checksum a TCP segment should carry, recomputed in full (for tests and crafted packets).

    ``ip_header`` supplies the addresses (bytes 12-19) of the pseudo-header; ``tcp_segment`` is the TCP header
    and payload, whose checksum field (bytes 16-17) is taken as zero.
    """
    addrs = bytes(ip_header[12:20])
    segment = bytes(tcp_segment)
    if len(addrs) != 8:
        raise ValueError("ip_header is shorter than 20 bytes")
    if len(segment) < 18:
        raise ValueError("tcp_segment is shorter than a TCP checksum field")
    pseudo = addrs + _PROTO_TCP + len(segment).to_bytes(2, "big")
    return internet_checksum(pseudo + segment[:16] + b"\x00\x00" + segment[18:])


def ipv4_tcp_checksum(packet: bytes | bytearray) -> int:
    """The TCP checksum a whole IPv4 + TCP ``packet`` should carry, from scratch; whatever its checksum field
    holds (a partial sum, garbage) is ignored. For a packet whose checksum the kernel had not completed
    (NFQUEUE's ``NFQA_SKB_CSUMNOTREADY``: the field holds the pseudo-header sum only), where an incremental update
    is wrong. The caller makes sure it is unfragmented TCP whose total length is ``len(packet)``.

    Sums the segment as one big integer (``2**16 == 1 (mod 0xFFFF)``, see ``ones_sum``), takes the field's word
    back out and adds the pseudo-header; no copy of the segment. ``(-sum) % 0xFFFF`` is the complement, with
    the one's complement -0 (all words cancel) giving 0x0000, as a full recompute does.
    """
    ihl = (packet[0] & 0x0F) << 2
    length = len(packet) - ihl
    segment = int.from_bytes(memoryview(packet)[ihl:], "big")
    if length & 1:
        segment <<= 8  # pad the odd last byte to a word
    field = packet[ihl + 16] << 8 | packet[ihl + 17]
    pseudo = int.from_bytes(packet[12:20], "big") + 6 + length
    return (field - segment - pseudo) % 0xFFFF
