"""DSR with flow offload: convey decides a connection's SYN, the kernel steers the rest of it.

The rules (``convey rules install --dsr --offload``; docs/dsr.md) ``notrack`` the client's SYN and queue it,
restore a connection's connmark into the fwmark in ``mangle``, and queue only what is still unmarked. The
decision is ``convey.packet.dsr.Dsr`` with ``pin=False``: every queued packet is decided afresh (Maglev on the
client tuple, health, weights, a RST when no server is left) and its flow comes to ``_hand_over`` before the
verdict. For a SYN, ``_hand_over`` writes the connection's conntrack entry over ctnetlink (``Writer.replace``:
the server's mark, ESTABLISHED, window tracking off, and for ``rewrite = "ip"`` a DNAT to the server's address
and port); ctnetlink creates it inside the ``send``, so it exists before the SYN's verdict, and the client's
next packets find it and never leave the kernel. Why convey writes the entry rather than letting conntrack pick
the connection up: the pickup race (findings in docs/dsr.md, "Offload").

A queued packet that is not a SYN lost its entry (expired, flushed): it is rescheduled by the same hash and
accepted with its server's mark, which the nat table saves into the new entry's connmark (``ip``: and DNATs by);
``ip`` also rewrites it, so a packet conntrack could not track at all still reaches the server.

Counters come from conntrack (``Monitor`` -> ``OffloadAccounting``; one direction: a connection closes at the
client's FIN, ``ONE_WAY_CLOSED_STATES``, and only ``bytes_tx`` is known). The /stats "dsr" section adds the
entries written and the write errors; the "offload" section is the accounting's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Callable
from typing import Any

from convey import stats as st
from convey.balancing.pool import Pool
from convey.config import Config
from convey.control.flows import Query, Selection
from convey.dataplane import conntrack, conntrack_check
from convey.dataplane.conntrack_records import ONE_WAY_CLOSED_STATES, FlowTuple, Ledger, MarkFilter
from convey.dataplane.dsr_plane import DsrPlane
from convey.dataplane.nfqueue import Batch
from convey.dataplane.offload_accounting import OffloadAccounting
from convey.dataplane.rules.offload import WORKER_FIELD, OffloadPlan, offload_plan, worker_bits
from convey.dataplane.verdict_sender import (
    VerdictSender,
    queue_fd,
    threaded,
)
from convey.errors import StartupError
from convey.modes import Mode, Rewrite
from convey.packet.dsr import Dsr
from convey.packet.flows import Flow, FlowState, FlowTable

__all__ = ["DsrOffloadPlane", "kernel_needs"]

log = logging.getLogger("convey.packet")

_ntoa = socket.inet_ntoa


def kernel_needs(rewrite: Rewrite) -> tuple[str, ...]:
    """The xtables targets DSR offload uses: ``mac`` routes by mark, ``ip`` DNATs by mark too."""
    return ("NFQUEUE", "CONNMARK", "CT", "DNAT") if rewrite == Rewrite.IP else ("NFQUEUE", "CONNMARK", "CT")


class DsrOffloadPlane(DsrPlane):
    def __init__(self, pools: dict[str, Pool], stats: st.Stats, worker: int = -1, **options: bool) -> None:
        super().__init__(pools, stats, **options)
        self.plan: OffloadPlan | None = None
        # A worker process (``rewrite = "ip"``): its number in every mark (the entry's connmark), so conntrack's
        # events of its connections come to it alone; the plan is the supervisor's (``fixed_plan``).
        self.worker_bits = worker_bits(worker) if worker >= 0 else 0
        self.fixed_plan: OffloadPlan | None = None
        self.server_marks: dict[str, int] = {}  # server id -> mark, both flavours (the entry's connmark)
        self.offload = OffloadAccounting(pools, stats, self._offload_drained)
        self.writer: conntrack.Writer | None = None
        self.monitor: conntrack.Monitor | None = None
        self.handed = 0  # the mark ``_hand_over`` chose for the packet being decided (0: none)
        self.pickups = 0  # non-SYN packets that found no entry and were rescheduled
        self.unmarked = 0  # flows of a server without a mark: not handed to the kernel
        self._verdicts: VerdictSender | None = None  # set once the queue is bound

    # -- start and stop ---------------------------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        found = await asyncio.to_thread(
            conntrack_check.missing, ctnetlink=conntrack.probe, need=kernel_needs(config.dsr.rewrite)
        )
        conntrack_check.require(found, "--dsr --offload")
        await super().start(config)

    async def _prepare(self, config: Config) -> None:
        try:
            self.writer = conntrack.Writer()
        except conntrack.ConntrackError as exc:
            raise StartupError(str(exc)) from None

    async def _start(self, config: Config) -> None:
        await super()._start(config)
        assert self.plan is not None
        ours = (
            MarkFilter(WORKER_FIELD, self.worker_bits)
            if self.worker_bits
            else MarkFilter(mask=self.plan.mask)
        )
        ledger = Ledger(ours=ours, closed_states=ONE_WAY_CLOSED_STATES)
        self.monitor = conntrack.Monitor(ledger, self.offload.apply)
        try:
            self.monitor.start(asyncio.get_running_loop())  # adopts the connections already in the table
        except conntrack.ConntrackError as exc:
            raise StartupError(f"conntrack events: {exc}") from None
        assert self._queue is not None
        if threaded():
            self._verdicts = VerdictSender(queue_fd(self._queue), self._queue.queue_num)

    async def stop(self, timeout: float) -> None:
        if self._verdicts is not None:
            self._verdicts.close()
            self._verdicts = None
        if self.monitor is not None:
            self.monitor.stop()
            self.monitor = None
        if self.writer is not None:
            self.writer.close()
            self.writer = None
        self.offload.close_all()  # the kernel keeps the connections; this process stops counting them
        await super().stop(timeout)

    # -- config, marks and rules ------------------------------------------------------------------------------

    def _new_plan(self, config: Config) -> OffloadPlan:
        if self.fixed_plan is not None:
            return self.fixed_plan
        return offload_plan(config, Mode.DSR, previous=self.plan, keep=self.offload.servers_in_use())

    def set_plan(self, plan: OffloadPlan) -> None:
        """A worker process: the supervisor's plan (at start, with a reload, after a drained server)."""
        self.fixed_plan = plan
        if self.config is not None:
            self._loaded(self.config)

    def servers_in_use(self) -> list[str]:
        """Servers conntrack still holds this process's connections to (the supervisor's ``keep``)."""
        return sorted(self.offload.servers_in_use())

    def _loaded(self, config: Config) -> None:
        self.plan = plan = self._new_plan(config)
        self.server_marks = {
            f"{back.name}/{server.name}": plan.mark(f"{back.name}/{server.name}") | self.worker_bits
            for back in config.backends.values()
            for server in back.servers
        }
        # ``mac``: the core answers these marks (the policy routing's); ``ip``: the core rewrites
        self.marks = self.server_marks if config.dsr.rewrite == Rewrite.MAC else {}
        if self.decider is not None:
            self.decider.marks = self.marks
        self.offload.vips = self.vips
        self.offload.backend_of = self.backend_of
        self.offload.server_of = plan.server_of

    def _rules_options(self) -> dict[str, Any]:
        # None at start, before the first ``_load``: the rules compute the same plan from the config
        return {"plan": self.plan}

    def _offload_drained(self, server_id: str) -> None:
        """The last connection of a server removed from the config closed: its mark and rules can go."""
        if self._queue is None or self.config is None or self.fixed_plan is not None:
            return  # a worker: the supervisor sees it in its next poll and sends a new plan
        self._loaded(self.config)  # a new plan without its mark
        task = asyncio.get_running_loop().create_task(self._update_rules("server_drained"))
        self._rules_tasks.add(task)
        task.add_done_callback(self._rules_tasks.discard)

    # -- the decision and its queue ---------------------------------------------------------------------------

    def _new_decider(self, config: Config) -> Dsr:
        return Dsr(
            self.vips,
            FlowTable(1),  # never used: nothing is pinned (the kernel's entry holds the connection)
            self._choose,
            config.dsr.rewrite,
            self.marks,
            on_flow_open=self._hand_over,
            pin=False,
        )

    def _hand_over(self, flow: Flow) -> None:
        """The decision chose ``flow.server_id`` for the packet being decided: a SYN's connection gets its
        conntrack entry now, before the verdict; any packet gets the server's mark (``handed``)."""
        mark = self.server_marks.get(flow.server_id, 0)
        self.handed = mark
        if not mark:
            self.unmarked += 1
            return
        if flow.state != FlowState.EMBRYONIC:
            self.pickups += 1
            return
        writer, config = self.writer, self.config
        if writer is None or config is None:
            return
        orig = FlowTuple(_ntoa(flow.client_addr), _ntoa(flow.vip_addr), flow.client_port, flow.vip_port)
        nat_dst = (_ntoa(flow.server_addr), flow.server_port) if config.dsr.rewrite == Rewrite.IP else None
        writer.replace(orig, mark, max(1, int(config.dsr.idle_timeout)), nat_dst)

    def _callback(self, decider: Dsr, batch: Batch) -> Callable[[Any], None]:
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
                plane.handed = 0
                out = decide(pkt.get_payload(), monotonic())
                sender = plane._verdicts
                # with a sender, the kernel carries the packet on in another thread (see verdict_sender)
                if sender is not None:
                    if out is None:
                        sender.drop(pkt.id)
                    elif isinstance(out, int):
                        sender.accept(pkt.id, out or None)
                    else:
                        sender.accept(pkt.id, plane.handed or None, out)
                elif out is None:
                    pkt.drop()
                elif out.__class__ is int:  # mac: accept unchanged with the server's fwmark
                    if out:
                        pkt.set_mark(out)
                    pkt.accept()
                else:  # ip: the rewritten packet, with the mark the nat table saves (and DNATs by) on a pickup
                    if plane.handed:
                        pkt.set_mark(plane.handed)
                    pkt.set_payload(out)
                    pkt.accept()
            except Exception:  # the queue's I/O failed; the decision never raises
                plane.io_errors += 1
                with contextlib.suppress(Exception):
                    pkt.drop()
            if rst_out:
                send_resets(rst_out)

        return on_packet

    # -- stats ------------------------------------------------------------------------------------------------

    def flows(self, query: Query) -> Selection:
        """GET /flows: the connections conntrack reported open (see ``OffloadAccounting.flows``)."""
        return self.offload.flows(query, time.monotonic())

    def _sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"dsr": self.dsr_section, "offload": self.offload_section}

    def dsr_section(self) -> dict[str, Any]:
        doc = super().dsr_section()
        writer = self.writer
        if writer is not None:
            writer.drain_errors()
        doc["flows_per_server"] = {s: self.offload.open_on(s) for s in self.offload.servers_in_use()}
        doc["offload"] = {
            "entries_written": writer.sent if writer is not None else 0,
            "write_errors": dict(writer.errors) if writer is not None else {},
            "pickups": self.pickups,
            "unmarked": self.unmarked,
        }
        doc["note"] = (
            "DSR offload: convey decides each connection's SYN and writes its conntrack entry; the kernel "
            "steers the rest. Connections and bytes_tx come from conntrack; replies never pass the balancer, "
            "so bytes_rx stays 0"
        )
        return doc

    def offload_section(self) -> dict[str, Any]:
        doc = self.offload.section(self.monitor.counters() if self.monitor is not None else None)
        if self._verdicts is not None:
            doc["verdicts"] = self._verdicts.counters()
        return doc
