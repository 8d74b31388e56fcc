"""bench/lib's reporting of interleaved rounds: medians, ratios, round-by-round ratios."""

from __future__ import annotations

import os

import pytest

from bench.lib.l4 import CONNS, MACHINE, PER_DRAIN, ceiling_line, queue_reads, ratio_line
from bench.lib.rounds import Series


def test_round_ratios_pair_the_rounds_and_need_every_round_of_both() -> None:
    s = Series()
    for nat, off in ((9000, 5400), (10000, 6300), (8000, 5600)):
        s.add("nat", CONNS, nat)
        s.add("off", CONNS, off)
    assert [round(r, 2) for r in s.round_ratios("off", "nat", CONNS)] == [0.6, 0.63, 0.7]
    assert s.ratio("off", "nat", CONNS) == 5600 / 9000  # medians: the rounds are not paired
    s.add("off", CONNS, 5000)  # a row with one value more than its base: no pairs
    assert s.round_ratios("off", "nat", CONNS) == []
    one = Series()
    one.add("nat", CONNS, 9000)
    one.add("off", CONNS, 6000)
    assert one.round_ratios("off", "nat", CONNS) == []  # one round: nothing to pair


def test_a_target_line_shows_the_range_of_the_rounds() -> None:
    s = Series()
    for nat, off in ((9000, 5400), (10000, 7100), (8000, 5600)):
        s.add("nat", CONNS, nat)
        s.add("off", CONNS, off)
    line = ratio_line(s, "off", "nat", "off / nat:", {CONNS: 0.7})
    assert line is not None
    assert line.endswith("conn/s 0.62x (NOT met: >= 0.7x; rounds 0.60-0.71x)"), line
    assert ratio_line(s, "off", "nat", "off / nat:") == "off / nat:                             conn/s 0.62x"


def test_the_ceiling_line_says_what_every_busy_cpu_would_allow(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    s = Series()
    s.add("one", CONNS, 3000)
    s.add("one", MACHINE, 1.2)  # 400 us of machine CPU per connection
    s.add("two", CONNS, 4500)
    s.add("two", MACHINE, 1.8)  # the same cost: 2 CPUs / 400 us = 5,000/s = 1.67x one
    line = ceiling_line(s, "two", "one")
    assert line is not None
    assert "one 1.20 of 2 busy (400 us per connection" in line, line
    assert "two 1.80 (400 us)" in line, line
    assert line.endswith("two could reach 1.67x"), line
    assert ceiling_line(s, "three", "one") is None  # no figures: no line
    s.add("one", PER_DRAIN, 80.4)
    s.add("two", PER_DRAIN, 26.6)
    line = ceiling_line(s, "two", "one")
    assert line is not None and line.endswith("1.67x; packets per queue read 80 / 27"), line


def test_queue_reads_come_from_the_packet_sections_queue() -> None:
    assert queue_reads({"packet": {"queue": {"num": 0, "drains": 3, "packets": 90}}}) == (3, 90)
    assert queue_reads({"packet": {"queue": {"num": 0}}}) is None  # netfilterqueue: not counted
    assert queue_reads(None) is None and queue_reads({"mode": "proxy"}) is None
