"""nfnetlink_queue wire encode/decode (convey/dataplane/nfq_netlink.py), the netlink binding's verdicts
(nfq_socket.NetlinkPacket, no socket) and the full TCP checksum for packets whose checksum the kernel left partial.
Needs no root."""

from __future__ import annotations

import contextlib
import random
import socket
import struct
from typing import Any

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

    # the netlink binding's accept writes it into the verdict for a CSUMNOTREADY packet that is not GSO; a GSO
    # packet keeps its bytes (the kernel's segmentation sets every segment's checksum up), others too
    cases = (
        (nl.NFQA_SKB_CSUMNOTREADY, "full"),
        (nl.NFQA_SKB_CSUMNOTREADY | nl.NFQA_SKB_GSO, "kernel"),
        (nl.NFQA_SKB_GSO, "kernel"),
        (0, "kept"),
    )
    for info, how in cases:
        queue = NetlinkQueue(0, lambda pkt: None, Batch())
        queue.full_gso = False
        sent = accepted_payload(queue, 77, info, bytes(buf))
        assert len(sent) == len(buf)
        checksum = struct.unpack_from("!H", sent, 36)[0]
        assert (checksum == expected) if how == "full" else (sent == bytes(buf))
        assert queue.full_checksums == int(how == "full")
        assert queue.kernel_checksums == int(how == "kernel")
    # the debug override: a full checksum for GSO packets too
    queue = NetlinkQueue(0, lambda pkt: None, Batch())
    queue.full_gso = True
    sent = accepted_payload(queue, 78, nl.NFQA_SKB_CSUMNOTREADY | nl.NFQA_SKB_GSO, bytes(buf))
    assert struct.unpack_from("!H", sent, 36)[0] == expected and queue.kernel_checksums == 0


def pending(queue: NetlinkQueue) -> bytes:
    """What the next flush sends, as one buffer (the kernel sees the sendmsg pieces so)."""
    return b"".join(bytes(p) for p in queue.pieces) + bytes(queue.out)


def accepted_payload(queue: NetlinkQueue, packet_id: int, info: int, payload: bytes) -> bytes:
    """Accept ``payload`` as the new payload of packet ``packet_id``; the payload the verdict carries."""
    pkt = queue._pkt
    pkt.id, pkt.skb_info, pkt.done = packet_id, info, False
    pkt._new = pkt._mark = None
    pkt.set_payload(payload)
    pkt.accept()
    out = pending(queue)
    ((at, end, _),) = nl.iter_messages(out, len(out))
    attrs = attrs_of(out[at:end])
    assert attrs[nl.NFQA_VERDICT_HDR] == struct.pack("!II", nl.NF_ACCEPT, packet_id)
    return attrs[nl.NFQA_PAYLOAD]


@given(st.binary(min_size=0, max_size=3000))
def test_small_and_big_payload_verdicts_match_the_reference_encoding(payload: bytes) -> None:
    """The binding's verdicts (one struct per head; big payloads as their own sendmsg pieces) are byte for byte
    what ``nfq_netlink.verdict_head`` builds, with and without a mark, several in a row."""
    queue = NetlinkQueue(5, lambda pkt: None, Batch())
    expected = bytearray()
    for packet_id, mark in ((1, None), (2**32 - 1, 0x1234), (300, None)):
        pkt = queue._pkt
        pkt.id, pkt.skb_info, pkt.done = packet_id, 0, False
        pkt._new = pkt._mark = None
        if mark is not None:
            pkt.set_mark(mark)
        pkt.set_payload(payload)
        pkt.accept()
        expected += nl.verdict_head(5, packet_id, nl.NF_ACCEPT, mark, len(payload)) + payload
        expected += nl.padding(len(payload))
    pkt.id, pkt.done, pkt._new, pkt._mark = 9, False, None, None
    pkt.drop()
    expected += nl.verdict_head(5, 9, nl.NF_DROP, None, None)
    assert pending(queue) == bytes(expected)
    assert len(queue.pieces) == (6 if len(payload) >= 1024 else 0)


@given(st.binary(min_size=0, max_size=2000))
def test_ipv4_tcp_checksum_small_and_odd_lengths(payload: bytes) -> None:
    packet = tcp_packet(b"\xc6\x12\x00\x02", b"\xc6\x12\x01\x02", 40000, 80, payload)
    struct.pack_into("!H", packet, 36, 0xBEEF)  # whatever the field holds
    assert ipv4_tcp_checksum(bytes(packet)) == tcp_checksum(packet[:20], packet[20:])


def test_drain_decodes_packets_and_sends_their_verdicts_in_one_sendmsg() -> None:
    """The binding's read loop over a datagram socket pair standing in for the netlink socket: every packet's id,
    SKB_INFO and payload reach the callback (whatever attributes come between), and the verdicts of the batch
    leave in one datagram, big payloads included."""
    kernel, ours = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    ours.setblocking(False)
    seen: list[tuple[int, int, bytes]] = []
    batch = Batch()

    def callback(pkt: Any) -> None:
        batch.left -= 1
        seen.append((pkt.id, pkt.skb_info, pkt.get_payload()))
        if pkt.id % 2:
            pkt.set_payload(pkt.get_payload()[::-1])
            pkt.accept()
        else:
            pkt.drop()

    queue = NetlinkQueue(0, callback, batch)
    queue._sock = ours
    rng = random.Random(5)
    sent = []
    for packet_id, size, info, mark in (
        (1, 60, None, None),
        (2, 100, 1, 7),
        (3, 5000, 3, None),
        (4, 0, 2, 1),
    ):
        payload = rng.randbytes(size)
        kernel.send(packet_message(packet_id, payload, info, mark))
        sent.append((packet_id, info or 0, payload))
    queue._drain()
    assert seen == sent
    datagram = kernel.recv(1 << 20)
    messages = nl.iter_messages(datagram, len(datagram))
    verdicts = [attrs_of(datagram[at:end]) for at, end, _ in messages]
    assert [v[nl.NFQA_VERDICT_HDR] for v in verdicts] == [
        struct.pack("!II", nl.NF_ACCEPT if i % 2 else nl.NF_DROP, i) for i in (1, 2, 3, 4)
    ]
    assert [v.get(nl.NFQA_PAYLOAD) for v in verdicts] == [sent[0][2][::-1], None, sent[2][2][::-1], None]
    assert queue.gso_packets == 2 and queue.no_verdict == 0
    assert (queue.drains, queue.packets) == (1, 4)  # one read of the socket got the four packets
    queue._drain()  # readable, but nothing there (the loop's wakeup can be spurious): a drain of no packet
    assert (queue.counters()["drains"], queue.counters()["packets"]) == (2, 4)
    with contextlib.suppress(BlockingIOError):
        kernel.setblocking(False)
        assert kernel.recv(1 << 20) == b"", "one datagram for the batch"
    kernel.close()
    ours.close()
