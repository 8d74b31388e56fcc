"""The stats service (bottle): ``/stats`` JSON, ``/metrics`` for Prometheus and a human page at ``/``.

It runs in its own thread with a small threaded WSGI server so a slow scraper never stalls the data path. It only
reads: ``snapshot`` is a callable returning the /stats document (the engine makes it safe to call from this thread).
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Callable
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
from prometheus_client import CollectorRegistry, generate_latest

from convey.control.api import Control
from convey.control.http import install_routes
from convey.metrics import Collector
from convey.page import render_page

log = logging.getLogger("convey.web")

Snapshot = Callable[[], dict[str, Any]]


def make_app(snapshot: Snapshot, control: Control | None = None) -> bottle.Bottle:
    app = bottle.Bottle()
    if control is not None:  # the runtime API: /api/..., /flows (convey/control/)
        install_routes(app, control)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(snapshot))

    @app.get("/stats")  # type: ignore[untyped-decorator]
    def stats() -> str:
        bottle.response.content_type = "application/json"
        return json.dumps(snapshot(), indent=2, sort_keys=True)

    @app.get("/metrics")  # type: ignore[untyped-decorator]
    def metrics() -> bytes:
        bottle.response.content_type = "text/plain; version=0.0.4; charset=utf-8"
        return bytes(generate_latest(registry))

    @app.get("/")  # type: ignore[untyped-decorator]
    def index() -> str:
        return render_page(snapshot())

    return app


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("event=http_request %s", format % args)


class StatsServer:
    """The stats service in a background thread."""

    def __init__(self, address: str, port: int, snapshot: Snapshot, control: Control | None = None) -> None:
        self.app = make_app(snapshot, control)
        try:
            self._server = make_server(
                address, port, self.app, server_class=_ThreadingServer, handler_class=_QuietHandler
            )
        except OSError as exc:
            raise OSError(
                exc.errno, f"stats service cannot listen on {address}:{port}: {exc.strerror}"
            ) from None
        self.port = self._server.server_port
        self._thread = threading.Thread(target=self._server.serve_forever, name="stats-http", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(timeout=5)
