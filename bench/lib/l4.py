"""TCP load through a test bed's balancer, the same for every row of bench/packet.py and bench/dsr.py: bulk Gbit/s
both ways and short connections/s, plus what each row costs its userspace verdict process.

- **bulk**: ``iperf3 -c ADDR -p PORT -t SECONDS`` (up: the client sends) and the same with ``-R`` (down: the
  server sends), one stream, against ``iperf3 -s`` in a server's namespace; Gbit/s as iperf3's receiver counts
  them. Without iperf3 on the PATH the ``bulk_client``/``bulk_server`` roles (Python, one stream, ``U``/``D``)
  take its place, on the same port, and :meth:`Tools.describe` says so.
- **connections/s**: ``bench/loadgen.c`` (compiled at run time into the bed's log directory): an epoll client
  keeping ``concurrency`` connections in flight (connect, 32-byte request, 32-byte reply, the server closes first),
  counting completions after a warm-up; the servers are loadgen's too. Without a C compiler the Python
  ``rr_client``/``rr_server`` roles, and the output says so.
- **packets to convey**: the row's verdict counter (convey's /stats) before and after each measurement: per
  connection of the connections/s run (every connection the client started, the warm-up included) and per MB of
  the download.

:func:`run_rows` runs rows A/B/A/B (alternating the order every round) and records every value in a
:class:`~bench.lib.rounds.Series`; a row whose setup raises :class:`Skip` is skipped for the rest of the run and
the reason is kept.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from bench.lib.cpu import busy_cpus, machine_jiffies, process_tree, tree_cpu_times
from bench.lib.procs import result_of, spawn_in
from bench.lib.rounds import Series, interleave, markdown_table
from testbed.process import python_env, wait_until

if TYPE_CHECKING:
    from testbed.host import Host

IPERF_PORT = 5201
CHUNK = 256 * 1024  # the Python bulk roles' buffer
MAX_CONNECTIONS = (
    2_000_000  # per connections/s run, when the row sets no lower limit: the time limit comes first
)

# metric names in a Series
UP, DOWN, CONNS = "up", "down", "conns"
PER_CONN, PER_MB = "pkt_per_conn", "pkt_per_mb"
FAILED = "failed"
CPU = "cpu_percent"  # of convey (all its processes) during the connections/s run (100 = one core)
PER_DRAIN = "pkt_per_drain"  # packets per read of convey's queues during the connections/s run
MACHINE = "machine_cpus"  # CPUs the machine kept busy during the connections/s run (load generators too)
OVERFLOWS = "ct_overflows"  # conntrack event overflows (resynchronisations) convey reported after the row


class Skip(Exception):
    """A row cannot run on this machine (the message says why); the run goes on without it."""


class Row(Protocol):
    name: str

    def target(self, service: str) -> tuple[str, int]:
        """Where clients connect for ``service``: ``rr`` (short connections) or ``bulk``."""
        ...

    def verdicts(self) -> int | None:
        """Packets the row's userspace process gave a verdict so far; None when it has none."""
        ...

    def cpu_pid(self) -> int | None:
        """The row's userspace process (convey), whose CPU use (with its worker processes') is measured; None when
        it has none."""
        ...

    def stats(self) -> dict[str, Any] | None:
        """convey's /stats document; None without convey."""
        ...

    def close(self) -> None: ...


@dataclass(frozen=True)
class Tools:
    loadgen: str | None  # the compiled bench/loadgen.c, or None: the Python roles
    iperf3: str | None

    @classmethod
    def find(cls, directory: Path) -> Tools:
        return cls(compile_loadgen(directory), shutil.which("iperf3"))

    def describe(self) -> list[str]:
        bulk = (
            "bulk: iperf3, one stream, up (-t) and down (-R)"
            if self.iperf3
            else "bulk: NO iperf3 on the PATH: bench/lib's Python bulk roles instead (slower, not comparable "
            "with iperf3 figures; install iperf3: scripts/install-system-deps.sh)"
        )
        conns = (
            "connections: bench/loadgen.c (C, epoll)"
            if self.loadgen
            else "connections: NO C compiler: bench/lib's Python rr roles instead (the client is the limit)"
        )
        return [bulk, conns]


def compile_loadgen(directory: Path) -> str | None:
    """``cc -O2 bench/loadgen.c`` into ``directory``; None (and a note on stderr) when that is not possible."""
    compiler = shutil.which("cc") or shutil.which("gcc")
    source = Path(__file__).resolve().parent.parent / "loadgen.c"
    if compiler is None or not source.exists():
        return None
    binary = directory / "loadgen"
    result = subprocess.run(
        [compiler, "-O2", "-o", str(binary), str(source)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    if result.returncode != 0:
        print(f"  could not compile {source}: {result.stderr[-1000:]}", file=sys.stderr)
        return None
    os.chmod(binary, 0o755)
    return str(binary)


def no_time_wait(servers: Sequence[Host]) -> None:
    """``tcp_max_tw_buckets = 0`` in the servers' namespaces: their closed connections leave no TIME_WAIT.

    The servers close first, so they hold a TIME_WAIT socket per connection. Through source NAT (kernel NAT,
    passthrough either way) the server-side tuples of one row are reused by the next row seconds later (the kernel
    keeps the client's port; a restarted convey starts again from the bottom of its port range), and a SYN that
    meets a TIME_WAIT socket it cannot reopen (the server counts ``TcpExtPAWSTimewait``) answers with an ACK, a
    RST, and a SYN retried 1 s later. With 32 connections in flight a 1% stall rate costs more than half of the
    connections/s, and how much depends on which rows ran before (measured: 0.3% of kernel NAT's SYNs on a fresh
    bed, 3.7% after a per-packet row; 37% of a per-packet row's after two kernel NAT rows). Without TIME_WAIT on
    the servers every row measures forwarding, whatever ran before; ``--keep-time-wait`` measures with it."""
    for server in servers:
        server.sysctl("net.ipv4.tcp_max_tw_buckets", 0)


def _listening(host: Host, port: int) -> bool:
    out = host.run(["ss", "-Hltn", f"sport = :{port}"], check=False, timeout=10).stdout
    return bool(out.strip())


def start_rr_server(tools: Tools, host: Host, addr: str, port: int) -> None:
    """The short-connection server on ``addr:port`` in ``host``'s namespace (the bed stops it)."""
    if tools.loadgen:
        host.popen([tools.loadgen, "server", str(port), addr], stdout=subprocess.DEVNULL)
        wait_until(lambda: _listening(host, port), 10, f"loadgen server on {host.role}:{port}", interval=0.05)
    else:
        spawn_in(host, "rr_server", addr, port)


def start_bulk_server(tools: Tools, host: Host, addr: str, port: int = IPERF_PORT) -> None:
    """``iperf3 -s`` (or the Python bulk server) on ``addr:port`` in ``host``'s namespace (the bed stops it)."""
    if tools.iperf3:
        bind = ["-B", addr] if addr != "0.0.0.0" else []
        host.popen([tools.iperf3, "-s", "-p", str(port), *bind], stdout=subprocess.DEVNULL,
                   stderr=subprocess.DEVNULL)  # fmt: skip
        wait_until(lambda: _listening(host, port), 10, f"iperf3 -s on {host.role}:{port}", interval=0.05)
    else:
        spawn_in(host, "bulk_server", addr, port, CHUNK)


def bulk(tools: Tools, client: Host, addr: str, port: int, seconds: float, down: bool) -> tuple[float, int]:
    """(Gbit/s, bytes received) of one stream client -> server (``down``: server -> client)."""
    if tools.iperf3:
        argv = [tools.iperf3, "-c", addr, "-p", str(port), "-t", f"{seconds:g}", "-J"] + (
            ["-R"] if down else []
        )
        proc = client.run(argv, check=False, timeout=seconds + 30)
        try:
            doc: dict[str, Any] = json.loads(proc.stdout)
        except ValueError:
            raise RuntimeError(
                f"iperf3 to {addr}:{port}: {proc.stdout[-500:]} {proc.stderr[-500:]}"
            ) from None
        if "error" in doc:
            raise RuntimeError(f"iperf3 to {addr}:{port}: {doc['error']}")
        got = doc["end"]["sum_received"]
        return float(got["bits_per_second"]) / 1e9, int(got["bytes"])
    warmup = min(0.3, seconds / 4)
    role = spawn_in(client, "bulk_client", addr, port, seconds, 1, "D" if down else "U", warmup, CHUNK,
                    ready=False)  # fmt: skip
    result = result_of(role, warmup + seconds + 30)
    if result["errors"]:
        raise RuntimeError(f"bulk client errors: {result['errors']}")
    return float(result["bytes_per_second"]) * 8 / 1e9, int(result["bytes"])


@dataclass(frozen=True)
class Conns:
    per_second: float
    ok: int  # completed within the window
    errors: int
    started: int  # every connection the client opened, the warm-up included
    last_error: str


def conns(
    tools: Tools,
    client: Host,
    addr: str,
    port: int,
    seconds: float,
    concurrency: int,
    limit: int,
    warmup: float,
) -> Conns:
    """Short connections to ``addr:port`` for ``warmup`` + ``seconds``, ``concurrency`` in flight, at most
    ``limit`` in all."""
    if tools.loadgen:
        argv = [tools.loadgen, "client", str(port), f"{seconds:g}", str(concurrency), f"{warmup:g}", addr,
                str(limit)]  # fmt: skip
        proc = client.run(argv, check=False, timeout=warmup + seconds + 30)
        if proc.returncode != 0:
            raise RuntimeError(f"loadgen client failed ({proc.returncode}): {proc.stderr[-1000:]}")
        doc = json.loads(proc.stdout.strip().splitlines()[-1])
    else:
        role = spawn_in(
            client, "rr_client", addr, port, seconds, concurrency, limit, warmup, "rr", ready=False
        )
        doc = result_of(role, warmup + seconds + 60)
    return Conns(
        float(doc["per_second"]),
        int(doc["ok"]),
        int(doc["errors"]),
        int(doc["started"]),
        str(doc.get("last_error", "")),
    )


@dataclass(frozen=True)
class Load:
    """What one round measures on a row."""

    seconds: float  # iperf3 -t and the connections/s window
    warmup: float  # before the connections/s window
    concurrency: int


def measure_row(
    tools: Tools, client: Host, row: Row, load: Load, series: Series, limit: int = MAX_CONNECTIONS
) -> None:
    """Bulk up, bulk down and connections/s through ``row``, into ``series`` (plus convey's packets per MB down
    and per connection when the row has a verdict counter)."""
    addr, port = row.target("bulk")
    for metric, down in ((UP, False), (DOWN, True)):
        before = row.verdicts()
        gbit, received = bulk(tools, client, addr, port, load.seconds, down)
        series.add(row.name, metric, gbit)
        after = row.verdicts()
        if down and before is not None and after is not None and received:
            series.add(row.name, PER_MB, (after - before) / (received / 1e6))
    addr, port = row.target("rr")
    before, pid, reads = row.verdicts(), row.cpu_pid(), queue_reads(row.stats())
    pids = process_tree(pid) if pid else []  # with --workers: the supervisor and its workers
    cpu0, machine0, started = tree_cpu_times(pids), machine_jiffies(), time.monotonic()
    result = conns(tools, client, addr, port, load.seconds, load.concurrency, limit, load.warmup)
    elapsed = time.monotonic() - started
    series.add(row.name, MACHINE, busy_cpus(machine0, machine_jiffies()))
    if pids:
        series.add(row.name, CPU, 100 * (tree_cpu_times(pids) - cpu0).total / elapsed)
    after = row.verdicts()
    series.add(row.name, CONNS, result.per_second)
    series.add(row.name, FAILED, result.errors)
    if result.errors:
        print(f"    note: {row.name}: {result.errors} connections failed, e.g. {result.last_error}",
              file=sys.stderr)  # fmt: skip
    if before is not None and after is not None and result.started:
        series.add(row.name, PER_CONN, (after - before) / result.started)
    doc = row.stats()
    reads_after = queue_reads(doc)
    if reads is not None and reads_after is not None and reads_after[0] > reads[0]:
        series.add(row.name, PER_DRAIN, (reads_after[1] - reads[1]) / (reads_after[0] - reads[0]))
    if doc is not None and "offload" in doc:
        monitor = doc["offload"].get("monitor") or {}
        series.add(row.name, OVERFLOWS, int(monitor.get("overflows", 0)))


def run_rows(
    rounds: int,
    rows: Sequence[tuple[str, Callable[[], Row]]],
    measure: Callable[[Row], None],
    say: Callable[[str], None],
    skipped: dict[str, str],
) -> None:
    """Every row in every round (A B, B A, A B, ...): set it up, ``measure`` it, close it. A row whose setup
    raises :class:`Skip` is recorded in ``skipped`` (name -> reason) and not tried again."""
    for round_no, (name, make) in interleave(rounds, rows, alternate=True):
        if name in skipped:
            continue
        say(f"round {round_no + 1}: {name}")
        try:
            row = make()
        except Skip as exc:
            skipped[name] = str(exc)
            say(f"  {name}: skipped: {exc}")
            continue
        try:
            measure(row)
        finally:
            row.close()


def flush_conntrack(host: Host) -> None:
    """Forget every conntrack entry in ``host``'s namespace (only a bed's balancer), so that no row inherits
    another row's entries."""
    if shutil.which("conntrack"):
        host.run(["conntrack", "-F"], check=False, timeout=10)
        return
    code = "from pyroute2 import Conntrack\nwith Conntrack() as ct:\n    ct.flush()\n"
    host.run([sys.executable, "-c", code], check=False, timeout=20, env=python_env())


def ratio_line(
    series: Series, row: str, base: str, label: str, targets: dict[str, float] | None = None, width: int = 38
) -> str | None:
    """``label bulk up 0.95x, bulk down ..., conn/s ...`` (medians of ``row`` / medians of ``base``), each
    marked met / NOT met against ``targets`` (metric -> least ratio) when given, with the lowest and highest
    round-by-round ratio (``Series.round_ratios``) after a metric with a target; None when nothing compares."""
    parts = []
    for metric, name in ((UP, "bulk up"), (DOWN, "bulk down"), (CONNS, "conn/s")):
        value = series.ratio(row, base, metric)
        if value is None:
            continue
        text = f"{name} {value:.2f}x"
        if targets and metric in targets:
            met = value >= targets[metric]
            if not met and f"{value:.2f}" == f"{targets[metric]:.2f}":
                text = f"{name} {value:.3f}x"  # just below the target: do not print it as equal
            rounds = series.round_ratios(row, base, metric)
            by_round = f"; rounds {min(rounds):.2f}-{max(rounds):.2f}x" if rounds else ""
            text += f" ({'met' if met else 'NOT met'}: >= {targets[metric]}x{by_round})"
        parts.append(text)
    return f"{label:<{width}} " + ", ".join(parts) if parts else None


def ceiling_line(series: Series, row: str, base: str) -> str | None:
    """What the machine's CPUs allow ``row`` against ``base`` on connections/s: both rows' busy CPUs and CPU per
    connection (the whole machine's: load generators, servers and kernel too), and the most ``row`` could reach
    with every CPU busy at its measured cost per connection. When ``row`` already keeps every CPU busy, its ratio
    is what this machine can give, whatever the balancer does; None without the figures."""
    cpus = os.cpu_count() or 1
    rate, base_rate = series.median(row, CONNS), series.median(base, CONNS)
    busy, base_busy = series.median(row, MACHINE), series.median(base, MACHINE)
    if not (rate and base_rate and busy and base_busy):
        return None
    cost, base_cost = busy / rate, base_busy / base_rate  # CPU-seconds per connection, everything counted
    most = cpus / cost / base_rate
    line = (f"  machine CPUs: {base} {base_busy:.2f} of {cpus} busy ({base_cost * 1e6:.0f} us per connection, "
            f"everything counted), {row} {busy:.2f} ({cost * 1e6:.0f} us): with all {cpus} busy at that cost "
            f"{row} could reach {most:.2f}x")  # fmt: skip
    batch, base_batch = series.median(row, PER_DRAIN), series.median(base, PER_DRAIN)
    if batch is not None and base_batch is not None:
        line += f"; packets per queue read {base_batch:.0f} / {batch:.0f}"
    return line


def l4_table(series: Series, rows: Sequence[str], skipped: dict[str, str]) -> str:
    """The rows' bulk, connections/s and packets-to-convey medians as a Markdown table, then the skipped rows."""
    body = []
    for name in rows:
        if name not in series.values:
            continue
        failed = int(sum(series.get(name, FAILED)))
        conns = series.cell(name, CONNS) + (f" ({failed} failed)" if failed else "")
        body.append([name, series.cell(name, UP, ".2f"), series.cell(name, DOWN, ".2f"), conns,
                     series.cell(name, CPU, ".0f"), series.cell(name, MACHINE, ".2f"),
                     series.cell(name, PER_CONN, ".1f"), series.cell(name, PER_MB, ",.0f")])  # fmt: skip
    header = ["path", "bulk up Gbit/s", "bulk down Gbit/s", "conn/s", "convey CPU % (conn/s)",
              "machine CPUs (conn/s)", "to convey pkt/conn", "to convey pkt/MB down"]  # fmt: skip
    lines = [markdown_table(header, body)]
    lines += [f"{name}: SKIPPED: {reason}" for name, reason in skipped.items()]
    for name in rows:
        overflows = series.get(name, OVERFLOWS)
        if any(overflows):
            lines.append(f"note: {name}: convey's conntrack event socket overflowed (resynchronised from a dump) "
                         f"{int(sum(overflows))} time(s) over {len(overflows)} round(s)")  # fmt: skip
    return "\n".join(lines)


def queue_reads(doc: dict[str, Any] | None) -> tuple[int, int] | None:
    """(drains, packets) of convey's queue(s), summed over workers, from a /stats document; None without them
    (no convey, or a binding that does not count them)."""
    queue = (doc or {}).get("packet", {}).get("queue", {})
    if "drains" not in queue or "packets" not in queue:
        return None
    return int(queue["drains"]), int(queue["packets"])


def verdict_count(doc: dict[str, Any]) -> int:
    """Packets convey gave a verdict, from a /stats document (passthrough's and DSR's counters, either plane)."""
    counts = doc.get("packet", {}).get("verdicts", {})
    keys = ("accepted", "dropped", "ingress_accepted", "ingress_dropped", "return_accepted", "return_dropped")
    return sum(int(counts.get(key, 0)) for key in keys)


def refusal(exc: Exception) -> str:
    """convey's own message from a failed start (from its ``convey: ...`` line on), else the end of its log."""
    lines = [line.rstrip() for line in str(exc).splitlines() if line.strip()]
    first = next((i for i, line in enumerate(lines) if line.startswith("convey: ")), None)
    said = lines[first : first + 10] if first is not None else lines[-6:]
    return "\n    ".join(said)[:1500]
