"""The stats service (bottle): ``/stats`` JSON, ``/metrics`` for Prometheus and a human page at ``/``.

It runs in its own thread with a small threaded WSGI server so a slow scraper never stalls the data path. It only
reads: ``snapshot`` is a callable returning the /stats document (the engine makes it safe to call from this thread).
"""

from __future__ import annotations

import html
import json
import logging
import threading
from collections.abc import Callable, Iterator
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import bottle
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

log = logging.getLogger("convey.web")

Snapshot = Callable[[], dict[str, Any]]

_COUNTERS = {
    "total_connections": "Connections accepted",
    "bytes_tx": "Bytes from the clients towards the servers (client -> server)",
    "bytes_rx": "Bytes from the servers back to the clients (server -> client)",
    "refused": "Connections refused: no healthy server or no resource",
    "failed": "Connection attempts to servers that failed",
}


class _Collector:
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        doc = self.snapshot()
        up = GaugeMetricFamily("convey_up", "1 while convey runs", labels=["mode"])
        up.add_metric([str(doc.get("mode", ""))], 1)
        yield up
        yield GaugeMetricFamily("convey_uptime_seconds", "Seconds since start", value=doc["uptime_seconds"])
        for key, help_ in (
            ("reloads", "Config reloads applied"),
            ("reload_failures", "Reloads refused: the new file did not validate (the running config stays)"),
            ("reload_errors", "Reloads that failed unexpectedly (logged as event=reload_error)"),
        ):
            yield CounterMetricFamily(f"convey_{key}", help_, value=doc.get(key, 0))
        for scope, label in (("frontends", "frontend"), ("backends", "backend")):
            cur = GaugeMetricFamily(f"convey_{label}_current_connections", "Open connections", labels=[label])
            fams = {
                k: CounterMetricFamily(f"convey_{label}_{k}", help_, labels=[label])
                for k, help_ in _COUNTERS.items()
            }
            for name, body in doc[scope].items():
                cur.add_metric([name], body["current_connections"])
                for k, fam in fams.items():
                    fam.add_metric([name], body[k])
            yield cur
            yield from fams.values()
        labels = ["backend", "server", "addr"]
        srv_up = GaugeMetricFamily("convey_server_up", "1 if the server passes health checks", labels=labels)
        srv_w = GaugeMetricFamily("convey_server_weight", "Configured weight (0 drains)", labels=labels)
        srv_cur = GaugeMetricFamily("convey_server_current_connections", "Open connections", labels=labels)
        fams = {k: CounterMetricFamily(f"convey_server_{k}", h, labels=labels) for k, h in _COUNTERS.items()}
        for backend, body in doc["backends"].items():
            for server, detail in body["server_detail"].items():
                lv = [backend, server, detail["addr"]]
                srv_up.add_metric(lv, 1 if detail["healthy"] else 0)
                srv_w.add_metric(lv, detail["weight"])
                srv_cur.add_metric(lv, detail["current_connections"])
                for k, fam in fams.items():
                    fam.add_metric(lv, detail[k])
        yield srv_up
        yield srv_w
        yield srv_cur
        yield from fams.values()
        packet = doc.get("packet")
        if isinstance(packet, dict):
            for key, value in _flatten(packet):
                if isinstance(value, int | float) and not isinstance(value, bool):
                    yield GaugeMetricFamily(f"convey_packet_{key}", f"Packet path: {key}", value=value)


def _flatten(doc: dict[str, Any], prefix: str = "") -> Iterator[tuple[str, Any]]:
    for key, value in doc.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            yield from _flatten(value, f"{name}_")
        else:
            yield name, value


def make_app(snapshot: Snapshot) -> bottle.Bottle:
    app = bottle.Bottle()
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Collector(snapshot))

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


def render_page(doc: dict[str, Any]) -> str:
    e = html.escape
    rows = []
    for backend, body in doc["backends"].items():
        for server, d in body["server_detail"].items():
            state = d["state"]
            colour = {"up": "#2e7d32", "down": "#c62828"}.get(state, "#ef6c00")
            rows.append(
                f"<tr><td>{e(backend)}</td><td>{e(server)}</td><td>{e(d['addr'])}</td>"
                f"<td style='color:{colour};font-weight:bold'>{e(state)}</td><td>{d['weight']}</td>"
                f"<td>{d['current_connections']}</td><td>{d['total_connections']}</td>"
                f"<td>{d['bytes_tx']}</td><td>{d['bytes_rx']}</td><td>{d['failed']}</td>"
                f"<td>{e(d['last_check_error'] or '')}</td></tr>"
            )
    fronts = "".join(
        f"<tr><td>{e(n)}</td><td>{e(b['backend'])}</td><td>{b['current_connections']}</td>"
        f"<td>{b['total_connections']}</td><td>{b['refused']}</td><td>{b['bytes_tx']}</td><td>{b['bytes_rx']}</td></tr>"
        for n, b in doc["frontends"].items()
    )
    extra = ""
    for key in ("packet", "dsr"):
        if key in doc:
            extra += f"<h2>{key}</h2><pre>{e(json.dumps(doc[key], indent=2, sort_keys=True))}</pre>"
    return f"""<!doctype html><html><head><meta charset="utf-8"><meta http-equiv="refresh" content="5">
<title>convey</title><style>body{{font-family:sans-serif;margin:2em}}td,th{{padding:.2em .8em;text-align:left}}
table{{border-collapse:collapse}}tr:nth-child(even){{background:#f3f3f3}}</style></head><body>
<h1>convey ({e(str(doc["mode"]))} mode)</h1>
<p>up {doc["uptime_seconds"]:.0f}s &middot; connections: {doc["current_connections"]} open,
{doc["total_connections"]} total, {doc["refused"]} refused &middot; bytes from clients {doc["bytes_tx"]},
to clients {doc["bytes_rx"]} &middot; reloads {doc["reloads"]} (failed {doc["reload_failures"]})</p>
<h2>Frontends</h2><table><tr><th>frontend</th><th>backend</th><th>open</th><th>total</th><th>refused</th>
<th>bytes tx (from clients)</th><th>bytes rx (to clients)</th></tr>{fronts}</table>
<h2>Servers</h2><table><tr><th>backend</th><th>server</th><th>address</th><th>state</th><th>weight</th><th>open</th>
<th>total</th><th>bytes tx</th><th>bytes rx</th><th>failed</th><th>last check error</th></tr>{"".join(rows)}</table>
{extra}<p><a href="/stats">/stats</a> &middot; <a href="/metrics">/metrics</a></p></body></html>"""


class _ThreadingServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True
    allow_reuse_address = True


class _QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:
        log.debug("event=http_request %s", format % args)


class StatsServer:
    """The stats service in a background thread."""

    def __init__(self, address: str, port: int, snapshot: Snapshot) -> None:
        self.app = make_app(snapshot)
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
