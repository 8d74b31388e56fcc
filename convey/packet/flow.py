"""One flow: a TCP connection through the balancer, as the decisions and the flow table (``flows``) see it.

A flow is small (issue 10: 1,277 bytes per flow before; ``bench/flow_memory.py`` measures it): a ``__slots__``
object holding what the fast path reads and writes, and nothing it could compute. Each direction's rewrite is
its ``head`` (the 12 bytes a packet's bytes 12..24 become; the return head is the mirror of the forward key and
the forward head the mirror of the return key, so the keys are not kept: the dicts hold them) and the RFC 1624
checksum deltas, computed once; the return direction's deltas are the forward ones negated, so the fast path
adds them there instead of keeping two more. Delta values are shared ``int`` objects (``_shared_u16``). The forward
head carries after its 12 bytes what the sequence checks need (``SeqInfo`` of both directions: where the
sender's sequence space starts, the receiver's window scale), written by the full path; ``struct`` writes only
the first 12. Both directions' packets and payload bytes are one integer (``count``), one addition per packet.
The frontend, server id and the flags (FIN seen each way, in the table, full NAT) are one shared tuple per
combination. Addresses, ports and keys are properties derived from the heads.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from enum import IntEnum
from struct import Struct
from typing import NamedTuple

from convey.packet.checksum import delta
from convey.packet.ipv4 import flow_key

__all__ = [
    "FWD_PACKET",
    "NO_WSCALE",
    "RET_SHIFT",
    "CountTables",
    "DsrFlow",
    "Flow",
    "FlowState",
    "Rewrite",
    "SeqInfo",
    "count_tables",
    "mirror",
    "new_passthrough_flow",
]


class FlowState(IntEnum):
    EMBRYONIC = 0
    ESTABLISHED = 1
    CLOSING = 2


# A flow's ``count``: client -> server payload bytes (bits 0..47) and packets (48..79), server -> client payload
# bytes (80..127) and packets (128 on). The fast path adds one entry of ``count_tables()`` per packet: one
# addition, no intermediate integer.
FWD_PACKET = 1 << 48
_BYTES = FWD_PACKET - 1
_PACKETS = (1 << 32) - 1
RET_SHIFT = 80  # a return packet adds ``(size + FWD_PACKET) << RET_SHIFT``
_U16: list[
    int
] = []  # the checksum deltas of every flow are these objects (no int per flow), made at first use


class CountTables(NamedTuple):
    """What one packet of each size adds to a flow's ``count``, per direction (the fast path's tables)."""

    fwd: tuple[int, ...]
    ret: tuple[int, ...]


@functools.cache
def count_tables() -> CountTables:
    """Built once, when the first decision is compiled (~7 MB), not at import."""
    fwd = tuple(size + FWD_PACKET for size in range(0x10000))
    return CountTables(fwd, tuple(n << RET_SHIFT for n in fwd))


def _shared_u16(value: int) -> int:
    if not _U16:
        _U16.extend(range(0x10000))
    return _U16[value & 0xFFFF]


_MIRROR = Struct("!4s4s2s2s")
# After a head's 12 bytes: the sender's first sequence number (ISN + 1), the receiver's window scale (or
# NO_WSCALE: none offered), whether the first sequence number is known.
_SEQ = Struct("!IBB")  # one direction's
_SEQS = 12  # where the client's direction starts in the forward head; the server's follows (_SEQ.size on)
NO_WSCALE = 15

# Flags in a flow's ``meta``
_FIN_FWD, _FIN_RET, _IN_TABLE, _NAT, _RST = 1, 2, 4, 8, 16
_UNKNOWN = _SEQ.pack(0, 0, 0) * 2
_METAS: dict[tuple[str, str, int], tuple[str, str, int]] = {}


def _meta(frontend: str, server_id: str, flags: int) -> tuple[str, str, int]:
    key = (frontend, server_id, flags)
    return _METAS.setdefault(key, key)


def mirror(key: bytes) -> bytes:
    """The key of the other direction: (src, dst, sport, dport) -> (dst, src, dport, sport)."""
    a, b, c, d = _MIRROR.unpack_from(key)
    return bytes(b + a + d + c)


@dataclass(frozen=True, slots=True)
class Rewrite:
    """What one direction's packets are rewritten to, and the checksum deltas that rewrite implies.

    ``addrs`` (new src + dst) goes at IPv4 offset 12, ``ports`` (new sport + dport) at TCP offset 0; ``head``
    is both, i.e. bytes 12..24 of a packet without IP options. ``ip_delta`` covers the addresses,
    ``tcp_delta`` the addresses (pseudo-header) and the ports.
    """

    addrs: bytes
    ports: bytes
    head: bytes
    ip_delta: int
    tcp_delta: int

    @classmethod
    def between(cls, old_key: bytes, new_key: bytes) -> Rewrite:
        """The rewrite turning packets keyed ``old_key`` into packets keyed ``new_key`` (flow keys)."""
        if len(old_key) != 12 or len(new_key) != 12:
            raise ValueError("flow keys are 12 bytes")
        return cls(
            new_key[:8], new_key[8:], new_key, delta(old_key[:8], new_key[:8]), delta(old_key, new_key)
        )


class SeqInfo(NamedTuple):
    """One direction's sequence space as the flow knows it: ``base`` is the sender's ISN + 1 (None until its
    SYN was seen), ``wscale`` the window scale of the *receiver* (``NO_WSCALE``: it offered none)."""

    base: int | None
    wscale: int


class Flow:
    """One connection. Mutable: the decisions update its counts, state and ``last_seen`` per packet.

    ``fwd_head`` rewrites client -> VIP packets, ``ret_head`` server -> balancer packets (passthrough; for DSR
    it is the mirror of the forward key and never written). ``ip_delta``/``tcp_delta`` are the forward
    direction's checksum deltas; the return direction adds them (``(csum + d) % 0xFFFF``) where the forward
    one subtracts them.
    """

    # ``pick`` (set by the plane when the flow opens, unset otherwise): when it opened and the scheduler's detail
    # in one int, for GET /flows (convey.control.flows.stamp).
    __slots__ = (
        "count",
        "fwd_head",
        "ip_delta",
        "last_seen",
        "meta",
        "pick",
        "ret_head",
        "state",
        "tcp_delta",
    )
    pick: int

    def __init__(
        self,
        frontend: str,
        server_id: str,
        fwd_key: bytes,
        fwd_head: bytes,
        now: float,
        nat: bool,
    ) -> None:
        rw = Rewrite.between(fwd_key, fwd_head)
        self.fwd_head = fwd_head + _UNKNOWN
        self.ret_head = mirror(fwd_key)
        self.ip_delta = _shared_u16(rw.ip_delta)
        self.tcp_delta = _shared_u16(rw.tcp_delta)
        self.last_seen = now
        self.state: int = FlowState.EMBRYONIC
        self.count = 0  # both directions' payload bytes and packets (see FWD_PACKET)
        self.meta = _meta(frontend, server_id, _NAT if nat else 0)

    # -- what the flow is, derived

    @property
    def frontend(self) -> str:
        return self.meta[0]

    @property
    def server_id(self) -> str:
        return self.meta[1]

    @property
    def fwd_key(self) -> bytes:
        return mirror(self.ret_head[:12])

    @property
    def ret_key(self) -> bytes:
        """The return key (empty for DSR: no return direction)."""
        return mirror(self.fwd_head[:12]) if self.meta[2] & _NAT else b""

    @property
    def client_addr(self) -> bytes:
        return self.ret_head[4:8]

    @property
    def vip_addr(self) -> bytes:
        return self.ret_head[:4]

    @property
    def client_port(self) -> int:
        return int.from_bytes(self.ret_head[10:12], "big")

    @property
    def vip_port(self) -> int:
        return int.from_bytes(self.ret_head[8:10], "big")

    @property
    def server_addr(self) -> bytes:
        return self.fwd_head[4:8]

    @property
    def server_port(self) -> int:
        return int.from_bytes(self.fwd_head[10:12], "big")

    @property
    def lb_addr(self) -> bytes:
        return self.fwd_head[:4] if self.meta[2] & _NAT else b""

    @property
    def eport(self) -> int:
        return int.from_bytes(self.fwd_head[8:10], "big") if self.meta[2] & _NAT else 0

    @property
    def fwd(self) -> Rewrite:
        return Rewrite.between(self.fwd_key, self.fwd_head[:12])

    @property
    def ret(self) -> Rewrite:
        return Rewrite.between(self.ret_key or self.ret_head[:12], self.ret_head[:12])

    @property
    def fwd_packets(self) -> int:
        return self.count >> 48 & _PACKETS

    @property
    def fwd_bytes(self) -> int:
        return self.count & _BYTES

    @property
    def ret_packets(self) -> int:
        return self.count >> 128

    @property
    def ret_bytes(self) -> int:
        return self.count >> RET_SHIFT & _BYTES

    # -- flags

    def _flag(self, flag: int) -> bool:
        return bool(self.meta[2] & flag)

    def _set_flag(self, flag: int, on: bool) -> None:
        f, s, flags = self.meta
        flags = flags | flag if on else flags & ~flag
        if flags != self.meta[2]:
            self.meta = _meta(f, s, flags)

    @property
    def fin_fwd(self) -> bool:
        return self._flag(_FIN_FWD)

    @fin_fwd.setter
    def fin_fwd(self, on: bool) -> None:
        self._set_flag(_FIN_FWD, on)

    @property
    def fin_ret(self) -> bool:
        return self._flag(_FIN_RET)

    @fin_ret.setter
    def fin_ret(self, on: bool) -> None:
        self._set_flag(_FIN_RET, on)

    @property
    def rst_closed(self) -> bool:
        """CLOSING because of a RST (in the window, but maybe forged and ignored by its endpoint): a later packet
        that is no RST and no SYN shows the connection alive, and the flow is ESTABLISHED again."""
        return self._flag(_RST)

    @rst_closed.setter
    def rst_closed(self, on: bool) -> None:
        self._set_flag(_RST, on)

    @property
    def in_table(self) -> bool:
        """Owned by FlowTable: whether the flow is in it."""
        return self._flag(_IN_TABLE)

    @in_table.setter
    def in_table(self, on: bool) -> None:
        self._set_flag(_IN_TABLE, on)

    # -- sequence spaces (the RST check)

    @property
    def fwd_seq(self) -> SeqInfo:
        """The client's sequence space (the server's window scale)."""
        return _seq_info(self.fwd_head, _SEQS)

    @property
    def ret_seq(self) -> SeqInfo:
        """The server's sequence space (the client's window scale)."""
        return _seq_info(self.fwd_head, _SEQS + _SEQ.size)

    def set_fwd_seq(self, base: int | None, wscale: int) -> None:
        """The client's ISN + 1 (None: unknown) and the server's window scale (NO_WSCALE: none offered)."""
        self.fwd_head = _with_seq(self.fwd_head, _SEQS, base, wscale)

    def set_ret_seq(self, base: int | None, wscale: int) -> None:
        """The server's ISN + 1 (None: unknown) and the client's window scale (NO_WSCALE: none offered)."""
        self.fwd_head = _with_seq(self.fwd_head, _SEQS + _SEQ.size, base, wscale)

    def __repr__(self) -> str:
        return (
            f"Flow({self.frontend!r}, {self.server_id!r}, fwd_key={self.fwd_key.hex()}, "
            f"fwd_head={self.fwd_head[:12].hex()}, state={self.state}, last_seen={self.last_seen})"
        )


def _seq_info(head: bytes, at: int) -> SeqInfo:
    base, wscale, known = _SEQ.unpack_from(head, at)
    return SeqInfo(base if known else None, wscale)


def _with_seq(head: bytes, at: int, base: int | None, wscale: int) -> bytes:
    seq = _SEQ.pack((base or 0) & 0xFFFFFFFF, wscale, base is not None)
    return head[:at] + seq + head[at + _SEQ.size :]


class DsrFlow(Flow):
    """A DSR flow: ``verdict`` is the (verdict, fwmark) pair its packets get, built once."""

    __slots__ = ("fwmark", "verdict")

    def __init__(
        self, frontend: str, server_id: str, fwd_key: bytes, fwd_head: bytes, now: float, fwmark: int
    ) -> None:
        super().__init__(frontend, server_id, fwd_key, fwd_head, now, False)
        self.fwmark = fwmark
        self.verdict: tuple[int, int] = (1, 0)


def new_passthrough_flow(
    frontend: str,
    client_addr: bytes,
    client_port: int,
    vip_addr: bytes,
    vip_port: int,
    server_id: str,
    server_addr: bytes,
    server_port: int,
    lb_addr: bytes,
    eport: int,
    now: float,
) -> Flow:
    """A full-NAT flow: ``client:cport -> VIP:vport`` becomes ``LB:eport -> server:sport`` and back."""
    fwd_key = flow_key(client_addr, vip_addr, client_port, vip_port)
    return Flow(frontend, server_id, fwd_key, flow_key(lb_addr, server_addr, eport, server_port), now, True)
