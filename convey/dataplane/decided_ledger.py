"""Passthrough offload's ledger: a connection opens when convey decides it, and conntrack says when it closed.

The first ``Ledger`` (``conntrack_records``) learns every connection from conntrack's NEW event. Passthrough
offload does not need that event: convey itself decided the connection's first packet (``decided``), so it
opens the connection there, keyed by its original tuple (client:port -> VIP:port, which one live conntrack
entry holds at a time), and conntrack only has to say when it closed. No NEW event to receive and decode, and the
kernel's filter drops the DESTROY of a connection already closed: with the other changes of that work, convey's
CPU per connection went from ~184 to ~137 us (bench/README.md).

- ``decided(key, mark, now)``: an ``Opened`` for a tuple not open yet (a retransmitted SYN decided twice opens
  once). Each connection gets a serial number, ``uid``: the ``ct_id`` of the changes it yields, so the
  accounting never mixes two connections that reused a tuple.
- ``apply(record)``: an UPDATE whose mark has every ``closed_mark`` bit (the FIN bits the rules OR in at the
  FINs of both ways: an entry made at a SYN reports only its mark changes and its DESTROY), an UPDATE in a
  closed state (TIME_WAIT; CLOSE, which a RST's mark change carries; entries picked up mid-stream report every
  state), or a DESTROY closes the connection open on its tuple (``Closed``); with ``fetch_counters`` the
  monitor then asks for the entry's counters (a GET), whose answer gives the bytes (``Accounted``, final).
  Passthrough offload turns it off: its bytes come from the kernel's byte counters (``offload_bytes``), which
  cost convey less CPU per connection than the GET (bench/README.md). Any record of an open connection teaches its conntrack id;
  one with counters (a check's answer, a dump line) reports the bytes so far.
- ``unconfirmed(now)``: connections decided long ago whose entry conntrack never named: the monitor asks for
  them (a GET by tuple). ``missing(key)``: the answer was "no such entry": the accepted packet never made one
  (dropped after the verdict), so the connection is closed as ``lost`` and counted in ``unconfirmed_closed``.
- ``resync(entries)``: a dump of our entries (at start, after an event overflow): open ones not known are
  adopted (a restart), closed or missing ones we hold open are closed, known ones give their bytes so far.

Sans-I/O: records in, changes out; the clock is passed in or read from ``clock``.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from convey.dataplane.conntrack_records import (
    CLOSED_STATES,
    Change,
    Closed,
    CtKind,
    CtRecord,
    HeaderSizes,
    MarkFilter,
    Opened,
    ResyncReport,
    TcpState,
    accounted,
)

__all__ = ["CHECK_AFTER", "DecidedLedger"]

CHECK_AFTER = 10.0  # seconds a decided connection may go without conntrack naming its entry before a check
CHECK_AGAIN = 60.0  # seconds between two checks of the same connection (an answer lost, say)
RESYNC_GRACE = 2.0  # a connection decided this recently and absent from a dump is not closed by it


@dataclass(slots=True)
class _Decided:
    uid: int
    mark: int
    since: float
    ct_id: int = 0  # 0 until conntrack names the entry (a close, a check's answer, a dump)
    asked: float = float("-inf")  # when a check was last sent for it


@dataclass(slots=True)
class DecidedLedger:
    """Our connections by original tuple; see the module doc. ``open`` is what the monitor's counters show."""

    ours: MarkFilter = field(default_factory=MarkFilter)
    sizes: HeaderSizes = field(default_factory=HeaderSizes)
    closed_states: frozenset[TcpState] = CLOSED_STATES
    closed_mark: int = 0  # the close bits (rules.offload.CLOSE_BITS); 0: closes by TCP state only
    clock: Callable[[], float] = time.monotonic
    open: dict[bytes, _Decided] = field(default_factory=dict)
    # closed connections whose counters were asked for: conntrack id -> uid (oldest first, bounded; ordered
    # dicts: dropping a plain dict's first key scans every key deleted before it)
    fetching: OrderedDict[int, int] = field(default_factory=OrderedDict)
    fetching_max: int = 65536
    reported: dict[int, tuple[int, int]] = field(default_factory=dict)  # uid -> (tx, rx) payload so far
    # tuples closed by a reset (an UPDATE to CLOSE) whose entry lives on (10 s) until its DESTROY (oldest first)
    reset: OrderedDict[bytes, None] = field(default_factory=OrderedDict)
    unconfirmed_closed: int = 0  # decided, but conntrack never held an entry for them
    # False when the bytes come from elsewhere (passthrough offload's kernel byte counters): no GET at a close
    fetch_counters: bool = True
    _next_uid: int = 1

    # -- convey's decisions -----------------------------------------------------------------------------------

    def decided(self, key: bytes, mark: int, now: float) -> list[Change]:
        """Convey accepted the first packet of ``key`` (the 12-byte original tuple) with ``mark``."""
        opened = self.decided_one(key, mark, now)
        return [opened] if opened is not None else []

    def decided_one(self, key: bytes, mark: int, now: float) -> Opened | None:
        """:meth:`decided` without the list (the decision's own path): the ``Opened``, or None for a tuple
        open already (the same SYN again, a retransmission decided twice: one connection)."""
        if key in self.open:
            return None
        uid = self._next_uid
        self._next_uid += 1
        self.open[key] = _Decided(uid, mark, now)
        return Opened(uid, mark, key, b"")

    # -- conntrack's records ----------------------------------------------------------------------------------

    def apply(self, rec: CtRecord) -> list[Change]:
        """An event, a GET's answer or a dump line."""
        if not self.ours(rec.mark):
            return []
        key = rec.orig_key
        conn = self.open.get(key)
        destroy = rec.kind is CtKind.DESTROY
        closing = destroy or self._closed(rec)
        if conn is not None and not self._same_entry(conn, rec, destroy):
            conn = None
        if destroy:
            self.reset.pop(key, None)
        if conn is None:
            uid = self.fetching.get(rec.ct_id)
            if uid is None or not rec.has_counters:
                return []
            del self.fetching[rec.ct_id]  # the counters of a connection closed already: its last bytes
            return self._delta(uid, rec, final=True)
        conn.ct_id = rec.ct_id
        if not closing:
            return self._delta(conn.uid, rec, final=False) if rec.has_counters else []
        del self.open[key]
        changes: list[Change] = [Closed(conn.uid, conn.mark, key)]
        if rec.has_counters:
            changes += self._delta(conn.uid, rec, final=True)
        elif self.fetch_counters:  # the monitor asks for the counters: the answer names this entry
            self.fetching[rec.ct_id] = conn.uid
            if len(self.fetching) > self.fetching_max:
                self.reported.pop(self.fetching.popitem(last=False)[1], None)
        if not destroy and rec.tcp_state is TcpState.CLOSE:
            self.reset[key] = None
            if len(self.reset) > self.fetching_max:
                self.reset.popitem(last=False)
        return changes

    def _closed(self, rec: CtRecord) -> bool:
        """Whether the entry of ``rec`` says its connection is over (not counting a DESTROY)."""
        bits = self.closed_mark
        return rec.tcp_state in self.closed_states or (bits != 0 and rec.mark & bits == bits)

    def _same_entry(self, conn: _Decided, rec: CtRecord, destroy: bool) -> bool:
        """Whether ``rec`` is about the entry of ``conn`` rather than an earlier one on the same tuple.

        Once its id is known, only that id. Before, the DESTROY of the previous connection's entry, which
        conntrack kills as the new SYN comes in (it reopens a tuple in TIME_WAIT or CLOSE), must not close this
        one: a DESTROY in TIME_WAIT is always such (a connection reaches TIME_WAIT by an UPDATE first), one in
        CLOSE is when that tuple was closed by a reset (``reset``); otherwise a DESTROY in CLOSE is this
        connection's own end (a server that answered its SYN with a RST: conntrack kills the entry at once,
        with no UPDATE)."""
        if conn.ct_id:
            return conn.ct_id == rec.ct_id
        if not destroy:
            return True
        if rec.tcp_state is TcpState.TIME_WAIT:
            return False
        return not (rec.tcp_state is TcpState.CLOSE and rec.orig_key in self.reset)

    def _delta(self, uid: int, rec: CtRecord, final: bool) -> list[Change]:
        found = accounted(self.reported, uid, rec, self.sizes, final)
        return [found] if found is not None else []

    # -- checks of connections conntrack never named ----------------------------------------------------------

    def unconfirmed(
        self, now: float, after: float = CHECK_AFTER, again: float = CHECK_AGAIN, limit: int = 1 << 30
    ) -> list[bytes]:
        """Tuples of connections decided more than ``after`` seconds ago that no record has named yet, not
        asked about in the last ``again`` seconds, at most ``limit``: the monitor sends a GET for each (marked
        asked now)."""
        keys = []
        for key, conn in self.open.items():
            if not conn.ct_id and conn.since <= now - after and conn.asked <= now - again:
                conn.asked = now
                keys.append(key)
                if len(keys) >= limit:
                    break
        return keys

    def missing(self, key: bytes) -> list[Change]:
        """A check found no entry for ``key``: if conntrack still never named it, the accepted packet made no
        entry (dropped after its verdict) and the connection is closed as lost."""
        conn = self.open.get(key)
        if conn is None or conn.ct_id:
            return []
        del self.open[key]
        self.reported.pop(conn.uid, None)
        self.unconfirmed_closed += 1
        return [Closed(conn.uid, conn.mark, key, lost=True)]

    # -- dumps ------------------------------------------------------------------------------------------------

    def resync(self, entries: Iterable[CtRecord]) -> tuple[list[Change], ResyncReport]:
        """Bring the ledger in line with a dump of the whole table (only our entries are looked at)."""
        now = self.clock()
        report = ResyncReport()
        changes: list[Change] = []
        seen: set[bytes] = set()
        for rec in entries:
            if not self.ours(rec.mark):
                continue
            report.entries += 1
            key = rec.orig_key
            closing = self._closed(rec)
            if not closing:
                seen.add(key)
            conn = self.open.get(key)
            if conn is None:
                if closing:
                    continue  # closed before we held it: nothing of ours
                uid = self._next_uid  # open and not decided by us (a restart, an overflow): adopted
                self._next_uid += 1
                self.open[key] = _Decided(uid, rec.mark, now, rec.ct_id)
                changes.append(Opened(uid, rec.mark, key, rec.reply_key))
                report.opened += 1
                if rec.has_counters:
                    changes += self._delta(uid, rec, final=False)
                continue
            before = len(changes)
            changes += self.apply(rec)
            if any(isinstance(c, Closed) for c in changes[before:]):
                report.closed += 1
        for key, conn in list(self.open.items()):
            if key not in seen and conn.since <= now - RESYNC_GRACE:
                del self.open[key]
                self.reported.pop(conn.uid, None)
                changes.append(Closed(conn.uid, conn.mark, key, lost=True))
                report.closed += 1
                report.lost += 1
        return changes, report
