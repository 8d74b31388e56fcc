"""A classic BPF filter for the conntrack event socket, so the kernel drops the events convey does not want
before they are queued to it (pure: builds the program's bytes; ``conntrack.EventSource`` attaches it).

Per connection the kernel sends one NEW, one UPDATE per TCP state change (about five: SYN_RECV, ESTABLISHED,
FIN_WAIT, LAST_ACK, TIME_WAIT) and one DESTROY, for every entry of the namespace. convey needs NEW, DESTROY and
the one UPDATE that says the connection closed, for its own entries only. The filter keeps:

- NEW and DESTROY events whose connmark passes ``MarkFilter``;
- UPDATE events that carry a TCP state in ``states`` (and pass the mark test); ``states=None`` keeps them all;
- with ``closed_mark``: also the UPDATE events whose CTA_MARK has all of those bits (passthrough offload's FIN
  bits, ORed into the connmark at each FIN; its entries report only mark changes and their DESTROY, so the
  first FIN's event is dropped here and the second's is the close; a RST's mark change passes by its state,
  CLOSE, and one that left the entry ESTABLISHED carries no state and is dropped);
- with ``destroy_unless``: only the DESTROY events whose TCP state is not in it (passthrough offload learns a
  connection's close from its UPDATE and its counters from a GET then: the DESTROY of a TIME_WAIT entry, 120 s
  later, says nothing new; one that died in another state, a timeout or a reset, still comes).

It uses the kernel's netlink-attribute helpers (``SKF_AD_NLATTR`` finds a top-level attribute by type,
``SKF_AD_NLATTR_NEST`` one inside a nest), as libnetfilter_conntrack's filters do. Event messages are one per
skb, so the filter sees one event at a time. Loads of the netlink header are in network order while the header
is in host order: the type and flag constants are byte-swapped on little-endian hosts. CTA_MARK is in network
order already. An entry with mark 0 has no CTA_MARK attribute at all.
"""

from __future__ import annotations

import struct
import sys
from collections.abc import Iterable

from convey.dataplane.conntrack_records import MarkFilter
from convey.dataplane.conntrack_wire import (
    CT_DELETE,
    CT_NEW,
    CTA_MARK,
    CTA_PROTOINFO,
    CTA_PROTOINFO_TCP,
    CTA_PROTOINFO_TCP_STATE,
    NLM_F_CREATE,
    NLM_F_EXCL,
)

__all__ = ["event_filter"]

# instruction classes, sizes, modes, operations (include/uapi/linux/filter.h, bpf_common.h)
LD, LDX, ALU, JMP, RET, MISC = 0x00, 0x01, 0x04, 0x05, 0x06, 0x07
W, H, B = 0x00, 0x08, 0x10
IMM, ABS, IND = 0x00, 0x20, 0x40
JA, JEQ, JSET = 0x00, 0x10, 0x40
AND, K, TAX = 0x50, 0x00, 0x00
SKF_AD_OFF = -0x1000
SKF_AD_NLATTR, SKF_AD_NLATTR_NEST = 12, 16
ATTRS = 20  # nlmsghdr (16) + nfgenmsg (4): where the attributes start
_INSN = struct.Struct("=HBBI")  # struct sock_filter: code, jt, jf, k


def _host16(value: int) -> int:
    """What a BPF halfword load (network order) reads for a host-order u16 ``value``."""
    return value if sys.byteorder == "big" else ((value & 0xFF) << 8) | (value >> 8)


def _ancillary(which: int) -> int:
    return (SKF_AD_OFF + which) & 0xFFFFFFFF


class _Asm:
    """A few lines of assembler: jumps name labels, resolved to the forward offsets cBPF wants."""

    def __init__(self) -> None:
        self.code: list[tuple[int, str | int, str | int, int]] = []
        self.labels: dict[str, int] = {}

    def op(self, code: int, k: int = 0, jt: str | int = 0, jf: str | int = 0) -> None:
        self.code.append((code, jt, jf, k & 0xFFFFFFFF))

    def label(self, name: str) -> None:
        self.labels[name] = len(self.code)

    def assemble(self) -> bytes:
        out = []
        for i, (code, jt, jf, k) in enumerate(self.code):
            t = self.labels[jt] - i - 1 if isinstance(jt, str) else jt
            f = self.labels[jf] - i - 1 if isinstance(jf, str) else jf
            if not (0 <= t <= 255 and 0 <= f <= 255):
                raise ValueError("BPF jump out of range")
            if code == JMP | JA and isinstance(jt, str):  # JA jumps by k
                code, k, t, f = JMP | JA, t, 0, 0
            out.append(_INSN.pack(code, t, f, k))
        return b"".join(out)


def _load_tcp_state(a: _Asm, absent: str) -> None:
    """A := the TCP state (CTA_PROTOINFO > CTA_PROTOINFO_TCP > CTA_PROTOINFO_TCP_STATE, a u8 after its 4-byte
    header); jumps to ``absent`` when the message has none."""
    a.op(LD | IMM, ATTRS)
    a.op(LDX | IMM, CTA_PROTOINFO)
    a.op(LD | W | ABS, _ancillary(SKF_AD_NLATTR))
    a.op(JMP | JEQ | K, 0, jt=absent)
    for inner in (CTA_PROTOINFO_TCP, CTA_PROTOINFO_TCP_STATE):
        a.op(LDX | IMM, inner)
        a.op(LD | W | ABS, _ancillary(SKF_AD_NLATTR_NEST))
        a.op(JMP | JEQ | K, 0, jt=absent)
    a.op(MISC | TAX)
    a.op(LD | B | IND, 4)


def event_filter(
    ours: MarkFilter,
    states: Iterable[int] | None,
    destroy_unless: Iterable[int] | None = None,
    closed_mark: int = 0,
) -> bytes:
    """The program (an array of ``struct sock_filter``) for SO_ATTACH_FILTER on a ctnetlink event socket."""
    a = _Asm()
    a.op(LD | H | ABS, 4)  # nlmsg_type
    a.op(JMP | JEQ | K, _host16(CT_DELETE), jt="mark" if destroy_unless is None else "destroy")
    a.op(JMP | JEQ | K, _host16(CT_NEW), jf="drop")
    a.op(LD | H | ABS, 6)  # nlmsg_flags
    a.op(JMP | JSET | K, _host16(NLM_F_CREATE | NLM_F_EXCL), jt="mark")
    if states is None:
        a.op(JMP | JA, jt="mark")
    else:
        if closed_mark:  # an UPDATE whose mark has every close bit: a close, whatever its TCP state
            a.op(LD | IMM, ATTRS)
            a.op(LDX | IMM, CTA_MARK)
            a.op(LD | W | ABS, _ancillary(SKF_AD_NLATTR))
            a.op(JMP | JEQ | K, 0, jt="state")
            a.op(MISC | TAX)
            a.op(LD | W | IND, 4)
            a.op(ALU | AND | K, closed_mark)
            a.op(JMP | JEQ | K, closed_mark, jt="mark")
            a.label("state")
        _load_tcp_state(a, absent="drop")
        for state in sorted(set(states)):
            a.op(JMP | JEQ | K, state, jt="mark")
        a.op(JMP | JA, jt="drop")
    if destroy_unless is not None:
        a.label("destroy")
        _load_tcp_state(a, absent="mark")
        for state in sorted(set(destroy_unless)):
            a.op(JMP | JEQ | K, state, jt="drop")
        a.op(JMP | JA, jt="mark")
    a.label("mark")
    a.op(LD | IMM, ATTRS)
    a.op(LDX | IMM, CTA_MARK)
    a.op(LD | W | ABS, _ancillary(SKF_AD_NLATTR))
    a.op(JMP | JEQ | K, 0, jt="accept" if ours(0) else "drop")  # no CTA_MARK: the mark is 0
    a.op(MISC | TAX)
    a.op(LD | W | IND, 4)
    a.op(ALU | AND | K, ours.mask)
    if ours.value is None:
        a.op(JMP | JEQ | K, 0, jt="drop", jf="accept")
    else:
        a.op(JMP | JEQ | K, ours.value, jt="accept", jf="drop")
    a.label("accept")
    a.op(RET | K, 0xFFFFFFFF)
    a.label("drop")
    a.op(RET | K, 0)
    return a.assemble()
