"""What the packet modes' data planes share: a queue bound into the loop, resets, housekeeping, rules, lifecycle.

A plane is an edge: it moves packets between the kernel's NFQUEUE and the mode's sans-I/O decision and does
nothing else per packet. Its queue callback counts the queue's batch down (see ``nfqueue.Batch``), hands the
payload to the decision's one entry point, ``decide(payload, now)``, turns the answer into a verdict
(``set_payload``/``set_mark``, ``accept`` or ``drop``) and sends the TCP resets the decision queued in ``rst_out``.
Only a failing verdict call is counted here (``io_errors``); every decision is counted by the core.

Per flow, the decision's ``on_flow_open``/``on_flow_close`` callbacks go to ``FlowAccounting`` (pools and stats
scopes). Every ``HOUSEKEEPING_INTERVAL`` the flows past their timeout are expired. At start the iptables rules (and
sysctls) the config needs are checked, or installed with ``install_rules``; on reload, and when the last flow of a
removed server ends, they are brought in line with the live config (``_rules_config``).

One subclass per mode: ``PassthroughPlane`` (convey/dataplane/passthrough_plane.py) and ``DsrPlane``
(dsr_plane.py), and per mode with flow offload (``PassthroughOffloadPlane``: only first packets are queued, the
decision is a mark, the counters come from conntrack); ``convey.engine.build_plane`` picks the class by
``convey.modes.Mode`` and ``convey.config.offloaded``.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from abc import ABC, abstractmethod
from collections.abc import Callable
from typing import Any, ClassVar, Generic, Protocol, TypeVar, cast

from convey import stats as st
from convey.balancing.pool import Pool, Server
from convey.config import Address, Config, offloaded
from convey.control.flows import Query, Selection, packet_select, stamp
from convey.dataplane import rules
from convey.dataplane.flow_accounting import Decider, FlowAccounting
from convey.dataplane.nfqueue import Batch, QueueEdge, RawSender, open_queue, queue_counters
from convey.dataplane.verdict_sender import threaded
from convey.modes import Mode
from convey.packet.flow import Flow
from convey.packet.flows import FlowTable

__all__ = ["HOUSEKEEPING_INTERVAL", "PacketPlane", "inet"]

log = logging.getLogger("convey.packet")

HOUSEKEEPING_INTERVAL = 0.25


class QueueDecider(Protocol):
    """What the base uses of any mode's decision (a flow plane's is a whole ``Decider``)."""

    vips: Any
    rst_out: list[bytes]

    def expire(self, now: float) -> None: ...


D = TypeVar("D", bound=QueueDecider)


def inet(addr: str) -> bytes:
    return socket.inet_aton(addr)


class PacketPlane(ABC, Generic[D]):
    """The shared part of a packet mode's data plane; see the module doc. A subclass says how to build its
    decision (``_new_decider``), which queue it binds (``_queue_num``) and how a decision becomes a verdict
    (``_callback``)."""

    mode: ClassVar[Mode]

    def __init__(
        self, pools: dict[str, Pool], stats: st.Stats, install_rules: bool = False, manage_rules: bool = True
    ) -> None:
        self.pools = pools
        self.stats = stats
        self.install_rules = install_rules
        # False in a worker process: the supervisor checks, installs and updates the rules of all workers.
        self.manage_rules = manage_rules
        self.config: Config | None = None
        self.vips: dict[tuple[bytes, int], str] = {}
        self.backend_of: dict[str, str] = {}
        self.decider: D | None = None
        self.accounting = FlowAccounting(pools, stats, self._server_drained)
        self.io_errors = 0  # verdict calls (get_payload, set_payload, set_mark, accept, drop) that raised
        self._addr_cache: dict[Address, bytes] = {}
        self._installed = False
        self._queue: QueueEdge | None = None
        self._raw: RawSender | None = None
        self._task: asyncio.Task[None] | None = None
        self._rules_lock = asyncio.Lock()
        self._rules_tasks: set[asyncio.Task[bool]] = set()
        self._picked = 0  # the scheduler's detail of the last pick (see _flow_opened)

    # -- what a mode provides ---------------------------------------------------------------------------------

    @abstractmethod
    def _queue_num(self, config: Config) -> int: ...

    @abstractmethod
    def _new_decider(self, config: Config) -> D:
        """The mode's decision over ``self.vips``, wired to ``self.accounting`` and ``self._choose``."""

    @abstractmethod
    def _callback(self, decider: D, batch: Batch) -> Callable[[Any], None]:
        """The queue callback: counts ``batch`` down, gives every packet a verdict, never raises.

        Each plane writes its own, though they share a shape (batch countdown, ``decide``, verdict, resets): the
        answers differ per mode (bytes, a fwmark, a mark plus a conntrack entry), and a shared callback calling
        a per-mode verdict function would add one Python call to every packet of the per-packet planes
        (~50-80 ns of ~1.7 us, bench/hotpath.py)."""

    async def _prepare(self, config: Config) -> None:
        """Before the first ``_load``: what the decision needs besides the config."""

    async def _prepare_reload(self, config: Config) -> None:
        """Before a reload's ``_load``."""

    def _loaded(self, config: Config) -> None:
        """After ``_load`` took a config (``self.decider`` is None at start)."""

    def _rules_config(self, config: Config) -> Config:
        """What the rules are rendered from (the live config by default)."""
        return config

    def _rules_options(self) -> dict[str, Any]:
        """Keyword arguments for ``rules.problems``/``rules.install`` besides the config and mode (offload: the
        mark plan)."""
        return {}

    def _decision_section(self, edge: dict[str, Any]) -> dict[str, Any]:
        """The "packet" section from the edge's entries: the decision's counters (flow planes: the flows)."""
        return self.accounting.section(cast(Decider | None, self.decider), edge)  # a flow plane's D is one

    def _section_extras(self) -> dict[str, Any]:
        """The mode's own entries of the /stats "packet" section."""
        return {}

    def _sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        """/stats sections of the mode's own, besides "packet"."""
        return {}

    # -- rules ------------------------------------------------------------------------------------------------

    def _ensure_rules(self, config: Config, at_start: bool) -> None:
        if rules.ensure(config, self.mode, self.install_rules, at_start, **self._rules_options()):
            self._installed = True

    async def _update_rules(self, reason: str) -> bool:
        """Bring the rules in line with the live config (and draining servers); True when they changed."""
        async with self._rules_lock:
            if self.config is None or not self.manage_rules:
                return False
            config = self._rules_config(self.config)
            try:
                options = self._rules_options()
                if not await asyncio.to_thread(lambda: rules.problems(config, self.mode, **options)):
                    return False
                await asyncio.to_thread(self._ensure_rules, config, False)
            except Exception as exc:  # keep serving with the old rules; the error is visible in the log
                log.error("event=rules_update_failed reason=%s error=%r", reason, str(exc))
                return False
            log.info("event=rules_updated reason=%s", reason)
            return True

    def _server_drained(self, server: Server) -> None:
        """The last flow of a server removed from the config ended: its rules can go now."""
        if self._queue is None:
            return
        task = asyncio.get_running_loop().create_task(self._update_rules("server_drained"))
        self._rules_tasks.add(task)
        task.add_done_callback(self._rules_tasks.discard)

    # -- config -----------------------------------------------------------------------------------------------

    def _server_addr(self, addr: Address) -> bytes:
        b = self._addr_cache.get(addr)
        if b is None:
            b = self._addr_cache[addr] = inet(addr.host)
        return b

    def _load(self, config: Config) -> None:
        self.config = config
        self.vips = {
            (inet(f.listen_addr.host), f.listen_addr.port): f.name for f in config.frontends.values()
        }
        self.backend_of = {f.name: f.backend for f in config.frontends.values()}
        self.accounting.backend_of = self.backend_of
        self._loaded(config)
        if self.decider is not None:
            self.decider.vips = self.vips

    def _choose(self, frontend: str, flow_hash: int) -> tuple[str, bytes, int] | None:
        backend = self.backend_of.get(frontend)
        pool = self.pools.get(backend) if backend is not None else None
        if pool is None:
            return None
        server = pool.pick(flow_hash)
        if server is None:
            return None
        self._picked = pool.pick_detail()  # for the flow this opens (_flow_opened)
        # Server ids are "backend/server" so a mark or a flow names its pool unambiguously.
        return (f"{pool.name}/{server.name}", self._server_addr(server.addr), server.addr.port)

    def _flow_opened(self, flow: Flow) -> None:
        """A flow opened (its server was just chosen): record the pick for GET /flows, then account for it."""
        flow.pick = stamp(flow.last_seen, self._picked)
        self.accounting.opened(flow)

    def flows(self, query: Query) -> Selection:
        """The flows this plane tracks that ``query`` asks for, for GET /flows (none without a flow table)."""
        table = getattr(self.decider, "flows", None)
        if not isinstance(table, FlowTable):
            return [], 0
        return packet_select(table, time.monotonic(), query)

    # -- lifecycle --------------------------------------------------------------------------------------------

    async def start(self, config: Config) -> None:
        if self.manage_rules:
            await asyncio.to_thread(self._ensure_rules, config, True)
        try:
            await self._start(config)
        except BaseException:
            await self.stop(0)
            raise

    async def _start(self, config: Config) -> None:
        await self._prepare(config)
        self._load(config)
        decider = self.decider = self._new_decider(config)
        self.stats.sections["packet"] = self.packet_section
        self.stats.sections.update(self._sections())
        self._raw = RawSender()
        batch = Batch()
        binding = config.dsr.queue_binding if self.mode == Mode.DSR else config.passthrough.queue_binding
        # Offload planes with a verdict thread (verdict_sender.threaded) give their verdicts from it: the binding
        # must not drop what the callback leaves without one.
        verdicts_here = not (offloaded(config, self.mode) and threaded())
        callback = self._callback(decider, batch)
        self._queue = open_queue(binding, self._queue_num(config), callback, batch, verdicts_here)
        self._queue.start()
        self._task = asyncio.get_running_loop().create_task(self._housekeeping(), name="flow-expiry")
        log.info(
            "event=packet_plane_started mode=%s queue=%d vips=%s",
            self.mode,
            self._queue.queue_num,
            ",".join(f"{socket.inet_ntoa(a)}:{p}" for a, p in self.vips),
        )

    async def apply(self, config: Config) -> list[str]:
        changes: list[str] = []
        old = self.config
        await self._prepare_reload(config)
        self._load(config)
        if (
            old is not None
            and (old.frontends != config.frontends or old.backends != config.backends)
            and await self._update_rules("reload")
        ):
            changes.append("iptables rules updated for the new config")
        return changes

    async def stop(self, timeout: float) -> None:
        if self._rules_tasks:
            await asyncio.gather(*self._rules_tasks, return_exceptions=True)
        if self._task is not None:
            self._task.cancel()
            await asyncio.gather(self._task, return_exceptions=True)
            self._task = None
        if self._queue is not None:
            self._queue.stop()
            self._queue = None
        if self._raw is not None:
            self._raw.close()
            self._raw = None
        self.accounting.close_all()
        if self._installed and self.config is not None:
            try:
                for line in await asyncio.to_thread(rules.remove, self.config):
                    log.info("event=rules_removed change=%r", line)
            except Exception as exc:
                log.error("event=rules_remove_failed error=%r", str(exc))
            self._installed = False

    # -- resets and housekeeping ------------------------------------------------------------------------------

    def _send_resets(self, out: list[bytes]) -> None:
        raw = self._raw
        if raw is not None:
            for packet in out:
                raw.send(packet)
        out.clear()

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(HOUSEKEEPING_INTERVAL)
            decider = self.decider
            if decider is None:
                continue
            try:
                now = time.monotonic()
                decider.expire(now)
                if decider.rst_out:
                    self._send_resets(decider.rst_out)
                self.accounting.report_refused(cast(Decider, decider).refused, now)  # rate-limited WARNING
            except Exception:
                log.exception("event=housekeeping_error")

    # -- stats ------------------------------------------------------------------------------------------------

    def packet_section(self) -> dict[str, Any]:
        """The /stats "packet" section; also folds open flows' bytes into the connection counters."""
        edge: dict[str, Any] = {"io_errors": self.io_errors, **self._section_extras()}
        if self._raw is not None:
            edge["resets_sent"] = self._raw.sent
            edge["resets_failed"] = self._raw.failed
        if self._queue is not None:
            num = self._queue.queue_num
            edge["queue"] = {"num": num, **queue_counters(num), **self._queue.counters()}
        return self._decision_section(edge)
