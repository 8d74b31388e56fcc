"""Counters and their snapshot: the numbers behind /stats, /metrics and the human page.

Sans-I/O: the data planes bump plain integer counters; ``snapshot`` turns them and the pools' state into one JSON-able
dict, a superset of the original convey's /stats document.

Byte directions, as the original convey counts them: ``bytes_tx`` is what the clients sent towards the servers
(client -> server), ``bytes_rx`` what came back from the servers (server -> client). In packet modes they count TCP
payload bytes; in DSR the replies bypass the balancer, so ``bytes_rx`` stays 0.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convey.balancing.pool import Pool


@dataclass(slots=True)
class Counters:
    """Connection and byte counters of one scope (everything, a frontend, a backend or a server)."""

    total_connections: int = 0
    current_connections: int = 0
    bytes_tx: int = 0  # client -> server
    bytes_rx: int = 0  # server -> client
    refused: int = 0  # no healthy server, or no resource (table full, no port): the client was turned away
    failed: int = 0  # a server could not be reached

    def as_dict(self) -> dict[str, int]:
        return asdict(self)


@dataclass(slots=True)
class Stats:
    """All counters of one running balancer. Scopes are created on first use."""

    mode: str
    started: float
    total: Counters = field(default_factory=Counters)
    frontends: dict[str, Counters] = field(default_factory=dict)
    backends: dict[str, Counters] = field(default_factory=dict)
    servers: dict[tuple[str, str], Counters] = field(default_factory=dict)
    # Extra sections (packet path counters, DSR notes, ...): name -> callable giving a JSON-able dict.
    sections: dict[str, Callable[[], dict[str, Any]]] = field(default_factory=dict)
    reloads: int = 0
    reload_failures: int = 0  # files that did not validate (the running config stays)
    reload_errors: int = 0  # reloads that raised something unexpected (logged as event=reload_error)
    last_reload_error: str | None = None

    def frontend(self, name: str) -> Counters:
        counters = self.frontends.get(name)
        if counters is None:
            counters = self.frontends[name] = Counters()
        return counters

    def backend(self, name: str) -> Counters:
        counters = self.backends.get(name)
        if counters is None:
            counters = self.backends[name] = Counters()
        return counters

    def server(self, backend: str, server: str) -> Counters:
        counters = self.servers.get((backend, server))
        if counters is None:
            counters = self.servers[(backend, server)] = Counters()
        return counters

    def scopes(self, frontend: str, backend: str, server: str | None = None) -> tuple[Counters, ...]:
        """The counters one connection updates, in a tuple to iterate over cheaply."""
        base = (self.total, self.frontend(frontend), self.backend(backend))
        return base if server is None else (*base, self.server(backend, server))


def opened(scopes: Iterable[Counters]) -> None:
    for c in scopes:
        c.total_connections += 1
        c.current_connections += 1


def closed(scopes: Iterable[Counters]) -> None:
    for c in scopes:
        c.current_connections -= 1


def refused(scopes: Iterable[Counters]) -> None:
    for c in scopes:
        c.refused += 1


def failed(scopes: Iterable[Counters]) -> None:
    for c in scopes:
        c.failed += 1


def snapshot(
    stats: Stats, pools: Mapping[str, Pool], frontends: Mapping[str, str], now: float
) -> dict[str, Any]:
    """The /stats document. ``frontends`` maps frontend name -> backend name (the live config)."""
    # Sections first: a provider may bring counters up to date (the packet plane folds open flows' bytes
    # into them), and the counters below must show that.
    sections = {section: provider() for section, provider in stats.sections.items()}
    doc: dict[str, Any] = {
        "mode": stats.mode,
        "uptime_seconds": round(now - stats.started, 3),
        **stats.total.as_dict(),
        # The original convey's names for the totals.
        "total_bytes_tx": stats.total.bytes_tx,
        "total_bytes_rx": stats.total.bytes_rx,
        "reloads": stats.reloads,
        "reload_failures": stats.reload_failures,
        "reload_errors": stats.reload_errors,
        "last_reload_error": stats.last_reload_error,
        "frontends": {},
        "backends": {},
    }
    for name, backend in frontends.items():
        doc["frontends"][name] = {"backend": backend, **stats.frontend(name).as_dict()}
    for name, pool in pools.items():
        servers_up: dict[str, bool] = {}
        detail: dict[str, Any] = {}
        for server in pool.all_servers():
            key = str(server.addr)
            servers_up[key] = server.healthy
            detail[server.name] = {
                "addr": key,
                "weight": server.weight,
                "healthy": server.healthy,
                "state": server.state,
                "active": server.active,
                "last_check_error": server.health.last_error,
                "checks_ok": server.health.checks_ok,
                "checks_failed": server.health.checks_failed,
                **stats.server(name, server.name).as_dict(),
            }
        doc["backends"][name] = {
            "scheduler": pool.scheduler_name,
            **stats.backend(name).as_dict(),
            "servers": servers_up,
            "server_detail": detail,
        }
    doc.update(sections)
    return doc
