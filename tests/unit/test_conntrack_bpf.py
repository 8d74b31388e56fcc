"""The conntrack event socket filter (convey.dataplane.conntrack_bpf), run by a small classic-BPF interpreter
that implements what the program uses, including the kernel's netlink-attribute helpers. The kernel accepting
and applying the same program is checked in tests/netns/test_conntrack.py."""

from __future__ import annotations

import struct

import pytest

from convey.dataplane import conntrack_bpf as bpf
from convey.dataplane.conntrack_records import CLOSED_STATES, MarkFilter, TcpState
from tests.unit.test_conntrack_wire import DESTROY_DOWNLOAD, NEW_SYN_SENT, UPDATE_SYN_RECV, UPDATE_TIME_WAIT

INSN = struct.Struct("=HBBI")


def nla_find(data: bytes, start: int, end: int, wanted: int) -> int:
    off = start
    while off + 4 <= end:
        length, typ = struct.unpack_from("=HH", data, off)
        if length < 4 or off + length > end:
            return 0
        if typ & 0x3FFF == wanted:
            return off
        off += (length + 3) & ~3
    return 0


def run(program: bytes, data: bytes) -> int:
    """Execute ``program`` on ``data`` as the kernel's sk_filter would; returns the program's result."""
    insns = [INSN.unpack_from(program, i) for i in range(0, len(program), INSN.size)]
    a = x = pc = 0
    for _ in range(1000):
        code, jt, jf, k = insns[pc]
        pc += 1
        cls = code & 0x07
        if cls in (bpf.LD, bpf.LDX):
            mode, size = code & 0xE0, code & 0x18
            if mode == bpf.IMM:
                value = k
            elif mode == bpf.ABS and k >= 0x80000000:  # ancillary
                which = k - (bpf.SKF_AD_OFF & 0xFFFFFFFF)
                if which == bpf.SKF_AD_NLATTR:
                    value = nla_find(data, a, len(data), x)
                elif which == bpf.SKF_AD_NLATTR_NEST:
                    length = struct.unpack_from("=H", data, a)[0]
                    value = nla_find(data, a + 4, min(a + length, len(data)), x)
                else:
                    raise AssertionError(f"ancillary {which}")
            else:
                off = k + (x if mode == bpf.IND else 0)
                fmt = {bpf.W: "!I", bpf.H: "!H", bpf.B: "!B"}[size]
                if off + struct.calcsize(fmt) > len(data):
                    return 0  # the kernel ends the program with 0 on an out-of-bounds load
                value = struct.unpack_from(fmt, data, off)[0]
            if cls == bpf.LD:
                a = value
            else:
                x = value
        elif cls == bpf.ALU:
            assert code == bpf.ALU | bpf.AND | bpf.K
            a &= k
        elif cls == bpf.JMP:
            op = code & 0xF0
            if op == bpf.JA:
                pc += k
            else:
                taken = a == k if op == bpf.JEQ else bool(a & k)
                pc += jt if taken else jf
        elif cls == bpf.RET:
            return k
        elif cls == bpf.MISC:
            x = a
        else:
            raise AssertionError(f"opcode {code:#x}")
    raise AssertionError("no RET")


def with_mark(data: bytes, mark: int | None) -> bytes:
    """The message with its CTA_MARK changed, or removed (``None``: how the kernel sends mark 0)."""
    out = bytearray(data)
    off = 20
    while off < len(out):
        length, typ = struct.unpack_from("=HH", out, off)
        if typ == 8:
            if mark is None:
                del out[off : off + 8]
                struct.pack_into("=I", out, 0, len(out))
            else:
                struct.pack_into("!I", out, off + 4, mark)
            return bytes(out)
        off += (length + 3) & ~3
    raise AssertionError("no CTA_MARK")


def test_keeps_new_and_destroy_and_only_the_closing_updates() -> None:
    program = bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES)
    assert len(program) % INSN.size == 0
    assert run(program, NEW_SYN_SENT) and run(program, DESTROY_DOWNLOAD)
    assert run(program, UPDATE_TIME_WAIT)
    assert not run(program, UPDATE_SYN_RECV)


def with_state(message: bytes, state: int) -> bytes:
    """``message`` with its TCP state (CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE) replaced."""
    data = bytearray(message)
    info = nla_find(data, 20, len(data), bpf.CTA_PROTOINFO)
    tcp = nla_find(data, info + 4, info + struct.unpack_from("=H", data, info)[0], bpf.CTA_PROTOINFO_TCP)
    at = nla_find(data, tcp + 4, tcp + struct.unpack_from("=H", data, tcp)[0], bpf.CTA_PROTOINFO_TCP_STATE)
    assert info and tcp and at
    data[at + 4] = state
    return bytes(data)


def test_destroys_of_closed_entries_dropped_on_request() -> None:
    """Passthrough offload (opens from decisions): a DESTROY in TIME_WAIT is dropped (the close and the counters
    came before); one in CLOSE (a SYN answered with a RST) or another state (a timeout) still comes."""
    program = bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES, destroy_unless=[TcpState.TIME_WAIT])
    assert run(program, UPDATE_TIME_WAIT) and not run(program, UPDATE_SYN_RECV)
    assert not run(program, with_state(DESTROY_DOWNLOAD, TcpState.TIME_WAIT))
    assert run(program, with_state(DESTROY_DOWNLOAD, TcpState.CLOSE))
    timed_out = with_state(DESTROY_DOWNLOAD, 1)  # SYN_SENT: a SYN nobody answered
    assert run(program, timed_out) and not run(program, with_mark(timed_out, 0x10000))
    assert run(bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES), with_state(DESTROY_DOWNLOAD, 7))


def test_an_update_with_every_close_bit_is_kept_whatever_its_state() -> None:
    """Passthrough offload's close bits (ORed into the connmark at each FIN and a RST): the second FIN's or the
    RST's event passes; the first FIN's, another mark's, or one without the bits asked for does not."""
    ours = MarkFilter(0xFFFFFF)
    program = bpf.event_filter(ours, CLOSED_STATES, [TcpState.TIME_WAIT], closed_mark=0xC00000)
    assert run(program, with_mark(UPDATE_SYN_RECV, 0xC00100))
    assert not run(program, with_mark(UPDATE_SYN_RECV, 0x400100))  # half a close
    assert not run(program, with_mark(UPDATE_SYN_RECV, 0x100))
    assert not run(program, with_mark(UPDATE_SYN_RECV, None))
    assert run(program, with_mark(UPDATE_TIME_WAIT, 0x100))  # by state still (an entry picked up mid-stream)
    # a RST's bit: kept when the event carries the state CLOSE, dropped without a state (a forged RST)
    assert run(program, with_state(with_mark(UPDATE_SYN_RECV, 0x200100), TcpState.CLOSE))
    assert not run(program, without_protoinfo(with_mark(UPDATE_SYN_RECV, 0x200100)))
    exact = bpf.event_filter(MarkFilter(0xFF000000, 0x2000000), CLOSED_STATES, closed_mark=0xC00000)
    assert run(exact, with_mark(UPDATE_SYN_RECV, 0x2C00100))
    assert not run(exact, with_mark(UPDATE_SYN_RECV, 0x1C00100))  # another worker's
    assert not run(bpf.event_filter(ours, CLOSED_STATES), with_mark(UPDATE_SYN_RECV, 0xC00100))


def test_all_updates_when_no_states_are_given() -> None:
    program = bpf.event_filter(MarkFilter(0xFF00), None)
    assert run(program, UPDATE_SYN_RECV) and run(program, UPDATE_TIME_WAIT)


@pytest.mark.parametrize("message", [NEW_SYN_SENT, UPDATE_TIME_WAIT, DESTROY_DOWNLOAD])
def test_marks(message: bytes) -> None:
    any_bit = bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES)
    assert run(any_bit, with_mark(message, 0x1FF))
    assert not run(any_bit, with_mark(message, 0x10000))
    assert not run(any_bit, with_mark(message, None))
    exact = bpf.event_filter(MarkFilter(0xFFFF0000, 0x80000000), CLOSED_STATES)
    assert run(exact, with_mark(message, 0x80000101))
    assert not run(exact, with_mark(message, 0x80010101))
    zero_ok = bpf.event_filter(MarkFilter(0xFF, 0), CLOSED_STATES)
    assert run(zero_ok, with_mark(message, None))


def test_other_messages_are_dropped() -> None:
    program = bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES)
    other = bytearray(NEW_SYN_SENT)
    struct.pack_into("=H", other, 4, 0x0201)  # an expectation event (subsystem 2)
    assert not run(program, bytes(other))
    assert not run(program, NEW_SYN_SENT[:18])


def without_protoinfo(data: bytes) -> bytes:
    """``data`` with its CTA_PROTOINFO renamed to an unknown type: an event that carries no TCP state."""
    message = bytearray(data)
    off = 20
    while off < len(message):
        length, typ = struct.unpack_from("=HH", message, off)
        if typ & 0x3FFF == 4:
            struct.pack_into("=H", message, off + 2, 0x8000 | 30)  # no longer CTA_PROTOINFO
        off += (length + 3) & ~3
    return bytes(message)


def test_update_without_protoinfo_is_dropped() -> None:
    assert not run(bpf.event_filter(MarkFilter(0xFF00), CLOSED_STATES), without_protoinfo(UPDATE_TIME_WAIT))
