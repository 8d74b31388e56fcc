"""The offload decision for a connection's first packet: which mark to accept it with, or a refusal.

With flow offload the rules queue only the packets that open a connection (conntrack NEW, no connmark yet; see
docs/modes.md); the kernel's conntrack NAT carries everything else. ``OffloadDecision.decide(payload, now)``
is the queue edge's one entry point: the mark to give the packet (``set_mark`` + accept; the nat table DNATs
and SNATs by it and saves it in the connection's connmark), or None to drop it. It never raises.

It decides exactly as the per-packet first packet (``convey.packet.passthrough``) does, with the same pieces
(``ipv4.parse``, ``flow_hash`` of the client tuple, the plane's ``choose``, ``queue_reset``) and counts in the
same vocabulary (``convey.packet.counters.PassthroughCounters``; every queued packet is a client packet):

- malformed (``malformed``, ``fragment``, ``too_long``, kinds in ``parse_errors``): dropped;
- not a VIP (``not_vip``): dropped, no RST;
- not a SYN (``unknown_flow``: a packet conntrack could not attribute, e.g. after its entry was flushed):
  convey does not know its NAT mapping, so it is dropped and answered with a RST (seq = its ACK), so the
  client fails at once instead of retransmitting for minutes;
- a full table (``table_full``: ``full()`` says the connections open reached the capacity) or no healthy
  server (``no_server``): the client is refused with a RST and counted in ``refused`` per frontend;
- otherwise ``mark_of(server id, flow hash)`` gives the mark, and ``ingress_accepted`` and ``flows_opened``
  count it; None (the server has no mark: no source address can carry it) refuses the client as ``no_port``.
  ``on_open(key, mark)`` (if given) hears of it: the 12-byte original tuple (client address, VIP address,
  client port, VIP port), which is how conntrack will name the connection (``decided_ledger``).

What connections actually open, close and carry is learnt from conntrack (``convey.dataplane.
offload_accounting``), not here. A SYN's header sizes (``header_sizes``: IP header, TCP header, timestamps
option) are kept for the byte accounting (``HeaderSizes.from_syn``).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from struct import Struct

from convey.packet.admission import Admission, Chooser
from convey.packet.counters import PassthroughCounters, count_malformed
from convey.packet.ipv4 import Malformed, Parsed, parse

__all__ = ["MarkOf", "OffloadDecision", "syn_timestamps"]

# (server id, flow hash) -> the mark naming (server, source address), or None when there is none
MarkOf = Callable[[str, int], int | None]
# (original tuple key, mark): a connection convey accepted
OnOpen = Callable[[bytes, int], None]
_PORTS = Struct("!HH")

TCPOPT_EOL = 0
TCPOPT_NOP = 1
TCPOPT_TIMESTAMP = 8


def syn_timestamps(payload: bytes, ihl: int, tcp_header_len: int) -> bool:
    """Whether the TCP options of a segment carry the timestamp option (kind 8)."""
    i, end = ihl + 20, min(ihl + tcp_header_len, len(payload))
    while i < end:
        kind = payload[i]
        if kind == TCPOPT_EOL:
            return False
        if kind == TCPOPT_NOP:
            i += 1
            continue
        if kind == TCPOPT_TIMESTAMP:
            return True
        if i + 1 >= end or payload[i + 1] < 2:
            return False
        i += payload[i + 1]
    return False


def _never_full() -> bool:
    return False


class OffloadDecision(Admission):
    """Sans-I/O first-packet decisions; see the module doc. ``vips`` maps (VIP addr, VIP port) to the frontend
    and may be replaced on reload; so may ``mark_of``."""

    def __init__(
        self,
        vips: Mapping[tuple[bytes, int], str],
        choose: Chooser,
        mark_of: MarkOf,
        full: Callable[[], bool] = _never_full,
        *,
        rst_unknown: bool = True,
        on_open: OnOpen | None = None,
    ) -> None:
        self.vips = vips
        self.choose = choose
        self.mark_of = mark_of
        self.full = full
        self.on_open = on_open
        self.rst_unknown = rst_unknown
        self.rst_out: list[bytes] = []
        self.counters = PassthroughCounters()
        self.refused: dict[str, int] = {}  # frontend -> clients refused (no_server, table_full, no_port)
        self.parse_errors: dict[Malformed, int] = dict.fromkeys(Malformed, 0)
        # (IP header, TCP header, timestamps) of the last SYN decided: for HeaderSizes.from_syn
        self.header_sizes: tuple[int, int, bool] | None = None

    def decide(self, payload: bytes, now: float) -> int | None:
        """The mark to accept a connection's first packet with, or None to drop it (RSTs in ``rst_out``)."""
        counters = self.counters
        try:
            parsed = parse(payload)
            if isinstance(parsed, Malformed):
                count_malformed(counters, self.parse_errors, parsed)
                mark = None
            else:
                mark = self._first(payload, parsed)
        except Exception:
            counters.errors += 1
            mark = None
        if mark is None:
            counters.ingress_dropped += 1
        else:
            counters.ingress_accepted += 1
        return mark

    def expire(self, now: float) -> None:
        """Nothing to expire: conntrack keeps the connections (the plane's housekeeping calls it)."""

    def _first(self, payload: bytes, p: Parsed) -> int | None:
        counters = self.counters
        admitted = self.admit(p, self.full())
        if admitted is None:
            return None
        frontend, choice, hashed = admitted
        mark = self.mark_of(choice[0], hashed)
        if mark is None:
            counters.no_port += 1
            self._refuse(frontend, p)
            return None
        if p.ihl != 20:
            counters.ip_options += 1
        self.header_sizes = (p.ihl, p.tcp_header_len, syn_timestamps(payload, p.ihl, p.tcp_header_len))
        counters.flows_opened += 1
        if self.on_open is not None:
            self.on_open(p.src + p.dst + _PORTS.pack(p.sport, p.dport), mark)
        return mark
