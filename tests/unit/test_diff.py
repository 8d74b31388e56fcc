"""Reload preview: the diff of two configs, Maglev slots that move, open flows that would go elsewhere."""

from __future__ import annotations

import socket
from typing import Any

from hypothesis import given, settings
from hypothesis import strategies as st

from convey.balancing.maglev import Maglev
from convey.balancing.pool import Overlay, Pool
from convey.balancing.schedulers import flow_hash
from convey.config import parse_config
from convey.control.diff import config_doc, diff, moved_share
from convey.control.overlay import backends_doc


def text(
    servers: dict[str, tuple[int, int]], scheduler: str = "maglev", fronts: int = 1, size: int = 65537
) -> str:
    """servers: name -> (last address byte, weight)."""
    lines = [f'[frontends.f{i}]\nlisten_addr = "198.18.0.1:{80 + i}"\nbackend = "b"' for i in range(fronts)]
    lines.append(f'[backends.b]\nscheduler = "{scheduler}"\nmaglev_table_size = {size}')
    for name, (host, weight) in servers.items():
        lines.append(f'[backends.b.servers.{name}]\naddr = "198.19.0.{host}:80"\nweight = {weight}')
    return "\n".join(lines)


def doc(servers: dict[str, tuple[int, int]], **kw: Any) -> dict[str, Any]:
    return config_doc(parse_config(text(servers, **kw)), "dsr")


NAMES = st.dictionaries(
    st.sampled_from(["a", "b", "c", "d", "e"]), st.tuples(st.integers(1, 9), st.integers(0, 5)), min_size=1
).filter(lambda d: len({h for h, _ in d.values()}) == len(d))


@settings(max_examples=60, deadline=None)
@given(NAMES, st.sampled_from(["maglev", "wrr", "least_conn"]), st.integers(1, 3))
def test_a_config_against_itself_is_no_change(
    servers: dict[str, tuple[int, int]], sched: str, fronts: int
) -> None:
    one = doc(servers, scheduler=sched, fronts=fronts, size=503)
    assert diff(one, one) == []
    assert (
        diff(one, doc(servers, scheduler=sched, fronts=fronts, size=503), flows={"flows": [], "total": 0})
        == []
    )


def test_what_changes_is_named() -> None:
    old = doc({"a": (1, 1), "b": (2, 1), "c": (3, 1)}, fronts=2, scheduler="wrr")
    new = doc({"a": (1, 3), "c2": (3, 1), "d": (4, 1)}, fronts=1, scheduler="least_conn")
    new["frontends"]["f0"]["listen_addr"] = "198.18.0.1:8080"
    lines = diff(old, new)
    assert "  - frontend f1" in lines
    assert "  ~ frontend f0 listen_addr 198.18.0.1:80 -> 198.18.0.1:8080" in lines
    assert "  ~ backend b scheduler wrr -> least_conn" in lines
    assert "  ~ server b/a weight 1 -> 3" in lines
    assert "  ~ server b/c renamed c2" in lines
    assert "  + server b/d 198.19.0.4:80 weight 1" in lines
    assert "  - server b/b 198.19.0.2:80" in lines
    assert not any("maglev" in line for line in lines)


def test_maglev_share_matches_the_tables() -> None:
    a = [("a", 1), ("b", 1), ("c", 1), ("d", 1)]
    moved, size = moved_share(a, [*a, ("e", 1)], 65537)
    assert size == 65537 and 0.18 < moved / size < 0.26  # about 1/5 moves to the new server
    old, new = Maglev(a, 65537).table, Maglev([*a, ("e", 1)], 65537).table
    assert moved == sum(x != y for x, y in zip(old, new, strict=True))
    assert moved_share(a, a, 65537) == (0, 65537)
    lines = diff(
        doc({n: (i, 1) for i, (n, _) in enumerate(a, 1)}), doc({n: (i, 1) for i, n in enumerate("abcde", 1)})
    )
    assert f"  maglev b: {moved} of 65537 hash slots move ({100 * moved / 65537:.2f}%)" in lines


def _flows(pool: Pool, n: int) -> dict[str, Any]:
    vip = int.from_bytes(socket.inet_aton("198.18.0.1"), "big")
    rows = []
    for i in range(n):
        client = f"10.1.{i // 250}.{i % 250 + 1}"
        server = pool.pick(flow_hash(int.from_bytes(socket.inet_aton(client), "big"), 40000 + i, vip, 80))
        assert server is not None
        rows.append({"client": f"{client}:{40000 + i}", "frontend": "f0", "server": f"b/{server.name}"})
    return {"flows": rows, "total": n, "shown": n}


def test_against_a_running_instance_counts_flows_that_move() -> None:
    servers = {"a": (1, 1), "b": (2, 1), "c": (3, 1)}
    config = parse_config(text(servers))
    pool = Pool(config.backends["b"], "dsr")
    running = config_doc(config, "dsr")
    runtime = backends_doc({"b": pool}, read_only=False)
    flows = _flows(pool, 600)
    assert diff(running, running, runtime, flows) == []
    new = doc({"a": (1, 1), "b": (2, 1)})  # c goes: its flows stay where they are, the others do not move
    (line,) = [x for x in diff(running, new, runtime, flows) if "flows:" in x]
    on_c = sum(1 for r in flows["flows"] if r["server"] == "b/c")
    assert f"of 600 open flows, 0 would pick another server (Maglev), {on_c} are on servers" in line
    new = doc({"a": (1, 1), "b": (2, 1), "c": (3, 1), "d": (4, 1)})  # d comes: about a quarter move
    (line,) = [x for x in diff(running, new, runtime, flows) if "flows:" in x]
    moved = int(line.split(", ")[1].split()[0])
    assert 90 < moved < 220, line


def test_runtime_weights_and_drains_count_in_the_tables() -> None:
    servers = {"a": (1, 1), "b": (2, 1), "c": (3, 1)}
    config = parse_config(text(servers))
    pool = Pool(config.backends["b"], "dsr")
    pool.set_overlay("a", Overlay(weight=4))
    running = config_doc(config, "dsr")
    runtime = backends_doc({"b": pool}, read_only=False)
    # b's file weight changes: the runtime weight of a (unchanged in the file) stays in the table
    lines = diff(running, doc({"a": (1, 1), "b": (2, 2), "c": (3, 1)}), runtime)
    kept, _ = moved_share([("a", 4), ("b", 1), ("c", 1)], [("a", 4), ("b", 2), ("c", 1)], 65537)
    assert f"  maglev b: {kept} of 65537 hash slots move ({100 * kept / 65537:.2f}%)" in lines
    # a's file weight changes: its runtime weight is cleared, said so
    lines = diff(running, doc({"a": (1, 2), "b": (2, 1), "c": (3, 1)}), runtime)
    assert "  ~ server b/a weight 1 -> 2 (clears the runtime weight 4)" in lines
