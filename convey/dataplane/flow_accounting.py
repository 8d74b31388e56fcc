"""Flow accounting for the packet modes: what the decisions' flows mean for the pools and the stats.

The packet core calls ``opened`` and ``closed`` (its ``on_flow_open``/``on_flow_close`` callbacks) once per flow,
never per packet: a flow takes a connection from its server's pool (``Pool.acquire``) and opens a connection in its
stats scopes (total, frontend, backend, server); closing gives both back. Payload bytes are counted per flow by the
core (``Flow.fwd_bytes`` client -> server, ``Flow.ret_bytes`` server -> client) and folded into the scopes when the
flow closes and whenever a snapshot is taken, as the original convey counts them: ``bytes_tx`` what the clients
sent towards the servers, ``bytes_rx`` what came back.

With ``[log] connections = true`` (:data:`convey.logs.CONNECTIONS`) a flow's close also logs its line: client,
frontend, backend, server, duration, payload bytes both ways and ``end`` (``fin``, ``rst``, ``timeout`` when it
expired before closing, ``shutdown``). Off, the cost is one attribute test per flow open and close.

``section`` builds the /stats "packet" section: the decision's counters, flows, clients refused (folded into the
frontend, backend and total ``refused`` counters) and whatever the queue edge adds about itself.
"""

from __future__ import annotations

import ipaddress
import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

from convey import stats as st
from convey.balancing.pool import Pool, Server
from convey.logs import CONNECTIONS, log_connection
from convey.packet.flow import FlowState
from convey.packet.flows import Flow, FlowTable

__all__ = ["CoreCounters", "Decider", "FlowAccounting", "fold_refused"]

log = logging.getLogger("convey.packet")
REFUSED_LOG_INTERVAL = 10.0  # seconds: at most one event=refused line per frontend this often


class CoreCounters(Protocol):
    def as_dict(self) -> dict[str, int]: ...


class Decider(Protocol):
    """What the edge uses of a packet decision (``convey.packet.passthrough.Passthrough``, ``...dsr.Dsr``)."""

    vips: Mapping[tuple[bytes, int], str]
    rst_out: list[bytes]

    @property
    def counters(self) -> CoreCounters: ...
    @property
    def refused(self) -> Mapping[str, int]: ...
    @property
    def flows(self) -> FlowTable: ...
    @property
    def parse_errors(self) -> Mapping[Any, int]: ...

    def expire(self, now: float) -> None: ...


@dataclass(slots=True)
class _Open:
    """What a flow holds while open: its pool and server (for the connection count) and its stats scopes."""

    pool: Pool
    server: Server
    scopes: tuple[st.Counters, ...]
    tx: int = 0  # client -> server payload bytes already folded into the scopes
    rx: int = 0  # server -> client


class FlowAccounting:
    """Open flows -> pool connection counts and stats scopes. ``backend_of`` (frontend -> backend) follows the live
    config: the plane replaces it on reload. ``on_drained`` is called when the last flow of a server removed from
    the config closes."""

    def __init__(
        self, pools: Mapping[str, Pool], stats: st.Stats, on_drained: Callable[[Server], None] | None = None
    ) -> None:
        self.pools = pools
        self.stats = stats
        self.on_drained = on_drained
        self.backend_of: Mapping[str, str] = {}
        self._open: dict[Flow, _Open] = {}
        self._started: dict[Flow, float] = {}  # [log] connections: when each flow opened
        self._refused_logged: dict[str, tuple[int, float]] = {}  # frontend -> (refused count logged, when)

    def __len__(self) -> int:
        return len(self._open)

    def opened(self, flow: Flow) -> None:
        backend, _, name = flow.server_id.partition("/")
        pool = self.pools.get(backend)
        server = pool.find(name) if pool is not None else None
        if pool is None or server is None:
            return
        pool.acquire(server)
        scopes = self.stats.scopes(flow.frontend, backend, name)
        st.opened(scopes)
        self._open[flow] = _Open(pool, server, scopes)
        if CONNECTIONS.on:
            self._started[flow] = time.monotonic()

    def closed(self, flow: Flow, end: str = "") -> None:
        entry = self._open.pop(flow, None)
        if entry is None:
            return
        _fold(flow, entry)
        if CONNECTIONS.on or self._started:
            self._log_close(flow, end)
        entry.pool.release(entry.server)
        st.closed(entry.scopes)
        if entry.server.removed and entry.server.active <= 0 and self.on_drained is not None:
            self.on_drained(entry.server)

    def close_all(self) -> None:
        """Flows end with the process: count them closed so the stats stay exact."""
        for flow in list(self._open):
            self.closed(flow, "shutdown")

    def _log_close(self, flow: Flow, end: str) -> None:
        started = self._started.pop(flow, None)
        if not CONNECTIONS.on:
            return
        if not end:
            end = "timeout" if flow.state != FlowState.CLOSING else "rst" if flow.rst_closed else "fin"
        client = f"{ipaddress.IPv4Address(flow.client_addr)}:{flow.client_port}"
        backend, _, server = flow.server_id.partition("/")
        # From the first packet to the last (the flow is removed a linger or a timeout later).
        duration = -1.0 if started is None else max(0.0, flow.last_seen - started)
        log_connection(flow.frontend, backend, server, client, duration, flow.fwd_bytes, flow.ret_bytes, end)

    def fold_bytes(self) -> None:
        """Bring the scopes' byte counters up to date with the open flows."""
        for flow, entry in self._open.items():
            _fold(flow, entry)

    def report_refused(self, by_frontend: Mapping[str, int], now: float) -> None:
        """A WARNING for the clients each frontend refused since its last line (``clients=N``), at most one per
        frontend every REFUSED_LOG_INTERVAL seconds (the plane's housekeeping calls this: never per packet)."""
        for frontend, n in by_frontend.items():
            logged, at = self._refused_logged.get(frontend, (0, -REFUSED_LOG_INTERVAL))
            if n > logged and now - at >= REFUSED_LOG_INTERVAL:
                self._refused_logged[frontend] = (n, now)
                log.warning("event=refused frontend=%s clients=%d total=%d", frontend, n - logged, n)

    def fold_refused(self, by_frontend: Mapping[str, int]) -> None:
        """Clients the decision refused, per frontend, into the frontend, backend and total counters."""
        fold_refused(self.stats, self.backend_of, by_frontend)

    def section(self, decider: Decider | None, edge: Mapping[str, Any]) -> dict[str, Any]:
        """The /stats "packet" section (``edge``: what the queue edge reports about itself); folds open flows'
        bytes and the refused clients into the connection counters first."""
        self.fold_bytes()
        doc: dict[str, Any] = dict(edge)
        if decider is not None:
            doc["verdicts"] = decider.counters.as_dict()
            doc["parse_errors"] = {_name(e): n for e, n in decider.parse_errors.items() if n}
            self.fold_refused(decider.refused)
            doc["flows"] = len(decider.flows)
            doc["flow_capacity"] = decider.flows.capacity
        return doc


def fold_refused(stats: st.Stats, backend_of: Mapping[str, str], by_frontend: Mapping[str, int]) -> None:
    """Clients a decision refused, per frontend, into the frontend, backend and total counters (both the flow
    and the offload accounting)."""
    per_backend: dict[str, int] = {}
    for frontend, n in by_frontend.items():
        stats.frontend(frontend).refused = n
        backend = backend_of.get(frontend)
        if backend is not None:
            per_backend[backend] = per_backend.get(backend, 0) + n
    for backend, n in per_backend.items():
        stats.backend(backend).refused = n
    stats.total.refused = sum(by_frontend.values())


def _name(code: Any) -> str:
    return str(getattr(code, "name", code)).lower()


def _fold(flow: Flow, entry: _Open) -> None:
    tx, rx = flow.fwd_bytes - entry.tx, flow.ret_bytes - entry.rx
    if tx or rx:
        for c in entry.scopes:
            c.bytes_tx += tx
            c.bytes_rx += rx
        entry.tx, entry.rx = flow.fwd_bytes, flow.ret_bytes
