"""ctnetlink decoding and encoding (convey.dataplane.conntrack_wire) on bytes the kernel really sent.

The samples were captured on the development VM (kernel 6.18) from a passthrough-offload balancer (routed bed:
client 198.18.0.2, VIP 198.18.0.1, server 198.18.2.2:8080 behind source 198.18.2.1) and, for the dump line, from a
DSR balancer where convey created the entry with a DNAT to 198.19.0.12:8080.
"""

from __future__ import annotations

import errno
import socket
import struct

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pyroute2.netlink.nfnetlink.nfctsocket import nfct_msg

from convey.dataplane import conntrack_requests as requests
from convey.dataplane import conntrack_wire as wire
from convey.dataplane.conntrack_records import (
    CtKind,
    CtRecord,
    FlowTuple,
    HeaderSizes,
    TcpState,
    payload_bytes,
)

NEW_SYN_SENT = bytes.fromhex(
    "cc00000000010006000000000000000002000000340001801400018008000100c612000208000200c61200011c000280"
    "0500010006000000060002008ac600000600030000500000340002801400018008000100c612020208000200c6120201"
    "1c0002800500010006000000060002001f900000060003008ac6000008000c004f3fc38308000300000001b808000700"
    "00000078300004802c0001800500010001000000050002000a0000000500030000000000060004000300000006000500"
    "000000000800080000000101"
)
UPDATE_SYN_RECV = bytes.fromhex(
    "cc00000000010000000000000000000002000000340001801400018008000100c612000208000200c61200011c000280"
    "0500010006000000060002008ac600000600030000500000340002801400018008000100c612020208000200c6120201"
    "1c0002800500010006000000060002001f900000060003008ac6000008000c004f3fc38308000300000001ba08000700"
    "0000003c300004802c0001800500010002000000050002000a000000050003000a000000060004000300000006000500"
    "230000000800080000000101"
)
UPDATE_TIME_WAIT = bytes.fromhex(
    "cc00000000010000000000000000000002000000340001801400018008000100c612000208000200c61200011c000280"
    "0500010006000000060002008ac600000600030000500000340002801400018008000100c612020208000200c6120201"
    "1c0002800500010006000000060002001f900000060003008ac6000008000c004f3fc38308000300000001be08000700"
    "00000078300004802c0001800500010007000000050002000a000000050003000a000000060004002300000006000500"
    "270000000800080000000101"
)
# the DESTROY of a 20,000,000-byte download (the client sent "GET 20000000\n", 13 bytes)
DESTROY_DOWNLOAD = bytes.fromhex(
    "e40000000201000000000000547e1fb402000000340001801400018008000100c612000208000200c61200011c000280"
    "0500010006000000060002008ac600000600030000500000340002801400018008000100c612020208000200c6120201"
    "1c0002800500010006000000060002001f900000060003008ac6000008000c004f3fc38308000300000003be08000700"
    "000000761c0009800c00010000000000000000b80c00020000000000000025811c000a800c000100000000000000"
    "01a80c00020000000000013186f0100004800c00018005000100070000000800080000000101"
)
DUMP_DSR_NAT = bytes.fromhex(
    "2801000000012200040000009521000002000000340001801400018008000100c613000208000200c61300641c000280"
    "0500010006000000060002009c4000000600030000500000340002801400018008000100c613000c08000200c6130002"
    "1c0002800500010006000000060002001f900000060003009c40000008000300000001ac080008000000010108000c00"
    "88bdfc3c08000b0000000001080007000000012b300004802c0001800500010003000000050002000000000005000300"
    "00000000060004000a000000060005000a0000001c0009800c00010000000000000000000c0002000000000000000000"
    "1c000a800c00010000000000000000000c00020000000000000000001c00188008000100000000000800020000000000"
    "0800030000000000"
)
DONE = bytes.fromhex("1400000003000200040000009521000000000000")
ACK = bytes.fromhex("2400000002000001020000009521000000000000dc000000000105060200000000000000")

CLIENT = FlowTuple("198.18.0.2", "198.18.0.1", 35526, 80)
SERVER_SIDE = FlowTuple("198.18.2.2", "198.18.2.1", 8080, 35526)


def one(data: bytes) -> CtRecord:
    (item,) = wire.decode(data)
    assert isinstance(item, CtRecord)
    return item


def test_new_event() -> None:
    rec = one(NEW_SYN_SENT)
    assert rec.kind is CtKind.NEW
    assert (rec.orig, rec.reply) == (CLIENT, SERVER_SIDE)
    assert rec.mark == 0x101 and rec.ct_id == 0x4F3FC383
    assert rec.tcp_state is TcpState.SYN_SENT
    assert not rec.has_counters and rec.bytes_orig is None


def test_update_events_carry_the_tcp_state() -> None:
    assert one(UPDATE_SYN_RECV).kind is CtKind.UPDATE
    assert one(UPDATE_SYN_RECV).tcp_state is TcpState.SYN_RECV
    closed = one(UPDATE_TIME_WAIT)
    assert closed.tcp_state is TcpState.TIME_WAIT and closed.ct_id == one(NEW_SYN_SENT).ct_id


def test_destroy_carries_counters_and_gives_the_payload() -> None:
    rec = one(DESTROY_DOWNLOAD)
    assert rec.kind is CtKind.DESTROY and rec.tcp_state is TcpState.TIME_WAIT
    assert (rec.packets_orig, rec.bytes_orig) == (184, 9601)
    assert (rec.packets_reply, rec.bytes_reply) == (424, 20023024)
    received = payload_bytes(rec.packets_reply or 0, rec.bytes_reply or 0, HeaderSizes())
    assert abs(received - 20_000_000) / 20_000_000 < 0.0001
    # client -> server: 13 bytes and 183 ACKs, a few of which carried a SACK block (12 more header bytes each)
    assert 13 <= payload_bytes(rec.packets_orig or 0, rec.bytes_orig or 0, HeaderSizes()) <= 13 + 2 * 12


def test_dump_line_with_dnat_and_the_end_of_the_dump() -> None:
    rec, done = wire.decode(DUMP_DSR_NAT + DONE)
    assert isinstance(rec, CtRecord) and rec.kind is CtKind.DUMP
    assert rec.orig == FlowTuple("198.19.0.2", "198.19.0.100", 40000, 80)
    assert rec.reply == FlowTuple("198.19.0.12", "198.19.0.2", 8080, 40000)  # the DNAT convey asked for
    assert rec.tcp_state is TcpState.ESTABLISHED and rec.mark == 0x101
    assert (rec.packets_orig, rec.bytes_orig, rec.packets_reply, rec.bytes_reply) == (0, 0, 0, 0)
    assert done == wire.NlDone(4)


def test_acknowledgements_and_errors() -> None:
    assert wire.decode(ACK) == [wire.NlError(seq=2, errno=0)]
    error = bytearray(ACK)
    struct.pack_into("=i", error, 16, -errno.EEXIST)
    assert wire.decode(bytes(error)) == [wire.NlError(seq=2, errno=errno.EEXIST)]


def test_several_messages_in_one_datagram() -> None:
    items = wire.decode(NEW_SYN_SENT + UPDATE_SYN_RECV + UPDATE_TIME_WAIT + DESTROY_DOWNLOAD)
    assert [i.kind for i in items if isinstance(i, CtRecord)] == [
        CtKind.NEW,
        CtKind.UPDATE,
        CtKind.UPDATE,
        CtKind.DESTROY,
    ]


def test_truncated_datagram_keeps_the_complete_messages() -> None:
    assert len(wire.decode(NEW_SYN_SENT + UPDATE_SYN_RECV[:100])) == 1
    assert wire.decode(NEW_SYN_SENT[:10]) == []


def test_tuple_layout_other_than_the_usual_takes_the_attribute_walk() -> None:
    # a zone attribute inside the tuple (CTA_TUPLE_ZONE = 3) changes its length: the fast path must step aside
    inner = requests._tuple_attr(wire.CTA_TUPLE_ORIG, CLIENT)[4:] + requests._nla(3, struct.pack("!H", 7))
    zoned = requests._nla(wire.CTA_TUPLE_ORIG | wire.NLA_F_NESTED, inner)
    body = NEW_SYN_SENT[16:20] + zoned + NEW_SYN_SENT[20 + 52 :]
    msg = struct.pack("=IHHII", 16 + len(body), wire.CT_NEW, 0x600, 0, 0) + body
    rec = one(msg)
    assert rec.orig == CLIENT and rec.reply == SERVER_SIDE and rec.mark == 0x101


def test_learnt_layouts_read_like_the_attribute_walk() -> None:
    samples = [NEW_SYN_SENT, UPDATE_SYN_RECV, UPDATE_TIME_WAIT, DESTROY_DOWNLOAD, DUMP_DSR_NAT]
    wire._LAYOUTS.clear()
    walked = [wire.decode(s) for s in samples]  # the first of each shape takes the walk and learns it
    assert len(wire._LAYOUTS) == 4 and all(wire._LAYOUTS.values())
    assert [wire.decode(s) for s in samples] == walked


def test_same_length_other_layout_falls_back_to_the_walk() -> None:
    wire.decode(NEW_SYN_SENT)  # learnt
    # swap CTA_ID and CTA_STATUS (same sizes, same total length): the headers no longer match the layout
    data = bytearray(NEW_SYN_SENT)
    at = 20 + 52 + 52
    data[at : at + 16] = NEW_SYN_SENT[at + 8 : at + 16] + NEW_SYN_SENT[at : at + 8]
    rec = one(bytes(data))
    assert rec.ct_id == one(NEW_SYN_SENT).ct_id and rec.status == one(NEW_SYN_SENT).status


@given(st.binary(max_size=600))
def test_decode_never_raises(data: bytes) -> None:
    wire.decode(data)


@given(st.binary(min_size=1, max_size=200), st.integers(min_value=20, max_value=203))
def test_corrupted_real_messages_never_raise(noise: bytes, at: int) -> None:
    data = bytearray(NEW_SYN_SENT)
    data[at : at + len(noise)] = noise
    wire.decode(bytes(data[: len(NEW_SYN_SENT)]))


@pytest.mark.parametrize("data", [NEW_SYN_SENT, UPDATE_TIME_WAIT, DESTROY_DOWNLOAD, DUMP_DSR_NAT])
def test_same_fields_as_pyroute2(data: bytes) -> None:
    msg = nfct_msg(data)
    msg.decode()
    rec = one(data)

    def tuple_of(name: str) -> FlowTuple:
        t = msg.get_attr(name)
        ip, proto = t.get_attr("CTA_TUPLE_IP"), t.get_attr("CTA_TUPLE_PROTO")
        return FlowTuple(
            ip.get_attr("CTA_IP_V4_SRC"),
            ip.get_attr("CTA_IP_V4_DST"),
            proto.get_attr("CTA_PROTO_SRC_PORT"),
            proto.get_attr("CTA_PROTO_DST_PORT"),
        )

    assert rec.orig == tuple_of("CTA_TUPLE_ORIG") and rec.reply == tuple_of("CTA_TUPLE_REPLY")
    assert rec.mark == msg.get_attr("CTA_MARK") and rec.ct_id == msg.get_attr("CTA_ID")
    assert rec.status == msg.get_attr("CTA_STATUS")
    counters = msg.get_attr("CTA_COUNTERS_REPLY")
    if counters is not None:
        assert rec.bytes_reply == counters.get_attr("CTA_COUNTERS_BYTES")


def parsed(data: bytes) -> nfct_msg:
    msg = nfct_msg(data)
    msg.decode()
    return msg


def test_create_request() -> None:
    orig = FlowTuple("198.19.0.2", "198.19.0.100", 40000, 80)
    data = requests.encode_create(9, orig, mark=0x101, timeout=300, nat_dst=("198.19.0.12", 8080))
    header = struct.unpack_from("=IHHII", data)
    assert header[0] == len(data) and header[1] == wire.CT_NEW and header[3] == 9
    assert header[2] == wire.NLM_F_REQUEST | wire.NLM_F_CREATE | wire.NLM_F_EXCL
    msg = parsed(data)
    assert msg["nfgen_family"] == socket.AF_INET
    assert msg.get_attr("CTA_MARK") == 0x101 and msg.get_attr("CTA_TIMEOUT") == 300
    assert msg.get_attr("CTA_STATUS") == 0xC  # CONFIRMED | ASSURED: the kernel refuses a change of CONFIRMED
    tcp = msg.get_attr("CTA_PROTOINFO").get_attr("CTA_PROTOINFO_TCP")
    assert tcp.get_attr("CTA_PROTOINFO_TCP_STATE") == TcpState.ESTABLISHED
    nat = msg.get_attr("CTA_NAT_DST")
    assert nat.get_attr("CTA_NAT_V4_MINIP") == nat.get_attr("CTA_NAT_V4_MAXIP") == "198.19.0.12"
    assert nat.get_attr("CTA_NAT_PROTO").get_attr("CTA_PROTONAT_PORT_MIN") == 8080
    orig_attr = msg.get_attr("CTA_TUPLE_ORIG")
    assert orig_attr.get_attr("CTA_TUPLE_PROTO").get_attr("CTA_PROTO_SRC_PORT") == 40000
    reply = msg.get_attr("CTA_TUPLE_REPLY").get_attr("CTA_TUPLE_IP")
    assert reply.get_attr("CTA_IP_V4_SRC") == "198.19.0.100"  # the kernel rewrites it from the NAT
    assert parsed(requests.encode_create(1, orig, 0x101, 300)).get_attr("CTA_NAT_DST") is None


def test_dump_get_and_delete_requests() -> None:
    dump = requests.encode_dump(4, mark=0x100, mask=0xFF00)
    assert struct.unpack_from("=HH", dump, 4) == (wire.CT_GET, wire.NLM_F_REQUEST | wire.NLM_F_DUMP)
    msg = parsed(dump)
    assert (msg.get_attr("CTA_MARK"), msg.get_attr("CTA_MARK_MASK")) == (0x100, 0xFF00)
    assert parsed(requests.encode_dump(5)).get_attr("CTA_MARK") is None
    assert struct.unpack_from("=H", requests.encode_dump(5, zero=True), 4)[0] == wire.CT_GET_CTRZERO
    orig = FlowTuple("198.19.0.2", "198.19.0.100", 40000, 80)
    for data, mtype in (
        (requests.encode_delete(6, orig, ack=True), wire.CT_DELETE),
        (requests.encode_get(7, orig), wire.CT_GET),
    ):
        assert struct.unpack_from("=H", data, 4)[0] == mtype
        ip = parsed(data).get_attr("CTA_TUPLE_ORIG").get_attr("CTA_TUPLE_IP")
        assert ip.get_attr("CTA_IP_V4_DST") == "198.19.0.100"


@given(
    st.binary(min_size=4, max_size=4),
    st.binary(min_size=4, max_size=4),
    st.integers(0, 65535),
    st.integers(0, 65535),
    st.integers(0, 0x7FFFFFFF),
    st.booleans(),
)
def test_the_one_pack_get_equals_the_generic_encoding(
    src: bytes, dst: bytes, sport: int, dport: int, seq: int, ack: bool
) -> None:
    orig = FlowTuple(socket.inet_ntoa(src), socket.inet_ntoa(dst), sport, dport)
    generic = requests._message(
        wire.CT_GET,
        wire.NLM_F_REQUEST | (wire.NLM_F_ACK if ack else 0),
        seq,
        requests._tuple_attr(wire.CTA_TUPLE_ORIG, orig),
    )
    assert requests.encode_get_key(seq, orig.key, ack) == generic == requests.encode_get(seq, orig, ack)
