"""Passthrough with flow offload: convey decides a connection's first packet, the kernel carries the rest.

The rules (``rules.install(config, Mode.PASSTHROUGH, plan=...)``) queue only packets that open a connection
(conntrack NEW without a connmark). ``convey.packet.offload.OffloadDecision`` decides them exactly as the
per-packet mode decides a SYN (frontend, health, weights, drain, scheduler, source address, refusal with a
RST) and answers a mark; the queue callback gives it (``set_mark`` + accept). The nat table saves the mark in
the connection's connmark, DNATs it to the server and SNATs it to the source address the mark names (the
kernel picks the port); conntrack rewrites every later packet both ways without convey.

- Marks: the ``OffloadPlan`` (``rules.offload_plan``) maps (server, source address) to marks, kept stable
  across reloads (``previous``); a server removed from the config keeps its mark and rules while conntrack
  still holds connections to it (``keep``), and loses them when its last one closes.
- Counters: a connection opens when the decision accepts its first packet (``DecidedLedger.decided``: total
  and current connections, ``Pool.acquire`` for least_conn, at once); ``conntrack.Monitor`` with
  ``opens_from_decisions`` says when it closed (the connmark event with both FIN bits, an UPDATE to
  TIME_WAIT or CLOSE, or a DESTROY), adopts connections alive before a
  restart from a dump at start, resynchronises from a dump after an ENOBUFS overflow, and closes a decided
  connection conntrack never held (a check after ``CHECK_AFTER`` seconds finds no entry: the packet was
  dropped after its verdict). ``OffloadAccounting``
  turns those changes into pools and stats scopes; the /stats "offload" section shows it. No NEW event is
  needed (bench/README.md: what that saves).
- Bytes: the kernel counts every packet of a marked connection into an nftables set by (mark, direction, VIP)
  (``rules.byte_counters``, installed with the rules); the "offload" section reads it first, and
  ``ByteTally`` (``offload_bytes``) turns its growth into payload bytes for ``OffloadAccounting.add_bytes``:
  no GET per close (what it cost: bench/README.md).
- At start, a kernel without conntrack, NAT, connmark or ctnetlink makes convey refuse to start with what is
  missing and how to get it (``rules.offload_kernel.require_kernel``, over ``conntrack_check``).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections.abc import Callable
from typing import Any

from convey import stats as st
from convey.balancing.pool import Pool
from convey.config import Config
from convey.control.flows import Query, Selection
from convey.dataplane import conntrack
from convey.dataplane.conntrack_records import HeaderSizes, MarkFilter
from convey.dataplane.decided_ledger import DecidedLedger
from convey.dataplane.nfqueue import Batch
from convey.dataplane.offload_accounting import OffloadAccounting
from convey.dataplane.offload_bytes import ByteTally
from convey.dataplane.plane import PacketPlane
from convey.dataplane.rules import byte_counters
from convey.dataplane.rules.offload import CLOSE_BITS, WORKER_FIELD, OffloadPlan, offload_plan, worker_bits
from convey.dataplane.rules.offload_kernel import require_kernel
from convey.dataplane.rules.ruleset import RulesError
from convey.dataplane.verdict_sender import (
    VerdictSender,
    queue_fd,
    threaded,
)
from convey.modes import Mode
from convey.packet.offload import OffloadDecision

__all__ = ["PassthroughOffloadPlane", "accounting_on"]

log = logging.getLogger("convey.packet")

BYTES_READ_INTERVAL = 0.2  # seconds: the byte counters are read at most this often for /stats


def accounting_on() -> bool:
    """False only with ``CONVEY_OFFLOAD_ACCOUNTING=off``, a measurement knob (``bench/packet.py
    --accounting-off``): the plane then subscribes to no conntrack event, so /stats counts no connection and no
    byte, and least_conn sees none. It exists to measure what the per-connection accounting costs (the events,
    their decoding, the close's bookkeeping; the byte counters' readings) against the decision alone; never for serving."""
    return os.environ.get("CONVEY_OFFLOAD_ACCOUNTING", "on") != "off"


class PassthroughOffloadPlane(PacketPlane[OffloadDecision]):
    mode = Mode.PASSTHROUGH

    def __init__(self, pools: dict[str, Pool], stats: st.Stats, worker: int = -1, **options: bool) -> None:
        super().__init__(pools, stats, **options)
        self.plan: OffloadPlan | None = None
        # A worker process (convey/workers/): its number in every mark it gives, so conntrack's events of its
        # connections come to it alone; the plan is the supervisor's (``fixed_plan``), the same in every worker.
        self.worker_bits = worker_bits(worker) if worker >= 0 else 0
        self.fixed_plan: OffloadPlan | None = None
        self.offload = OffloadAccounting(pools, stats, self._offload_drained)
        self.monitor: conntrack.Monitor | None = None
        self.ledger: DecidedLedger | None = None
        self._sizes: tuple[int, int, bool] | None = None
        self._verdicts: VerdictSender | None = None
        # the kernel's byte counters (rules.byte_counters), read when /stats asks: payload bytes per key
        self.tally: ByteTally | None = None
        self.byte_reads_failed = 0
        self._last_byte_error = ""
        self._next_byte_read = 0.0

    # -- start and stop ---------------------------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        # before anything changes: a kernel without conntrack, NAT, connmark or ctnetlink -> OffloadUnavailable
        await asyncio.to_thread(require_kernel, config, self.mode)
        self.plan = self.fixed_plan or offload_plan(config, self.mode)
        if not accounting_on():
            log.warning(
                "event=offload_accounting_off reason=CONVEY_OFFLOAD_ACCOUNTING=off note=%r",
                "benchmark only: no conntrack events, connections and bytes are not counted, "
                "least_conn sees no connection",
            )
        await super().start(config)

    async def _start(self, config: Config) -> None:
        await super()._start(config)
        assert self._queue is not None
        if self.monitor is not None and hasattr(self._queue, "after_drain"):
            # conntrack's events (the closes) read in the queue's turn of the loop, and by a timer when no
            # packet comes: a close never wakes convey by itself
            self._queue.after_drain = self.monitor.on_readable
            self.monitor.poll_instead()
        if threaded():
            self._verdicts = VerdictSender(queue_fd(self._queue), self._queue.queue_num)

    async def stop(self, timeout: float) -> None:
        if self._verdicts is not None:
            self._verdicts.close()
            self._verdicts = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        self.ledger = None
        await super().stop(timeout)
        self.offload.close_all()  # after the queue is unbound: a drained removed server changes no rules now

    def _start_monitor(self) -> None:
        assert self.plan is not None
        ours = (
            MarkFilter(WORKER_FIELD, self.worker_bits)
            if self.worker_bits
            else MarkFilter(mask=self.plan.mask)
        )
        # the bytes come from the kernel's byte counters: no GET for an entry's counters at each close
        ledger = DecidedLedger(ours=ours, closed_mark=CLOSE_BITS, fetch_counters=False)
        self.monitor = conntrack.Monitor(
            ledger, self.offload.apply, opens_from_decisions=True, fetch_on_close=False
        )
        self.offload.bytes_from_counters = True
        self.tally = ByteTally(worker_mask=WORKER_FIELD, worker_bits=self.worker_bits)
        try:
            self.tally.start(byte_counters.read())
        except (RulesError, ValueError) as exc:  # counted from zero when a reading first works
            self._byte_read_failed(exc)
        try:
            self.monitor.start(asyncio.get_running_loop())  # dumps first: live connections are adopted
        except conntrack.ConntrackError:
            self.monitor.stop()
            self.monitor = None
            raise
        self.ledger = ledger

    # -- the decision and its queue ---------------------------------------------------------------------------

    def _queue_num(self, config: Config) -> int:
        return config.passthrough.queue_num

    def _new_decider(self, config: Config) -> OffloadDecision:
        capacity = config.passthrough.connection_tracker_capacity
        offload = self.offload
        return OffloadDecision(
            self.vips, self._choose, self._mark_of, lambda: len(offload) >= capacity, on_open=self._decided
        )

    def _decided(self, key: bytes, mark: int) -> None:
        """The decision accepted a connection's first packet: it counts as open from now (see the module doc)."""
        ledger = self.ledger
        if ledger is not None:
            opened = ledger.decided_one(key, mark, time.monotonic())
            if opened is not None:
                self.offload.opened_one(opened)
                tally = self.tally
                if tally is not None:
                    tally.decided((mark, key[4:8], (key[10] << 8) | key[11]))

    def _mark_of(self, server_id: str, flow_hash: int) -> int | None:
        """The mark for a connection to ``server_id``: with several source addresses, the flow hash spreads
        connections over them (the kernel picks the port per source address)."""
        plan = self.plan
        if plan is None:
            return None
        n = len(plan.sources)
        try:
            return plan.mark(server_id, flow_hash % n if n > 1 else 0) | self.worker_bits
        except (KeyError, IndexError, ValueError):
            return None

    def _callback(self, decider: OffloadDecision, batch: Batch) -> Callable[[Any], None]:
        decide = decider.decide
        rst_out = decider.rst_out
        send_resets = self._send_resets
        monotonic = time.monotonic
        plane = self

        def on_packet(pkt: Any) -> None:
            left = batch.left - 1
            batch.left = left
            if left <= 0:
                batch.end()
            try:
                mark = decide(pkt.get_payload(), monotonic())
                sender = plane._verdicts
                if sender is not None:  # the kernel carries the packet on in another thread (verdict_sender)
                    if mark is None:
                        sender.drop(pkt.id)
                    else:
                        sender.accept(pkt.id, mark)
                elif mark is None:
                    pkt.drop()
                else:
                    pkt.set_mark(mark)
                    pkt.accept()
                    if decider.header_sizes != plane._sizes:
                        plane._new_sizes(decider.header_sizes)
            except Exception:  # the queue's I/O failed; the decision never raises
                plane.io_errors += 1
                with contextlib.suppress(Exception):
                    pkt.drop()
            if rst_out:
                send_resets(rst_out)

        return on_packet

    # -- config, plan and rules -------------------------------------------------------------------------------

    def _kept(self, config: Config) -> tuple[str, ...]:
        """Servers no longer in ``config`` that conntrack still holds connections to: they keep their mark."""
        configured = {f"{b.name}/{s.name}" for b in config.backends.values() for s in b.servers}
        return tuple(sorted(self.offload.servers_in_use() - configured))

    def set_plan(self, plan: OffloadPlan) -> None:
        """A worker process: the supervisor's plan (at start, with a reload, after a drained server)."""
        self.refresh_bytes()  # what the byte counters hold is counted under the marks it had
        self.fixed_plan = self.plan = plan
        self.offload.server_of = plan.server_of

    def servers_in_use(self) -> list[str]:
        """Servers conntrack still holds this process's connections to (the supervisor's ``keep``)."""
        return sorted(self.offload.servers_in_use())

    async def _prepare_reload(self, config: Config) -> None:
        self.plan = self.fixed_plan or offload_plan(
            config, self.mode, previous=self.plan, keep=self._kept(config)
        )

    def _loaded(self, config: Config) -> None:
        assert self.plan is not None
        self.refresh_bytes()  # a reload: the bytes carried so far go to the frontends and servers they had
        self.offload.vips = self.vips
        self.offload.backend_of = self.backend_of
        self.offload.server_of = self.plan.server_of
        if self.monitor is None and accounting_on():  # at start, before the queue is bound
            self._start_monitor()

    def _rules_options(self) -> dict[str, Any]:
        return {"plan": self.plan}

    def _offload_drained(self, server_id: str) -> None:
        """The last connection of a server removed from the config closed: its mark and rules can go."""
        if self.config is None or self._queue is None:
            return
        if self.fixed_plan is not None:  # a worker: the supervisor sees it in its next poll and sends a plan
            log.info("event=server_drained server=%s", server_id)
            return
        self.refresh_bytes()  # its last bytes, while its mark still names it
        self.plan = offload_plan(self.config, self.mode, previous=self.plan, keep=self._kept(self.config))
        self.offload.server_of = self.plan.server_of
        log.info("event=server_drained server=%s", server_id)
        task = asyncio.get_running_loop().create_task(self._update_rules("server_drained"))
        self._rules_tasks.add(task)
        task.add_done_callback(self._rules_tasks.discard)

    def flows(self, query: Query) -> Selection:
        """GET /flows: the connections conntrack reported open (see ``OffloadAccounting.flows``)."""
        return self.offload.flows(query, time.monotonic())

    # -- counters ---------------------------------------------------------------------------------------------

    def _new_sizes(self, sizes: tuple[int, int, bool] | None) -> None:
        """The SYNs' header sizes changed (IP options, TCP timestamps): the ledger turns IP bytes into payload
        bytes with them (one set for all connections: the clients' stacks are assumed alike)."""
        self._sizes = sizes
        if sizes is not None and self.monitor is not None:
            self.monitor.ledger.sizes = HeaderSizes.from_syn(*sizes)
        if sizes is not None and self.tally is not None:
            self.tally.sizes = HeaderSizes.from_syn(*sizes)

    def refresh_bytes(self, force: bool = True) -> None:
        """Read the kernel's byte counters and add what they carried since the last reading to the stats
        scopes. The /stats "offload" section calls it first (``force=False``: at most every
        ``BYTES_READ_INTERVAL`` seconds, so a client polling /stats in a loop does not run ``nft`` in a loop);
        a reload or a drained server read at once, before what a mark or VIP names changes."""
        tally = self.tally
        if tally is None:
            return
        now = time.monotonic()
        if not force and now < self._next_byte_read:
            return
        self._next_byte_read = now + BYTES_READ_INTERVAL
        try:
            totals = byte_counters.read()
        except (RulesError, ValueError) as exc:
            self._byte_read_failed(exc)
            return
        if self._last_byte_error:
            log.info("event=byte_counters_read_recovered after=%r", self._last_byte_error)
            self._last_byte_error = ""
        for key, tx, rx in tally.update(totals):
            self.offload.add_bytes(key, tx, rx)

    def _byte_read_failed(self, exc: Exception) -> None:
        self.byte_reads_failed += 1
        text = str(exc)
        if text != self._last_byte_error:  # once per new error, not at every /stats
            log.error(
                "event=byte_counters_read_failed error=%r note=%r", text, "bytes not counted until it works"
            )
        self._last_byte_error = text

    def _decision_section(self, edge: dict[str, Any]) -> dict[str, Any]:
        doc: dict[str, Any] = dict(edge)
        decider = self.decider
        if decider is not None:
            doc["verdicts"] = decider.counters.as_dict()
            doc["parse_errors"] = {e.name.lower(): n for e, n in decider.parse_errors.items() if n}
            self.offload.fold_refused(decider.refused)
        doc["connections"] = len(self.offload)
        doc["connection_capacity"] = self.config.passthrough.connection_tracker_capacity if self.config else 0
        return doc

    def _sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"offload": self.offload_section}

    def offload_section(self) -> dict[str, Any]:
        """The /stats "offload" section: connections learnt from conntrack and the event monitor's counters."""
        self.refresh_bytes(force=False)
        monitor = self.monitor.counters() if self.monitor is not None else None
        doc = self.offload.section(monitor)
        if self.tally is not None:
            doc["byte_counters"] = {
                "source": f"nft {byte_counters.FAMILY} {byte_counters.TABLE} set {byte_counters.SET}",
                "readings": self.tally.readings,
                "read_failures": self.byte_reads_failed,
                "last_error": self._last_byte_error or None,
            }
        if self.plan is not None:
            doc["mark_mask"] = f"{self.plan.mask:#x}"
            doc["marks"] = {sid: f"{bits:#x}" for sid, bits in self.plan.servers.items()}
        doc["rules_updates_pending"] = len(self._rules_tasks)
        if self._verdicts is not None:
            doc["verdicts"] = self._verdicts.counters()
        return doc
