"""The conntrack edge of offload: event subscription, table dumps and entry writes over ctnetlink.

- ``EventSource`` subscribes to NEW, UPDATE and DESTROY events on a non-blocking netlink socket whose BPF
  filter (``conntrack_bpf``) lets through only convey's entries (by connmark) and, of the updates, only those
  that close a connection; ``attach`` registers its file descriptor with the asyncio loop (``add_reader``), like
  the NFQUEUE binding: one loop, one thread, no locks; each readable event drains at most ``BATCH`` datagrams so
  health checks, verdicts and /stats keep running under a burst. A thread would buy nothing: decoding is the
  only work and it needs the GIL.
- Passthrough offload opens its connections from its own decisions (``decided_ledger``): ``Monitor`` with
  ``opens_from_decisions`` subscribes to no NEW event, has the kernel drop the DESTROY of an entry that closed
  already (``conntrack_bpf``'s ``destroy_unless``), and every ``CHECK_EVERY`` seconds asks for the entries of
  connections decided long ago that conntrack never named (a GET by tuple; "no such entry" closes them).
- When the kernel could not queue an event (the socket buffer was full) the next ``recv`` fails with ENOBUFS:
  ``Monitor`` then drains what is queued, dumps the table (``dump``) synchronously, so that events received
  during the dump are applied after it, and lets the ``Ledger`` resynchronise; it logs ``event=conntrack_resync``
  and counts it. At each close it also asks for the entry's counters (a GET on a second socket): the DESTROY
  of a TIME_WAIT entry, which carries them too, comes 120 s or more later.
- ``Writer`` creates and deletes entries without waiting for answers (DSR: convey makes the entry for a
  connection at its SYN, so its later packets are steered by the kernel).

Needs CAP_NET_ADMIN in the namespace. ``convey.dataplane.conntrack_check`` says what a kernel lacks.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import errno
import logging
import socket
import struct
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from typing import Any

from convey.dataplane import conntrack_requests as requests
from convey.dataplane import conntrack_wire as wire
from convey.dataplane.conntrack_bpf import event_filter
from convey.dataplane.conntrack_records import (
    CLOSED_STATES,
    Change,
    Closed,
    CtKind,
    CtRecord,
    FlowTuple,
    Ledger,
    MarkFilter,
    ResyncReport,
    TcpState,
)
from convey.dataplane.decided_ledger import DecidedLedger
from convey.errors import ConveyError

__all__ = ["ConntrackError", "EventSource", "Monitor", "Writer", "dump", "open_socket", "probe"]

log = logging.getLogger("convey.conntrack")

NETLINK_NETFILTER = 12
SO_ATTACH_FILTER = 26
SO_RCVBUFFORCE = 33
EVENT_RCVBUF = 8 * 1024 * 1024  # ~10k events of slack (an event skb takes ~750 bytes of buffer)
BATCH = 256  # datagrams (one event each) per readable event: ~4 ms; a busy queue cannot starve it
RECV_SIZE = 65536
REARM_INTERVAL = 0.25  # seconds between re-registrations of the event socket's reader (see Monitor.rearm)
POLL_INTERVAL = 0.02  # seconds between two reads of a polled event socket (Monitor.poll_instead)
POLL_BATCHES = 16  # reads of up to BATCH datagrams each per poll: ~250k events/s before the socket fills
CHECK_EVERY = 5.0  # seconds between two looks for decided connections conntrack never named (DecidedLedger)
CHECKS_MAX = 65536  # GETs of such checks awaiting an answer (oldest forgotten first)
CHECKS_PER_ROUND = 1024  # at most this many GETs per look (one send); the others wait for the next look


class ConntrackError(ConveyError):
    """A conntrack request failed (no permission, no ctnetlink, a timeout)."""


def open_socket(groups: int = 0, netns: str | None = None, rcvbuf: int = 0) -> socket.socket:
    """A ctnetlink socket bound to ``groups`` (a bit mask of 1 << (group - 1)), in ``netns`` if given."""
    try:
        if netns is None:
            sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        else:
            from pyroute2 import netns as pyroute2_netns

            sock = pyroute2_netns.create_socket(netns, socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        if rcvbuf:
            try:
                sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, rcvbuf)
            except PermissionError:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # capped by net.core.rmem_max
        sock.bind((0, groups))
    except OSError as exc:
        raise ConntrackError(
            f"cannot open a conntrack netlink socket: {exc.strerror or exc} "
            "(needs root / CAP_NET_ADMIN and a kernel with CONFIG_NF_CT_NETLINK)"
        ) from None
    return sock


def probe(netns: str | None = None, timeout: float = 3.0) -> str | None:
    """None if ctnetlink answers in this namespace, else what went wrong (for ``conntrack_check.missing``)."""
    try:
        sock = open_socket(0, netns)
    except ConntrackError as exc:
        return str(exc)
    try:
        sock.settimeout(timeout)
        sock.send(requests.encode_dump(1, 0xFFFFFFFF, 0xFFFFFFFF))  # a mark nothing has: an empty answer
        for item in wire.decode(sock.recv(RECV_SIZE)):
            if isinstance(item, wire.NlError) and item.errno:
                return f"the kernel answered {errno.errorcode.get(item.errno, item.errno)}"
        return None
    except OSError as exc:
        return f"no answer: {exc.strerror or exc}"
    finally:
        sock.close()


def _attach_filter(sock: socket.socket, program: bytes) -> None:
    insns = ctypes.create_string_buffer(program, len(program))
    fprog = struct.pack("HL", len(program) // 8, ctypes.addressof(insns))  # struct sock_fprog
    sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, fprog)


class EventSource:
    """NEW, closing UPDATE and DESTROY events of our entries, read without blocking. Without ``new_events`` no
    NEW, and no DESTROY of an entry in TIME_WAIT (its close came as an UPDATE). ``closed_mark``: an UPDATE whose
    mark has all those bits is a closing one too (passthrough offload's close bits)."""

    def __init__(
        self,
        ours: MarkFilter,
        update_states: Iterable[int] | None = CLOSED_STATES,
        netns: str | None = None,
        rcvbuf: int = EVENT_RCVBUF,
        kernel_filter: bool = True,
        new_events: bool = True,
        closed_mark: int = 0,
    ) -> None:
        groups = 1 << (wire.GROUP_UPDATE - 1) | 1 << (wire.GROUP_DESTROY - 1)
        if new_events:
            groups |= 1 << (wire.GROUP_NEW - 1)
        self.sock = open_socket(groups, netns, rcvbuf)
        self.sock.setblocking(False)
        if kernel_filter:
            # without NEW events (passthrough offload): a DESTROY in TIME_WAIT says nothing new (the close came as
            # an UPDATE, the bytes with the GET then); one in CLOSE may be the only word of a connection whose
            # SYN was answered with a RST (conntrack kills that entry at once, before any UPDATE)
            destroy_unless = None if new_events else (TcpState.TIME_WAIT,)
            _attach_filter(self.sock, event_filter(ours, update_states, destroy_unless, closed_mark))
        self.datagrams = 0
        self.overflows = 0
        self._fd: int | None = None

    def fileno(self) -> int:
        return self.sock.fileno()

    def read(self, budget: int = BATCH) -> tuple[list[CtRecord], bool]:
        """Up to ``budget`` datagrams' worth of records, and whether the kernel dropped events (ENOBUFS) since
        the last read. Returns early when the socket is empty."""
        records: list[CtRecord] = []
        overflowed = False
        recv = self.sock.recv
        for _ in range(budget):
            try:
                data = recv(RECV_SIZE)
            except BlockingIOError:
                break
            except OSError as exc:
                if exc.errno == errno.ENOBUFS:
                    overflowed = True
                    self.overflows += 1
                    continue
                if exc.errno == errno.EINTR:
                    continue
                raise
            self.datagrams += 1
            records.extend(item for item in wire.decode(data) if isinstance(item, CtRecord))
        return records, overflowed

    def attach(self, loop: asyncio.AbstractEventLoop, on_readable: Callable[[], object]) -> None:
        self._fd = self.sock.fileno()
        loop.add_reader(self._fd, on_readable)

    def close(self) -> None:
        if self._fd is not None:
            with contextlib.suppress(RuntimeError):  # the loop is already closed
                asyncio.get_running_loop().remove_reader(self._fd)
            self._fd = None
        self.sock.close()


def dump(
    ours: MarkFilter | None = None, netns: str | None = None, timeout: float = 10.0, zero: bool = False
) -> list[CtRecord]:
    """Every entry of the table (only ours if ``ours`` is given; filtered by the kernel when it has a value),
    with counters when nf_conntrack_acct=1. ``zero`` also zeroes the counters. Blocking, bounded by ``timeout``."""
    sock = open_socket(0, netns, 4 * 1024 * 1024)
    try:
        sock.settimeout(timeout)
        seq = int(time.monotonic() * 1000) & 0x7FFFFFFF
        if ours is not None and ours.value is not None:
            request = requests.encode_dump(seq, ours.value, ours.mask, zero=zero)
        else:
            request = requests.encode_dump(seq, zero=zero)
        sock.send(request)
        records: list[CtRecord] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                data = sock.recv(RECV_SIZE)
            except TimeoutError:
                break
            for item in wire.decode(data):
                if isinstance(item, CtRecord):
                    if ours is None or ours(item.mark):
                        records.append(item)
                elif isinstance(item, wire.NlDone):
                    return records
                elif isinstance(item, wire.NlError) and item.errno:
                    raise ConntrackError(
                        f"conntrack dump failed: {errno.errorcode.get(item.errno, item.errno)}"
                    )
        raise ConntrackError(f"conntrack dump did not finish within {timeout:g}s")
    except OSError as exc:
        raise ConntrackError(f"conntrack dump failed: {exc.strerror or exc}") from None
    finally:
        sock.close()


@dataclass
class Writer:
    """Creates and deletes entries without waiting (each send is one syscall; ctnetlink handles it in it, so the
    entry exists when ``send`` returns). Errors come back later and are counted by ``drain_errors``."""

    netns: str | None = None
    sock: socket.socket = field(init=False)
    seq: int = 0
    sent: int = 0
    errors: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.sock = open_socket(0, self.netns, 1024 * 1024)
        self.sock.setblocking(False)

    def replace(
        self, orig: FlowTuple, mark: int, timeout: int, nat_dst: tuple[str, int] | None = None
    ) -> None:
        """Delete any entry with this original tuple (a previous connection on the same ports) and create one
        that names the new decision: both messages in one send."""
        self.seq = (self.seq + 2) & 0x7FFFFFFF
        self._send(
            requests.encode_delete(self.seq, orig)
            + requests.encode_create(self.seq + 1, orig, mark, timeout, nat_dst)
        )

    def delete(self, orig: FlowTuple) -> None:
        self.seq = (self.seq + 1) & 0x7FFFFFFF
        self._send(requests.encode_delete(self.seq, orig))

    def _send(self, message: bytes) -> None:
        try:
            self.sock.send(message)
            self.sent += 1
        except OSError as exc:
            name = errno.errorcode.get(exc.errno or 0, str(exc.errno))
            self.errors[name] = self.errors.get(name, 0) + 1
        self.drain_errors()

    def drain_errors(self) -> None:
        while True:
            try:
                data = self.sock.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                return
            except OSError:
                return
            for item in wire.decode(data):
                if isinstance(item, wire.NlError) and item.errno and item.errno != errno.ENOENT:
                    name = errno.errorcode.get(item.errno, str(item.errno))
                    self.errors[name] = self.errors.get(name, 0) + 1

    def close(self) -> None:
        self.sock.close()


@dataclass
class Monitor:
    """Events in, ``Change``s out to ``on_changes``; resynchronises from a dump after an overflow."""

    ledger: Ledger | DecidedLedger
    on_changes: Callable[[list[Change]], None]
    netns: str | None = None
    rcvbuf: int = EVENT_RCVBUF
    # the ledger opens connections from convey's decisions (DecidedLedger): no NEW events, checks instead
    opens_from_decisions: bool = False
    # At a close, ask for the entry's counters (a GET) instead of waiting for its DESTROY, which in TIME_WAIT
    # comes 120 s or more later: the bytes of a finished connection show at once.
    fetch_on_close: bool = True
    source: EventSource | None = None
    resyncs: int = 0
    last_resync: ResyncReport | None = None
    resync_errors: int = 0
    fetches: int = 0
    fetch_misses: int = 0  # the entry was gone already: its DESTROY carries the bytes
    checks: int = 0  # GETs for decided connections conntrack never named
    polled: bool = False  # the event socket is read by ``on_readable`` calls only (``poll_instead``)
    # their seq -> tuple key, oldest first (an OrderedDict: see OffloadAccounting._recent)
    _checks: OrderedDict[int, bytes] = field(default_factory=OrderedDict)
    _next_check: float = 0.0
    _query: socket.socket | None = None
    _seq: int = 0
    _loop: asyncio.AbstractEventLoop | None = None
    _rearm_timer: asyncio.TimerHandle | None = None
    _poll_timer: asyncio.TimerHandle | None = None

    def start(self, loop: asyncio.AbstractEventLoop | None = None, initial_dump: bool = True) -> None:
        """Subscribe, then (so nothing falls between the two) take the current table as the starting point.
        Without a loop, call ``on_readable`` to poll."""
        self.source = EventSource(
            self.ledger.ours,
            self.ledger.closed_states,
            self.netns,
            self.rcvbuf,
            new_events=not self.opens_from_decisions,
            closed_mark=self.ledger.closed_mark if isinstance(self.ledger, DecidedLedger) else 0,
        )
        if self.fetch_on_close or self.opens_from_decisions:
            self._query = open_socket(0, self.netns, 4 * 1024 * 1024)
            self._query.setblocking(False)
        if initial_dump:
            self.resync("start")
        if loop is not None:
            self._loop = loop
            self.source.attach(loop, self.on_readable)
            if self._query is not None:
                loop.add_reader(self._query.fileno(), self.on_answers)
            self._rearm_timer = loop.call_later(REARM_INTERVAL, self._rearm_tick)

    def _rearm_tick(self) -> None:
        try:
            self.rearm()
            if self.opens_from_decisions:
                self.check(time.monotonic())
        except Exception:
            log.exception("event=conntrack_rearm_error")
        if self._loop is not None and self.source is not None:
            self._rearm_timer = self._loop.call_later(REARM_INTERVAL, self._rearm_tick)

    def rearm(self) -> None:
        """Read what waits, then register the reader again. uvloop (libuv) stops watching a socket that reports
        an error (POLLERR: the ENOBUFS of an event overflow) and never calls its reader again, so the events
        would stop for good (measured); ``start`` with a loop calls this every ``REARM_INTERVAL`` seconds."""
        if self.source is None or self._loop is None:
            return
        self.on_readable()
        if self.polled:
            return
        fd = self.source.fileno()
        self._loop.remove_reader(fd)
        self._loop.add_reader(fd, self.on_readable)

    def poll_instead(self) -> None:
        """Stop watching the event socket: its owner calls ``on_readable`` after each turn of its queue
        (passthrough offload), and a timer drains it every ``POLL_INTERVAL`` for when no packet comes. A close
        then never wakes the process by itself: on a busy balancer that is one wakeup less per connection
        (measured: ~5% less CPU per connection)."""
        if self.source is None or self._loop is None or self.polled:
            return
        self.polled = True
        with contextlib.suppress(RuntimeError, ValueError):
            self._loop.remove_reader(self.source.fileno())
        self._poll_timer = self._loop.call_later(POLL_INTERVAL, self._poll_tick)

    def _poll_tick(self) -> None:
        try:
            for _ in range(POLL_BATCHES):
                if self.on_readable() < BATCH:
                    break
        except Exception:
            log.exception("event=conntrack_poll_error")
        if self._loop is not None and self.source is not None:
            self._poll_timer = self._loop.call_later(POLL_INTERVAL, self._poll_tick)

    def on_readable(self) -> int:
        """Read and apply what the event socket holds (up to ``BATCH`` datagrams); returns how many were read."""
        if self.source is None:
            return 0
        before = self.source.datagrams
        records, overflowed = self.source.read()
        changes: list[Change] = []
        closed: list[bytes] = []
        fetch = self.fetch_on_close and self._query is not None
        apply = self.ledger.apply
        for rec in records:
            got = apply(rec)
            if got:
                changes.extend(got)
                if fetch and rec.kind is CtKind.UPDATE:
                    closed.extend(c.orig_key for c in got if isinstance(c, Closed))
        if changes:
            self.on_changes(changes)
        if closed:
            self._fetch(closed)
        if self._loop is None and not closed:
            self.on_answers()
        if overflowed:
            self.resync("overflow")
        return self.source.datagrams - before if self.source is not None else 0

    def check(self, now: float) -> None:
        """Every ``CHECK_EVERY`` seconds: a GET for each connection decided long ago that conntrack never named
        (``DecidedLedger.unconfirmed``); "no such entry" closes it (``on_answers``), an entry names it."""
        if now < self._next_check or self._query is None or not isinstance(self.ledger, DecidedLedger):
            return
        self._next_check = now + CHECK_EVERY
        keys = self.ledger.unconfirmed(now, limit=CHECKS_PER_ROUND)
        if not keys:
            return
        messages, seq = [], self._seq
        for key in keys:
            seq = (seq + 1) & 0x7FFFFFFF
            messages.append(requests.encode_get_key(seq, key))
            self._checks[seq] = key
            if len(self._checks) > CHECKS_MAX:
                self._checks.popitem(last=False)
        self._seq = seq
        try:
            self._query.send(b"".join(messages))
            self.checks += len(keys)
        except OSError as exc:  # asked again in CHECK_AGAIN seconds
            log.debug("event=conntrack_check_failed error=%r", str(exc))

    def _fetch(self, keys: list[bytes]) -> None:
        assert self._query is not None
        messages = []
        encode, seq = requests.encode_get_key, self._seq
        for key in keys:
            seq = (seq + 1) & 0x7FFFFFFF
            messages.append(encode(seq, key))
        self._seq = seq
        try:
            self._query.send(b"".join(messages))
            self.fetches += len(keys)
        except OSError as exc:  # the DESTROY will bring the bytes
            log.debug("event=conntrack_fetch_failed error=%r", str(exc))
            return
        # ctnetlink answers a GET inside the send: the answers wait in the socket already. Reading them now
        # saves the loop a wakeup per close (the reader stays registered for anything left).
        self.on_answers(len(keys))

    def on_answers(self, expected: int = BATCH) -> None:
        """The answers to the GETs sent at closes: counters, folded in as partial byte counts. ``expected``: how
        many are waiting (one per GET, the entry or an error), so that no read ends in EAGAIN (an exception
        costs more than the read)."""
        if self._query is None:
            return
        changes: list[Change] = []
        for _ in range(min(expected, BATCH)):
            try:
                data = self._query.recv(RECV_SIZE)
            except (BlockingIOError, InterruptedError):
                break
            except OSError:
                break
            for item in wire.decode(data):
                if isinstance(item, CtRecord):
                    changes.extend(self.ledger.apply(item))
                elif isinstance(item, wire.NlError) and item.errno:
                    key = self._checks.pop(item.seq, None)
                    if key is not None and isinstance(self.ledger, DecidedLedger):
                        gone = self.ledger.missing(key)
                        if gone:
                            changes.extend(gone)
                            log.info(
                                "event=offload_unconfirmed flow=%s note=%r",
                                FlowTuple.from_key(key),
                                "accepted, but conntrack never held an entry: dropped after the verdict? "
                                "counted closed",
                            )
                    else:
                        self.fetch_misses += 1
        if changes:
            self.on_changes(changes)

    def resync(self, reason: str) -> ResyncReport | None:
        if self.source is not None:  # apply what is queued first: the dump must be newer than those events
            while True:
                records, _ = self.source.read()
                if not records:
                    break
                changes = [c for rec in records for c in self.ledger.apply(rec)]
                if changes:
                    self.on_changes(changes)
        try:
            entries = dump(self.ledger.ours, self.netns)
        except ConntrackError as exc:
            self.resync_errors += 1
            log.warning("event=conntrack_resync_failed reason=%s error=%r", reason, str(exc))
            return None
        changes, report = self.ledger.resync(entries)
        if changes:
            self.on_changes(changes)
        self.resyncs += 1
        self.last_resync = report
        log.info(
            "event=conntrack_resync reason=%s entries=%d opened=%d closed=%d lost=%d",
            reason,
            report.entries,
            report.opened,
            report.closed,
            report.lost,
        )
        return report

    def counters(self) -> dict[str, Any]:
        """For /stats: event datagrams read, overflows, resyncs (and what the last one found)."""
        last = self.last_resync
        return {
            "events": self.source.datagrams if self.source else 0,
            "overflows": self.source.overflows if self.source else 0,
            "resyncs": self.resyncs,
            "resync_errors": self.resync_errors,
            "last_resync": None if last is None else asdict(last),
            "open": len(self.ledger.open),
            "fetches": self.fetches,
            "fetch_misses": self.fetch_misses,
            **(
                {"checks": self.checks, "unconfirmed": self.ledger.unconfirmed_closed}
                if isinstance(self.ledger, DecidedLedger)
                else {}
            ),
        }

    def stop(self) -> None:
        if self._rearm_timer is not None:
            self._rearm_timer.cancel()
            self._rearm_timer = None
        if self._poll_timer is not None:
            self._poll_timer.cancel()
            self._poll_timer = None
        if self.source is not None:
            self.source.close()
            self.source = None
        if self._query is not None:
            if self._loop is not None:
                with contextlib.suppress(RuntimeError, ValueError):
                    self._loop.remove_reader(self._query.fileno())
            self._query.close()
            self._query = None
