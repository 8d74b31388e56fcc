"""Rounds and their summaries: interleaved A/B/A/B runs (so a burst of other load hits one round of each
contender, not all rounds of one), medians and spreads, progress lines."""

from __future__ import annotations

import statistics
import sys
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TypeVar

T = TypeVar("T")


def interleave(rounds: int, items: Sequence[T], alternate: bool = False) -> Iterator[tuple[int, T]]:
    """(round, item) for every item in every round: A B, A B, ... or, with ``alternate``, A B, B A, A B, ...
    (the second order also evens out which one runs first on a warming machine)."""
    for round_no in range(rounds):
        order = items[::-1] if alternate and round_no % 2 else items
        for item in order:
            yield round_no, item


def median(values: Iterable[float]) -> float:
    return statistics.median(values)


def spread(values: Sequence[float]) -> float:
    """(max - min) / median, 0 for fewer than two values or a zero median."""
    if len(values) < 2:
        return 0.0
    mid = statistics.median(values)
    return (max(values) - min(values)) / mid if mid else 0.0


def progress() -> Callable[[str], None]:
    """A function printing a progress line with the time since this call, on stderr."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    return say


class Series:
    """Every value of every round: row -> metric -> [value per round]."""

    def __init__(self) -> None:
        self.values: dict[str, dict[str, list[float]]] = {}

    def add(self, row: str, metric: str, value: float) -> None:
        self.values.setdefault(row, {}).setdefault(metric, []).append(value)

    def get(self, row: str, metric: str) -> list[float]:
        return self.values.get(row, {}).get(metric, [])

    def median(self, row: str, metric: str) -> float | None:
        values = self.get(row, metric)
        return statistics.median(values) if values else None

    def ratio(self, row: str, base: str, metric: str) -> float | None:
        """median(row) / median(base), None when either is missing or the base is 0."""
        a, b = self.median(row, metric), self.median(base, metric)
        return a / b if a is not None and b else None

    def round_ratios(self, row: str, base: str, metric: str) -> list[float]:
        """row / base round by round (rows of one round run minutes apart at most, so a drift of the machine's
        speed over the run cancels out), empty unless both have one value per round (none skipped) and there
        are two rounds or more."""
        a, b = self.get(row, metric), self.get(base, metric)
        if len(a) < 2 or len(a) != len(b) or not all(b):
            return []
        return [x / y for x, y in zip(a, b, strict=True)]

    def cell(self, row: str, metric: str, fmt: str = ",.0f") -> str:
        """``median ±h%`` (h: half the spread), the median alone for one round, ``-`` without values."""
        values = self.get(row, metric)
        if not values:
            return "-"
        text = format(statistics.median(values), fmt)
        if len(values) > 1:
            text += f" ±{spread(values) * 50:.0f}%"
        return text

    def as_dict(self) -> dict[str, dict[str, list[float]]]:
        return self.values


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> str:
    """A Markdown table, first column left-aligned, the others right-aligned."""
    lines = ["| " + " | ".join(header) + " |", "|---|" + "---:|" * (len(header) - 1)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)
