"""Smooth weighted round robin, weighted least connections, make_scheduler and flow_hash."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

import convey
from convey.balancing.maglev import Maglev
from convey.balancing.schedulers import (
    SCHEDULERS,
    LeastConnections,
    Scheduler,
    SmoothWeightedRoundRobin,
    flow_hash,
    make_scheduler,
)

weight_lists = st.lists(st.integers(min_value=0, max_value=20), min_size=1, max_size=8)


def picks(scheduler: Scheduler, count: int) -> list[str | None]:
    return [scheduler.pick() for _ in range(count)]


# --- smooth weighted round robin ---


def test_wrr_nginx_sequence() -> None:
    wrr = SmoothWeightedRoundRobin([("a", 5), ("b", 1), ("c", 1)])
    assert "".join(str(p) for p in picks(wrr, 14)) == "aabacaa" * 2


def test_wrr_three_to_one_in_every_window() -> None:
    seq = picks(SmoothWeightedRoundRobin([("a", 3), ("b", 1)]), 400)
    for start in range(len(seq) - 3):
        assert Counter(seq[start : start + 4]) == {"a": 3, "b": 1}, start


@given(weight_lists)
def test_wrr_each_server_picked_weight_times_per_cycle(weights: list[int]) -> None:
    servers = [(f"s{i}", w) for i, w in enumerate(weights)]
    wrr = SmoothWeightedRoundRobin(servers)
    total = sum(weights)
    if total == 0:
        assert wrr.pick() is None
        return
    for _ in range(2):  # two whole cycles: the state returns to its start
        counts = Counter(picks(wrr, total))
        assert counts == {f"s{i}": w for i, w in enumerate(weights) if w > 0}


def test_wrr_zero_weight_never_picked() -> None:
    seq = picks(SmoothWeightedRoundRobin([("a", 2), ("z", 0), ("b", 1)]), 300)
    assert set(seq) == {"a", "b"}


def test_wrr_empty_gives_none() -> None:
    assert SmoothWeightedRoundRobin([]).pick() is None
    assert SmoothWeightedRoundRobin([("a", 0)]).pick() is None


@pytest.mark.parametrize("servers", [[("a", -1)], [("a", 1), ("a", 2)]])
def test_bad_servers_rejected(servers: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError):
        SmoothWeightedRoundRobin(servers)
    with pytest.raises(ValueError):
        LeastConnections(servers, lambda _: 0)


# --- weighted least connections ---


def test_least_conn_picks_least_loaded() -> None:
    active = {"a": 5, "b": 2, "c": 7}
    lc = LeastConnections([("a", 1), ("b", 1), ("c", 1)], active.__getitem__)
    assert picks(lc, 3) == ["b", "b", "b"]
    active["b"] = 9
    assert lc.pick() == "a"


def test_least_conn_weighted_score() -> None:
    # (3+1)/3 = 1.33 beats (1+1)/1 = 2, although a has more connections
    active = {"a": 3, "b": 1}
    lc = LeastConnections([("a", 3), ("b", 1)], active.__getitem__)
    assert lc.pick() == "a"
    active["a"] = 6  # 7/3 = 2.33 loses to 2
    assert lc.pick() == "b"


def test_least_conn_ties_rotate() -> None:
    lc = LeastConnections([("a", 1), ("b", 1), ("c", 1)], lambda _: 4)
    assert picks(lc, 7) == ["a", "b", "c", "a", "b", "c", "a"]


def test_least_conn_tie_rotation_skips_loaded_server() -> None:
    active = {"a": 0, "b": 3, "c": 0}
    lc = LeastConnections([("a", 1), ("b", 1), ("c", 1)], active.__getitem__)
    assert picks(lc, 4) == ["a", "c", "a", "c"]


def test_least_conn_weight_honoured_when_connections_stay_open() -> None:
    active: Counter[str] = Counter()
    lc = LeastConnections([("a", 3), ("b", 1), ("z", 0)], lambda s: active[s])
    for _ in range(400):
        server = lc.pick()
        assert server is not None
        active[server] += 1
    assert active == {"a": 300, "b": 100}


def test_least_conn_empty_gives_none() -> None:
    assert LeastConnections([], lambda _: 0).pick() is None
    assert LeastConnections([("a", 0)], lambda _: 0).pick() is None


@given(
    st.lists(
        st.tuples(st.integers(min_value=1, max_value=50), st.integers(min_value=0, max_value=1000)),
        min_size=1,
        max_size=8,
    )
)
def test_least_conn_pick_minimises_score(spec: list[tuple[int, int]]) -> None:
    servers = [(f"s{i}", w) for i, (w, _) in enumerate(spec)]
    active = {f"s{i}": n for i, (_, n) in enumerate(spec)}
    lc = LeastConnections(servers, active.__getitem__)
    best = min((n + 1) / w for w, n in spec)
    for _ in range(3):
        server = lc.pick()
        assert server is not None
        weight = dict(servers)[server]
        assert (active[server] + 1) / weight == best


# --- make_scheduler ---


def test_make_scheduler_kinds() -> None:
    servers = [("a", 1), ("b", 2)]
    assert SCHEDULERS == ("wrr", "least_conn", "maglev")
    assert isinstance(make_scheduler("wrr", servers, lambda _: 0), SmoothWeightedRoundRobin)
    assert isinstance(make_scheduler("least_conn", servers, lambda _: 0), LeastConnections)
    maglev = make_scheduler("maglev", servers, lambda _: 0, maglev_table_size=251)
    assert isinstance(maglev, Maglev)
    assert len(maglev.table) == 251
    for kind in SCHEDULERS:
        assert make_scheduler(kind, servers, lambda _: 0, 251).pick(12345) in {"a", "b"}
        assert make_scheduler(kind, [], lambda _: 0, 251).pick(12345) is None


@pytest.mark.parametrize("kind", ["", "rr", "WRR", "random"])
def test_make_scheduler_unknown_kind(kind: str) -> None:
    with pytest.raises(ValueError):
        make_scheduler(kind, [("a", 1)], lambda _: 0)


# --- flow_hash ---

TUPLES = [(0, 0, 0, 0), (0x0A000001, 40000, 0xC0A80001, 80), (0xFFFFFFFF, 65535, 0xFFFFFFFF, 65535)]


def test_flow_hash_is_64_bit_and_deterministic() -> None:
    for t in TUPLES:
        h = flow_hash(*t)
        assert 0 <= h < 2**64
        assert h == flow_hash(*t)
    assert len({flow_hash(*t) for t in TUPLES}) == len(TUPLES)


def test_flow_hash_same_in_another_process() -> None:
    code = (
        "import json, sys\n"
        "from convey.balancing.schedulers import flow_hash\n"
        "print(json.dumps([flow_hash(*t) for t in json.loads(sys.argv[1])]))\n"
    )
    root = str(Path(convey.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONHASHSEED": "12345", "PYTHONPATH": root}
    out = subprocess.run(
        [sys.executable, "-c", code, json.dumps(TUPLES)], env=env, capture_output=True, text=True, check=True
    ).stdout
    assert json.loads(out) == [flow_hash(*t) for t in TUPLES]


@given(
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 2**32 - 1),
    st.integers(0, 2**16 - 1),
    st.integers(0, 95),
)
def test_flow_hash_every_input_bit_matters(sa: int, sp: int, da: int, dp: int, bit: int) -> None:
    fields = [sa, sp, da, dp]
    field = 0
    while bit >= (32, 16, 32, 16)[field]:
        bit -= (32, 16, 32, 16)[field]
        field += 1
    flipped = list(fields)
    flipped[field] ^= 1 << bit
    a, b = flow_hash(*fields), flow_hash(*flipped)
    # avalanche: one flipped input bit changes about half of the 64 output bits (expected 32, sd 4)
    assert (a ^ b).bit_count() >= 12


def test_flow_hash_spread_over_even_ports() -> None:
    client, vip = 0x0A000002, 0x0A0000FE
    hashes = [flow_hash(client, port, vip, 80) for port in range(32768, 32768 + 20000, 2)]
    assert len(hashes) == 10000
    by_mod = Counter(h % 3 for h in hashes)
    maglev = Maglev([("s1", 1), ("s2", 1), ("s3", 1)])
    by_maglev = Counter(maglev.pick(h) for h in hashes)
    for counts in (by_mod, by_maglev):
        assert len(counts) == 3
        for n in counts.values():
            assert abs(n - 10000 / 3) < 10000 / 3 * 0.10, counts
    # the low bit of the hash is not stuck either
    assert abs(sum(h & 1 for h in hashes) - 5000) < 500
