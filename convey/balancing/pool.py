"""A backend pool: its servers, their health and weights, and the scheduler that picks among them.

Sans-I/O. The health checker reports results with :meth:`Pool.report_check`; reload calls :meth:`Pool.update`; the
data planes call :meth:`Pool.pick` / :meth:`Pool.candidates` and keep ``Server.active`` up to date with
:meth:`Pool.acquire` / :meth:`Pool.release`.

Eligibility for *new* connections: healthy, weight > 0, still in the config. Existing connections are never moved:
a server whose weight drops to 0 or that is removed from the config drains (its open connections continue); a removed
server is forgotten once its last connection has ended.

Runtime overlay (``convey ctl``, convey/control/): :meth:`Pool.set_overlay` sets a server's weight or puts it in
drain or maintenance on top of the file, as HAProxy's runtime API does (never written back). ``Server.weight`` is
the weight in effect, ``Server.configured_weight`` the file's. A reload keeps the overlay of servers that still
exist; one that changes a server's weight in the file clears that server's weight overlay (the newer decision wins).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from enum import StrEnum

from convey.balancing.schedulers import Scheduler, make_scheduler
from convey.config import Address, BackendConfig


@dataclass(slots=True)
class HealthState:
    consecutive_ok: int = 0
    consecutive_failed: int = 0
    checks_ok: int = 0
    checks_failed: int = 0
    last_error: str | None = None


class Admin(StrEnum):
    """An operator's state for a server (the runtime overlay): no new connections either way; open ones go on."""

    DRAIN = "drain"
    MAINTENANCE = "maintenance"


@dataclass(frozen=True, slots=True)
class Overlay:
    """What the runtime API set on a server: a weight (None: the file's) and an admin state (None: ready)."""

    weight: int | None = None
    admin: Admin | None = None

    def as_dict(self) -> dict[str, object]:
        return {"weight": self.weight, "admin": None if self.admin is None else str(self.admin)}


@dataclass(slots=True, eq=False)
class Server:
    name: str
    addr: Address
    weight: int  # in effect: the overlay's weight, else the file's
    healthy: bool = True
    removed: bool = False
    active: int = 0
    health: HealthState = field(default_factory=HealthState)
    configured_weight: int = -1  # the file's weight (-1 at construction: the same as ``weight``)
    overlay: Overlay | None = None  # the runtime overlay, None when nothing is set

    def __post_init__(self) -> None:
        if self.configured_weight < 0:
            self.configured_weight = self.weight

    @property
    def admin(self) -> Admin | None:
        return None if self.overlay is None else self.overlay.admin

    @property
    def state(self) -> str:
        if self.removed:
            return "removed-draining"
        admin = self.admin
        if admin is Admin.MAINTENANCE:
            return "maintenance"
        if not self.healthy:
            return "down"
        if self.weight == 0 or admin is Admin.DRAIN:
            return "draining"
        return "up"

    @property
    def eligible(self) -> bool:
        return self.healthy and self.weight > 0 and not self.removed and self.admin is None


class Pool:
    """One ``[backends.<name>]`` section at run time."""

    def __init__(self, config: BackendConfig, mode: str) -> None:
        self.name = config.name
        self.mode = mode
        self.config = config
        self.servers: dict[str, Server] = {s.name: Server(s.name, s.addr, s.weight) for s in config.servers}
        self.retired: dict[str, Server] = {}  # removed from the config, still carrying connections
        self.scheduler_name = config.scheduler_for(mode)
        self._scheduler: Scheduler = self._build()

    # -- scheduling --------------------------------------------------------------------------------------------

    def _build(self) -> Scheduler:
        eligible = [(s.name, s.weight) for s in self.servers.values() if s.eligible]
        return make_scheduler(
            self.scheduler_name,
            eligible,
            self._active,
            maglev_table_size=self.config.maglev_table_size,
        )

    def set_overlay(self, name: str, overlay: Overlay | None) -> Server:
        """Set (None: clear) a server's runtime overlay; KeyError for a server not in the config."""
        server = self.servers[name]
        if overlay == Overlay():
            overlay = None
        server.overlay = overlay
        weight = None if overlay is None else overlay.weight
        server.weight = server.configured_weight if weight is None else weight
        self._scheduler = self._build()
        return server

    @property
    def scheduler(self) -> Scheduler:
        """The scheduler in use (rebuilt when servers, weights or health change)."""
        return self._scheduler

    def pick_detail(self) -> int:
        """What the scheduler recorded about its last pick (a WRR turn, least_conn's open count; 0 otherwise)."""
        return getattr(self._scheduler, "last", 0)

    def _active(self, name: str) -> int:
        server = self.servers.get(name)
        return server.active if server is not None else 0

    def pick(self, flow_hash: int = 0) -> Server | None:
        """The server for a new connection, or None when no server is eligible."""
        name = self._scheduler.pick(flow_hash)
        return None if name is None else self.servers[name]

    def candidates(self, flow_hash: int = 0, limit: int = 3) -> list[Server]:
        """The scheduler's pick followed by other eligible servers: what a proxy tries, in order, on connect
        failure. At most ``limit`` servers, no duplicates."""
        first = self.pick(flow_hash)
        if first is None:
            return []
        result = [first]
        for server in self.servers.values():
            if len(result) >= limit:
                break
            if server is not first and server.eligible:
                result.append(server)
        return result

    def acquire(self, server: Server) -> None:
        server.active += 1

    def release(self, server: Server) -> None:
        server.active -= 1
        if server.removed and server.active <= 0:
            self.retired.pop(server.name, None)

    @property
    def has_eligible(self) -> bool:
        return any(s.eligible for s in self.servers.values())

    def all_servers(self) -> list[Server]:
        return [*self.servers.values(), *self.retired.values()]

    def find(self, name: str) -> Server | None:
        return self.servers.get(name) or self.retired.get(name)

    # -- health -------------------------------------------------------------------------------------------------

    def report_check(self, name: str, ok: bool, error: str | None = None) -> bool | None:
        """Record one health check. Returns the new ``healthy`` value when it changed, else None."""
        server = self.servers.get(name)
        if server is None:
            return None
        h = server.health
        if ok:
            h.checks_ok += 1
            h.consecutive_ok += 1
            h.consecutive_failed = 0
            h.last_error = None
            if not server.healthy and h.consecutive_ok >= self.config.rise:
                server.healthy = True
                self._scheduler = self._build()
                return True
        else:
            h.checks_failed += 1
            h.consecutive_failed += 1
            h.consecutive_ok = 0
            h.last_error = error
            if server.healthy and h.consecutive_failed >= self.config.fall:
                server.healthy = False
                self._scheduler = self._build()
                return False
        return None

    def server_states(self) -> dict[str, tuple[bool, Overlay | None]]:
        """Each server's health and runtime overlay by name: what a supervisor sends its workers (see
        :meth:`set_states`)."""
        return {name: (server.healthy, server.overlay) for name, server in self.servers.items()}

    def set_states(self, states: dict[str, tuple[bool, Overlay | None]]) -> bool:
        """Take health and overlays decided elsewhere (a worker process takes the supervisor's checks and runtime
        API); True when it changed anything. Unknown names are ignored: a reload may be on its way."""
        changed = False
        for name, (healthy, overlay) in states.items():
            server = self.servers.get(name)
            if server is None or (server.healthy, server.overlay) == (healthy, overlay):
                continue
            server.healthy = healthy
            server.overlay = overlay
            weight = None if overlay is None else overlay.weight
            server.weight = server.configured_weight if weight is None else weight
            changed = True
        if changed:
            self._scheduler = self._build()
        return changed

    # -- reload ---------------------------------------------------------------------------------------------------

    def update(self, config: BackendConfig) -> list[str]:
        """Apply a new config for this pool in place; returns human lines describing what changed.

        Servers are matched by address (a renamed server keeps its health and connections). Health state survives
        unless the address changed."""
        changes: list[str] = []
        by_addr = {s.addr: s for s in self.servers.values()}
        new_servers: dict[str, Server] = {}
        for sc in config.servers:
            server = by_addr.pop(sc.addr, None)
            if server is None:
                retired = next((r for r in self.retired.values() if r.addr == sc.addr), None)
                if retired is not None:
                    del self.retired[retired.name]
                    retired.removed = False
                    retired.overlay = None  # it left the config: its overlay went with it
                    retired.weight = retired.configured_weight
                    server = retired
                    changes.append(f"server {sc.name} {sc.addr} re-added")
                else:
                    server = Server(sc.name, sc.addr, sc.weight)
                    changes.append(f"server {sc.name} {sc.addr} added weight={sc.weight}")
            if server.configured_weight != sc.weight:
                changes.append(f"server {sc.name} {sc.addr} weight {server.configured_weight} -> {sc.weight}")
                server.configured_weight = server.weight = sc.weight
                if server.overlay is not None and server.overlay.weight is not None:  # the file's change wins
                    changes.append(
                        f"server {sc.name} {sc.addr} runtime weight {server.overlay.weight} cleared"
                    )
                    server.overlay = Overlay(None, server.overlay.admin) if server.overlay.admin else None
            server.name = sc.name
            new_servers[sc.name] = server
        for gone in by_addr.values():
            changes.append(f"server {gone.name} {gone.addr} removed (draining {gone.active} connections)")
            gone.overlay = None
            gone.weight = gone.configured_weight
            if gone.active > 0:
                gone.removed = True
                self.retired[gone.name] = gone
        scheduler = config.scheduler_for(self.mode)
        if scheduler != self.scheduler_name:
            changes.append(f"scheduler {self.scheduler_name} -> {scheduler}")
        for attr in ("health_check_interval", "health_check_timeout", "rise", "fall"):
            old, new = getattr(self.config, attr), getattr(config, attr)
            if old != new:
                changes.append(f"{attr} {old:g} -> {new:g}")
        self.servers = new_servers
        self.config = config
        self.scheduler_name = scheduler
        self._scheduler = self._build()
        return changes
