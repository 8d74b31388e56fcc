"""The soak of issue 10 (robustness), shared by the passthrough and the proxy soak tests: thousands of
concurrent connections through the real ``convey``, each moving a checksummed payload (``testbed.conn_load
soak``), and what must hold afterwards: nothing lost or corrupted, every connection counted closed, convey's
memory returned.

Memory: convey's resident set (VmRSS in /proc/PID/status) is read after a warm-up round (imports, lazily built
tables and the allocator's first arenas are in place), at each peak (every connection open) and after each
round once everything has closed. CPython's allocator (and uvloop's, libc's) keeps freed memory for reuse
rather than giving it back to the kernel (pymalloc frees an arena only when all of it is free), so RSS after a
round stays near its peak: measured here (2 vCPU, 10,000 connections) per packet +6 MiB kept after the first
round (a flow is ~0.5 KiB, bench/flow_memory.py), proxy +31 MiB for 9,900 (two sockets, transports and buffers
per connection). So "returned" is checked in two steps:

- after the first round, less than ``RSS_SLACK_KIB`` (48 MiB, ~5 KiB a connection) more than before: what a
  leak of the proxy's whole per-connection state, or of 5 KiB a flow, would exceed;
- a second identical round grows RSS by less than ``REUSE_SLACK_KIB`` (6 MiB, ~0.6 KiB a connection): the
  memory the first round freed is reused, so nothing a connection holds stays behind (measured: +0.7 MiB per
  packet, +0.9 MiB proxy).
"""

from __future__ import annotations

import contextlib
import json
import os
import resource
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.process import python_env, read_line

RSS_SLACK_KIB = 48 * 1024
REUSE_SLACK_KIB = 6 * 1024
SIZES = [1024, 1536, 2048, 3072, 4096]  # payload bytes per connection (one size per exchange, at random)
INFLIGHT = 250  # exchanges at a time once all are open: ~10 packets each stay well inside the queue (8192)
BATCH = 500  # concurrent connects while ramping up (well inside every SYN and accept backlog on the way)
SERVER_BACKLOG = 8192  # somaxconn and tcp_max_syn_backlog inside the server namespaces (never on the host)


def rss_kib(pid: int) -> int:
    """Resident set size of ``pid`` in KiB (VmRSS in /proc/PID/status)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError(f"no VmRSS for pid {pid}")


def open_files(pid: int) -> int:
    """How many descriptors ``pid`` holds (/proc/PID/fd)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def convey_pid(convey: ConveyProcess) -> int:
    """convey's pid (``ip netns exec`` execs the command, so the Popen's pid is convey's own); checked."""
    assert convey.proc is not None
    pid = convey.proc.pid
    with open(f"/proc/{pid}/cmdline", "rb") as f:
        assert b"convey" in f.read(), "the process is not convey"
    return pid


def deep_backlogs(bed: Testbed) -> None:
    """Accept and SYN backlogs deep enough for the ramp inside the bed's server and balancer namespaces."""
    for host in [bed.lb, *bed.servers]:
        host.sysctl("net.core.somaxconn", SERVER_BACKLOG)
        host.sysctl("net.ipv4.tcp_max_syn_backlog", SERVER_BACKLOG)


@contextlib.contextmanager
def nofile_hard_limit(limit: int) -> Iterator[int]:
    """Children started inside inherit a hard RLIMIT_NOFILE of ``limit`` if this process may raise it (root
    with CAP_SYS_RESOURCE), else the current one; yields the hard limit they get. This process's limits are
    restored afterwards."""
    before = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        if before[1] != resource.RLIM_INFINITY and before[1] < limit:
            resource.setrlimit(resource.RLIMIT_NOFILE, (before[0], limit))
    except (OSError, ValueError):  # EPERM: no CAP_SYS_RESOURCE (a container)
        pass
    try:
        yield resource.getrlimit(resource.RLIMIT_NOFILE)[1]
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, before)


@dataclass
class SoakResult:
    client: dict[str, Any]
    connected: int
    peak_stats: dict[str, Any]
    rss_kib: dict[str, int] = field(default_factory=dict)
    seconds: dict[str, float] = field(default_factory=dict)


def soak(bed: Testbed, convey: ConveyProcess, n: int, seed: int, timeout: float = 120.0) -> SoakResult:
    """Open ``n`` connections to the VIP from the client namespace, check convey sees all of them open at
    once, then run the exchanges; returns the client's report, /stats at the peak and convey's RSS at the
    peak."""
    args = {
        "addr": bed.vip,
        "port": 80,
        "n": n,
        "batch": BATCH,
        "sizes": SIZES,
        "seed": seed,
        "inflight": INFLIGHT,
    }
    started = time.monotonic()
    proc = bed.client.popen(
        [sys.executable, "-m", "testbed.conn_load", "soak", json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_env(),
    )
    try:
        line = read_line(proc, 60)
        assert line.startswith("CONNECTED "), line
        connected = int(json.loads(line.split(" ", 1)[1])["connected"])
        peak = convey.wait_stats(lambda d: d["current_connections"] >= connected, 30, f"{connected} open")
        peak_rss = rss_kib(convey_pid(convey))
        ramp = time.monotonic() - started
        out, err = proc.communicate(b"go\n", timeout=timeout)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    report: dict[str, Any] = json.loads(out.decode().splitlines()[-1])
    result = SoakResult(report, connected, peak, {"peak": peak_rss})
    result.seconds = {"ramp": round(ramp, 1), "total": round(time.monotonic() - started, 1)}
    return result


def assert_all_exchanged(result: SoakResult, n: int) -> None:
    """0 lost, 0 corrupted: every connection opened, was counted open at the peak, and exchanged intact."""
    report = result.client
    assert report["nofile"] >= n + 100, (
        f"the client cannot hold {n} sockets: RLIMIT_NOFILE {report['nofile']}"
    )
    assert report["connected"] == n, report
    assert result.peak_stats["current_connections"] == n, "all connections open at once, and only those"
    assert report["corrupted"] == 0, report
    assert report["errors"] == {}, report
    assert report["ok"] == n, report


WARM_N = 200  # connections of the warm-up round


@dataclass
class Rounds:
    """A warm-up round and ``len(rounds)`` soak rounds; RSS (KiB) before the first, at each peak and after
    each (``before``, ``peak1``, ``after1``, ...) and convey's descriptors (``fds_before``, ``fds_after1``, ...);
    /stats once the last round settled."""

    warm: SoakResult
    rounds: list[SoakResult]
    rss_kib: dict[str, int]
    doc: dict[str, Any]

    @property
    def sent(self) -> int:
        return sum(r.client["sent"] for r in [self.warm, *self.rounds])

    @property
    def received(self) -> int:
        return sum(r.client["received"] for r in [self.warm, *self.rounds])

    def figures(self) -> dict[str, Any]:
        last = self.rounds[-1]
        return {
            "connections": last.connected,
            "rounds": len(self.rounds),
            "bytes_sent": self.sent,
            "bytes_received": self.received,
            "servers": last.client["servers"],
            "rss_kib": self.rss_kib,
            "seconds": [r.seconds | {"exchanges": r.client["exchange_seconds"]} for r in self.rounds],
        }


def soak_rounds(
    bed: Testbed, convey: ConveyProcess, n: int, settled: Callable[[dict[str, Any]], bool], rounds: int = 2
) -> Rounds:
    """The warm-up, then ``rounds`` soaks of ``n`` connections, each checked (:func:`assert_all_exchanged`)
    and waited out until ``settled``, with convey's RSS read around each."""
    pid = convey_pid(convey)
    warm = soak(bed, convey, WARM_N, seed=1)
    assert_all_exchanged(warm, WARM_N)
    convey.wait_stats(settled, 20, "the warm-up's connections closed")
    rss = {"before": rss_kib(pid), "fds_before": open_files(pid)}
    results = []
    doc: dict[str, Any] = {}
    for i in range(1, rounds + 1):
        result = soak(bed, convey, n, seed=1 + i)
        assert_all_exchanged(result, n)
        doc = convey.wait_stats(settled, 30, f"every connection of round {i} closed")
        rss[f"peak{i}"], rss[f"after{i}"] = result.rss_kib["peak"], rss_kib(pid)
        rss[f"fds_after{i}"] = open_files(pid)
        results.append(result)
    return Rounds(warm, results, rss, doc)


def assert_memory_returned(rounds: Rounds) -> None:
    """convey kept less than RSS_SLACK_KIB after the first round, and later rounds reused what it kept (grew
    it by less than REUSE_SLACK_KIB): see the module doc."""
    rss, n = rounds.rss_kib, rounds.rounds[0].connected
    kept = rss["after1"] - rss["before"]
    assert kept < RSS_SLACK_KIB, f"convey kept {kept} KiB after {n} connections: {rss}"
    grown = rss[f"after{len(rounds.rounds)}"] - rss["after1"]
    assert grown < REUSE_SLACK_KIB, f"convey grew by {grown} KiB over another {n} connections: {rss}"
    for i in range(1, len(rounds.rounds) + 1):  # every socket closed (a health check may be in flight)
        assert rss[f"fds_after{i}"] <= rss["fds_before"] + 2, f"convey holds more descriptors: {rss}"
