"""ctnetlink requests convey sends: dump (optionally by mark, optionally zeroing counters), get, delete, and
create (DSR: the entry for a connection the balancer sees one way only). Pure: arguments in, bytes out; the
layout is described in ``conntrack_wire``.
"""

from __future__ import annotations

import socket
import struct

from convey.dataplane.conntrack_records import FlowTuple, TcpState
from convey.dataplane.conntrack_wire import (
    CT_DELETE,
    CT_GET,
    CT_GET_CTRZERO,
    CT_NEW,
    CTA_IP_V4_DST,
    CTA_IP_V4_SRC,
    CTA_MARK,
    CTA_MARK_MASK,
    CTA_NAT_DST,
    CTA_NAT_PROTO,
    CTA_NAT_V4_MAXIP,
    CTA_NAT_V4_MINIP,
    CTA_PROTO_DST_PORT,
    CTA_PROTO_NUM,
    CTA_PROTO_SRC_PORT,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_FLAGS_ORIGINAL,
    CTA_PROTOINFO_TCP_FLAGS_REPLY,
    CTA_PROTOINFO_TCP_STATE,
    CTA_PROTONAT_PORT_MAX,
    CTA_PROTONAT_PORT_MIN,
    CTA_STATUS,
    CTA_TIMEOUT,
    CTA_TUPLE_IP,
    CTA_TUPLE_ORIG,
    CTA_TUPLE_PROTO,
    CTA_TUPLE_REPLY,
    IP_CT_TCP_FLAG_BE_LIBERAL,
    IP_CT_TCP_FLAG_SACK_PERM,
    IPS_ASSURED,
    IPS_CONFIRMED,
    NLA_F_NESTED,
    NLM_F_ACK,
    NLM_F_CREATE,
    NLM_F_DUMP,
    NLM_F_EXCL,
    NLM_F_REQUEST,
)

__all__ = ["encode_create", "encode_delete", "encode_dump", "encode_get", "encode_get_key"]

_HDR = struct.Struct("=IHHII")  # nlmsghdr (host order)
_NFGEN = struct.Struct("!BBH")
_NLA = struct.Struct("=HH")
_BE16 = struct.Struct("!H")
_BE32 = struct.Struct("!I")


def _nla(typ: int, payload: bytes) -> bytes:
    length = 4 + len(payload)
    return _NLA.pack(length, typ) + payload + b"\0" * (-length % 4)


def _nest(typ: int, *parts: bytes) -> bytes:
    return _nla(typ | NLA_F_NESTED, b"".join(parts))


def _message(mtype: int, flags: int, seq: int, attrs: bytes = b"") -> bytes:
    body = _NFGEN.pack(socket.AF_INET, 0, 0) + attrs
    return _HDR.pack(_HDR.size + len(body), mtype, flags, seq, 0) + body


def _tuple_attr(typ: int, t: FlowTuple) -> bytes:
    return _nest(
        typ,
        _nest(
            CTA_TUPLE_IP,
            _nla(CTA_IP_V4_SRC, socket.inet_aton(t.src)),
            _nla(CTA_IP_V4_DST, socket.inet_aton(t.dst)),
        ),
        _nest(
            CTA_TUPLE_PROTO,
            _nla(CTA_PROTO_NUM, bytes([socket.IPPROTO_TCP])),
            _nla(CTA_PROTO_SRC_PORT, _BE16.pack(t.sport)),
            _nla(CTA_PROTO_DST_PORT, _BE16.pack(t.dport)),
        ),
    )


def encode_dump(seq: int, mark: int | None = None, mask: int = 0xFFFFFFFF, zero: bool = False) -> bytes:
    """Dump the table; with ``mark``, only entries with ``ctmark & mask == mark`` (filtered by the kernel).
    ``zero``: read and zero the counters (IPCTNL_MSG_CT_GET_CTRZERO)."""
    attrs = b""
    if mark is not None:
        attrs = _nla(CTA_MARK, _BE32.pack(mark)) + _nla(CTA_MARK_MASK, _BE32.pack(mask))
    return _message(CT_GET_CTRZERO if zero else CT_GET, NLM_F_REQUEST | NLM_F_DUMP, seq, attrs)


# A GET by original tuple, whole: nlmsghdr, nfgenmsg, CTA_TUPLE_ORIG {CTA_TUPLE_IP {SRC, DST}, CTA_TUPLE_PROTO
# {NUM, SRC_PORT, DST_PORT}}, as ``_tuple_attr`` lays it out. One pack per request: the monitor sends one at every
# close, and the generic encoder costs ~5x more.
_GET = struct.Struct("=IHHII BBH HH HH HH4s HH4s HH HHB3x HH2s2x HH2s2x")


def encode_get(seq: int, orig: FlowTuple, ack: bool = False) -> bytes:
    """One entry by its original tuple: the answer is a CT_NEW message with the counters (decoded as an UPDATE),
    or an error (ENOENT: gone)."""
    return encode_get_key(seq, orig.key, ack)


def encode_get_key(seq: int, key: bytes, ack: bool = False) -> bytes:
    """``encode_get`` for a tuple in its 12-byte form (``CtRecord.orig_key``)."""
    return _GET.pack(
        _GET.size, CT_GET, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, 0,
        socket.AF_INET, 0, 0,
        52, CTA_TUPLE_ORIG | NLA_F_NESTED,
        20, CTA_TUPLE_IP | NLA_F_NESTED, 8, CTA_IP_V4_SRC, key[0:4], 8, CTA_IP_V4_DST, key[4:8],
        28, CTA_TUPLE_PROTO | NLA_F_NESTED, 5, CTA_PROTO_NUM, socket.IPPROTO_TCP,
        6, CTA_PROTO_SRC_PORT, key[8:10], 6, CTA_PROTO_DST_PORT, key[10:12],
    )  # fmt: skip


def encode_delete(seq: int, orig: FlowTuple, ack: bool = False) -> bytes:
    return _message(
        CT_DELETE, NLM_F_REQUEST | (NLM_F_ACK if ack else 0), seq, _tuple_attr(CTA_TUPLE_ORIG, orig)
    )


def encode_create(
    seq: int,
    orig: FlowTuple,
    mark: int,
    timeout: int,
    nat_dst: tuple[str, int] | None = None,
    ack: bool = False,
) -> bytes:
    """Create an ESTABLISHED entry for a connection the balancer sees one way only (DSR): its later packets find
    it, get ``mark`` restored from it and, with ``nat_dst`` (server address, port), are DNATed by the kernel. The
    TCP window tracking is off for it (BE_LIBERAL), as for an entry picked up mid-stream. Fails with EEXIST when
    an entry with this tuple exists (delete it first)."""
    reverse = FlowTuple(orig.dst, orig.src, orig.dport, orig.sport)
    liberal = bytes([IP_CT_TCP_FLAG_BE_LIBERAL | IP_CT_TCP_FLAG_SACK_PERM] * 2)  # flags, mask
    attrs = [
        _tuple_attr(CTA_TUPLE_ORIG, orig),
        _tuple_attr(CTA_TUPLE_REPLY, reverse),
        _nla(CTA_STATUS, _BE32.pack(IPS_CONFIRMED | IPS_ASSURED)),  # CONFIRMED: else EBUSY
        _nla(CTA_TIMEOUT, _BE32.pack(timeout)),
        _nla(CTA_MARK, _BE32.pack(mark)),
        _nest(
            CTA_PROTOINFO,
            _nest(
                CTA_PROTOINFO_TCP,
                _nla(CTA_PROTOINFO_TCP_STATE, bytes([TcpState.ESTABLISHED])),
                _nla(CTA_PROTOINFO_TCP_FLAGS_ORIGINAL, liberal),
                _nla(CTA_PROTOINFO_TCP_FLAGS_REPLY, liberal),
            ),
        ),
    ]
    if nat_dst is not None:
        addr = socket.inet_aton(nat_dst[0])
        port = _BE16.pack(nat_dst[1])
        attrs.append(
            _nest(
                CTA_NAT_DST,
                _nla(CTA_NAT_V4_MINIP, addr),
                _nla(CTA_NAT_V4_MAXIP, addr),
                _nest(CTA_NAT_PROTO, _nla(CTA_PROTONAT_PORT_MIN, port), _nla(CTA_PROTONAT_PORT_MAX, port)),
            )
        )
    flags = NLM_F_REQUEST | NLM_F_CREATE | NLM_F_EXCL | (NLM_F_ACK if ack else 0)
    return _message(CT_NEW, flags, seq, b"".join(attrs))
