"""The offload planes' verdict thread (convey.dataplane.verdict_sender): the messages it writes, and how."""

from __future__ import annotations

import os
import socket
import struct

from hypothesis import given
from hypothesis import strategies as st

from convey.dataplane.verdict_sender import NF_ACCEPT, NF_DROP, VerdictSender, verdict_message

NLMSG = struct.Struct("=IHHII")
NFGEN = struct.Struct("!BBH")
NLA = struct.Struct("=HH")


def parse(data: bytes) -> list[dict[str, object]]:
    """NFQNL_MSG_VERDICT messages back into fields, the way the kernel reads them (nfqnl_recv_verdict)."""
    out = []
    off = 0
    while off < len(data):
        length, mtype, flags, _seq, _pid = NLMSG.unpack_from(data, off)
        assert length >= NLMSG.size + NFGEN.size and off + length <= len(data)
        assert mtype == 3 << 8 | 1 and flags == 1  # NFNL_SUBSYS_QUEUE, NFQNL_MSG_VERDICT; NLM_F_REQUEST
        family, version, queue = NFGEN.unpack_from(data, off + NLMSG.size)
        assert (family, version) == (0, 0)
        msg: dict[str, object] = {"queue": queue}
        at = off + NLMSG.size + NFGEN.size
        while at < off + length:
            ln, typ = NLA.unpack_from(data, at)
            value = data[at + 4 : at + ln]
            if typ == 2:
                msg["verdict"], msg["id"] = struct.unpack("!II", value)
            elif typ == 3:
                (msg["mark"],) = struct.unpack("!I", value)
            elif typ == 10:
                msg["payload"] = value
            else:
                raise AssertionError(f"unexpected attribute {typ}")
            at += (ln + 3) & ~3
        assert at == off + length
        out.append(msg)
        off += (length + 3) & ~3
    return out


def test_accept_with_a_mark_and_drop() -> None:
    assert parse(verdict_message(3, 41, NF_ACCEPT, 0x200)) == [
        {"queue": 3, "verdict": NF_ACCEPT, "id": 41, "mark": 0x200}
    ]
    assert parse(verdict_message(0, 7, NF_DROP)) == [{"queue": 0, "verdict": NF_DROP, "id": 7}]


@given(
    st.integers(0, 65535),
    st.integers(0, 2**32 - 1),
    st.none() | st.integers(0, 2**32 - 1),
    st.none() | st.binary(max_size=1600),
)
def test_any_verdict_reads_back(queue: int, packet_id: int, mark: int | None, payload: bytes | None) -> None:
    data = verdict_message(queue, packet_id, NF_ACCEPT, mark, payload)
    assert len(data) % 4 == 0
    expected: dict[str, object] = {"queue": queue, "verdict": NF_ACCEPT, "id": packet_id}
    if mark is not None:
        expected["mark"] = mark
    if payload is not None:
        expected["payload"] = payload
    assert parse(data) == [expected]


def test_the_thread_writes_every_verdict_in_order_and_flushes_at_close() -> None:
    # a socketpair stands for the queue's netlink socket: each write is one datagram
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
    try:
        sender = VerdictSender(ours.fileno(), queue_num=1)
        for i in range(299):
            sender.accept(i, i)
        sender.drop(299)
        sender.close()
        theirs.setblocking(False)
        got: list[dict[str, object]] = []
        datagrams = 0
        while True:
            try:
                got.extend(parse(theirs.recv(1 << 20)))
            except BlockingIOError:
                break
            datagrams += 1
        assert [m["id"] for m in got] == list(range(300))
        assert got[5] == {"queue": 1, "verdict": NF_ACCEPT, "id": 5, "mark": 5}
        assert got[299] == {"queue": 1, "verdict": NF_DROP, "id": 299}
        assert sender.sent == 300 and sender.sends == datagrams and not sender.errors
        assert os.get_blocking(ours.fileno())  # the sender changed no flag of the shared file
    finally:
        ours.close()
        theirs.close()


def test_a_failed_write_is_counted_not_raised() -> None:
    r, w = os.pipe()
    os.close(r)  # writing to a pipe without a reader: EPIPE
    try:
        sender = VerdictSender(w)
        sender.put(verdict_message(1, 1, NF_ACCEPT))
        sender.close()
        assert sender.errors == {"EPIPE": 1} and sender.sent == 0
    finally:
        os.close(w)
