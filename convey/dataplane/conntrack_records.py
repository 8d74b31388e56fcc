"""Typed conntrack records and what convey makes of them (sans-I/O: no sockets, no clock, no root).

A ``CtRecord`` is one conntrack entry as the kernel reports it (an event or a dump line): the original tuple
(client -> VIP), the reply tuple (server -> balancer address and port, after NAT), the connmark that names the
server convey chose, the TCP state and, on DESTROY or in a dump with ``nf_conntrack_acct=1``, the packets and IP
bytes each way. ``conntrack_wire`` decodes them from netlink; ``Ledger`` turns a stream of them into the facts the
stats and the schedulers need: a connection opened, closed, and how many payload bytes it carried.

Payload bytes from IP bytes: conntrack counts each skb once with its whole length, and a GSO/GRO skb carries one
IP+TCP header for many segments, so ``payload = bytes - packets * header``, exact when every packet has the same
header. The header is 20 (IP) + 20 (TCP) + 12 when TCP timestamps are in use (Linux offers them in its SYN and
accepts them by default; the options of the first packet each way, SYN and SYN-ACK, are larger: see
``HeaderSizes.from_syn``). Measured: a 20,000,013-byte upload through passthrough offload counted 377 packets and
20,019,625 bytes: 20,019,625 - 377 * 52 - 8 = 20,000,013, exact.
"""

from __future__ import annotations

import socket
import struct
from collections import OrderedDict
from collections.abc import Iterable
from dataclasses import dataclass, field
from enum import IntEnum
from typing import NamedTuple

__all__ = [
    "CLOSED_STATES",
    "Accounted",
    "Closed",
    "CtKind",
    "CtRecord",
    "FlowTuple",
    "HeaderSizes",
    "Ledger",
    "MarkFilter",
    "Opened",
    "ResyncReport",
    "TcpState",
    "accounted",
    "payload_bytes",
]


_ntoa = socket.inet_ntoa
_PORTS = struct.Struct("!HH")


class CtKind(IntEnum):
    NEW = 1  # event: the entry was confirmed (the first packet passed)
    UPDATE = 2  # event: state, status or mark changed
    DESTROY = 3  # event: the entry is gone; carries the final counters
    DUMP = 4  # a line of a table dump


class TcpState(IntEnum):
    """``enum tcp_conntrack`` (include/uapi/linux/netfilter/nf_conntrack_tcp.h)."""

    NONE = 0
    SYN_SENT = 1
    SYN_RECV = 2
    ESTABLISHED = 3
    FIN_WAIT = 4
    CLOSE_WAIT = 5
    LAST_ACK = 6
    TIME_WAIT = 7
    CLOSE = 8
    SYN_SENT2 = 9


# The connection is over once conntrack reaches these (both FINs and the last ACK seen, or a RST). An entry stays
# in TIME_WAIT for nf_conntrack_tcp_timeout_time_wait (120 s) before its DESTROY: that is what keeps the NAT port.
CLOSED_STATES = frozenset({TcpState.TIME_WAIT, TcpState.CLOSE})
# A DSR balancer sees the client's side only: the client's FIN (FIN_WAIT) is the last thing it will learn.
ONE_WAY_CLOSED_STATES = frozenset({TcpState.FIN_WAIT, TcpState.TIME_WAIT, TcpState.CLOSE})


class FlowTuple(NamedTuple):
    """One direction of a TCP connection as conntrack names it (addresses as dotted quads). NamedTuples, not
    dataclasses, for the records: the decoder builds three per event, and a frozen dataclass costs ~3x more."""

    src: str
    dst: str
    sport: int
    dport: int

    def __str__(self) -> str:
        return f"{self.src}:{self.sport}->{self.dst}:{self.dport}"

    @classmethod
    def from_key(cls, key: bytes) -> FlowTuple:
        """From the 12-byte form the decoder keeps (addresses, then ports, in network order)."""
        return cls(
            _ntoa(key[0:4]), _ntoa(key[4:8]), int.from_bytes(key[8:10], "big"), int.from_bytes(key[10:12])
        )

    @property
    def key(self) -> bytes:
        return socket.inet_aton(self.src) + socket.inet_aton(self.dst) + _PORTS.pack(self.sport, self.dport)


class CtRecord(NamedTuple):
    kind: CtKind
    ct_id: int  # CTA_ID: stable for the entry's lifetime, unique among live entries
    # The tuples in their 12-byte wire form (``FlowTuple.from_key``): decoding them to strings costs more than
    # the rest of an event together, and most events are only counted. ``orig`` and ``reply`` decode them.
    orig_key: bytes  # client:cport -> VIP:vport
    reply_key: (
        bytes  # server:sport -> balancer:eport (passthrough); the reverse of orig when nothing is NATed
    )
    mark: int = 0  # the connmark
    status: int = 0  # IPS_* bits
    tcp_state: TcpState | None = None  # absent from UPDATE events that do not change it
    packets_orig: int | None = None  # None: the kernel sent no counters (not DESTROY, or nf_conntrack_acct=0)
    bytes_orig: int | None = None
    packets_reply: int | None = None
    bytes_reply: int | None = None

    @property
    def has_counters(self) -> bool:
        return self.bytes_orig is not None

    @property
    def orig(self) -> FlowTuple:
        return FlowTuple.from_key(self.orig_key)

    @property
    def reply(self) -> FlowTuple:
        return FlowTuple.from_key(self.reply_key)


@dataclass(frozen=True, slots=True)
class MarkFilter:
    """Which entries are ours: ``mark & mask == value``, or, without ``value``, any mark with a bit in ``mask``.
    With a value the same test can run in the kernel (a dump's CTA_MARK/CTA_MARK_MASK)."""

    mask: int = 0xFFFFFFFF
    value: int | None = None

    def __call__(self, mark: int) -> bool:
        if self.value is None:
            return mark & self.mask != 0
        return mark & self.mask == self.value


@dataclass(frozen=True, slots=True)
class HeaderSizes:
    """IP + TCP header bytes of a data packet, and of the first packet each way (SYN, SYN-ACK)."""

    data: int = 52  # 20 + 20 + 12 (timestamps: NOP NOP TS)
    first: int = 60  # 20 + 40: MSS, SACK-permitted, timestamps, NOP, window scale

    @classmethod
    def from_syn(cls, ip_header_len: int, tcp_header_len: int, timestamps: bool) -> HeaderSizes:
        """Sizes from the client's SYN as the queue saw it. The SYN-ACK is assumed as large as the SYN (Linux
        answers with the same options); data packets carry the timestamp option if the SYN offered it."""
        return cls(data=ip_header_len + 20 + (12 if timestamps else 0), first=ip_header_len + tcp_header_len)


def payload_bytes(packets: int, ip_bytes: int, sizes: HeaderSizes) -> int:
    """TCP payload carried by ``packets`` skbs of ``ip_bytes`` IP bytes in one direction (never negative)."""
    if packets <= 0:
        return 0
    return max(0, ip_bytes - packets * sizes.data - (sizes.first - sizes.data))


# -- the ledger: events in, facts out ------------------------------------------------------------------------


class Opened(NamedTuple):
    ct_id: int
    mark: int
    orig_key: bytes
    reply_key: bytes

    @property
    def orig(self) -> FlowTuple:
        return FlowTuple.from_key(self.orig_key)

    @property
    def reply(self) -> FlowTuple:
        return FlowTuple.from_key(self.reply_key)


class Closed(NamedTuple):
    ct_id: int
    mark: int
    orig_key: bytes
    lost: bool = False  # resync found it gone: its DESTROY (and its last bytes) were never seen

    @property
    def orig(self) -> FlowTuple:
        return FlowTuple.from_key(self.orig_key)


class Accounted(NamedTuple):
    """Payload bytes not reported before: client -> server (``tx``) and server -> client (``rx``)."""

    ct_id: int
    mark: int
    orig_key: bytes
    tx: int
    rx: int

    @property
    def orig(self) -> FlowTuple:
        return FlowTuple.from_key(self.orig_key)


Change = Opened | Closed | Accounted


@dataclass(slots=True)
class ResyncReport:
    entries: int = 0  # our entries in the dump
    opened: int = (
        0  # connections the events had not told us about (live, or already closed: then counted in both)
    )
    closed: int = 0  # connections we thought open that are closed or gone, and those opened and closed unseen
    lost: int = 0  # of those, gone without a DESTROY seen: their last bytes are unknown


@dataclass(slots=True)
class _Open:
    mark: int
    orig_key: bytes


@dataclass(slots=True)
class Ledger:
    """Our connections by conntrack id. ``apply`` takes events, ``resync`` a complete dump of our entries (after
    the event socket overflowed, or at start); both return the changes to fold into stats and schedulers.

    An entry counts as open from its NEW (or first sight) until its TCP state is in ``closed_states`` or it is
    destroyed; each connection yields exactly one ``Opened`` and one ``Closed``. Bytes are reported as
    ``Accounted`` deltas: the final ones with the DESTROY (in TIME_WAIT that comes 120 s after the close, or
    later: the kernel's collector scans a quiet table every 60 s), earlier ones whenever a record that is not a
    DESTROY carries counters (a dump line, or the answer to a GET sent at the close: ``Monitor`` does that), never
    twice.
    """

    ours: MarkFilter = field(default_factory=MarkFilter)
    sizes: HeaderSizes = field(default_factory=HeaderSizes)
    closed_states: frozenset[TcpState] = CLOSED_STATES
    open: dict[int, _Open] = field(default_factory=dict)
    reported: dict[int, tuple[int, int]] = field(default_factory=dict)  # ct id -> (tx, rx) payload reported
    # ids closed and not destroyed yet (TIME_WAIT: up to the table's size): a dump then tells a connection we
    # saw close from one that opened and closed while we were not listening
    closed: set[int] = field(default_factory=set)
    # ids whose DESTROY was applied (oldest first, bounded): a late answer about one of them changes nothing.
    # OrderedDict: dropping a plain dict's first key costs a scan over every key deleted before it (see
    # OffloadAccounting._recent)
    gone: OrderedDict[int, None] = field(default_factory=OrderedDict)
    gone_max: int = 65536

    def apply(self, rec: CtRecord) -> list[Change]:
        if not self.ours(rec.mark):
            return []
        if rec.kind is CtKind.NEW and rec.ct_id in self.gone:
            # The kernel reuses ids: the id hashes the entry's address and tuples, and a client reusing its port
            # (conntrack "reopens" a TIME_WAIT entry: destroy, then a new entry, same slab object, same tuples)
            # gets the id of the entry just destroyed. A NEW is always a new connection (measured: a third of
            # 30,000 short connections through one source address were lost without this).
            del self.gone[rec.ct_id]
            self.closed.discard(rec.ct_id)
            self.reported.pop(rec.ct_id, None)
        elif rec.ct_id in self.gone:
            return []
        if rec.kind is CtKind.DESTROY:
            self.closed.discard(rec.ct_id)
            self.gone[rec.ct_id] = None
            if len(self.gone) > self.gone_max:
                self.gone.popitem(last=False)
        changes: list[Change] = []
        known = rec.ct_id in self.open
        closing = rec.kind is CtKind.DESTROY or rec.tcp_state in self.closed_states
        # An UPDATE without a TCP state (a status or mark change) never opens: it may concern a closed entry.
        news = rec.kind is not CtKind.UPDATE or rec.tcp_state is not None
        if not known and not closing and news and rec.ct_id not in self.closed:
            self.open[rec.ct_id] = _Open(rec.mark, rec.orig_key)
            changes.append(Opened(rec.ct_id, rec.mark, rec.orig_key, rec.reply_key))
        elif known and closing:
            del self.open[rec.ct_id]
            if rec.kind is not CtKind.DESTROY:
                self.closed.add(rec.ct_id)
            changes.append(Closed(rec.ct_id, rec.mark, rec.orig_key))
        elif closing and rec.kind is CtKind.DUMP and rec.ct_id not in self.closed:
            # opened and closed while nobody listened (an overflow, a restart): count it all the same
            self.closed.add(rec.ct_id)
            changes.append(Opened(rec.ct_id, rec.mark, rec.orig_key, rec.reply_key))
            changes.append(Closed(rec.ct_id, rec.mark, rec.orig_key))
        if rec.has_counters:
            delta = self._delta(rec, final=rec.kind is CtKind.DESTROY)
            if delta is not None:
                changes.append(delta)
        elif rec.kind is CtKind.DESTROY:
            self.reported.pop(rec.ct_id, None)
        return changes

    def resync(self, entries: Iterable[CtRecord]) -> tuple[list[Change], ResyncReport]:
        """Bring the ledger in line with a dump of the whole table (only our entries are looked at)."""
        report = ResyncReport()
        changes: list[Change] = []
        seen: set[int] = set()
        for rec in entries:
            if not self.ours(rec.mark):
                continue
            report.entries += 1
            seen.add(rec.ct_id)
            was_open = rec.ct_id in self.open
            for change in self.apply(rec):
                changes.append(change)
                if isinstance(change, Opened) and not was_open:
                    report.opened += 1
                elif isinstance(change, Closed):
                    report.closed += 1
        for ct_id in [i for i in self.open if i not in seen]:
            gone = self.open.pop(ct_id)
            self.reported.pop(ct_id, None)
            changes.append(Closed(ct_id, gone.mark, gone.orig_key, lost=True))
            report.closed += 1
            report.lost += 1
        for ct_id in [i for i in self.reported if i not in seen and i not in self.open]:
            del self.reported[ct_id]  # closed and gone while we were not listening
        self.closed &= seen
        return changes, report

    def _delta(self, rec: CtRecord, final: bool) -> Accounted | None:
        return accounted(self.reported, rec.ct_id, rec, self.sizes, final)


def accounted(
    reported: dict[int, tuple[int, int]], ident: int, rec: CtRecord, sizes: HeaderSizes, final: bool
) -> Accounted | None:
    """The payload bytes ``rec``'s counters add to what ``reported[ident]`` says was reported already (each way,
    never negative), as an ``Accounted`` named ``ident``; None when nothing is new. ``final``: the connection's
    last counters (``reported`` forgets it), else ``reported`` remembers them."""
    tx = payload_bytes(rec.packets_orig or 0, rec.bytes_orig or 0, sizes)
    rx = payload_bytes(rec.packets_reply or 0, rec.bytes_reply or 0, sizes)
    old_tx, old_rx = reported.pop(ident, (0, 0)) if final else reported.get(ident, (0, 0))
    d_tx, d_rx = max(0, tx - old_tx), max(0, rx - old_rx)
    if not final:
        reported[ident] = (max(tx, old_tx), max(rx, old_rx))
    if d_tx == 0 and d_rx == 0:
        return None
    return Accounted(ident, rec.mark, rec.orig_key, d_tx, d_rx)
