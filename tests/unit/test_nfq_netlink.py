"""nfnetlink_queue wire encode/decode (convey/dataplane/nfq_netlink.py), the netlink binding's verdicts
(nfq_socket.NetlinkPacket, no socket) and the full TCP checksum for packets whose checksum the kernel left partial.
Needs no root."""

from __future__ import annotations

import random
import socket
import struct

from hypothesis import given, settings
from hypothesis import strategies as st

from convey.dataplane import nfq_netlink as nl
from convey.dataplane.nfq_socket import NetlinkQueue
from convey.dataplane.nfqueue import Batch
from convey.packet.checksum import delta, internet_checksum, ipv4_tcp_checksum, ones_sum, tcp_checksum


def attrs_of(message: bytes, start: int = 20) -> dict[int, bytes]:
    found, at = {}, start
    while at + 4 <= len(message):
        length, kind = struct.unpack_from("=HH", message, at)
        found[kind & nl.NLA_TYPE_MASK] = message[at + 4 : at + length]
        at += (length + 3) & ~3
    return found


def test_bind_message() -> None:
    msg = nl.config_bind(513, 7)
    length, kind, flags, seq, pid = struct.unpack_from("=IHHII", msg)
    assert (length, kind, seq, pid) == (len(msg), 3 << 8 | 2, 7, 0)
    assert flags == nl.NLM_F_REQUEST | nl.NLM_F_ACK
    assert struct.unpack_from("!BBH", msg, 16) == (socket.AF_UNSPEC, 0, 513)  # the queue, big-endian
    assert attrs_of(msg)[nl.NFQA_CFG_CMD] == struct.pack("!BxH", nl.NFQNL_CFG_CMD_BIND, socket.AF_INET)


def test_params_message() -> None:
    msg = nl.config_params(3, 65531, 8192, nl.NFQA_CFG_F_GSO, nl.NFQA_CFG_F_GSO, 2)
    assert struct.unpack_from("=I", msg)[0] == len(msg) and len(msg) % 4 == 0
    attrs = attrs_of(msg)
    assert attrs[nl.NFQA_CFG_PARAMS] == struct.pack("!IB", 65531, nl.NFQNL_COPY_PACKET)
    assert attrs[nl.NFQA_CFG_QUEUE_MAXLEN] == struct.pack("!I", 8192)
    assert attrs[nl.NFQA_CFG_FLAGS] == attrs[nl.NFQA_CFG_MASK] == struct.pack("!I", 4)


def packet_message(
    packet_id: int, payload: bytes, skb_info: int | None = None, mark: int | None = None
) -> bytes:
    """A packet message as the kernel builds it (attribute order of nfqnl_build_packet_message)."""
    body = nl.attribute(nl.NFQA_PACKET_HDR, struct.pack("!IHB", packet_id, 0x0800, 0))
    body += nl.attribute(5, struct.pack("!I", 2))  # NFQA_IFINDEX_INDEV
    if mark is not None:
        body += nl.attribute(nl.NFQA_MARK, struct.pack("!I", mark))
    body += nl.attribute(9, bytes(12))  # NFQA_HWADDR
    if skb_info is not None:
        body += nl.attribute(nl.NFQA_SKB_INFO, struct.pack("!I", skb_info))
    body += nl.attribute(nl.NFQA_PAYLOAD, payload)
    return nl.message_header(nl.PACKET_TYPE, 0, 0, len(body)) + body


@given(
    st.integers(0, 2**32 - 1),
    st.binary(max_size=300),
    st.sampled_from([None, 0, 1, 3]),
    st.sampled_from([None, 9]),
)
def test_decode_packet(packet_id: int, payload: bytes, info: int | None, mark: int | None) -> None:
    msg = packet_message(packet_id, payload, info, mark)
    found = nl.decode_packet(msg, 0, len(msg))
    assert found.packet_id == packet_id
    assert msg[found.payload_at : found.payload_at + found.payload_len] == payload
    assert found.skb_info == (info or 0) and found.mark == (mark or 0) and found.cap_len == 0
    # a message cut short ends the walk without raising
    nl.decode_packet(msg, 0, len(msg) - 3)


def test_verdicts_with_and_without_payload_and_mark_concatenate() -> None:
    out = bytearray()
    out += nl.verdict_head(5, 11, nl.NF_ACCEPT, None, None)
    out += nl.verdict_head(5, 12, nl.NF_DROP, 0x101, None)
    out += nl.verdict_head(5, 13, nl.NF_ACCEPT, 7, 3) + b"abc" + nl.padding(3)
    messages = nl.iter_messages(out, len(out))
    assert [kind for _, _, kind in messages] == [nl.VERDICT_TYPE] * 3
    decoded = []
    for at, end, _ in messages:
        length, _, flags = struct.unpack_from("=IHH", out, at)
        assert (
            flags & nl.NLM_F_REQUEST and length == end - at and length % 4 == 0
        )  # else the kernel ignores it
        assert struct.unpack_from("!H", out, at + 18)[0] == 5
        decoded.append(attrs_of(bytes(out[at:end])))
    assert decoded[0][nl.NFQA_VERDICT_HDR] == struct.pack("!II", nl.NF_ACCEPT, 11)
    assert decoded[1][nl.NFQA_MARK] == struct.pack("!I", 0x101) and nl.NFQA_PAYLOAD not in decoded[1]
    assert decoded[2][nl.NFQA_PAYLOAD] == b"abc" and decoded[2][nl.NFQA_VERDICT_HDR][4:] == struct.pack(
        "!I", 13
    )


def test_decode_error() -> None:
    msg = (
        struct.pack("=IHHII", 36, nl.NLMSG_ERROR, 0, 9, 0) + struct.pack("=i", -1) + nl.config_bind(0, 4)[:16]
    )
    assert nl.decode_error(msg) == (1, 4)


# -- the full checksum of a packet whose checksum the kernel left partial ---------------------------------------


def tcp_packet(src: bytes, dst: bytes, sport: int, dport: int, payload: bytes) -> bytearray:
    total = 40 + len(payload)
    ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, total, 1, 0x4000, 64, 6, 0, src, dst))
    struct.pack_into("!H", ip, 10, internet_checksum(ip))
    tcp = struct.pack("!HHIIBBHHH", sport, dport, 1, 2, 0x50, 0x18, 65535, 0, 0) + payload
    return ip + tcp


def partial(packet: bytearray) -> bytearray:
    """The packet as CHECKSUM_PARTIAL leaves it: the TCP field holds the pseudo-header sum (not complemented)."""
    length = len(packet) - 20
    pseudo = ones_sum(bytes(packet[12:20]) + struct.pack("!HH", 6, length))
    struct.pack_into("!H", packet, 36, pseudo)
    return packet


addrs = st.binary(min_size=4, max_size=4)
ports = st.integers(1, 65535)


@settings(max_examples=30, deadline=None)
@given(
    addrs, addrs, ports, ports, addrs, addrs, ports, ports, st.integers(20_000, 65_000), st.integers(0, 2**32)
)
def test_gso_sized_rewrite_with_partial_checksum_equals_a_full_recompute(
    src: bytes, dst: bytes, sport: int, dport: int, nsrc: bytes, ndst: bytes, nsport: int, ndport: int,
    size: int, seed: int,
) -> None:  # fmt: skip
    payload = random.Random(seed).randbytes(size)
    packet = partial(tcp_packet(src, dst, sport, dport, payload))
    # the packet core's rewrite: new addresses and ports, both checksums updated incrementally (fastpath.py)
    ip_delta = delta(src + dst, nsrc + ndst)
    tcp_delta = delta(
        src + dst + struct.pack("!HH", sport, dport), nsrc + ndst + struct.pack("!HH", nsport, ndport)
    )
    buf = bytearray(packet)
    buf[12:24] = nsrc + ndst + struct.pack("!HH", nsport, ndport)
    struct.pack_into("!H", buf, 10, (struct.unpack_from("!H", buf, 10)[0] - ip_delta) % 0xFFFF)
    struct.pack_into("!H", buf, 36, (struct.unpack_from("!H", buf, 36)[0] - tcp_delta) % 0xFFFF)
    expected = tcp_checksum(buf[:20], buf[20:])
    assert ipv4_tcp_checksum(bytes(buf)) == expected
    assert internet_checksum(buf[:20]) == 0  # the IPv4 header's incremental update stays right

    # the netlink binding's accept writes it into the verdict for a CSUMNOTREADY packet, and only for one
    for info, full in ((nl.NFQA_SKB_CSUMNOTREADY | nl.NFQA_SKB_GSO, True), (0, False)):
        queue = NetlinkQueue(0, lambda pkt: None, Batch())
        pkt = queue._pkt
        pkt.id, pkt.skb_info, pkt.done = 77, info, False
        pkt.set_payload(bytes(buf))
        pkt.accept()
        (at, end, _), = nl.iter_messages(queue.out, len(queue.out))  # fmt: skip
        sent = attrs_of(bytes(queue.out[at:end]))[nl.NFQA_PAYLOAD]
        assert len(sent) == len(buf)
        checksum = struct.unpack_from("!H", sent, 36)[0]
        assert (checksum == expected) if full else (sent == bytes(buf))
        assert queue.full_checksums == int(full)


@given(st.binary(min_size=0, max_size=2000))
def test_ipv4_tcp_checksum_small_and_odd_lengths(payload: bytes) -> None:
    packet = tcp_packet(b"\xc6\x12\x00\x02", b"\xc6\x12\x01\x02", 40000, 80, payload)
    struct.pack_into("!H", packet, 36, 0xBEEF)  # whatever the field holds
    assert ipv4_tcp_checksum(bytes(packet)) == tcp_checksum(packet[:20], packet[20:])
