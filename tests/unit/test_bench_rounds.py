"""bench/lib's reporting of interleaved rounds: medians, ratios, round-by-round ratios."""

from __future__ import annotations

from bench.lib.l4 import CONNS, ratio_line
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
