"""``/metrics``: the /stats document as Prometheus metrics, named by rules rather than by a list per key.

The fixed part (docs/operations.md has the list):

- ``convey_info{mode}`` 1, ``convey_uptime_seconds``, ``convey_reloads_total{result="applied|rejected|error"}``;
- the connection counters of each scope: the whole balancer (no prefix, no labels), ``convey_frontend_*``
  ``{frontend}``, ``convey_backend_*{backend}``, ``convey_server_*{backend,server}``. A counter ``k`` becomes
  ``<scope>_<k>_total``, ``total_connections`` becomes ``<scope>_connections_total``, ``bytes_tx`` / ``bytes_rx``
  become ``<scope>_tx_bytes_total`` / ``<scope>_rx_bytes_total``; ``current_connections`` stays a gauge;
- per server: ``convey_server_up`` (passes health checks), ``convey_server_state{state}`` (1 for the current
  state, 0 for the others), ``convey_server_info{addr}`` 1, ``convey_server_health_checks_total{result}``, and
  its other numbers (``weight``, ...) as gauges.

Every other section of /stats (``packet``, ``dsr``, ``offload``, ``proxy``, ``health``, ``workers``, and any
section added later) is walked by the same rules, the metric named by its path (``packet.queue.queue_dropped``
-> ``convey_packet_queue_dropped_total``: a key that repeats its parent's name does not repeat it):

- a number is a counter (``_total``; ``bytes_x`` -> ``x_bytes_total``) unless its name says it is a current
  value (``_GAUGES``: ``flows``, ``active``, ``*_capacity``, ``*_in_use``, ``max_*``, ``*_timeout`` (in
  seconds), a last event's report, ...); a boolean is a 0/1 gauge; strings and lists of strings are left out;
- the maps keyed by names (``_LABELLED``) give labels: ``parse_errors`` -> ``kind``, ``frontends`` ->
  ``frontend``, a per-server map -> ``backend`` and ``server``, ...; a list of dicts gives one label per item
  (``workers`` -> ``worker``, the item's ``id`` or its index);
- identifiers are never values: ``num``, ``id``, ``queue`` become labels of their dict's metrics (``queue.num``
  -> ``{queue="3"}``), ``pid`` and ports are left out;
- a ``verdicts`` dict is split: verdicts in ``<prefix>_verdicts_total{verdict}`` (each packet once), drop
  reasons in ``<prefix>_drops_total{reason}`` (each dropped packet once), the rest by the rules above.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric

from convey.packet.counters import DsrCounters, PassthroughCounters

log = logging.getLogger("convey.metrics")

Labels = tuple[tuple[str, str], ...]

# The connection counters of every scope (convey.stats.Counters) and the top-level keys the fixed part handles.
_SCOPE_COUNTERS = {
    "total_connections": "Connections accepted",
    "current_connections": "Open connections",
    "bytes_tx": "Bytes from the clients towards the servers (client -> server)",
    "bytes_rx": "Bytes from the servers back to the clients (server -> client)",
    "refused": "Connections refused: no eligible server, a limit reached or no local resource",
    "failed": "Connection attempts that failed (server scope: to this server; others: every candidate failed)",
}
_RELOADS = {"reloads": "applied", "reload_failures": "rejected", "reload_errors": "error"}
_FIXED = {
    "mode",
    "uptime_seconds",
    "total_bytes_tx",  # the original convey's names of bytes_tx / bytes_rx
    "total_bytes_rx",
    "last_reload_error",
    "frontends",
    "backends",
    *_SCOPE_COUNTERS,
    *_RELOADS,
}
SERVER_STATES = ("up", "down", "draining", "maintenance", "removed-draining")

# Maps whose keys are names, not fields: the label their keys give.
_LABELLED = {
    "parse_errors": "kind",
    "send_errors": "error",
    "write_errors": "error",
    "frontends": "frontend",
    "backends": "backend",
    "open_per_server": "server",
    "flows_per_server": "server",
    "overlay": "server",
    "peers": "peer",
}
_ID_LABELS = {"num", "id", "queue", "index", "worker"}  # scalar keys that name the dict they are in
_LEFT_OUT = {"pid", "port"}  # identifiers that would only churn as labels
_GAUGES = {"flows", "connections", "current_connections", "active", "open", "entries", "port_pools", "weight"}
_GAUGE_SUFFIXES = (
    "_open",
    "_capacity",
    "_in_use",
    "_pending",
    "_per_server",
    "_timeout",
    "_waiting",
    "_weight",
)
_GAUGE_PARENTS = {"last_resync"}  # the report of one event: its numbers do not add up over time
_VERDICTS = {"accepted", "dropped"}
_NAME_PART = re.compile(r"[a-z_][a-z0-9_]*")
_DROP_REASONS = {*PassthroughCounters.DROP_REASONS, *DsrCounters.DROP_REASONS}


class Families:
    """Metric families by name, filled in any order; a sample that would clash with its family's type or labels
    is left out (and logged once per family) rather than breaking the exposition."""

    def __init__(self) -> None:
        self._fams: dict[str, CounterMetricFamily | GaugeMetricFamily] = {}
        self._labels: dict[str, tuple[str, ...]] = {}
        self._clashes: set[str] = set()

    def add(self, name: str, kind: str, help_: str, labels: Labels, value: float) -> None:
        family = name.removesuffix("_total") if kind == "counter" else name  # as the exposition names it
        fam = self._fams.get(family)
        names = tuple(k for k, _ in labels)
        if fam is None:
            cls = CounterMetricFamily if kind == "counter" else GaugeMetricFamily
            fam = self._fams[family] = cls(name, help_, labels=list(names))
            self._labels[family] = names
        elif fam.type != kind or self._labels[family] != names:
            if name not in self._clashes:
                self._clashes.add(name)
                log.warning("event=metric_clash metric=%s labels=%s", name, ",".join(names))
            return
        fam.add_metric([v for _, v in labels], value)

    def __iter__(self) -> Iterator[Metric]:
        return iter(self._fams.values())


def collect(doc: Mapping[str, Any]) -> Iterator[Metric]:
    """The metric families of one /stats document."""
    fams = Families()
    fams.add("convey_info", "gauge", "convey runs, in this mode", (("mode", str(doc.get("mode", ""))),), 1)
    fams.add("convey_uptime_seconds", "gauge", "Seconds since start", (), float(doc.get("uptime_seconds", 0)))
    for key, result in _RELOADS.items():
        help_ = "Config reloads: applied, rejected (the file did not validate) or error (failed unexpectedly)"
        fams.add("convey_reloads_total", "counter", help_, (("result", result),), doc.get(key, 0))
    _scope(fams, "convey", (), doc)
    for name, body in doc.get("frontends", {}).items():
        _scope(fams, "convey_frontend", (("frontend", name),), body)
    for name, body in doc.get("backends", {}).items():
        _scope(fams, "convey_backend", (("backend", name),), body)
        for server, detail in body.get("server_detail", {}).items():
            _server(fams, (("backend", name), ("server", server)), detail)
    for key, value in doc.items():
        if key not in _FIXED:
            _walk(fams, ["convey", key], (), value, key)
    return iter(fams)


def _scope(fams: Families, prefix: str, labels: Labels, body: Mapping[str, Any]) -> None:
    for key, help_ in _SCOPE_COUNTERS.items():
        value = body.get(key)
        if not isinstance(value, int | float) or isinstance(value, bool):
            continue
        if key == "current_connections":
            fams.add(f"{prefix}_current_connections", "gauge", help_, labels, value)
        else:
            fams.add(f"{prefix}_{_counter_stem(key)}_total", "counter", help_, labels, value)


def _server(fams: Families, labels: Labels, detail: Mapping[str, Any]) -> None:
    _scope(fams, "convey_server", labels, detail)
    fams.add(
        "convey_server_up", "gauge", "1 if the server passes health checks", labels, int(detail["healthy"])
    )
    state = str(detail.get("state", ""))
    help_ = "1 for the server's state (up, down, draining, maintenance, removed-draining), 0 for the others"
    for known in (*SERVER_STATES, *(() if state in SERVER_STATES else (state,))):
        fams.add("convey_server_state", "gauge", help_, (*labels, ("state", known)), int(known == state))
    fams.add(
        "convey_server_info", "gauge", "The server's address", (*labels, ("addr", str(detail["addr"]))), 1
    )
    for key, result in (("checks_ok", "ok"), ("checks_failed", "failed")):
        if _is_number(detail.get(key)):
            help_ = "Health checks made, by result"
            fams.add(
                "convey_server_health_checks_total",
                "counter",
                help_,
                (*labels, ("result", result)),
                detail[key],
            )
    for key, value in detail.items():
        if key not in _SCOPE_COUNTERS and key not in ("healthy", "checks_ok", "checks_failed"):
            _scalar(fams, ["convey_server"], labels, key, value, f"backends.*.server_detail.*.{key}")


def _walk(fams: Families, parts: list[str], labels: Labels, node: Any, path: str) -> None:
    """One value of a /stats section and everything below it (the rules in the module doc)."""
    if isinstance(node, Mapping):
        label = _LABELLED.get(parts[-1]) or _keyed_by_names(node)
        if label is not None:
            _walk_labelled(fams, parts, labels, node, path, label)
            return
        have = {k for k, _ in labels}
        ids = tuple((parts[-1] if k in ("num", "id") else k, str(v)) for k, v in node.items() if _is_id(k, v))
        labels = (*labels, *((k, v) for k, v in ids if k not in have))
        if parts[-1] == "verdicts":
            _walk_verdicts(fams, parts[:-1], labels, node, path)
            return
        for key, value in node.items():
            if _is_id(key, value) or key in _LEFT_OUT or key.endswith(("_pid", "_port")):
                continue
            if isinstance(value, Mapping | list):
                _walk(fams, [*parts, _strip(key, parts[-1])], labels, value, f"{path}.{key}")
            else:
                _scalar(fams, parts, labels, key, value, f"{path}.{key}")
    elif isinstance(node, list) and all(isinstance(item, Mapping) for item in node) and node:
        label = parts[-1][:-1] if parts[-1].endswith("s") else parts[-1]
        for index, item in enumerate(node):
            ident = next((str(item[k]) for k in ("id", "index", label) if k in item), str(index))
            rest = {k: v for k, v in item.items() if k not in ("id", "index", label)}
            _walk(fams, [*parts[:-1], label], (*labels, (label, ident)), rest, f"{path}[]")


def _walk_labelled(
    fams: Families, parts: list[str], labels: Labels, node: Mapping[str, Any], path: str, label: str
) -> None:
    for name, value in node.items():
        item = _name_labels(label, str(name))
        if isinstance(value, Mapping):
            _walk(fams, parts[:-1], (*labels, *item), value, f"{path}.*")
        else:
            _scalar(fams, parts[:-1], (*labels, *item), parts[-1], value, path)


def _walk_verdicts(
    fams: Families, parts: list[str], labels: Labels, node: Mapping[str, Any], path: str
) -> None:
    prefix = "_".join(parts)
    for key, value in node.items():
        if isinstance(value, Mapping):
            _walk(fams, [*parts, key], labels, value, f"{path}.{key}")
            continue
        if not _is_number(value):
            continue
        if key in _VERDICTS or key.endswith(("_accepted", "_dropped")) or key.startswith("icmp_"):
            help_ = f"Packets by verdict ({path}: every packet counted once)"
            fams.add(f"{prefix}_verdicts_total", "counter", help_, (*labels, ("verdict", key)), value)
        elif key in _DROP_REASONS:
            help_ = f"Dropped packets by reason ({path}: every dropped packet counted once)"
            fams.add(f"{prefix}_drops_total", "counter", help_, (*labels, ("reason", key)), value)
        else:
            _scalar(fams, parts, labels, key, value, f"{path}.{key}")


def _scalar(fams: Families, parts: Sequence[str], labels: Labels, key: str, value: Any, path: str) -> None:
    if isinstance(value, bool):
        fams.add(
            f"{'_'.join(parts)}_{_strip(key, parts[-1])}",
            "gauge",
            f"{path} in /stats (1 true, 0 false)",
            labels,
            int(value),
        )
    elif _is_number(value):
        prefix, stem = "_".join(parts), _strip(key, parts[-1])
        if _is_gauge(key, parts[-1]):
            name = f"{prefix}_{stem}_seconds" if key.endswith("_timeout") else f"{prefix}_{stem}"
            fams.add(name, "gauge", f"{path} in /stats", labels, value)
        else:
            fams.add(f"{prefix}_{_counter_stem(stem)}_total", "counter", f"{path} in /stats", labels, value)


def _is_gauge(key: str, parent: str) -> bool:
    """A current value, not a count of events since start."""
    return (
        key in _GAUGES or key.startswith("max_") or key.endswith(_GAUGE_SUFFIXES) or parent in _GAUGE_PARENTS
    )


def _counter_stem(key: str) -> str:
    """``bytes_tx`` -> ``tx_bytes``, ``total_connections`` -> ``connections``, ``x_total`` -> ``x``."""
    if key.startswith("bytes_"):
        return f"{key[len('bytes_') :]}_bytes"
    if key.startswith("total_"):
        return key[len("total_") :]
    return key.removesuffix("_total")


def _strip(key: str, parent: str) -> str:
    """A key that repeats its parent's name: ``queue.queue_dropped`` -> ``dropped``."""
    return key[len(parent) + 1 :] if key.startswith(f"{parent}_") and len(key) > len(parent) + 1 else key


def _name_labels(label: str, name: str) -> Labels:
    """A per-server map is keyed ``backend/server``: two labels, as on ``convey_server_*``."""
    if label == "server" and "/" in name:
        backend, _, server = name.partition("/")
        return (("backend", backend), ("server", server))
    return ((label, name),)


def _keyed_by_names(node: Mapping[str, Any]) -> str | None:
    """A map not in ``_LABELLED`` whose keys cannot be part of a metric name: keyed by servers or other names."""
    keys = [str(k) for k in node]
    if all(_NAME_PART.fullmatch(k) for k in keys):
        return None
    return "server" if all("/" in k for k in keys) else "name"


def _is_id(key: str, value: Any) -> bool:
    return key in _ID_LABELS and isinstance(value, int | str) and not isinstance(value, bool)


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


class Collector:
    """The prometheus_client collector: one /stats snapshot per scrape."""

    def __init__(self, snapshot: Callable[[], dict[str, Any]]) -> None:
        self.snapshot = snapshot

    def collect(self) -> Iterator[Metric]:
        return collect(self.snapshot())
