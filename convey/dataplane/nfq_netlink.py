"""nfnetlink_queue on the wire: the messages convey's own queue binding sends and reads (pure, no socket).

The layout is the kernel's (include/uapi/linux/netfilter/nfnetlink_queue.h, net/netfilter/nfnetlink_queue.c):
a netlink header (``nlmsghdr``, host byte order), a ``nfgenmsg`` (family, version, the queue number big-endian)
and attributes (``nlattr``: length and type in host order, payload padded to 4 bytes; the values inside are
big-endian). What convey uses:

- configuration (``NFQNL_MSG_CONFIG``): bind the queue (``NFQNL_CFG_CMD_BIND``), then copy mode PACKET with a
  copy range, the queue length and the flags (``NFQA_CFG_F_GSO``: whole GSO packets, checksums maybe partial);
  each with ``NLM_F_ACK`` so the kernel answers with an ``NLMSG_ERROR`` carrying 0 or an errno.
- packets (``NFQNL_MSG_PACKET``): ``decode_packet`` finds the packet id, the mark, ``NFQA_SKB_INFO`` (the
  ``SKB_CSUMNOTREADY`` / ``SKB_GSO`` flags), ``NFQA_CAP_LEN`` and where the payload lies in the buffer.
- verdicts (``NFQNL_MSG_VERDICT``): ``verdict_head`` builds everything but the payload bytes; several
  verdicts go to the kernel in one ``send``. Each carries ``NLM_F_REQUEST`` or the kernel ignores it silently;
  a verdict the kernel refuses comes back as an ``NLMSG_ERROR`` (``decode_error``).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

__all__ = [
    "NFQA_SKB_CSUMNOTREADY",
    "NFQA_SKB_GSO",
    "PACKET_TYPE",
    "Packet",
    "config_bind",
    "config_params",
    "config_unbind",
    "decode_error",
    "decode_packet",
    "message_header",
    "verdict_head",
]

# netlink
NLMSG_ERROR = 2
NLMSG_DONE = 3
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4
NLA_TYPE_MASK = 0x3FFF  # without NLA_F_NESTED / NLA_F_NET_BYTEORDER
# nfnetlink
NFNL_SUBSYS_QUEUE = 3
NFNETLINK_V0 = 0
# message types
NFQNL_MSG_PACKET = 0
NFQNL_MSG_VERDICT = 1
NFQNL_MSG_CONFIG = 2
PACKET_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_PACKET
VERDICT_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_VERDICT
CONFIG_TYPE = NFNL_SUBSYS_QUEUE << 8 | NFQNL_MSG_CONFIG
# packet and verdict attributes
NFQA_PACKET_HDR = 1
NFQA_VERDICT_HDR = 2
NFQA_MARK = 3
NFQA_PAYLOAD = 10
NFQA_CAP_LEN = 13
NFQA_SKB_INFO = 14
NFQA_SKB_CSUMNOTREADY = 1 << 0  # the checksum is partial (CHECKSUM_PARTIAL): the pseudo-header sum only
NFQA_SKB_GSO = 1 << 1  # a GSO super-packet (larger than the MTU; segmented on the way out)
# configuration
NFQNL_CFG_CMD_BIND = 1
NFQNL_CFG_CMD_UNBIND = 2
NFQNL_COPY_PACKET = 2
NFQA_CFG_CMD = 1
NFQA_CFG_PARAMS = 2
NFQA_CFG_QUEUE_MAXLEN = 3
NFQA_CFG_MASK = 4
NFQA_CFG_FLAGS = 5
NFQA_CFG_F_FAIL_OPEN = 1 << 0
NFQA_CFG_F_GSO = 1 << 2
NFQNL_MAX_COPY_RANGE = 0xFFFF - 4  # the kernel caps the copy range here (an attribute's length is 16 bits)
# verdicts
NF_DROP = 0
NF_ACCEPT = 1

NLMSG_HDR = struct.Struct("=IHHII")  # len, type, flags, seq, pid
NFGEN_HDR = struct.Struct("!BBH")  # family, version, res_id (the queue number)
NLA_HDR = struct.Struct("=HH")  # len, type
BE32 = struct.Struct("!I")
_HEAD_LEN = NLMSG_HDR.size + NFGEN_HDR.size  # 20: where a message's attributes start
# A verdict: nlmsghdr, nfgenmsg, NFQA_VERDICT_HDR (verdict, id); then NFQA_MARK and the NFQA_PAYLOAD header, if any.
_VERDICT = struct.Struct("=IHHIIBBHHH4s4s")
_MARK_ATTR = struct.Struct("=HH4s")


def _align(n: int) -> int:
    return (n + 3) & ~3


def attribute(kind: int, value: bytes) -> bytes:
    """One attribute, padded to 4 bytes."""
    return NLA_HDR.pack(4 + len(value), kind) + value + b"\x00" * (_align(len(value)) - len(value))


def message_header(kind: int, flags: int, queue_num: int, body_len: int, seq: int = 0) -> bytes:
    """The netlink and nfnetlink headers of a message whose attributes take ``body_len`` bytes."""
    return NLMSG_HDR.pack(_HEAD_LEN + body_len, kind, flags, seq, 0) + NFGEN_HDR.pack(
        socket.AF_UNSPEC, NFNETLINK_V0, queue_num
    )


def _config(queue_num: int, attrs: bytes, seq: int) -> bytes:
    return message_header(CONFIG_TYPE, NLM_F_REQUEST | NLM_F_ACK, queue_num, len(attrs), seq) + attrs


def config_bind(queue_num: int, seq: int) -> bytes:
    """``NFQNL_CFG_CMD_BIND``: this socket takes the queue (EBUSY when another socket holds it)."""
    return _config(
        queue_num, attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_BIND, socket.AF_INET)), seq
    )


def config_unbind(queue_num: int, seq: int) -> bytes:
    return _config(
        queue_num, attribute(NFQA_CFG_CMD, struct.pack("!BxH", NFQNL_CFG_CMD_UNBIND, socket.AF_INET)), seq
    )


def config_params(queue_num: int, copy_range: int, maxlen: int, flags: int, mask: int, seq: int) -> bytes:
    """Copy mode PACKET with ``copy_range`` bytes, the queue length, and the ``flags`` under ``mask``."""
    attrs = (
        attribute(NFQA_CFG_PARAMS, struct.pack("!IB", copy_range, NFQNL_COPY_PACKET))
        + attribute(NFQA_CFG_QUEUE_MAXLEN, BE32.pack(maxlen))
        + attribute(NFQA_CFG_FLAGS, BE32.pack(flags))
        + attribute(NFQA_CFG_MASK, BE32.pack(mask))
    )
    return _config(queue_num, attrs, seq)


def decode_error(buf: bytes | bytearray | memoryview, offset: int = 0) -> tuple[int, int]:
    """(errno, seq of the message it answers) of an ``NLMSG_ERROR`` at ``offset``; errno 0 is an ack."""
    (error,) = struct.unpack_from("=i", buf, offset + NLMSG_HDR.size)
    seq = NLMSG_HDR.unpack_from(buf, offset + NLMSG_HDR.size + 4)[3]
    return -error, seq


class Packet(NamedTuple):
    """What ``decode_packet`` found in one ``NFQNL_MSG_PACKET``."""

    packet_id: int
    skb_info: int  # NFQA_SKB_* flags, 0 when the attribute is absent
    mark: int
    cap_len: int  # the packet's real length when the copy was cut (NFQA_CAP_LEN), else 0
    payload_at: int  # where the payload starts in the buffer
    payload_len: int


def decode_packet(buf: bytes | bytearray | memoryview, offset: int, end: int) -> Packet:
    """The fields of the packet message at ``buf[offset:end]`` (one message: ``end`` is its end). An absent
    payload gives ``payload_len`` 0; a message too short for its attributes stops the walk there."""
    at = offset + _HEAD_LEN
    packet_id = skb_info = mark = cap_len = payload_at = payload_len = 0
    unpack_attr = NLA_HDR.unpack_from
    unpack_u32 = BE32.unpack_from
    while at + 4 <= end:
        length, kind = unpack_attr(buf, at)
        if length < 4 or at + length > end:
            break
        kind &= NLA_TYPE_MASK
        if kind == NFQA_PAYLOAD:
            payload_at, payload_len = at + 4, length - 4
        elif kind == NFQA_PACKET_HDR:
            packet_id = unpack_u32(buf, at + 4)[0]
        elif kind == NFQA_SKB_INFO:
            skb_info = unpack_u32(buf, at + 4)[0]
        elif kind == NFQA_MARK:
            mark = unpack_u32(buf, at + 4)[0]
        elif kind == NFQA_CAP_LEN:
            cap_len = unpack_u32(buf, at + 4)[0]
        at += (length + 3) & ~3
    return Packet(packet_id, skb_info, mark, cap_len, payload_at, payload_len)


def verdict_head(
    queue_num: int, packet_id: int, verdict: int, mark: int | None, payload_len: int | None
) -> bytes:
    """A verdict message without its payload bytes: ``NFQA_VERDICT_HDR``, ``NFQA_MARK`` when ``mark`` is not
    None, and the ``NFQA_PAYLOAD`` attribute header when ``payload_len`` is not None; the caller appends the
    payload and ``padding(payload_len)`` zero bytes. The message length counts them."""
    body = 12 + (8 if mark is not None else 0) + (4 + _align(payload_len) if payload_len is not None else 0)
    head = _VERDICT.pack(
        _HEAD_LEN + body, VERDICT_TYPE, NLM_F_REQUEST, 0, 0, socket.AF_UNSPEC, NFNETLINK_V0,
        socket.htons(queue_num), 12, NFQA_VERDICT_HDR, BE32.pack(verdict), BE32.pack(packet_id),
    )  # fmt: skip
    if mark is not None:
        head += _MARK_ATTR.pack(8, NFQA_MARK, BE32.pack(mark))
    if payload_len is not None:
        head += NLA_HDR.pack(4 + payload_len, NFQA_PAYLOAD)
    return head


def padding(payload_len: int) -> bytes:
    return b"\x00" * (-payload_len & 3)


def iter_messages(buf: bytes | bytearray | memoryview, size: int) -> list[tuple[int, int, int]]:
    """(offset, end, type) of every netlink message in the first ``size`` bytes of ``buf`` (one datagram)."""
    out = []
    at = 0
    while at + NLMSG_HDR.size <= size:
        length, kind = NLMSG_HDR.unpack_from(buf, at)[:2]
        if length < NLMSG_HDR.size or at + length > size:
            break
        out.append((at, at + length, kind))
        at += _align(length)
    return out
