"""Worker processes, the pure parts: how a config is split (queues, ports, capacity, steering), the rules for N
queues, the worker keys of the config, and how the supervisor sums its workers' /stats documents."""

from __future__ import annotations

import os
import re

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convey.config import ConfigError, check_workers, parse_config, with_offload, with_workers
from convey.dataplane.rules.ruleset import chain_rules, output_rules
from convey.modes import Mode
from convey.workers.merge import merge, sum_tree
from convey.workers.slices import (
    buckets,
    capacity_share,
    client_steer_match,
    even_slices,
    icmp_steer_matches,
    worker_config,
)

BASE = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "b"
[backends.b.servers.s0]
addr = "198.18.1.2:8080"
[backends.b.servers.s1]
addr = "198.18.2.2:8080"
"""


def config(extra: str = ""):  # type: ignore[no-untyped-def]
    return parse_config(BASE + extra, "w.toml")


# -- slices -----------------------------------------------------------------------------------------------------


@given(st.integers(1024, 65535), st.integers(0, 60000), st.integers(1, 256))
def test_even_slices_are_contiguous_and_cover_the_range(lo: int, span: int, count: int) -> None:
    hi = min(65535, lo + span)
    if hi - lo + 1 < count:
        return
    slices = even_slices(lo, hi, count)
    assert slices[0][0] == lo and slices[-1][1] == hi and len(slices) == count
    assert all(slices[i][1] + 1 == slices[i + 1][0] for i in range(count - 1))
    sizes = [b - a + 1 for a, b in slices]
    assert max(sizes) - min(sizes) <= 1


@given(st.integers(1, 10**7), st.integers(1, 256))
def test_capacity_shares_add_up(capacity: int, count: int) -> None:
    shares = [capacity_share(capacity, i, count) for i in range(count)]
    assert sum(shares) == capacity and max(shares) - min(shares) <= 1


def u32_test(match: str) -> tuple[int, int, int]:
    """(mask, low, high) of a steering match's last test."""
    found = re.search(r"&(0x[0-9a-f]+)=(0x[0-9a-f]+):(0x[0-9a-f]+)\"$", match)
    assert found, match
    return int(found[1], 16), int(found[2], 16), int(found[3], 16)


@pytest.mark.parametrize("count", [2, 3, 4, 7, 16, 33])
def test_every_client_port_goes_to_exactly_one_worker(count: int) -> None:
    tests = [u32_test(client_steer_match(i, count)) for i in range(count)]
    owners = [0] * count
    for port in range(65536):
        matching = [i for i, (mask, lo, hi) in enumerate(tests) if lo <= port & mask <= hi]
        assert len(matching) == 1, (port, matching)
        owners[matching[0]] += 1
    assert min(owners) > 0
    # Linux connect() walks even ports two at a time: consecutive connections still reach every worker
    even = [
        next(i for i, (m, lo, hi) in enumerate(tests) if lo <= p & m <= hi) for p in range(40000, 40512, 2)
    ]
    share = [even.count(i) / len(even) for i in range(count)]
    assert max(share) - min(share) <= 2 / buckets(count) + 1e-9, share


def test_one_worker_adds_no_match() -> None:
    assert client_steer_match(0, 1) == "" and icmp_steer_matches(config(), Mode.PASSTHROUGH, 0, 1) == [""]


def test_icmp_errors_are_steered_by_the_quoted_ports() -> None:
    cfg = with_workers(config(), Mode.PASSTHROUGH, 2)
    first, second = (icmp_steer_matches(cfg, Mode.PASSTHROUGH, i, 2) for i in range(2))
    # the quoted source port (the balancer's ephemeral port) by slice, then the quoted client port by bucket
    assert first[0].endswith('0x8>>0x10=0x83e8:0xb918"') and second[0].endswith('=0xb919:0xee48"')
    assert "@0x8&0x1e=" in first[1]
    assert len(icmp_steer_matches(cfg, Mode.DSR, 0, 2)) == 1


def test_worker_config_takes_its_share() -> None:
    cfg = parse_config(BASE + "[passthrough]\nqueue_num = 10\nconnection_tracker_capacity = 1001\n", "w.toml")
    cfg = with_workers(cfg, Mode.PASSTHROUGH, 2)
    one, two = (worker_config(cfg, Mode.PASSTHROUGH, i, 2).passthrough for i in range(2))
    assert (one.queue_num, two.queue_num) == (10, 11)
    assert one.port_range == (33768, 47384) and two.port_range == (47385, 61000)
    assert (one.connection_tracker_capacity, two.connection_tracker_capacity) == (501, 500)
    assert one.workers == two.workers == 1
    assert worker_config(with_workers(cfg, Mode.DSR, 3), Mode.DSR, 2, 3).dsr.queue_num == 2


# -- rules ------------------------------------------------------------------------------------------------------


def test_rules_for_two_workers_queue_to_two_queues() -> None:
    cfg = with_workers(config(), Mode.PASSTHROUGH, 2)
    rules = chain_rules(cfg, Mode.PASSTHROUGH)
    front = [r for r in rules if "convey frontend web" in r]
    assert len([r for r in front if "CT --notrack" in r]) == 1
    queued = [r for r in front if "NFQUEUE" in r]
    assert [r.split("--queue-num ")[1].split()[0] for r in queued] == ["0", "1"]
    assert all("-m u32 --u32" in r for r in queued)
    s0 = [r for r in rules if "web_servers" not in r and "server b/s0" in r and "NFQUEUE" in r]
    assert [r.split("--dport ")[1].split()[0] for r in s0] == ["33768:47384", "47385:61000"]
    assert any("NFQUEUE --queue-num 1" in r for r in output_rules(cfg, Mode.PASSTHROUGH))


def test_rules_for_one_worker_are_unchanged() -> None:
    rules = chain_rules(config(), Mode.PASSTHROUGH)
    assert not any("u32" in r for r in rules)
    assert all("--queue-num 0" in r for r in rules if "NFQUEUE" in r)


# -- config -----------------------------------------------------------------------------------------------------


def test_workers_keys_and_auto() -> None:
    cfg = config('[passthrough]\nworkers = "auto"\n[dsr]\nworkers = 3\n[proxy]\nworkers = 2\n')
    assert cfg.passthrough.workers == len(os.sched_getaffinity(0))
    assert (cfg.dsr.workers, cfg.proxy.workers) == (3, 2)


@pytest.mark.parametrize(
    ("extra", "key"),
    [
        ("[passthrough]\nworkers = 0\n", "passthrough.workers"),
        ("[passthrough]\nworkers = -3\n", "passthrough.workers"),
        ('[dsr]\nworkers = "many"\n', "dsr.workers"),
        ("[proxy]\nworkers = 257\n", "proxy.workers"),
        ("[proxy]\nthreads = 2\n", "proxy.threads"),
    ],
)
def test_bad_worker_counts_name_the_key(extra: str, key: str) -> None:
    with pytest.raises(ConfigError) as failure:
        config(extra)
    assert failure.value.key == key


def test_more_workers_than_the_port_range_holds() -> None:
    cfg = config('[passthrough]\nport_range = "40000-40200"\n')
    with_workers(cfg, Mode.PASSTHROUGH, 3)  # 67 ports each: fine
    with pytest.raises(ConfigError, match="at least 64 ports") as failure:
        with_workers(cfg, Mode.PASSTHROUGH, 4)
    assert failure.value.key == "passthrough.workers"
    with pytest.raises(ConfigError, match="queues 65535-65536"):
        with_workers(config("[dsr]\nqueue_num = 65535\n"), Mode.DSR, 2)
    check_workers(with_offload(with_workers(cfg, Mode.PASSTHROUGH, 2), Mode.PASSTHROUGH), Mode.PASSTHROUGH)
    check_workers(with_offload(with_workers(config(), Mode.DSR, 2), Mode.DSR), Mode.DSR)  # rewrite = "ip"
    mac = config('[dsr]\nrewrite = "mac"\n')
    check_workers(with_offload(with_workers(mac, Mode.DSR, 2), Mode.DSR), Mode.DSR)
    high = config("[dsr]\nfwmark_base = 0xFFFFFF\n")
    with pytest.raises(ConfigError, match="below 0x1000000"):
        check_workers(with_offload(with_workers(high, Mode.DSR, 2), Mode.DSR), Mode.DSR)


def test_offload_marks_carry_the_worker() -> None:
    from convey.dataplane.rules.offload import WORKER_FIELD, offload_plan, passthrough_chains, worker_bits

    one = offload_plan(config(), Mode.PASSTHROUGH)
    cfg = with_offload(with_workers(config(), Mode.PASSTHROUGH, 2), Mode.PASSTHROUGH)
    two = offload_plan(cfg, Mode.PASSTHROUGH)
    assert one.mask == 0xFFFFFF and two.mask == 0xFFFFFFFF and one.servers == two.servers
    assert worker_bits(0) == 0x1000000 and worker_bits(254) & WORKER_FIELD == 0xFF000000
    queued = [r for r in passthrough_chains(cfg, two)[("mangle", "CONVEY-PREROUTING")] if "NFQUEUE" in r]
    assert [r.split("--queue-num ")[1].split()[0] for r in queued] == ["0", "1"]
    assert all("-m u32" in r and "--mark 0x0 " in r for r in queued)  # iptables-save omits a full mask


def test_dsr_mac_offload_with_workers_routes_by_the_low_24_bits() -> None:
    """Offloaded DSR mac connections carry the worker's number in their marks (bits 24-31, restored into the
    fwmark of every packet): the policy routing's ip rules then compare bits 0-23 only, the server's mark."""
    from convey.dataplane.rules import show
    from convey.dataplane.rules.offload import offload_plan, worker_bits
    from convey.dataplane.rules.ruleset import FULL_MARK, fwmark_mask, mark_plan

    mac = config('[dsr]\nrewrite = "mac"\n')
    one = with_offload(mac, Mode.DSR)
    two = with_offload(with_workers(mac, Mode.DSR, 2), Mode.DSR)
    assert fwmark_mask(one) == FULL_MARK and fwmark_mask(with_workers(mac, Mode.DSR, 2)) == FULL_MARK
    assert fwmark_mask(two) == 0xFFFFFF and {r.mask for r in mark_plan(two)} == {0xFFFFFF}
    plan = offload_plan(two, Mode.DSR)
    assert plan.servers == offload_plan(one, Mode.DSR).servers  # the same marks, one process or several
    for server, bits in plan.servers.items():
        assert plan.server_of(bits | worker_bits(1)) == plan.server_of(bits)
        assert plan.server_of(bits | worker_bits(1)) is not None, server
    first = mark_plan(two)[0]
    assert f"fwmark {first.mark:#x}/0xffffff lookup {first.table}" in show(two, Mode.DSR)
    assert f"fwmark {first.mark:#x} lookup {first.table}" in show(one, Mode.DSR)


# -- merge ------------------------------------------------------------------------------------------------------


def doc(total: int, current: int, packet: dict[str, object] | None = None) -> dict[str, object]:
    counters = {
        "total_connections": total,
        "current_connections": current,
        "bytes_tx": total * 10,
        "bytes_rx": total * 100,
        "refused": 0,
        "failed": 0,
    }
    out: dict[str, object] = {
        "mode": "passthrough",
        **counters,
        "total_bytes_tx": total * 10,
        "total_bytes_rx": total * 100,
        "frontends": {"web": {"backend": "b", **counters}},
        "backends": {
            "b": {"scheduler": "wrr", **counters, "server_detail": {"s0": {"active": current, **counters}}}
        },
    }
    if packet is not None:
        out["packet"] = packet
    return out


def test_merge_sums_live_workers_and_keeps_the_dead_ones_counters() -> None:
    base = doc(0, 0)
    live = [doc(5, 1, {"flows": 1, "queue": {"num": 0}}), doc(7, 2, {"flows": 2, "queue": {"num": 1}})]
    dead = [doc(3, 3)]
    out = merge(base, live, dead, [{"index": 0}, {"index": 1}])
    assert out["total_connections"] == 15 and out["current_connections"] == 3  # dead gauges left out
    assert out["total_bytes_rx"] == out["bytes_rx"] == 1500
    backend = out["backends"]["b"]  # type: ignore[index]
    assert backend["server_detail"]["s0"]["active"] == 3 and backend["total_connections"] == 15
    assert out["packet"] == {"flows": 3, "queue": {"num": [0, 1]}}
    assert out["workers"] == [{"index": 0}, {"index": 1}]
    assert base["total_connections"] == 0  # the base is not changed


def test_sum_tree_keeps_agreeing_names_and_lists_the_rest() -> None:
    assert sum_tree([{"rewrite": "ip", "n": 1}, {"rewrite": "ip", "n": 2}]) == {"rewrite": "ip", "n": 3}
    assert sum_tree(["33768-47384", "47385-61000"]) == ["33768-47384", "47385-61000"]
    assert sum_tree([True, True]) is True


def test_proxy_workers_share_max_connections() -> None:
    cfg = parse_config(BASE.replace('backend = "b"', 'backend = "b"\nmax_connections = 5'), "w.toml")
    shares = [worker_config(cfg, Mode.PROXY, i, 2).frontends["web"].max_connections for i in range(2)]
    assert shares == [3, 2]
    assert worker_config(config(), Mode.PROXY, 1, 2).frontends["web"].max_connections == 0  # no limit stays
    assert sum_tree([300.0, 300.0], "idle_timeout") == 300.0


def test_merge_shows_a_removed_server_still_draining_in_a_worker() -> None:
    base = doc(0, 0)
    worker = doc(4, 1)
    retired = {"addr": "198.18.2.2:8080", "state": "removed-draining", "healthy": True, "active": 1}
    retired.update({k: 0 for k in ("total_connections", "bytes_tx", "bytes_rx", "refused", "failed")})
    retired.update(total_connections=2, current_connections=1)
    worker["backends"]["b"]["server_detail"]["s1"] = retired  # type: ignore[index]
    out = merge(base, [worker, worker], [], [])
    s1 = out["backends"]["b"]["server_detail"]["s1"]  # type: ignore[index]
    assert s1["state"] == "removed-draining" and (s1["total_connections"], s1["active"]) == (4, 2)
    assert out["backends"]["b"]["servers"]["198.18.2.2:8080"] is True  # type: ignore[index]
