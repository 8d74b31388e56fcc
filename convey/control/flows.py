"""``GET /flows``: the connections convey tracks, filtered, limited, and why each went to its server.

Sans-I/O. The data planes answer a :class:`Query` with a :data:`Selection` (``PacketPlane.flows`` through
:func:`packet_select`, ``ProxyPlane.flows`` through :func:`select`): the first ``limit`` matching flows as
:class:`FlowRow` values and how many match; :func:`listing` explains each server choice with :func:`why`, from
the pool's scheduler as it is now:

* Maglev: nothing is stored per flow; the client tuple's hash is recomputed and its slot looked up
  (``maglev slot 1234 of 65537 for hash 0x...``; when the table now maps the slot elsewhere, it says so).
* WRR: the pick's turn, recorded when the flow opened (``wrr turn 17 (weight 3 of 6)``, weights as they are now;
  turns count from the scheduler's last rebuild: a health change, a runtime change or a reload).
* least_conn: the server's open connections when it was picked (``least_conn: 2 open (fewest for weight 1)``).
* proxy mode, when the pick failed to connect and another candidate took the connection: ``wrr: fallback 1 after
  the pick failed to connect``.

A packet flow records its pick in one integer (``stamp``: when it opened, in tenths of a second of the plane's
clock, and the scheduler's detail), the only per-flow memory this costs.
"""

from __future__ import annotations

import itertools
import socket
from collections.abc import Iterable, Iterator, Mapping
from typing import Any, NamedTuple, Protocol

from convey.balancing.maglev import Maglev
from convey.balancing.pool import Pool
from convey.balancing.schedulers import SmoothWeightedRoundRobin, flow_hash
from convey.control.overlay import ApiError
from convey.packet.flow import Flow, FlowState

__all__ = [
    "DEFAULT_LIMIT",
    "MAX_LIMIT",
    "FlowRow",
    "Query",
    "Selection",
    "listing",
    "merge",
    "packet_select",
    "select",
    "stamp",
    "unstamp",
    "why",
]

DEFAULT_LIMIT = 100
MAX_LIMIT = 10_000
_DETAIL = 0xFFFFFFFF


class FlowRow(NamedTuple):
    """One tracked connection. ``bytes_in``: from the client (client -> server); ``bytes_out``: to it."""

    client_addr: str
    client_port: int
    vip_addr: str
    vip_port: int
    frontend: str
    server_id: str  # "backend/server"
    state: str
    age: float
    bytes_in: int
    bytes_out: int
    detail: (
        int | None
    )  # the scheduler's detail recorded at pick time (None: not recorded; -N: proxy fallback N)


Selection = tuple[list[FlowRow], int]  # the rows shown (at most the query's limit) and how many matched


def stamp(now: float, detail: int) -> int:
    """One integer for a flow: when it opened (tenths of a second) and the scheduler's detail (32 bits)."""
    return (int(now * 10) << 32) | (detail & _DETAIL)


def unstamp(value: int) -> tuple[float, int]:
    """(opened at, detail) from ``stamp``."""
    return (value >> 32) / 10, value & _DETAIL


def ntoa(addr: bytes) -> str:
    return socket.inet_ntoa(addr) if len(addr) == 4 else "?"


class Query(NamedTuple):
    frontend: str | None = None
    server: str | None = None  # "backend/server", or a backend or server name
    client: str | None = None  # "ip" or "ip:port"
    limit: int = DEFAULT_LIMIT

    @classmethod
    def parse(cls, params: Mapping[str, str]) -> Query:
        """From a query string's parameters; ApiError (400) naming the parameter at fault."""
        unknown = sorted(set(params) - {"frontend", "server", "client", "limit"})
        if unknown:
            raise ApiError(400, f"unknown parameter {unknown[0][:64]!r}", unknown[0][:64])
        text = params.get("limit", str(DEFAULT_LIMIT)).strip()
        if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
            raise ApiError(400, f"limit must be an integer 1-{MAX_LIMIT}", "limit")
        return cls(
            params.get("frontend") or None,
            params.get("server") or None,
            params.get("client") or None,
            int(text),
        )

    def server_matches(self, server_id: str) -> bool:
        return self.server is None or self.server == server_id or self.server in server_id.split("/")

    def matches(self, row: FlowRow) -> bool:
        if self.frontend is not None and row.frontend != self.frontend:
            return False
        if not self.server_matches(row.server_id):
            return False
        if self.client is not None:
            return self.client == row.client_addr or self.client == f"{row.client_addr}:{row.client_port}"
        return True


def why(pool: Pool | None, row: FlowRow) -> str:
    """Why the scheduler gave this flow its server, from the pool's scheduler as it is now."""
    if pool is None:
        return "backend no longer in the config"
    name = row.server_id.partition("/")[2]
    scheduler = pool.scheduler
    if isinstance(scheduler, Maglev):
        hashed = flow_hash(_int(row.client_addr), row.client_port, _int(row.vip_addr), row.vip_port)
        slot = hashed % scheduler.size
        text = f"maglev slot {slot} of {scheduler.size} for hash 0x{hashed:016x}"
        owner = scheduler.table[slot] if scheduler.table else None
        return text if owner == name else f"{text} (the table now gives {owner or 'no server'})"
    if row.detail is None:
        return f"{pool.scheduler_name} (not recorded)"
    if row.detail < 0:  # proxy: the pick (and -detail - 1 more candidates) failed to connect
        return f"{pool.scheduler_name}: fallback {-row.detail} after the pick failed to connect"
    if isinstance(scheduler, SmoothWeightedRoundRobin):
        weight, total = scheduler.weight_of(name)
        return f"wrr turn {row.detail} (weight {weight} of {total})"
    server = pool.find(name)
    weight = server.weight if server is not None else 0
    return f"{pool.scheduler_name}: {row.detail} open (fewest for weight {weight})"


def _int(addr: str) -> int:
    try:
        return int.from_bytes(socket.inet_aton(addr), "big")
    except OSError:
        return 0


def select(rows: Iterable[FlowRow], query: Query) -> Selection:
    """The first ``limit`` rows the query matches, and how many match."""
    shown: list[FlowRow] = []
    total = 0
    for row in rows:
        if query.matches(row):
            total += 1
            if len(shown) < query.limit:
                shown.append(row)
    return shown, total


def merge(selections: Iterable[Selection], limit: int) -> Selection:
    """Several sources' selections as one (a supervisor's workers)."""
    shown: list[FlowRow] = []
    total = 0
    for rows, count in selections:
        shown += rows[: max(limit - len(shown), 0)]
        total += count
    return shown, total


def listing(selection: Selection, pools: Mapping[str, Pool]) -> dict[str, Any]:
    """The ``GET /flows`` document from a selection, each flow with why it went to its server."""
    rows, total = selection
    return {"flows": [_doc(row, pools) for row in rows], "total": total, "shown": len(rows)}


def _doc(row: FlowRow, pools: Mapping[str, Pool]) -> dict[str, Any]:
    return {
        "client": f"{row.client_addr}:{row.client_port}",
        "frontend": row.frontend,
        "server": row.server_id,
        "state": row.state,
        "age": round(max(row.age, 0.0), 1),
        "bytes_in": row.bytes_in,
        "bytes_out": row.bytes_out,
        "why": why(pools.get(row.server_id.partition("/")[0]), row),
    }


class FlowTableLike(Protocol):
    def __len__(self) -> int: ...
    def __iter__(self) -> Iterator[Flow]: ...


def packet_select(flows: FlowTableLike, now: float, query: Query) -> Selection:
    """A packet plane's flow table (``now``: its clock, ``time.monotonic``): the query's first ``limit`` flows as
    rows, and how many match. A flow is matched on its raw fields; only the shown ones become rows (a table holds
    up to millions, and this runs on the loop that gives the packets their verdicts)."""
    limit = query.limit
    if query.frontend is None and query.server is None and query.client is None:  # the common case
        return [packet_row(flow, now) for flow in itertools.islice(flows, limit)], len(flows)
    client = _client_key(query.client)
    servers: dict[str, bool] = {}
    shown: list[FlowRow] = []
    total = 0
    for flow in flows:
        frontend, server_id, _ = flow.meta
        if query.frontend is not None and frontend != query.frontend:
            continue
        ok = servers.get(server_id)
        if ok is None:
            ok = servers[server_id] = query.server_matches(server_id)
        if not ok:
            continue
        if client is not None:
            head = flow.ret_head  # the mirror of the forward key: client address at 4..8, port at 10..12
            if head[4:8] != client[0] or (client[1] is not None and head[10:12] != client[1]):
                continue
        total += 1
        if len(shown) < limit:
            shown.append(packet_row(flow, now))
    return shown, total


def _client_key(client: str | None) -> tuple[bytes, bytes | None] | None:
    """A ``client`` filter as the bytes a flow holds: (address, port or None); an unparsable one matches none."""
    if client is None:
        return None
    addr, sep, port = client.rpartition(":") if ":" in client else (client, "", "")
    try:
        return socket.inet_aton(addr), (int(port).to_bytes(2, "big") if sep else None)
    except (OSError, ValueError, OverflowError):
        return b"none", None


_STATES = {int(state): state.name.lower() for state in FlowState}


def packet_row(flow: Flow, now: float) -> FlowRow:
    picked = getattr(flow, "pick", None)
    opened, detail = unstamp(picked) if picked is not None else (flow.last_seen, None)
    return FlowRow(
        ntoa(flow.client_addr),
        flow.client_port,
        ntoa(flow.vip_addr),
        flow.vip_port,
        flow.frontend,
        flow.server_id,
        _STATES.get(flow.state) or str(flow.state),
        now - opened,
        flow.fwd_bytes,
        flow.ret_bytes,
        detail,
    )
