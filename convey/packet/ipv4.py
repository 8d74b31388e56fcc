"""IPv4 + TCP headers: a fast validating parser, the in-place NAT rewrite, TCP reset generation.

Everything works on the raw packet as netfilterqueue hands it over (``get_payload()``: the IPv4 header first,
no link layer). Nothing here allocates per packet beyond what ``struct`` returns.

What the kernel has already checked before PREROUTING, and so is not checked again here: the IPv4 header
checksum (``ip_rcv`` drops bad ones) and that the packet is at least as long as its total length (longer
packets are trimmed). The TCP checksum is not verified (that would cost a pass over the payload); incremental
updates keep a bad one bad, so the server's stack still drops the segment.

``parse`` decides what is malformed: it returns a ``Parsed`` (named fields) or the ``Malformed`` kind, never
raises. Every kind is fatal for the packet (the decisions drop it and count the kind):

- ``TRUNCATED``: the buffer is shorter than 20 bytes or than the IHL, or the TCP header does not fit in the
  packet (the total length or the buffer ends before 20 bytes of TCP header, or before the data offset says it
  ends).
- ``BAD_VERSION``: not IPv4. ``BAD_IHL``: IHL below 5. ``BAD_TCP_HEADER``: TCP data offset below 5.
- ``NOT_TCP``: the iptables rules only queue TCP; anything else is not ours to rewrite.
- ``FRAGMENT``: MF set or a fragment offset. A non-first fragment has no ports to find its flow by, and a
  first fragment rewritten alone would leave its siblings behind, so fragments are dropped. TCP sets DF and
  sizes segments by the MSS, so this is rare; the counter shows it.
- ``TOO_LONG``: the total length exceeds the buffer. The kernel guarantees the packet itself is that long, so
  the queue's copy was cut (netfilterqueue copies at most 4016 bytes of a packet with its default 4096-byte
  buffer). ``set_payload`` with the cut copy would truncate the packet, and a verdict without it cannot carry
  the rewrite, so the packet is dropped. Seen with MTUs above ~4000 (jumbo frames): raise the edge's copy size
  or clamp the MSS.
- ``BAD_LENGTH``: the buffer is longer than the total length (trailing bytes the kernel would have trimmed).

IP options (IHL > 5) are *not* an error: the rewrite touches only the addresses, the ports and the two
checksums, and options are covered by the IPv4 checksum but left unchanged, so the flow's precomputed deltas
still hold. The parser returns the real IHL and the decisions accept such packets (rewritten) and count them
(``ip_options``).
"""

from __future__ import annotations

import ipaddress
from enum import IntEnum
from struct import Struct
from typing import NamedTuple

from convey.packet.checksum import internet_checksum, ip_header_checksum

__all__ = [
    "ACK",
    "FIN",
    "HOT_CSUM",
    "HOT_CSUM_HEAD",
    "HOT_HEADER",
    "IP_CHECKSUM",
    "IP_DST",
    "IP_SRC",
    "MAX_COPY",
    "PSH",
    "RST",
    "SYN",
    "TCP_CHECKSUM",
    "URG",
    "Malformed",
    "Parsed",
    "addr_from_int",
    "addr_to_bytes",
    "addr_to_int",
    "build_rst",
    "bytes_to_addr",
    "flow_key",
    "parse",
    "reset_for",
    "rewrite",
]

# TCP flags (byte 13 of the TCP header).
FIN = 0x01
SYN = 0x02
RST = 0x04
PSH = 0x08
ACK = 0x10
URG = 0x20

# Offsets: into the IPv4 header, and into the TCP header (add the IHL).
IP_CHECKSUM = 10
IP_SRC = 12
IP_DST = 16
TCP_CHECKSUM = 16

MIN_IHL = 20
MIN_TCP_HEADER = 20
IP_FRAGMENT_MASK = 0x3FFF  # MF and the fragment offset; DF (0x4000) is fine
PROTO_TCP = 6

# The most netfilterqueue hands over of one packet with its default buffer; longer ones arrive cut.
MAX_COPY = 4016


class Malformed(IntEnum):
    """Why ``parse`` rejected a packet (returned, not raised). All are fatal: the decisions drop the packet
    and count it (see the module doc and ``convey.packet.counters``)."""

    TRUNCATED = 1
    BAD_VERSION = 2
    BAD_IHL = 3
    NOT_TCP = 4
    FRAGMENT = 5
    TOO_LONG = 6
    BAD_LENGTH = 7
    BAD_TCP_HEADER = 8


class Parsed(NamedTuple):
    """The fields of a valid IPv4 + TCP packet; lengths are in bytes."""

    ihl: int  # IPv4 header length (20 without options)
    src: bytes  # 4-byte addresses
    dst: bytes
    sport: int
    dport: int
    seq: int
    ack: int
    flags: int  # TCP flags (FIN, SYN, ...)
    tcp_header_len: int
    payload_len: int  # TCP payload: total length minus both headers


# The fast path's view of a packet without IP options (first 38 bytes): version/IHL, total length, fragment
# field, protocol, IPv4 checksum, bytes 12..24 (the flow key), TCP data offset, TCP flags, TCP checksum. The
# rewrite then writes the IPv4 checksum and bytes 12..24 in one call (HOT_CSUM_HEAD at offset 10) and the TCP
# checksum in another (HOT_CSUM at offset 36).
HOT_HEADER = Struct("!BxH2xHxBH12s8xBB2xH")
HOT_CSUM_HEAD = Struct("!H12s")
HOT_CSUM = Struct("!H")

_IP = Struct("!BxH2xHxB2x4s4s")  # version/IHL, total length, flags/fragment offset, protocol, src, dst
_TCP = Struct("!HHIIBB")  # sport, dport, seq, ack, data offset, flags
_U16 = Struct("!H")
_IP_CSUM_ADDRS = Struct("!H8s")  # IPv4 checksum + src + dst, at offset 10
_PORTS = Struct("!4s")
_PORT_PAIR = Struct("!HH")
_RST_TEMPLATE = Struct("!BBHHHBBH4s4sHHIIBBHHH")


def parse(buf: bytes | bytearray) -> Parsed | Malformed:
    """Validate an IPv4 + TCP packet and return its fields (``Parsed``), or why it is ``Malformed``.

    The checks run in the order of the module doc; the first failing one names the kind.
    """
    n = len(buf)
    if n < 20:
        return Malformed.TRUNCATED
    vihl, total, frag, proto, src, dst = _IP.unpack_from(buf)
    if vihl >> 4 != 4:
        return Malformed.BAD_VERSION
    ihl = (vihl & 0x0F) << 2
    if ihl < MIN_IHL:
        return Malformed.BAD_IHL
    if n < ihl:
        return Malformed.TRUNCATED
    if proto != PROTO_TCP:
        return Malformed.NOT_TCP
    if frag & IP_FRAGMENT_MASK:
        return Malformed.FRAGMENT
    if total < ihl + MIN_TCP_HEADER or n < ihl + MIN_TCP_HEADER:
        return Malformed.TRUNCATED
    sport, dport, seq, ack, offset, flags = _TCP.unpack_from(buf, ihl)
    thl = (offset >> 4) << 2
    if thl < MIN_TCP_HEADER:
        return Malformed.BAD_TCP_HEADER
    end = ihl + thl
    if end > total or end > n:
        return Malformed.TRUNCATED
    if total > n:
        return Malformed.TOO_LONG
    if total < n:
        return Malformed.BAD_LENGTH
    return Parsed(ihl, src, dst, sport, dport, seq, ack, flags, thl, total - end)


def flow_key(src: bytes, dst: bytes, sport: int, dport: int) -> bytes:
    """The 12-byte key of one direction of a flow: src addr, dst addr, sport, dport, as on the wire.

    For a packet without IP options these are exactly bytes 12..24, so the fast path reads the key with one
    ``struct`` field instead of building it.
    """
    return src + dst + _PORT_PAIR.pack(sport, dport)


def rewrite(buf: bytearray, ihl: int, addrs12: bytes, ports4: bytes, ip_delta: int, tcp_delta: int) -> None:
    """Rewrite a parsed packet in place: the 8 address bytes at offset 12 (src, dst), the 4 port bytes at the
    start of the TCP header (sport, dport), and both checksums, patched incrementally with the precomputed RFC
    1624 deltas (``checksum.delta`` of the old and new address bytes for IPv4; of addresses + ports for TCP,
    whose pseudo-header holds the addresses).

    ``(checksum - delta) % 0xFFFF`` is ``checksum.apply`` (RFC 1624 eqn. 3) for deltas in 1..0xFFFF, which is
    what ``checksum.delta`` returns.
    """
    checksum = _U16.unpack_from(buf, IP_CHECKSUM)[0]
    _IP_CSUM_ADDRS.pack_into(buf, IP_CHECKSUM, (checksum - ip_delta) % 0xFFFF, addrs12)
    offset = ihl + TCP_CHECKSUM
    checksum = _U16.unpack_from(buf, offset)[0]
    _U16.pack_into(buf, offset, (checksum - tcp_delta) % 0xFFFF)
    _PORTS.pack_into(buf, ihl, ports4)


def build_rst(src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, ack_flag: bool) -> bytes:
    """A complete 40-byte IPv4 + TCP reset from ``src:sport`` to ``dst:dport`` with correct checksums.

    RST, plus ACK when ``ack_flag``; window 0, no options, no payload; IPv4 id 0, DF, TTL 64. ``ack`` is
    written as given (pass 0 without ``ack_flag``). Built for an IP_HDRINCL raw socket.
    """
    flags = RST | ACK if ack_flag else RST
    seq &= 0xFFFFFFFF
    ack &= 0xFFFFFFFF
    ip = bytearray(
        _RST_TEMPLATE.pack(
            0x45, 0, 40, 0, 0x4000, 64, PROTO_TCP, 0, src, dst, sport, dport, seq, ack, 0x50, flags, 0, 0, 0
        )
    )
    pseudo = src + dst + b"\x00\x06\x00\x14"
    _U16.pack_into(ip, IP_CHECKSUM, ip_header_checksum(ip[:20]))
    _U16.pack_into(ip, 20 + TCP_CHECKSUM, internet_checksum(pseudo + ip[20:]))
    return bytes(ip)


def reset_for(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: int, flags: int, payload_len: int
) -> bytes | None:
    """The RST answering the segment ``src:sport -> dst:dport`` (RFC 793 reset generation); None for a RST.

    If the segment has ACK, the reset takes its sequence number from the segment's ACK field and has no ACK
    flag. Otherwise it has sequence number 0 and ACKs the segment: its sequence number plus its length, SYN
    and FIN counting one each (so a SYN is refused with RST|ACK, ack = seq + 1). A reset is never answered.
    """
    if flags & RST:
        return None
    if flags & ACK:
        return build_rst(dst, src, dport, sport, ack, 0, False)
    length = payload_len + (1 if flags & SYN else 0) + (1 if flags & FIN else 0)
    return build_rst(dst, src, dport, sport, 0, seq + length, True)


def addr_to_bytes(addr: str) -> bytes:
    """``"198.18.0.1"`` -> ``b"\\xc6\\x12\\x00\\x01"``; ValueError unless a dotted-quad IPv4 address."""
    return ipaddress.IPv4Address(addr).packed


def bytes_to_addr(raw: bytes) -> str:
    """``b"\\xc6\\x12\\x00\\x01"`` -> ``"198.18.0.1"``; ValueError unless ``raw`` is 4 bytes."""
    return str(ipaddress.IPv4Address(bytes(raw)))


def addr_to_int(raw: bytes) -> int:
    """A 4-byte address as a 32-bit int (network order), as ``flow_hash`` takes it."""
    return int.from_bytes(raw, "big")


def addr_from_int(value: int) -> bytes:
    """A 32-bit int as a 4-byte address (network order)."""
    return value.to_bytes(4, "big")
