"""The runtime overlay as the API sees it: backends and servers as JSON, and the four changes an operator makes.

Sans-I/O: functions over the live pools (``convey.balancing.pool``). A change is validated completely before
anything is touched, so a request that fails (unknown backend or server, a malformed body, a weight out of the
config's range) changes nothing; :class:`ApiError` carries the HTTP status and the field at fault.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from convey.balancing.pool import Admin, Overlay, Pool, Server
from convey.config import MAX_WEIGHT
from convey.errors import ConveyError

__all__ = ["ACTIONS", "ApiError", "apply_action", "backends_doc", "overlay_section", "server_entry"]

ACTIONS = ("weight", "drain", "maintenance", "ready")


class ApiError(ConveyError):
    """A request the API refuses: ``status`` (400, 401, 403, 404, 405) and the field at fault, if any."""

    def __init__(self, status: int, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.field = field

    def doc(self) -> dict[str, Any]:
        doc: dict[str, Any] = {"error": self.message}
        if self.field is not None:
            doc["field"] = self.field
        return doc


def server_entry(server: Server) -> dict[str, Any]:
    """One server as ``GET /api/backends`` shows it."""
    return {
        "address": str(server.addr),
        "weight": server.weight,
        "configured_weight": server.configured_weight,
        "state": server.state,
        "healthy": server.healthy,
        "active": server.active,
        "overlay": None if server.overlay is None else server.overlay.as_dict(),
    }


def backends_doc(pools: Mapping[str, Pool], read_only: bool) -> dict[str, Any]:
    """The ``GET /api/backends`` document."""
    return {
        "read_only": read_only,
        "backends": {
            name: {
                "scheduler": pool.scheduler_name,
                "servers": {server.name: server_entry(server) for server in pool.all_servers()},
            }
            for name, pool in pools.items()
        },
    }


def overlay_section(pools: Mapping[str, Pool]) -> dict[str, Any]:
    """The /stats ``runtime`` section: every server with an overlay, as "backend/server" -> overlay."""
    return {
        "overlay": {
            f"{name}/{server.name}": server.overlay.as_dict()
            for name, pool in pools.items()
            for server in pool.servers.values()
            if server.overlay is not None
        }
    }


def _weight(body: Any) -> int:
    if not isinstance(body, dict):
        raise ApiError(400, 'the body must be a JSON object such as {"weight": 3}', "body")
    unknown = sorted(set(body) - {"weight"})
    if unknown:
        raise ApiError(400, f"unknown field {unknown[0][:64]!r} (allowed: weight)", unknown[0][:64])
    weight = body.get("weight")
    if isinstance(weight, bool) or not isinstance(weight, int):
        raise ApiError(400, f"weight must be an integer 0-{MAX_WEIGHT}", "weight")
    if not 0 <= weight <= MAX_WEIGHT:
        raise ApiError(400, f"weight must be between 0 and {MAX_WEIGHT}, got {weight}", "weight")
    return weight


def _find(pools: Mapping[str, Pool], backend: str, server: str) -> Pool:
    pool = pools.get(backend)
    if pool is None:
        raise ApiError(400, f"unknown backend {backend[:64]!r}", "backend")
    if server not in pool.servers:
        raise ApiError(400, f"unknown server {server[:64]!r} in backend {backend[:64]!r}", "server")
    return pool


def apply_action(
    pools: Mapping[str, Pool], backend: str, server: str, action: str, body: Any = None
) -> dict[str, Any]:
    """Apply one change (``ACTIONS``; ``weight`` takes ``{"weight": N}``), returning the server's new entry.
    Everything is checked first: ApiError, and no change, for anything wrong."""
    if action not in ACTIONS:
        raise ApiError(404, f"unknown action {action[:64]!r} (actions: {', '.join(ACTIONS)})", "action")
    pool = _find(pools, backend, server)
    current = pool.servers[server].overlay or Overlay()
    if action == "weight":
        overlay = Overlay(_weight(body), current.admin)
    elif action == "ready":
        overlay = Overlay(current.weight, None)
    else:
        overlay = Overlay(current.weight, Admin(action))
    return server_entry(pool.set_overlay(server, overlay))
