"""The runtime API as plain functions: a :class:`Request` in, a :class:`Response` (status, JSON document) out.

Routes (web.py hands every ``/api/...`` and ``/flows`` request here):

* ``GET /api/backends``: backends and servers with their state and runtime overlay (``overlay.backends_doc``).
* ``GET /api/config``: the running config's frontends, backends, servers and file weights (``convey check
  --diff`` compares a new file with it).
* ``GET /flows?frontend=&server=&client=&limit=``: the tracked connections (``flows.listing``).
* ``PUT /api/servers/<backend>/<server>/weight`` with ``{"weight": N}``; ``POST .../drain``,
  ``.../maintenance``, ``.../ready``: change the overlay, answer the server's new entry.

Changes need ``Authorization: Bearer <token>`` (``[stats] api_token`` or ``api_token_file``): no token configured
answers 403 (read-only), a missing or wrong one 401, logged at WARNING without the token. Reads need no token.
Every answer is JSON; a failed request changes nothing. Where the state lives (the pools, on the engine's loop)
is behind :class:`Sources`, small functions a supervisor can replace to aggregate over workers.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from convey.balancing.pool import Pool
from convey.config import Config
from convey.control.diff import config_doc
from convey.control.flows import Query, Selection, listing
from convey.control.overlay import ACTIONS, ApiError, apply_action, backends_doc
from convey.control.token import authorized

__all__ = ["MAX_BODY", "Control", "Request", "Response", "Sources"]

log = logging.getLogger("convey.control")

MAX_BODY = 64 * 1024  # bytes of a request body


def _direct(fn: Callable[[], Any]) -> Any:
    return fn()


@dataclass(frozen=True)
class Sources:
    """What the API reads and changes. ``run(fn)`` calls ``fn`` where the state lives (the engine's loop) and
    returns its result or raises its exception."""

    mode: str
    pools: Callable[[], Mapping[str, Pool]]
    config: Callable[[], Config]
    flows: Callable[[Query], Selection]  # the first query.limit matching flows, and how many match
    run: Callable[[Callable[[], Any]], Any] = field(default=_direct)


class Request(NamedTuple):
    method: str
    path: str  # without the query string
    params: Mapping[str, str] = {}
    authorization: str | None = None
    body: bytes = b""
    client: str = "-"


class Response(NamedTuple):
    status: int
    doc: dict[str, Any]


class Control:
    """The API over one set of :class:`Sources`."""

    def __init__(self, sources: Sources) -> None:
        self.sources = sources

    @property
    def read_only(self) -> bool:
        return self.sources.config().stats.api_token is None

    def handle(self, request: Request) -> Response:
        """Answer one request; never raises for anything a client sends."""
        try:
            return Response(200, self._route(request))
        except ApiError as exc:
            return Response(exc.status, exc.doc())

    def _route(self, request: Request) -> dict[str, Any]:
        parts = [p for p in request.path.split("/") if p]
        src = self.sources
        if parts == ["flows"]:
            _method(request, "GET")
            query = Query.parse(request.params)
            return dict(src.run(lambda: listing(src.flows(query), src.pools())))
        if parts == ["api", "backends"]:
            _method(request, "GET")
            read_only = self.read_only
            return dict(src.run(lambda: backends_doc(src.pools(), read_only)))
        if parts == ["api", "config"]:
            _method(request, "GET")
            return dict(src.run(lambda: config_doc(src.config(), src.mode)))
        if len(parts) == 5 and parts[:2] == ["api", "servers"] and parts[4] in ACTIONS:
            backend, server, action = parts[2:]
            _method(request, "PUT" if action == "weight" else "POST")
            self._authorize(request)
            body = _json(request.body) if action == "weight" else None
            return dict(src.run(lambda: apply_action(src.pools(), backend, server, action, body)))
        raise ApiError(404, f"no such resource: {request.path[:200]}")

    def _authorize(self, request: Request) -> None:
        token = self.sources.config().stats.api_token
        if token is None:
            raise ApiError(403, "read-only: no [stats] api_token configured")
        if not authorized(request.authorization, token):
            reason = "missing" if not request.authorization else "wrong"
            log.warning(
                "event=api_unauthorized client=%s method=%s path=%r token=%s",
                request.client,
                request.method,
                request.path[:200],
                reason,
            )
            raise ApiError(401, f"unauthorized: {reason} token (send Authorization: Bearer <token>)")


def _method(request: Request, allowed: str) -> None:
    if request.method != allowed:
        raise ApiError(405, f"method {request.method[:16]} not allowed here (use {allowed})", "method")


def _json(body: bytes) -> Any:
    if len(body) > MAX_BODY:
        raise ApiError(400, f"body too large (over {MAX_BODY} bytes)", "body")
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        raise ApiError(400, "the body is not valid JSON", "body") from None
