"""Accounting for the offload planes (passthrough and DSR): conntrack changes -> pools and stats scopes.

With offload the kernel carries a connection's packets, so the counters come from conntrack, not from packets:
``conntrack.Monitor`` turns events (and dumps) into ``Opened``/``Closed``/``Accounted`` changes and hands them to
``apply``. Per connection (by conntrack id):

- ``Opened``: the mark names the server (``server_of``: mark -> "backend/server", the plane's mark plan), the
  original tuple's destination names the frontend (``vips``); total and current connections +1 on the total,
  frontend, backend and server scopes, and ``Pool.acquire`` so least_conn sees the connection.
- ``Closed``: current -1 and ``Pool.release``; when the last connection of a server removed from the config
  closes, ``on_drained(server id)`` (the plane may then drop its mark and rules).
- ``Accounted``: payload bytes, in the original convey's directions: ``bytes_tx`` client -> server (the
  original direction), ``bytes_rx`` server -> client (the reply; DSR never sees it). Bytes may arrive after the
  close (the GET at the close, the DESTROY of a TIME_WAIT entry 120 s later): the scopes of recently closed
  connections are kept (bounded) for that. Passthrough offload (``bytes_from_counters``) ignores them: its
  bytes come from the kernel's byte counters by (mark, VIP) instead (``add_bytes``), read when /stats asks.

Clients the decision refused are folded per frontend into the scopes' ``refused`` counters, as with flows.
``section`` builds the /stats "offload" section.
"""

from __future__ import annotations

import socket
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, NamedTuple

from convey import stats as st
from convey.balancing.pool import Pool, Server
from convey.control.flows import FlowRow, Query, Selection, select
from convey.dataplane.conntrack_records import Accounted, Change, Closed, Opened
from convey.dataplane.flow_accounting import fold_refused
from convey.dataplane.rules.byte_counters import CounterKey

__all__ = ["OffloadAccounting"]

RECENT_MAX = 65536  # closed connections whose late bytes still find their scopes


def _no_server(mark: int) -> str | None:
    return None


class _Where(NamedTuple):
    """Where a connection is counted (``OffloadAccounting._locate``)."""

    pool: Pool
    server: Server
    server_id: str
    scopes: tuple[st.Counters, ...]
    frontend: str


_UNKNOWN: Any = object()  # not located yet (a cached None means: no such server)


@dataclass(slots=True)
class _Conn:
    pool: Pool
    server: Server
    server_id: str
    scopes: tuple[st.Counters, ...]
    key: bytes = (
        b""  # the original tuple: client addr 0..4, VIP addr 4..8, client port 8..10, VIP port 10..12
    )
    frontend: str = ""
    since: float = 0.0  # time.monotonic() when conntrack reported it (GET /flows' age)
    tx: int = 0  # payload bytes reported so far (DSR: at the close; passthrough's byte counters: none)
    rx: int = 0


class OffloadAccounting:
    """Conntrack changes -> pool connection counts and stats scopes; see the module doc. ``vips``,
    ``backend_of`` and ``server_of`` follow the live config: the plane replaces them on reload."""

    def __init__(
        self, pools: Mapping[str, Pool], stats: st.Stats, on_drained: Callable[[str], None] | None = None
    ) -> None:
        self.pools = pools
        self.stats = stats
        self.on_drained = on_drained
        self._vips: Mapping[tuple[bytes, int], str] = {}  # (VIP addr, VIP port) -> frontend
        self._backend_of: Mapping[str, str] = {}  # frontend -> backend
        self._server_of: Callable[[int], str | None] = _no_server  # mark -> "backend/server"
        # (mark, VIP address and port as in the tuple key) -> where a connection with them is counted; emptied
        # whenever the maps above are replaced (a reload, a new mark plan)
        self._where: dict[tuple[int, bytes], _Where | None] = {}
        self.opened = 0
        self.closed = 0
        self.lost = 0  # closed by a resync: gone without a DESTROY seen, last bytes unknown
        self.unknown_mark = 0  # an entry with our mark bits whose mark names no server we know
        self._open: dict[int, _Conn] = {}
        # closed: ct id -> scopes, oldest first. An OrderedDict: a plain dict used as a FIFO (``del
        # d[next(iter(d))]``) scans every key deleted before the first live one, ~40 us per close once it is
        # full, and convey's CPU per connection doubled within a minute of load (bench/sustained.py)
        self._recent: OrderedDict[int, tuple[st.Counters, ...]] = OrderedDict()
        self._per_server: dict[str, int] = {}
        # passthrough offload: bytes come from the kernel's byte counters (``add_bytes``), not per connection
        self.bytes_from_counters = False
        self.unattributed_bytes = 0  # counted under a mark or VIP that names no server or frontend any more

    # the live config's maps: the plane replaces them on reload (each replacement forgets ``_where``)

    @property
    def vips(self) -> Mapping[tuple[bytes, int], str]:
        return self._vips

    @vips.setter
    def vips(self, value: Mapping[tuple[bytes, int], str]) -> None:
        self._vips = value
        self._where = {}

    @property
    def backend_of(self) -> Mapping[str, str]:
        return self._backend_of

    @backend_of.setter
    def backend_of(self, value: Mapping[str, str]) -> None:
        self._backend_of = value
        self._where = {}

    @property
    def server_of(self) -> Callable[[int], str | None]:
        return self._server_of

    @server_of.setter
    def server_of(self, value: Callable[[int], str | None]) -> None:
        self._server_of = value
        self._where = {}

    def __len__(self) -> int:
        return len(self._open)

    def open_on(self, server_id: str) -> int:
        """Connections open on a server ("backend/server")."""
        return self._per_server.get(server_id, 0)

    def servers_in_use(self) -> set[str]:
        """Server ids with open connections (a plan keeps their marks)."""
        return {s for s, n in self._per_server.items() if n > 0}

    # -- changes ----------------------------------------------------------------------------------------------

    def apply(self, changes: Iterable[Change]) -> None:
        """``Monitor``'s ``on_changes``."""
        for change in changes:  # most common first: one open and one close per connection
            if isinstance(change, Closed):
                self._closed(change)
            elif isinstance(change, Opened):
                self.opened_one(change)
            elif isinstance(change, Accounted):
                self._bytes(change)

    def opened_one(self, change: Opened) -> None:
        """One connection opened (``apply`` of one ``Opened``, without the list: the decision's own path)."""
        if change.ct_id in self._open:
            return
        key = change.orig_key
        cached = (change.mark, key[4:8] + key[10:12])
        where = self._where.get(cached, _UNKNOWN)
        if where is _UNKNOWN:
            where = self._where[cached] = self._locate(change.mark, key)
        if where is None:
            self.unknown_mark += 1
            return
        pool, server, server_id, scopes, frontend = where
        pool.acquire(server)
        st.opened(scopes)
        self._open[change.ct_id] = _Conn(pool, server, server_id, scopes, key, frontend, time.monotonic())
        self._per_server[server_id] = self._per_server.get(server_id, 0) + 1
        self.opened += 1

    def _locate(self, mark: int, key: bytes) -> _Where | None:
        """Where a connection with ``mark`` to the VIP of ``key`` is counted: None when the mark names no
        server we know."""
        server_id = self.server_of(mark)
        backend, _, name = (server_id or "").partition("/")
        pool = self.pools.get(backend)
        server = pool.find(name) if pool is not None else None
        if pool is None or server is None or server_id is None:
            return None
        frontend, scopes = self._scopes(backend, name, key[4:8], int.from_bytes(key[10:12], "big"))
        return _Where(pool, server, server_id, scopes, frontend)

    def _scopes(self, backend: str, name: str, vip: bytes, port: int) -> tuple[str, tuple[st.Counters, ...]]:
        """The frontend of a VIP ("" when it left the config) and the scopes a connection to it counts in."""
        frontend = self.vips.get((vip, port))
        if frontend is None:  # its frontend left the config: total, backend and server only
            return "", (self.stats.total, self.stats.backend(backend), self.stats.server(backend, name))
        return frontend, self.stats.scopes(frontend, backend, name)

    def _closed(self, change: Closed) -> None:
        conn = self._open.pop(change.ct_id, None)
        if conn is None:
            return
        self.closed += 1
        if change.lost:
            self.lost += 1
        conn.pool.release(conn.server)
        st.closed(conn.scopes)
        if not self.bytes_from_counters:  # late bytes (a GET's answer, a DESTROY) find the scopes
            self._recent[change.ct_id] = conn.scopes
            if len(self._recent) > RECENT_MAX:
                self._recent.popitem(last=False)
        left = self._per_server.get(conn.server_id, 1) - 1
        if left > 0:
            self._per_server[conn.server_id] = left
        else:
            self._per_server.pop(conn.server_id, None)
            if conn.server.removed and self.on_drained is not None:
                self.on_drained(conn.server_id)

    def add_bytes(self, key: CounterKey, tx: int, rx: int) -> None:
        """Payload bytes the kernel's byte counters carried for (mark, VIP address, VIP port) since the last
        reading (``offload_bytes.ByteTally``): to the scopes a connection with that mark to that VIP counts in.
        The mark's server need not be in its pool any more (a removed server whose last connection just
        closed: the plane reads the counters before it releases the mark)."""
        mark, vip, port = key
        cached = (mark, vip + port.to_bytes(2, "big"))
        where = self._where.get(cached, _UNKNOWN)
        scopes = (
            where.scopes
            if where is not None and where is not _UNKNOWN
            else self._byte_scopes(mark, vip, port)
        )
        if scopes is None:
            self.unattributed_bytes += tx + rx
            return
        for c in scopes:
            c.bytes_tx += tx
            c.bytes_rx += rx

    def _byte_scopes(self, mark: int, vip: bytes, port: int) -> tuple[st.Counters, ...] | None:
        """The scopes of bytes under ``mark`` to a VIP, by the names alone: None when the mark names no server."""
        server_id = self.server_of(mark)
        if server_id is None:
            return None
        backend, _, name = server_id.partition("/")
        return self._scopes(backend, name, vip, port)[1]

    def _bytes(self, change: Accounted) -> None:
        if self.bytes_from_counters:
            return  # the kernel's counters have them (a dump's counters would count them twice)
        conn = self._open.get(change.ct_id)
        scopes = conn.scopes if conn is not None else self._recent.get(change.ct_id)
        if scopes is None:
            return
        tx, rx = change.tx, change.rx
        if conn is not None:
            conn.tx += tx
            conn.rx += rx
        for c in scopes:
            c.bytes_tx += tx
            c.bytes_rx += rx

    def close_all(self) -> None:
        """At exit: count every open connection closed so the stats stay exact (the kernel keeps them)."""
        for ct_id in list(self._open):
            self._closed(Closed(ct_id, 0, b""))

    def flows(self, query: Query, now: float) -> Selection:
        """GET /flows: the open connections conntrack reported, as rows (state "offloaded": the kernel carries
        them; bytes as conntrack reported them so far: at the close, so 0 while open, and always 0 with passthrough's
        byte counters, which count per server and frontend; no scheduler detail recorded)."""
        rows = (
            FlowRow(
                socket.inet_ntoa(c.key[0:4]),
                int.from_bytes(c.key[8:10], "big"),
                socket.inet_ntoa(c.key[4:8]),
                int.from_bytes(c.key[10:12], "big"),
                c.frontend,
                c.server_id,
                "offloaded",
                now - c.since,
                c.tx,
                c.rx,
                None,
            )
            for c in self._open.values()
            if len(c.key) >= 12
        )
        return select(rows, query)

    # -- refusals and /stats ----------------------------------------------------------------------------------

    def fold_refused(self, by_frontend: Mapping[str, int]) -> None:
        fold_refused(self.stats, self.backend_of, by_frontend)

    def section(self, monitor: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """The /stats "offload" section: connections seen through conntrack, and the monitor's counters
        (``Monitor.counters()``: events, overflows, resyncs, ...)."""
        doc: dict[str, Any] = {
            "connections_open": len(self._open),
            "opened": self.opened,
            "closed": self.closed,
            "lost": self.lost,
            "unknown_mark": self.unknown_mark,
            "open_per_server": dict(self._per_server),
        }
        if self.bytes_from_counters:
            doc["unattributed_bytes"] = self.unattributed_bytes
        if monitor is not None:
            doc["monitor"] = dict(monitor)
        return doc
