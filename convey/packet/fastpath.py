"""The fast path: the one per-packet code that the common packet takes, compiled once per decision.

Nearly every packet belongs to a known flow, has no IP options, is not a fragment and carries no SYN, FIN or
RST. For such a packet the decision is fixed when its flow opens: the rewrite (new header bytes and checksum
deltas) and the verdict. ``compile_passthrough`` and ``compile_dsr`` build a closure over the flow tables, the
counters and a few ``struct`` functions, all bound to locals, that handles exactly these packets: one
``struct`` call reads the header, one header guard (written once, below) checks it, the 12 bytes 12..24 find
the flow, two ``pack_into`` calls write the new checksums and bytes 12..24 (the flow's head; ``struct`` writes
its first 12 bytes) into a copy, and the flow's and the
decision's counters move on. Per packet it allocates the unpacked header, the copy and the bytes it returns.

Everything else (a new flow, a SYN, FIN or RST, IP options, a fragment, a malformed packet, a packet that
makes an EMBRYONIC flow ESTABLISHED) goes to ``fallback``, the decision's full path, which parses the packet
with ``ipv4.parse``; the full path gives the same answer and the same counts for the packets the fast path
takes (``tests/unit/test_fastpath.py`` checks both over generated packet sequences). An unexpected exception
goes to ``on_error``, which counts it and drops the packet; without ``on_error`` it propagates.
``bench/hotpath.py`` measures the cost per packet.

The closure answers ``bytes`` (accept with these bytes: the rewritten packet), an ``int`` (DSR ``mac``: accept
unchanged with this fwmark), or whatever ``fallback`` answers. One closure serves every mode:

- passthrough ``decide``: ``forward`` and ``reverse`` are the flow table's two dicts; a hit in ``forward`` is
  a client -> VIP packet, a hit in ``reverse`` a return packet (server -> balancer);
- passthrough ``ingress`` / ``ret``: one of the two dicts is ``NO_FLOWS``, so only one direction is taken;
- DSR: ``reverse`` is ``NO_FLOWS`` (no return keys); ``rewrite`` False (``mac``) answers the flow's fwmark.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar, cast

from convey.packet.counters import DsrCounters, PassthroughCounters
from convey.packet.flows import Flow, count_tables
from convey.packet.ipv4 import HOT_CSUM, HOT_CSUM_HEAD, HOT_HEADER

__all__ = ["NO_FLOWS", "Packet", "compile_dsr", "compile_passthrough"]

R = TypeVar("R")
Packet = bytes | bytearray

NO_FLOWS: Mapping[bytes, Flow] = {}  # a table nothing is found in: the direction the closure does not take


def compile_passthrough(
    forward: Mapping[bytes, Flow],
    reverse: Mapping[bytes, Flow],
    counters: PassthroughCounters,
    fallback: Callable[[Packet, float], R],
    on_error: Callable[[Packet], R] | None = None,
) -> Callable[[Packet, float], bytes | R]:
    """Passthrough: ``forward`` hits are client -> VIP packets, ``reverse`` hits are return packets."""
    fast = _compile(forward, reverse, counters, None, True, fallback, on_error)
    return cast("Callable[[Packet, float], bytes | R]", fast)


def compile_dsr(
    forward: Mapping[bytes, Flow],
    counters: DsrCounters,
    rewrite: bool,
    fallback: Callable[[Packet, float], R],
    on_error: Callable[[Packet], R] | None = None,
) -> Callable[[Packet, float], bytes | int | R]:
    """The DSR fast path: ``rewrite`` (``ip``) answers the rewritten bytes, otherwise (``mac``) the fwmark."""
    return _compile(forward, NO_FLOWS, None, counters, rewrite, fallback, on_error)


def _compile(
    forward: Mapping[bytes, Flow],
    reverse: Mapping[bytes, Flow],
    pt: PassthroughCounters | None,
    dsr: DsrCounters | None,
    rewrite: bool,
    fallback: Callable[[Packet, float], R],
    on_error: Callable[[Packet], R] | None,
) -> Callable[[Packet, float], bytes | int | R]:
    """The one closure (module doc); ~75 lines: straight-line code on purpose, one Python frame per packet."""
    forward_get = forward.get
    reverse_get = reverse.get
    read_head = HOT_HEADER.unpack_from
    write_head = HOT_CSUM_HEAD.pack_into
    write_csum = HOT_CSUM.pack_into
    fwd_counts, ret_counts = count_tables()  # what one packet of each size adds to a flow's count

    def fast(payload: Packet, now: float) -> bytes | int | R:
        try:
            n = len(payload)
            if n >= 40:
                # The header guard: IPv4 without options, the whole packet (not a cut copy, no trailing
                # bytes), TCP, not a fragment, no SYN, FIN or RST, a TCP header inside the packet.
                vihl, total, frag, proto, ip_csum, key, offset, flags, tcp_csum = read_head(payload)
                thl = offset >> 2 & 0x3C
                if (
                    vihl == 0x45
                    and total == n
                    and proto == 6
                    and not frag & 0x3FFF
                    and not flags & 7
                    and 20 <= thl <= n - 20
                ):
                    flow = forward_get(key)
                    # A DSR flow still EMBRYONIC (0) takes the full path, which establishes it; passthrough
                    # establishes a flow on its first return packet, so here EMBRYONIC will do. CLOSING (2)
                    # flows take the full path: after a RST, a packet shows whether the connection lives on.
                    if flow is not None and ((state := flow.state) == 1 or (pt is not None and not state)):
                        size = n - 20 - thl
                        flow.last_seen = now
                        flow.count += fwd_counts[size]
                        if pt is not None:
                            pt.ingress_accepted += 1
                            pt.bytes_tx += size
                        elif dsr is not None:
                            dsr.accepted += 1
                            dsr.bytes_tx += size
                            if not rewrite:
                                mark: int = flow.fwmark  # type: ignore[attr-defined]  # a DsrFlow
                                return mark
                            dsr.rewrites += 1
                        buf = bytearray(payload)
                        write_head(buf, 10, (ip_csum - flow.ip_delta) % 0xFFFF, flow.fwd_head)
                        write_csum(buf, 36, (tcp_csum - flow.tcp_delta) % 0xFFFF)
                        return bytes(buf)
                    flow = reverse_get(key)
                    if flow is not None and flow.state == 1 and pt is not None:  # else: the full path
                        size = n - 20 - thl
                        flow.last_seen = now
                        flow.count += ret_counts[size]
                        pt.return_accepted += 1
                        pt.bytes_rx += size
                        buf = bytearray(payload)  # the return deltas are the forward ones negated
                        write_head(buf, 10, (ip_csum + flow.ip_delta) % 0xFFFF, flow.ret_head)
                        write_csum(buf, 36, (tcp_csum + flow.tcp_delta) % 0xFFFF)
                        return bytes(buf)
        except Exception:
            if on_error is None:
                raise
            return on_error(payload)
        return fallback(payload, now)

    return fast
