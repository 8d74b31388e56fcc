"""A tier's balancers agree: the same config gives the same pick for every tuple, whatever the order of the
servers in the file, the process, its hash seed or the history of the pool (servers down and back up)."""

from __future__ import annotations

import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest

from convey.balancing.pool import Pool
from convey.bgp.choose_route import BadRequest, choose
from convey.config import parse_config

ROOT = Path(__file__).resolve().parents[2]
SERVERS = [("s0", "198.18.5.10"), ("s1", "198.18.5.11"), ("s2", "198.18.5.12")]


def config_text(order: list[int]) -> str:
    lines = [
        '[frontends.web]\nlisten_addr = "198.18.50.1:80"\nbackend = "web"\n[backends.web]\nscheduler = "maglev"'
    ]
    for i in order:
        name, addr = SERVERS[i]
        lines.append(f'[backends.web.servers.{name}]\naddr = "{addr}:8080"')
    return "\n".join(lines) + "\n"


def tuples(n: int = 1000) -> list[list[object]]:
    rnd = random.Random(12)
    return [
        [
            f"198.18.{100 + rnd.randrange(4)}.{rnd.randrange(2, 250)}",
            rnd.randrange(1024, 65536),
            "198.18.50.1",
            80,
        ]
        for _ in range(n)
    ]


def picks(order: list[int], items: list[list[object]]) -> list[str | None]:
    config = parse_config(config_text(order))
    pools = {name: Pool(backend, "dsr") for name, backend in config.backends.items()}
    return choose(pools, config, items)


CHILD = """
import json, sys
from tests.unit.test_bgp_maglev import picks, tuples
print(json.dumps(picks(json.loads(sys.argv[1]), tuples())))
"""


def test_same_picks_whatever_the_order_and_process() -> None:
    items = tuples()
    first = picks([0, 1, 2], items)
    assert set(first) == {"web/s0", "web/s1", "web/s2"}
    assert all(first.count(s) > 250 for s in set(first))  # and spread
    assert picks([2, 0, 1], items) == first
    for seed, order in (("1", [1, 2, 0]), ("4242", [2, 1, 0])):
        env = {**os.environ, "PYTHONHASHSEED": seed, "PYTHONPATH": str(ROOT)}
        out = subprocess.run(
            [sys.executable, "-c", CHILD, json.dumps(order)],
            capture_output=True,
            text=True,
            env=env,
            timeout=60,
            cwd=ROOT,
        )
        assert out.returncode == 0, out.stderr
        assert json.loads(out.stdout) == first


def test_a_server_down_and_back_gives_the_same_table() -> None:
    items = tuples()
    config = parse_config(config_text([0, 1, 2]))
    pool = Pool(config.backends["web"], "dsr")
    before = choose({"web": pool}, config, items)
    for _ in range(config.backends["web"].fall):
        pool.report_check("s1", False, "down")
    during = choose({"web": pool}, config, items)
    assert "web/s1" not in during
    # Maglev's minimal disruption: the flows of the other servers mostly stay where they were
    kept = sum(1 for b, d in zip(before, during, strict=True) if b != "web/s1" and b == d)
    assert kept > 0.9 * sum(1 for b in before if b != "web/s1")
    for _ in range(config.backends["web"].rise):
        pool.report_check("s1", True)
    assert choose({"web": pool}, config, items) == before


def test_unknown_tuples_and_bad_input() -> None:
    config = parse_config(config_text([0, 1, 2]))
    pools = {"web": Pool(config.backends["web"], "dsr")}
    assert choose(pools, config, [["198.18.100.2", 1, "198.18.50.2", 80]]) == [None]
    for bad in (
        [["x", 1, "198.18.50.1", 80]],
        [[1, 2]],
        "tuples",
        [["198.18.100.2", "1", "198.18.50.1", 80]],
    ):
        with pytest.raises(BadRequest):
            choose(pools, config, bad)
    wrr = parse_config(config_text([0, 1]).replace('scheduler = "maglev"', 'scheduler = "wrr"'))
    with pytest.raises(BadRequest, match="not a hashing scheduler"):
        choose({"web": Pool(wrr.backends["web"], "dsr")}, wrr, [["198.18.100.2", 1, "198.18.50.1", 80]])
