"""The /stats document of a supervisor: its own (health, config, reloads) plus its workers' counters (pure).

Connection counters (``total_connections``, bytes, ``refused``, ``failed``; gauges ``current_connections`` and a
server's ``active``) are summed over the live workers at every scope (totals, frontends, backends, servers).
A worker that died leaves its last report behind (the supervisor polls every ``POLL_INTERVAL``): its counters stay
in the sums, its gauges do not (its connections are gone). Sections only the workers have (``packet``, ``dsr``,
``proxy``, ...) are summed leaf by leaf; a leaf that is not a number, or that names something (``NAMES``: a queue
number) or is a setting (``*_timeout``), is kept when every worker agrees and listed per worker otherwise. ``workers`` lists each worker's own
figures: the per-worker breakdown.
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import fields
from typing import Any

from convey.stats import Counters

COUNTERS = tuple(f.name for f in fields(Counters))
GAUGES = frozenset({"current_connections", "active"})
TOTAL_ALIASES = {"total_bytes_tx": "bytes_tx", "total_bytes_rx": "bytes_rx"}
NAMES = frozenset({"num", "queue_num", "port_range", "pid", "index"})
SCOPE_KEYS = frozenset({"frontends", "backends"})


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _add(target: dict[str, Any], source: dict[str, Any], gauges: bool) -> None:
    for key in (*COUNTERS, "active"):
        if key in target and key in source and _number(source[key]):
            if key in GAUGES and not gauges:
                continue
            target[key] += source[key]


def add_counters(doc: dict[str, Any], worker: dict[str, Any], gauges: bool = True) -> None:
    """Add ``worker``'s connection counters into ``doc`` at every scope ``doc`` has (gauges unless told)."""
    _add(doc, worker, gauges)
    for alias, key in TOTAL_ALIASES.items():
        if alias in doc:
            doc[alias] = doc.get(key, doc[alias])
    for name, front in doc.get("frontends", {}).items():
        theirs = worker.get("frontends", {}).get(name)
        if theirs is not None:
            _add(front, theirs, gauges)
    for name, back in doc.get("backends", {}).items():
        theirs = worker.get("backends", {}).get(name)
        if theirs is None:
            continue
        _add(back, theirs, gauges)
        details = theirs.get("server_detail", {})
        mine = back.setdefault("server_detail", {})
        for server, detail in details.items():
            if server in mine:
                _add(mine[server], detail, gauges)
            elif gauges and detail.get("state") == "removed-draining":
                # removed from the config, still carrying this worker's connections: the supervisor's pool
                # forgot it (it has no connections of its own), the worker's entry says what is left
                mine[server] = dict(detail)
                back.setdefault("servers", {})[detail.get("addr", server)] = detail.get("healthy", True)


def sum_tree(values: Sequence[Any], key: str = "") -> Any:
    """One value from the workers' values of a leaf or subtree (see the module doc)."""
    if not values:
        return None
    if key not in NAMES and not key.endswith("_timeout") and all(_number(v) for v in values):
        total = sum(values)
        return round(total, 6) if isinstance(total, float) else total
    if all(isinstance(v, dict) for v in values):
        keys = dict.fromkeys(k for v in values for k in v)
        return {k: sum_tree([v[k] for v in values if k in v], k) for k in keys}
    first = values[0]
    if all(v == first for v in values):
        return first
    return list(values)


def merge(
    base: dict[str, Any],
    live: Sequence[dict[str, Any]],
    dead: Sequence[dict[str, Any]],
    workers: list[dict[str, Any]],
) -> dict[str, Any]:
    """The supervisor's document: ``base`` (its own snapshot, counters all zero) plus the ``live`` workers'
    documents, the ``dead`` workers' last ones (counters, not gauges) and the per-worker list ``workers``."""
    doc = copy.deepcopy(base)
    for worker in live:
        add_counters(doc, worker)
    for worker in dead:
        add_counters(doc, worker, gauges=False)
    sections = dict.fromkeys(
        k for w in live for k, v in w.items() if isinstance(v, dict) and k not in base and k not in SCOPE_KEYS
    )
    for section in sections:
        doc[section] = sum_tree([w[section] for w in live if section in w], section)
    doc["workers"] = workers
    return doc


def worker_entry(info: dict[str, Any], doc: dict[str, Any] | None) -> dict[str, Any]:
    """One worker's line of the per-worker list: who it is (``info``) and its own counters and sections."""
    entry = dict(info)
    if doc is None:
        return entry
    for key in COUNTERS:
        if key in doc:
            entry[key] = doc[key]
    for section in ("packet", "dsr", "proxy"):
        if isinstance(doc.get(section), dict):
            entry[section] = doc[section]
    return entry
