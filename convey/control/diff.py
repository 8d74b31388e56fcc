"""Reload preview (``convey check --config=NEW --diff``): what a new file changes, from two config documents.

Sans-I/O. A config document (:func:`config_doc`, also served as ``GET /api/config``) holds the frontends, backends,
schedulers and servers with their file weights. :func:`diff` compares two of them: frontends, backends and servers
added, removed or changed; for a backend that uses Maglev after the reload, the share of the hash slots whose
server changes, the two tables built with ``convey.balancing.maglev`` as they would be. With the running
instance's ``GET /api/backends`` (``runtime``) the tables use what it runs: health, drain and maintenance, and the
runtime weights a reload keeps (the file's weight wins where it changes, ``convey.balancing.pool``). With its open
flows (``GET /flows``), it counts those a Maglev backend would send elsewhere after the reload and those on
servers the new file removes (these finish where they are: a reload never moves an open connection).

Servers are matched by address, as a reload matches them.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Mapping
from typing import Any

from convey.balancing.maglev import Maglev
from convey.balancing.schedulers import flow_hash
from convey.config import Config

__all__ = ["config_doc", "diff", "moved_share"]

Doc = Mapping[str, Any]


def config_doc(config: Config, mode: str) -> dict[str, Any]:
    """A config as the diff compares it (and ``GET /api/config`` serves it)."""
    return {
        "mode": str(mode),
        "frontends": {
            f.name: {"listen_addr": str(f.listen_addr), "backend": f.backend}
            for f in config.frontends.values()
        },
        "backends": {
            b.name: {
                "scheduler": b.scheduler_for(mode),
                "maglev_table_size": b.maglev_table_size,
                "servers": {s.name: {"addr": str(s.addr), "weight": s.weight} for s in b.servers},
            }
            for b in config.backends.values()
        },
    }


def _table(weights: Iterable[tuple[str, int]], size: int) -> tuple[str, ...]:
    """The Maglev table over (server name, weight) pairs, as a pool builds it."""
    return tuple(Maglev(sorted(weights), size).table)


def moved_share(old: Iterable[tuple[str, int]], new: Iterable[tuple[str, int]], size: int) -> tuple[int, int]:
    """(slots whose server changes, all slots) between the Maglev tables of two weighted server sets."""
    a, b = _table(old, size), _table(new, size)
    if not a or not b:
        return (size if a != b else 0), size
    return sum(1 for x, y in zip(a, b, strict=True) if x != y), size


def _running(runtime: Doc | None, backend: str) -> dict[str, Doc]:
    """The running servers of ``backend`` by address, each with its ``name`` (from GET /api/backends)."""
    if runtime is None:
        return {}
    servers = runtime.get("backends", {}).get(backend, {}).get("servers", {})
    return {
        s["address"]: {**s, "name": n} for n, s in servers.items() if s.get("state") != "removed-draining"
    }


def _usable(entry: Doc) -> bool:
    return bool(entry.get("healthy")) and not (entry.get("overlay") or {}).get("admin")


def _weights_now(old_b: Doc, running: Mapping[str, Doc], live: bool) -> list[tuple[str, int]]:
    if not live:
        return [(n, s["weight"]) for n, s in old_b["servers"].items()]
    return [(e["name"], e["weight"] if _usable(e) else 0) for e in running.values()]


def _weights_after(new_b: Doc, running: Mapping[str, Doc], live: bool) -> list[tuple[str, int]]:
    result = []
    for n, s in new_b["servers"].items():
        entry = running.get(s["addr"]) if live else None
        if entry is None:
            result.append((n, s["weight"]))
        elif not _usable(entry):
            result.append((n, 0))
        else:  # the runtime weight survives unless the file changes this server's weight
            kept = entry["configured_weight"] == s["weight"]
            result.append((n, entry["weight"] if kept else s["weight"]))
    return result


def _servers(name: str, old_b: Doc, new_b: Doc, runtime: Doc | None) -> list[str]:
    lines = []
    old_by, new_by = {s["addr"]: (n, s) for n, s in old_b["servers"].items()}, {}
    running = _running(runtime, name)
    for n, s in new_b["servers"].items():
        new_by[s["addr"]] = (n, s)
        was = old_by.get(s["addr"])
        if was is None:
            lines.append(f"  + server {name}/{n} {s['addr']} weight {s['weight']}")
            continue
        if was[0] != n:
            lines.append(f"  ~ server {name}/{was[0]} renamed {n}")
        if was[1]["weight"] != s["weight"]:
            note = ""
            overlay = (running.get(s["addr"]) or {}).get("overlay") or {}
            if overlay.get("weight") is not None:
                note = f" (clears the runtime weight {overlay['weight']})"
            lines.append(f"  ~ server {name}/{n} weight {was[1]['weight']} -> {s['weight']}{note}")
    for addr, (n, _) in old_by.items():
        if addr not in new_by:
            lines.append(f"  - server {name}/{n} {addr}")
    return lines


def _named(kind: str, old: Doc, new: Doc, describe: Any) -> list[str]:
    lines = [f"  + {kind} {n} {describe(b)}" for n, b in new.items() if n not in old]
    lines += [f"  - {kind} {n}" for n in old if n not in new]
    return lines


def diff(old: Doc, new: Doc, runtime: Doc | None = None, flows: Doc | None = None) -> list[str]:
    """What loading ``new`` over ``old`` changes, one line each; empty when nothing does."""
    lines = _named(
        "frontend",
        old["frontends"],
        new["frontends"],
        lambda f: f"{f['listen_addr']} -> backend {f['backend']}",
    )
    for n, f in new["frontends"].items():
        was = old["frontends"].get(n)
        for key in ("listen_addr", "backend") if was is not None else ():
            if was[key] != f[key]:
                lines.append(f"  ~ frontend {n} {key} {was[key]} -> {f[key]}")
    lines += _named("backend", old["backends"], new["backends"], lambda b: f"({len(b['servers'])} servers)")
    live = runtime is not None
    tables: dict[str, tuple[str, ...]] = {}
    for n, b in new["backends"].items():
        was = old["backends"].get(n)
        if was is None:
            continue
        for key in ("scheduler", "maglev_table_size"):
            if was[key] != b[key]:
                lines.append(f"  ~ backend {n} {key} {was[key]} -> {b[key]}")
        lines += _servers(n, was, b, runtime)
        if b["scheduler"] != "maglev":
            continue
        running = _running(runtime, n)
        before, after = _weights_now(was, running, live), _weights_after(b, running, live)
        if was["scheduler"] == "maglev" and was["maglev_table_size"] == b["maglev_table_size"]:
            moved, size = moved_share(before, after, b["maglev_table_size"])
            if moved:
                lines.append(f"  maglev {n}: {moved} of {size} hash slots move ({100 * moved / size:.2f}%)")
        tables[n] = _table(after, b["maglev_table_size"])
    if flows is not None and lines:
        lines += _flows(old, new, tables, flows)
    return lines


def _flows(old: Doc, new: Doc, tables: Mapping[str, tuple[str, ...]], flows: Doc) -> list[str]:
    """How many open flows the new config's Maglev tables send elsewhere, and how many are on removed servers."""
    moved = leaving = 0
    rows = flows.get("flows", [])
    names = {b: {s["addr"]: n for n, s in body["servers"].items()} for b, body in new["backends"].items()}
    for row in rows:
        backend, _, server = row["server"].partition("/")
        addr = old["backends"].get(backend, {}).get("servers", {}).get(server, {}).get("addr")
        name = names.get(backend, {}).get(addr)
        if name is None:
            leaving += 1
            continue
        table = tables.get(backend)
        front = new["frontends"].get(row["frontend"]) or old["frontends"].get(row["frontend"])
        if not table or front is None:
            continue
        client, _, cport = row["client"].rpartition(":")
        vip, _, vport = front["listen_addr"].rpartition(":")
        hashed = flow_hash(_int(client), int(cport), _int(vip), int(vport))
        if table[hashed % len(table)] != name:
            moved += 1
    seen = f"{len(rows)} open flows" + (
        f" (of {flows['total']})" if flows.get("total", 0) > len(rows) else ""
    )
    return [
        f"  flows: of {seen}, {moved} would pick another server (Maglev), {leaving} are on servers the new "
        "config removes (they finish where they are)"
    ]


def _int(addr: str) -> int:
    try:
        return int.from_bytes(socket.inet_aton(addr), "big")
    except OSError:
        return 0
