"""Maglev lookup table: balance, weights, minimal disruption, determinism."""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import convey
from convey.balancing.maglev import Maglev, is_prime, permutation_params, weighted_turns

M = 65537


def servers(n: int, weight: int = 1) -> list[tuple[str, int]]:
    return [(f"10.0.0.{i}:80", weight) for i in range(1, n + 1)]


def digest(table: Sequence[str]) -> str:
    return hashlib.sha256("\n".join(table).encode()).hexdigest()


# --- table size ---


@pytest.mark.parametrize("size", [0, 1, 4, 9, 250, 255, 65535, 65536, 65541])
def test_non_prime_size_rejected(size: int) -> None:
    with pytest.raises(ValueError, match="prime"):
        Maglev(servers(1), size)


def test_size_smaller_than_server_count_rejected() -> None:
    with pytest.raises(ValueError):
        Maglev(servers(4), 3)
    assert Counter(Maglev(servers(3), 3).table) == dict.fromkeys(dict(servers(3)), 1)
    # weight 0 servers do not count
    assert len(Maglev([*servers(3), ("idle", 0)], 3).table) == 3


def test_is_prime() -> None:
    primes = {n for n in range(2, 2000) if all(n % d for d in range(2, n))}
    assert {n for n in range(-5, 2000) if is_prime(n)} == primes
    assert is_prime(65537) and is_prime(655373) and not is_prime(65537 * 3)


@pytest.mark.parametrize("bad", [[("a", -1)], [("a", 1), ("a", 1)]])
def test_bad_servers_rejected(bad: list[tuple[str, int]]) -> None:
    with pytest.raises(ValueError):
        Maglev(bad, 251)


# --- permutations ---


@given(st.text(alphabet="0123456789abcdef.:[]-", max_size=40), st.sampled_from([3, 251, 65537]))
def test_permutation_params_in_range(server: str, size: int) -> None:
    offset, skip = permutation_params(server, size)
    assert 0 <= offset < size
    assert 1 <= skip < size


def test_permutation_params_pinned() -> None:
    # Balancers of different versions must agree on flows: these values must never change.
    assert permutation_params("10.0.0.1:80", 65537) == (49588, 43163)
    assert permutation_params("10.0.0.2:80", 251) == (107, 82)
    table = Maglev([("10.0.0.1:80", 1), ("10.0.0.2:80", 1), ("10.0.0.3:80", 2)], 251).table
    assert "".join(s[7] for s in table[:40]) == "2133223233213322311323331332331133223113"


# --- balance and weights ---


@pytest.mark.parametrize("size", [251, M])
@pytest.mark.parametrize("n", [1, 2, 3, 5, 7, 10, 16])
def test_equal_weights_own_floor_or_ceil(size: int, n: int) -> None:
    for weight in (1, 7):
        counts = Counter(Maglev(servers(n, weight), size).table)
        assert len(counts) == n
        assert set(counts.values()) <= {size // n, -(-size // n)}
        assert sum(counts.values()) == size


def test_weights_three_to_one() -> None:
    counts = Counter(Maglev([("a", 3), ("b", 1)], M).table)
    assert counts["a"] / counts["b"] == pytest.approx(3, rel=0.02)


def test_weights_ten_servers() -> None:
    spec = [(f"s{i}", i) for i in range(1, 11)]
    counts = Counter(Maglev(spec, M).table)
    for server, weight in spec:
        assert counts[server] == pytest.approx(M * weight / 55, rel=0.01)


@settings(max_examples=60)
@given(
    st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=10),
    st.sampled_from([11, 101, 251, 1009]),
)
def test_weighted_slot_counts_within_one_of_share(weights: list[int], size: int) -> None:
    spec = [(f"s{i}", w) for i, w in enumerate(weights)]
    eligible = sum(1 for w in weights if w > 0)
    if eligible > size:
        return
    maglev = Maglev(spec, size)
    if eligible == 0:
        assert maglev.table == ()
        assert maglev.pick(123) is None
        return
    counts = Counter(maglev.table)
    assert len(maglev.table) == size
    total = sum(weights)
    for server, weight in spec:
        assert abs(counts[server] - size * weight / total) < 1, (server, counts)


def test_zero_weight_gets_no_slots() -> None:
    table = Maglev([("a", 1), ("off", 0), ("b", 2)], M).table
    assert set(table) == {"a", "b"}


def test_weighted_turns_is_smooth_wrr() -> None:
    assert weighted_turns([5, 1, 1], 14) == [0, 0, 1, 0, 2, 0, 0] * 2
    assert weighted_turns([2, 2, 2], 7) == [0, 1, 2, 0, 1, 2, 0]
    assert weighted_turns([3, 1], 3) == [0, 0, 1]


# --- lookups ---


def test_pick_is_table_at_hash_mod_size() -> None:
    maglev = Maglev(servers(5), 251)
    for h in (0, 1, 250, 251, 2**64 - 1, 123456789):
        assert maglev.pick(h) == maglev.table[h % 251]
    assert maglev.size == 251


def test_empty_gives_none() -> None:
    for spec in ([], [("a", 0)]):
        maglev = Maglev(spec, 251)
        assert maglev.table == ()
        assert maglev.pick(7) is None


# --- minimal disruption ---


@pytest.mark.parametrize("n", range(5, 11))
def test_removing_a_server_moves_few_other_slots(n: int) -> None:
    # Measured: at most 0.27% of M moves (N=10). A modulo table or a reshuffle moves most of the table.
    spec = servers(n)
    before = Maglev(spec, M).table
    for removed in {0, n // 2, n - 1}:
        gone = spec[removed][0]
        after = Maglev(spec[:removed] + spec[removed + 1 :], M).table
        assert gone not in after
        moved = sum(1 for old, new in zip(before, after, strict=True) if old != gone and old != new)
        assert moved < 0.01 * M, (n, removed, moved)


def test_removing_a_weighted_server_moves_few_other_slots() -> None:
    # Measured: 0.29% of M.
    spec = [("a", 7), ("b", 4), ("c", 2), ("d", 8), ("e", 1), ("f", 7)]
    before = Maglev(spec, M).table
    after = Maglev([s for s in spec if s[0] != "d"], M).table
    moved = sum(1 for old, new in zip(before, after, strict=True) if old != "d" and old != new)
    assert moved < 0.01 * M


def test_adding_a_server_takes_its_share_mostly_from_others_fairly() -> None:
    before = Maglev(servers(6), M).table
    after = Maglev(servers(7), M).table
    new = "10.0.0.7:80"
    changed = sum(1 for old, cur in zip(before, after, strict=True) if old != cur)
    gained = sum(1 for cur in after if cur == new)
    assert gained in (M // 7, M // 7 + 1)
    assert changed - gained < 0.01 * M


# --- determinism ---


def test_order_of_servers_does_not_matter() -> None:
    spec = [("b", 2), ("a", 1), ("d", 3), ("c", 1)]
    assert Maglev(spec, M).table == Maglev(sorted(spec), M).table == Maglev(spec[::-1], M).table


def test_two_instances_agree() -> None:
    assert Maglev(servers(7), M).table == Maglev(servers(7), M).table


def test_same_table_in_another_process() -> None:
    code = (
        "import hashlib\n"
        "from convey.balancing.maglev import Maglev\n"
        "spec = [(f'10.0.0.{i}:80', i % 3 + 1) for i in range(1, 8)]\n"
        "print(hashlib.sha256('\\n'.join(Maglev(spec).table).encode()).hexdigest())\n"
    )
    root = str(Path(convey.__file__).resolve().parent.parent)
    env = {**os.environ, "PYTHONHASHSEED": "4242", "PYTHONPATH": root}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    spec = [(f"10.0.0.{i}:80", i % 3 + 1) for i in range(1, 8)]
    assert result.stdout.strip() == digest(Maglev(spec).table)
