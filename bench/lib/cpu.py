"""CPU accounting: a process's (or a process tree's) CPU seconds, the whole machine's busy CPUs, pinning a process
to a CPU."""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import NamedTuple


class CpuTimes(NamedTuple):
    """CPU seconds of a process, all its threads."""

    user: float
    system: float

    @property
    def total(self) -> float:
        return self.user + self.system

    def __sub__(self, other: tuple[float, ...]) -> CpuTimes:
        """The CPU time spent between two samples."""
        return CpuTimes(self.user - other[0], self.system - other[1])


def cpu_times(pid: int) -> CpuTimes:
    """(user, system) CPU seconds of process ``pid`` and its threads, from /proc/PID/stat."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()  # the command name may contain spaces and parentheses
    tick = os.sysconf("SC_CLK_TCK")
    return CpuTimes(int(fields[11]) / tick, int(fields[12]) / tick)


def process_tree(pid: int) -> list[int]:
    """``pid`` and its descendants (a ``--workers`` supervisor and its workers)."""
    found = [pid]
    try:
        tasks = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return found
    for task in tasks:
        try:
            children = Path(f"/proc/{pid}/task/{task}/children").read_text().split()
        except OSError:
            continue
        for child in children:
            found += process_tree(int(child))
    return found


def tree_cpu_times(pids: list[int]) -> CpuTimes:
    """The summed :func:`cpu_times` of ``pids`` (see :func:`process_tree`); a process gone meanwhile counts 0."""
    user = system = 0.0
    for pid in pids:
        try:
            times = cpu_times(pid)
        except OSError:
            continue
        user += times.user
        system += times.system
    return CpuTimes(user, system)


def cpu_seconds(pids: list[int]) -> float:
    """User + system CPU seconds of ``pids`` together."""
    return tree_cpu_times(pids).total


def machine_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine, from /proc/stat."""
    with open("/proc/stat") as f:
        values = [int(v) for v in f.readline().split()[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)
    return sum(values) - idle, sum(values)


def busy_cpus(before: tuple[int, int], after: tuple[int, int]) -> float:
    """How many CPUs the machine kept busy between two :func:`machine_jiffies` samples."""
    total = after[1] - before[1]
    return (after[0] - before[0]) / total * (os.cpu_count() or 1) if total > 0 else 0.0


def pin(pid: int, cpu: int) -> None:
    """Keep a process (all its threads) on one CPU, when the machine has more than one."""
    if (os.cpu_count() or 1) < 2:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})
