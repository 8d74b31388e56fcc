#!/usr/bin/env python3
"""Proxy-mode benchmark: convey's relay against HAProxy (mode tcp) on loopback.

    python bench/proxy.py [--seconds N] [--quick] [--pin] [--json FILE]

Starts, all on 127.0.0.1 and all as child processes of this one:

* backends: a bulk server (one thread per connection, blocking sends/receives of a preallocated buffer: C speed) and a
  request/reply server (read a 32-byte request, write a 32-byte reply, close: HTTP/1.0 style, the server closes
  first, so TIME_WAIT stays on the server side and the clients' port search stays cheap);
* the proxy under test, one at a time: convey's ProxyFrontend (bench/lib's ``convey_proxy`` role builds it from a
  TOML string with real Pool/Stats, on the default asyncio loop and on uvloop), then HAProxy with ``nbthread 1`` (convey
  is single threaded) and ``nbthread 2``;
* load generators: bulk clients (one thread per stream, ``recv_into`` a reused buffer) and request/reply clients
  (many concurrent connections: connect, send 32 bytes, read the reply until EOF, close).

The request/reply server and client are ``bench/loadgen.c`` (epoll, compiled into a temporary directory on each run
when ``cc`` is available) so that they cost far less CPU than the proxy they measure; without a compiler, Python
versions (uvloop when installed) are used and the header says so: on a small machine they can be the bottleneck.

Metrics per row: bulk download Gbit/s over 1 connection and over 4, short connections per second, and the proxy
process's CPU use during each (100% = one core busy). Every load loop is bounded in time and count; every child is
killed on exit, Ctrl-C and failure (and, via PR_SET_PDEATHSIG, if this process itself dies).

The Python processes it starts are roles of bench/lib (``bulk_server``, ``rr_server``, ``convey_proxy``,
``bulk_client``, ``rr_client``).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib.util
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib.cpu import busy_cpus, machine_jiffies, process_tree, tree_cpu_times  # noqa: E402
from bench.lib.procs import Children, role_argv  # noqa: E402
from bench.lib.rounds import interleave, median, spread  # noqa: E402

HOST = "127.0.0.1"
CHUNK = 1024 * 1024
WARMUP = 0.3
MAX_SHORT_CONNECTIONS = 2_000_000  # per client process: a bound that the time limit reaches first
HAS_UVLOOP = importlib.util.find_spec("uvloop") is not None
FLOOR = "uvloop floor relay"


# ---------------------------------------------------------------------------------------------------------------
# orchestration
# ---------------------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        port: int = s.getsockname()[1]
    return port


def wait_port(port: int, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            with socket.create_connection((HOST, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"nothing listens on {HOST}:{port} after {timeout}s") from None
            time.sleep(0.02)


@dataclass
class Measure:
    value: float
    cpu: float | None  # proxy CPU use during the measurement, 1.0 = one core
    machine: float  # CPUs busy on the whole machine meanwhile (everything: proxy, generators, kernel, others)


@dataclass
class Tools:
    loadgen: str | None  # the compiled bench/loadgen.c, or None for the Python fallback
    rr_procs: int
    rr_concurrency: int

    def rr_server(self, port: int) -> list[str]:
        if self.loadgen:
            return [self.loadgen, "server", str(port)]
        return role_argv("rr_server", HOST, port)

    def rr_client(self, port: int, seconds: float) -> list[str]:
        if self.loadgen:
            return [self.loadgen, "client", str(port), str(seconds), str(self.rr_concurrency), str(WARMUP)]
        return role_argv(
            "rr_client", HOST, port, seconds, self.rr_concurrency, MAX_SHORT_CONNECTIONS, WARMUP, "rr"
        )


def compile_loadgen(directory: str) -> str | None:
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = Path(__file__).with_name("loadgen.c")
    if compiler is None or not source.exists():
        return None
    binary = os.path.join(directory, "loadgen")
    result = subprocess.run(
        [compiler, "-O2", "-o", binary, str(source)], capture_output=True, text=True, timeout=60, check=False
    )
    if result.returncode != 0:
        print(f"  could not compile {source}: {result.stderr[-1000:]}", file=sys.stderr)
        return None
    return binary


def measure(
    children: Children, tools: Tools, kind: str, port: int, seconds: float, proxy_pid: int | None
) -> Measure:
    if kind.startswith("bulk"):
        streams = int(kind[4:])
        commands = [role_argv("bulk_client", HOST, port, seconds, streams, "D", WARMUP, CHUNK)]
    else:
        commands = [tools.rr_client(port, seconds)] * tools.rr_procs
    procs = [children.start(command) for command in commands]
    try:
        # The generators count from WARMUP after they start to WARMUP + seconds; sample CPU inside that window.
        time.sleep(WARMUP + 0.05)
        # convey --workers: the supervisor and its workers
        pids = process_tree(proxy_pid) if proxy_pid else []
        cpu0 = tree_cpu_times(pids).total
        box0 = machine_jiffies()
        t0 = time.monotonic()
        time.sleep(max(0.1, seconds - 0.15))
        cpu1 = tree_cpu_times(pids).total
        box1 = machine_jiffies()
        t1 = time.monotonic()
    finally:
        results = children.collect(procs, seconds + WARMUP + 20)
    if kind.startswith("bulk"):
        [result] = results
        if result["errors"]:
            raise RuntimeError(f"bulk client errors: {result['errors']}")
        value = result["bytes_per_second"] * 8 / 1e9
    else:
        errors = sum(r["errors"] for r in results)
        if errors:
            last = next(r["last_error"] for r in results if r["errors"])
            print(f"    note: {errors} short connections failed, e.g. {last}", file=sys.stderr)
        value = sum(r["per_second"] for r in results)
    cpu = (cpu1 - cpu0) / (t1 - t0) if proxy_pid else None
    return Measure(value, cpu, busy_cpus(box0, box1))


HAPROXY_CFG = """\
global
    nbthread {threads}
    maxconn 8000
defaults
    mode tcp
    timeout connect 3s
    timeout client 30s
    timeout server 30s
listen bulk
    bind {host}:{bulk_listen}
    server s1 {host}:{bulk_server}
listen rr
    bind {host}:{rr_listen}
    server s1 {host}:{rr_server}
"""


CONVEY_CFG = """\
[frontends.bulk]
listen_addr = "{host}:{bulk_listen}"
backend = "bulk"
[frontends.rr]
listen_addr = "{host}:{rr_listen}"
backend = "rr"
[backends.bulk]
health_check_interval = 5
[backends.bulk.servers.one]
addr = "{host}:{bulk_server}"
[backends.rr]
health_check_interval = 5
[backends.rr.servers.one]
addr = "{host}:{rr_server}"
"""


@dataclass
class Row:
    name: str
    results: dict[str, list[Measure]] = field(default_factory=dict)

    def median(self, metric: str) -> Measure | None:
        """The median over rounds of the value and of the CPU use (each on its own)."""
        runs = self.results.get(metric)
        if not runs:
            return None
        cpus = [m.cpu for m in runs if m.cpu is not None]
        return Measure(
            median(m.value for m in runs), median(cpus) if cpus else None, median(m.machine for m in runs)
        )

    def spread(self, metric: str) -> float:
        """(max - min) / median over rounds, 0 for a single round."""
        return spread([m.value for m in self.results.get(metric, [])])


@dataclass
class Proxy:
    """One row: how to start (and stop) what is measured. ``start`` returns the process, or None for direct."""

    name: str
    start: Callable[[], tuple[subprocess.Popen[str] | None, int, int]]  # (process, bulk port, rr port)
    cpu: bool = True  # measure the process's CPU (with its children's: a supervisor and its workers)


def bench(args: argparse.Namespace) -> list[Row]:
    tmp = tempfile.TemporaryDirectory(prefix="convey-bench-")
    children = Children(tmp.name)
    ncpu = os.cpu_count() or 1
    # --pin: the proxy on the last CPU, everything else (backends and load generators) on the others.
    proxy_cpu = str(ncpu - 1) if args.pin and ncpu > 1 else None
    other_cpus = ",".join(str(c) for c in range(ncpu - 1)) if args.pin and ncpu > 1 else None
    metrics = ["bulk1", "rr"] if args.quick else ["bulk1", "bulk4", "rr"]
    try:
        loadgen = compile_loadgen(tmp.name)
        rr_procs = args.rr_procs or (1 if loadgen else 2)
        tools = Tools(loadgen, rr_procs, args.rr_concurrency)
        print(
            f"  short connections: {'bench/loadgen.c' if loadgen else 'Python (no C compiler)'} "
            f"load generator, {rr_procs} process(es) x {args.rr_concurrency} concurrent",
            file=sys.stderr,
        )
        bulk_server, rr_server = free_port(), free_port()
        children.role("bulk_server", HOST, bulk_server, CHUNK, pin=other_cpus)
        children.start(tools.rr_server(rr_server), pin=other_cpus, wait_ready=True)

        def direct() -> tuple[subprocess.Popen[str] | None, int, int]:
            return None, bulk_server, rr_server

        def convey(use_uvloop: bool) -> tuple[subprocess.Popen[str] | None, int, int]:
            bulk_listen, rr_listen = free_port(), free_port()
            proc = children.role(
                "convey_proxy",
                HOST,
                bulk_listen,
                bulk_server,
                rr_listen,
                rr_server,
                int(use_uvloop),
                pin=proxy_cpu,
            )
            return proc, bulk_listen, rr_listen

        def floor() -> tuple[subprocess.Popen[str] | None, int, int]:
            bulk_listen, rr_listen = free_port(), free_port()
            proc = children.role(
                "floor_relay", HOST, bulk_listen, bulk_server, rr_listen, rr_server, pin=proxy_cpu
            )
            return proc, bulk_listen, rr_listen

        def haproxy(threads: int) -> tuple[subprocess.Popen[str] | None, int, int]:
            bulk_listen, rr_listen = free_port(), free_port()
            cfg = Path(tmp.name) / f"haproxy-{threads}.cfg"
            cfg.write_text(
                HAPROXY_CFG.format(
                    threads=threads,
                    host=HOST,
                    bulk_listen=bulk_listen,
                    bulk_server=bulk_server,
                    rr_listen=rr_listen,
                    rr_server=rr_server,
                )
            )
            assert haproxy_path is not None
            pin = proxy_cpu if threads == 1 else None
            proc = children.start([haproxy_path, "-f", str(cfg), "-db"], pin=pin)
            wait_port(bulk_listen)
            wait_port(rr_listen)
            return proc, bulk_listen, rr_listen

        def convey_cli(workers: int) -> tuple[subprocess.Popen[str] | None, int, int]:
            """The real ``convey`` command with ``--workers``: the supervisor and its worker processes."""
            bulk_listen, rr_listen = free_port(), free_port()
            cfg = Path(tmp.name) / f"convey-{workers}.toml"
            cfg.write_text(
                CONVEY_CFG.format(
                    host=HOST, bulk_listen=bulk_listen, bulk_server=bulk_server, rr_listen=rr_listen,
                    rr_server=rr_server,
                )
            )  # fmt: skip
            argv = [sys.executable, "-m", "convey", f"--config={cfg}", f"--workers={workers}", "--no-watch"]
            proc = children.start(argv, pin=proxy_cpu if workers == 1 else None)
            wait_port(bulk_listen)
            wait_port(rr_listen)
            return proc, bulk_listen, rr_listen

        proxies = [
            Proxy("direct (no proxy)", direct),
            Proxy("convey (asyncio)", functools.partial(convey, False)),
        ]
        for workers in sorted({1, args.workers}) if args.workers > 1 else []:
            label = f"convey, {workers} worker{'s' if workers > 1 else ''}"
            proxies.append(Proxy(label, functools.partial(convey_cli, workers)))
        if HAS_UVLOOP:
            proxies.append(Proxy("convey (uvloop)", functools.partial(convey, True)))
            if args.floor:
                proxies.append(Proxy(FLOOR, floor))
        else:
            print("  uvloop is not installed: skipping the convey+uvloop row", file=sys.stderr)
        haproxy_path = shutil.which("haproxy")
        if haproxy_path is None:
            print("  haproxy not found: skipping the HAProxy rows", file=sys.stderr)
        else:
            for threads in [1] if args.quick else [1, 2]:
                proxies.append(Proxy(f"haproxy (nbthread {threads})", functools.partial(haproxy, threads)))

        rows = {p.name: Row(p.name) for p in proxies}
        # Rounds go through every row in turn, so that a burst of other load on the machine hits one round of
        # each row rather than all rounds of one.
        for round_no, proxy in interleave(args.rounds, proxies):
            proc, bulk_port, rr_port = proxy.start()
            try:
                for metric in metrics:
                    port = rr_port if metric == "rr" else bulk_port
                    pid = proc.pid if proc and proxy.cpu else None
                    m = measure(children, tools, metric, port, args.seconds, pid)
                    rows[proxy.name].results.setdefault(metric, []).append(m)
                    cpu = f"proxy CPU {m.cpu * 100:3.0f}%, " if m.cpu is not None else ""
                    print(
                        f"  [{round_no + 1}/{args.rounds}] {proxy.name:22} {LABELS[metric]:>16}: "
                        f"{m.value:10.2f}  ({cpu}machine {m.machine:.2f} CPUs busy)",
                        file=sys.stderr,
                        flush=True,
                    )
            finally:
                if proc is not None:
                    children.stop(proc)
    finally:
        children.stop_all()
        tmp.cleanup()
    return list(rows.values())


LABELS = {"bulk1": "bulk 1 conn Gb/s", "bulk4": "bulk 4 conn Gb/s", "rr": "short conn/s"}


def table(rows: list[Row], rounds: int) -> str:
    metrics = [m for m in LABELS if any(m in r.results for r in rows)]
    head = f"| {'row':24} |" + "".join(f" {LABELS[m]:>16} | {'CPU':>5} |" for m in metrics)
    lines = [head, "|" + "-" * 26 + "|" + "".join("-" * 18 + "|" + "-" * 7 + "|" for _ in metrics)]
    for row in rows:
        cells = ""
        for m in metrics:
            r = row.median(m)
            if r is None:
                cells += f" {'-':>16} | {'':>5} |"
                continue
            value = f"{r.value:,.0f}" if m == "rr" else f"{r.value:.2f}"
            if rounds > 1:
                value += f" ±{row.spread(m) * 50:.0f}%"
            cpu = f"{r.cpu * 100:.0f}%" if r.cpu is not None else ""
            cells += f" {value:>16} | {cpu:>5} |"
        lines.append(f"| {row.name:24} |{cells}")
    lines.append(
        "CPU: the proxy's CPU use during the measurement, all its processes and threads (100% = one core)."
    )
    if rounds > 1:
        lines.append(
            f"Values: median of {rounds} rounds; ±: half the spread (max - min) relative to the median."
        )
    by_name = {r.name: r for r in rows}
    ref = by_name.get("haproxy (nbthread 1)")
    if ref is not None:
        lines.append("")
        lines.append(
            "ratios against haproxy (nbthread 1): measured, and per proxy CPU-second (work per core)"
        )
        for row in rows:
            if not row.name.startswith("convey") and row.name != FLOOR:
                continue
            parts = []
            for m in metrics:
                mine, theirs = row.median(m), ref.median(m)
                if mine is None or theirs is None or theirs.value <= 0:
                    continue
                part = f"{LABELS[m].removesuffix(' Gb/s')} {mine.value / theirs.value:.2f}x"
                if mine.cpu and theirs.cpu:
                    part += f" ({(mine.value / mine.cpu) / (theirs.value / theirs.cpu):.2f}x per CPU)"
                parts.append(part)
            lines.append(f"  {row.name:18} " + ", ".join(parts))
    pairs = [(f"convey, {n} worker{'s' if n > 1 else ''}", f"haproxy (nbthread {n})") for n in (1, 2)]
    pairs.append(("convey, 2 workers", "convey, 1 worker"))
    # What a second thread gives HAProxy on this machine:
    pairs.append(("haproxy (nbthread 2)", "haproxy (nbthread 1)"))
    compared = [(by_name[a], by_name[b]) for a, b in pairs if a in by_name and b in by_name]
    if compared:
        lines.append("")
        lines.append(
            "workers (issue 9 targets: convey >= 1.0x haproxy at the same threads, 2 workers >= 1.6x 1)"
        )
        for mine, theirs in compared:
            parts = []
            for m in metrics:
                a, b = mine.median(m), theirs.median(m)
                if a is not None and b is not None and b.value > 0:
                    parts.append(f"{LABELS[m].removesuffix(' Gb/s')} {a.value / b.value:.2f}x")
            a, b = mine.median("rr"), theirs.median("rr")
            if a is not None and b is not None:  # is the machine the limit? (load generators count too)
                parts.append(f"machine CPUs busy (short conn/s) {a.machine:.2f} / {b.machine:.2f}")
            lines.append(f"  {mine.name} / {theirs.name}: " + ", ".join(parts))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--seconds", type=float, default=None, help="seconds per measurement (default 2.5, quick 2)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds over all rows; medians are shown (default 2, quick 1)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter: one round, no 4-connection bulk, no nbthread 2 row"
    )
    parser.add_argument(
        "--pin", action="store_true", help="pin the proxy to the last CPU and the rest elsewhere"
    )
    parser.add_argument(
        "--rr-procs",
        type=int,
        default=0,
        help="short-connection generator processes (default 1 with C, 2 without)",
    )
    parser.add_argument("--rr-concurrency", type=int, default=64, help="concurrent connections per generator")
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also the floor row: the least relay of asyncio Protocols on uvloop (bench/lib/roles.py floor_relay)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=2,
        help="also rows of the real convey command with 1 and this many worker processes (default 2; 1: none)",
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    args = parser.parse_args(argv)
    if args.seconds is None:
        args.seconds = 2.0 if args.quick else 2.5
    if args.rounds is None:
        args.rounds = 1 if args.quick else 2
    if not 1 <= args.rounds <= 10:
        parser.error("--rounds must be between 1 and 10")
    if not 0.5 <= args.seconds <= 60:
        parser.error("--seconds must be between 0.5 and 60")

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    # Explicitly, also for SIGINT: a shell starts background jobs with SIGINT ignored, and Python keeps that.
    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    print(
        f"convey proxy benchmark: {args.seconds:g}s per measurement, {os.cpu_count()} CPUs, "
        f"uvloop {'yes' if HAS_UVLOOP else 'no'}, pinning {'on' if args.pin else 'off'}",
        file=sys.stderr,
    )
    before = machine_jiffies()
    time.sleep(1.0)
    background = busy_cpus(before, machine_jiffies())
    print(f"  background load before starting: {background:.2f} CPUs busy", file=sys.stderr)
    if background > 0.2:
        print(
            "  WARNING: the machine is not idle; proxies and load generators share its CPUs, so the numbers will "
            "be low and noisy (compare ratios, or run again when it is quiet)",
            file=sys.stderr,
        )
    started = time.monotonic()
    try:
        rows = bench(args)
    except KeyboardInterrupt:
        print("interrupted; all child processes stopped", file=sys.stderr)
        return 130
    print(table(rows, args.rounds))
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        doc = {
            "seconds": args.seconds,
            "pin": args.pin,
            "cpus": os.cpu_count(),
            "background_cpus_busy": background,
            "units": {"bulk1": "Gbit/s", "bulk4": "Gbit/s", "rr": "connections/s"},
            "rounds": args.rounds,
            "rows": {
                r.name: {
                    m: [{"value": v.value, "proxy_cpu": v.cpu, "machine_cpus_busy": v.machine} for v in runs]
                    for m, runs in r.results.items()
                }
                for r in rows
            },
        }
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
