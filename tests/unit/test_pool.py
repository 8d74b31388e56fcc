"""Pools and stats snapshots: health thresholds, draining, reload in place, exact counters."""

from __future__ import annotations

from collections import Counter

from hypothesis import given, settings
from hypothesis import strategies as st

from convey import stats as stats_mod
from convey.balancing.pool import Pool
from convey.config import BackendConfig, parse_config
from convey.stats import Stats, snapshot


def backend(
    servers: dict[str, tuple[str, int]], scheduler: str = "wrr", rise: int = 2, fall: int = 3
) -> BackendConfig:
    lines = [
        '[frontends.f]\nlisten_addr = "127.0.0.1:80"\nbackend = "b"',
        f'[backends.b]\nscheduler = "{scheduler}"\nrise = {rise}\nfall = {fall}',
    ]
    for name, (addr, weight) in servers.items():
        lines.append(f'[backends.b.servers.{name}]\naddr = "{addr}"\nweight = {weight}')
    return parse_config("\n".join(lines)).backends["b"]


def picks(pool: Pool, n: int) -> Counter[str]:
    result: Counter[str] = Counter()
    for i in range(n):
        server = pool.pick(i * 7919)
        result[server.name if server else "-"] += 1
    return result


def test_fall_and_rise_thresholds() -> None:
    pool = Pool(backend({"a": ("10.0.0.1:80", 1), "b": ("10.0.0.2:80", 1)}, rise=2, fall=3), "proxy")
    assert pool.report_check("a", False, "refused") is None
    assert pool.report_check("a", False, "refused") is None
    assert pool.servers["a"].healthy
    assert pool.report_check("a", False, "refused") is False  # third failure: down
    assert picks(pool, 10) == Counter({"b": 10})
    assert pool.servers["a"].health.last_error == "refused"
    assert pool.report_check("a", True) is None
    assert pool.report_check("a", False, "x") is None  # a failure resets the run of successes
    assert pool.report_check("a", True) is None
    assert pool.report_check("a", True) is True  # second consecutive success: up
    assert picks(pool, 10) == Counter({"a": 5, "b": 5})


def test_no_eligible_server_picks_none() -> None:
    pool = Pool(backend({"a": ("10.0.0.1:80", 0)}), "proxy")
    assert pool.pick() is None and pool.candidates() == [] and not pool.has_eligible


def test_candidates_start_with_the_pick_and_hold_no_duplicates() -> None:
    pool = Pool(backend({n: (f"10.0.0.{i}:80", 1) for i, n in enumerate("abcd", 1)}), "proxy")
    cands = pool.candidates(limit=3)
    assert len(cands) == 3 and len({c.name for c in cands}) == 3


def test_reload_keeps_health_and_connections_and_drains_removed_servers() -> None:
    pool = Pool(backend({"a": ("10.0.0.1:80", 1), "b": ("10.0.0.2:80", 1)}), "proxy")
    a, b = pool.servers["a"], pool.servers["b"]
    pool.acquire(b)
    for _ in range(3):
        pool.report_check("a", False, "down")
    changes = pool.update(
        backend({"a2": ("10.0.0.1:80", 5), "c": ("10.0.0.3:80", 1)}, scheduler="least_conn")
    )
    assert pool.servers["a2"] is a and not a.healthy and a.weight == 5  # renamed, same server, health kept
    assert "c" in pool.servers
    assert b.removed and b.state == "removed-draining" and pool.find("b") is b
    assert any("removed" in c for c in changes) and any("scheduler wrr -> least_conn" in c for c in changes)
    assert all(s.name != "b" for s in (pool.pick(h) for h in range(50)) if s)
    pool.release(b)  # the last connection ends: forgotten
    assert pool.find("b") is None and [s.name for s in pool.all_servers()] == ["a2", "c"]


def test_weight_zero_drains_without_touching_open_connections() -> None:
    pool = Pool(backend({"a": ("10.0.0.1:80", 1), "b": ("10.0.0.2:80", 1)}), "proxy")
    a = pool.servers["a"]
    pool.acquire(a)
    pool.update(backend({"a": ("10.0.0.1:80", 0), "b": ("10.0.0.2:80", 1)}))
    assert a.state == "draining" and a.active == 1
    assert picks(pool, 20) == Counter({"b": 20})


def test_dsr_defaults_to_maglev_and_is_stable_across_instances() -> None:
    cfg = backend({n: (f"10.0.0.{i}:80", 1) for i, n in enumerate("abc", 1)}).__class__
    conf = backend({n: (f"10.0.0.{i}:80", 1) for i, n in enumerate("abc", 1)})
    conf = cfg(**{**{f: getattr(conf, f) for f in conf.__dataclass_fields__}, "scheduler": None})
    one, two = Pool(conf, "dsr"), Pool(conf, "dsr")
    assert one.scheduler_name == "maglev"
    assert [one.pick(h).name for h in range(0, 10**6, 9973)] == [
        two.pick(h).name for h in range(0, 10**6, 9973)
    ]  # type: ignore[union-attr]


def test_snapshot_matches_the_original_shape_and_counts_exactly() -> None:
    config = parse_config(
        '[frontends.f]\nlisten_addr = "127.0.0.1:80"\nbackend = "b"\n'
        '[backends.b.servers.a]\naddr = "10.0.0.1:80"\n[backends.b.servers.z]\naddr = "10.0.0.2:80"\nweight = 0\n'
    )
    pool = Pool(config.backends["b"], "proxy")
    stats = Stats(mode="proxy", started=100.0)
    scopes = stats.scopes("f", "b", "a")
    stats_mod.opened(scopes)
    for c in scopes:
        c.bytes_rx += 10
        c.bytes_tx += 20
    refused = stats.scopes("f", "b")
    stats_mod.opened(refused)
    stats_mod.refused(refused)
    stats_mod.closed(refused)
    doc = snapshot(stats, {"b": pool}, {"f": "b"}, now=105.5)
    assert doc["uptime_seconds"] == 5.5
    assert (doc["total_connections"], doc["current_connections"], doc["refused"]) == (2, 1, 1)
    assert (doc["total_bytes_rx"], doc["total_bytes_tx"]) == (10, 20)
    b = doc["backends"]["b"]
    assert b["servers"] == {"10.0.0.1:80": True, "10.0.0.2:80": True}
    assert (
        b["server_detail"]["a"]["current_connections"] == 1 and b["server_detail"]["z"]["state"] == "draining"
    )
    assert doc["frontends"]["f"] == {
        "backend": "b",
        "total_connections": 2,
        "current_connections": 1,
        "bytes_tx": 20,
        "bytes_rx": 10,
        "refused": 1,
        "failed": 0,
    }
    stats_mod.closed(scopes)
    assert snapshot(stats, {"b": pool}, {"f": "b"}, now=106)["current_connections"] == 0


@settings(max_examples=50)
@given(st.lists(st.tuples(st.sampled_from("ab"), st.booleans()), max_size=60))
def test_current_connections_returns_to_zero(events: list[tuple[str, bool]]) -> None:
    """Any interleaving of opens (refused or not) closed in any order leaves every scope at 0."""
    stats = Stats(mode="proxy", started=0.0)
    open_scopes = []
    for server, refused in events:
        scopes = stats.scopes("f", "b") if refused else stats.scopes("f", "b", server)
        stats_mod.opened(scopes)
        open_scopes.append(scopes)
    for scopes in reversed(open_scopes):
        stats_mod.closed(scopes)
    assert all(
        c.current_connections == 0 for c in [stats.total, *stats.frontends.values(), *stats.servers.values()]
    )
    assert stats.total.total_connections == len(events)
