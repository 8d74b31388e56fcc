#!/usr/bin/env python3
"""DSR benchmark: the balancer's packet load and the client's download speed, DSR against passthrough (root only).

    sudo .venv/bin/python bench/dsr.py [--quick] [--seconds N] [--size MB] [--json FILE]

One L2 test bed (testbed/: client, balancer and two servers on one bridge, 198.19.0.0/24), the same
for every mode, so the only difference is the data path:

* ``passthrough``: every packet both ways is queued to convey and rewritten (full NAT);
* ``dsr-ip`` / ``dsr-mac``: only client -> server packets are queued; the servers answer the client directly
  (servers prepared with scripts/setup-dsr-backend.sh: nftables egress NAT for ``ip``, the VIP on lo for ``mac``).

Per mode, with the real ``convey`` process in the balancer's namespace:

1. **download**: one curl in the client fetches ``--size`` MB from the VIP; Mbit/s as curl measures it, and the
   packets convey handled meanwhile (its verdict counters) per second and per MB;
2. **requests**: a client process (bench/lib's ``rr_client`` role) keeps 32 connections busy for ``--seconds`` s
   (connect, ``GET /``, read to EOF, close); requests/s, convey's packets/s and packets per request, and convey's
   CPU use.

Ratios DSR / passthrough are printed at the end. Everything (load generator, test servers written in Python,
convey) shares this machine's cores, and other jobs may run beside it: read the figures as rough, the ratios as
the point. Every load loop is bounded in time and count; the bed and every process are removed on exit.

The functions ``measure_mode``, ``run`` and ``report`` are meant to be imported (``bench/packet.py`` prints them
beside the passthrough figures).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.lib.cpu import cpu_times  # noqa: E402
from bench.lib.procs import result_of, spawn_in  # noqa: E402
from testbed.bed import Testbed  # noqa: E402
from testbed.convey_proc import ConveyProcess  # noqa: E402
from testbed.dsr import (  # noqa: E402
    IP_SERVER_PORT,
    VIP_PORT,
    dsr_config,
    prepare_servers,
    unprepare_servers,
)
from testbed.httpd_proc import start_httpd  # noqa: E402

MODES = ("passthrough", "dsr-ip", "dsr-mac")
VERDICT_KEYS = (
    "accepted",
    "dropped",
    "ingress_accepted",
    "ingress_dropped",
    "return_accepted",
    "return_dropped",
)
CONCURRENCY = 32
MAX_REQUESTS = 1_000_000  # a bound the time limit reaches first
NAMES = {  # the metrics compared as DSR / passthrough
    "download_mbit_s": "client download Mbit/s",
    "download_lb_packets_s": "balancer packets/s during the download",
    "download_lb_packets_per_mb": "balancer packets per MB downloaded",
    "requests_s": "requests/s",
    "request_lb_packets_s": "balancer packets/s under the request load",
    "lb_packets_per_request": "balancer packets per request",
}


def verdicts(doc: dict[str, Any]) -> int:
    """Packets convey gave a verdict (either mode's counters)."""
    counts = doc.get("packet", {}).get("verdicts", {})
    return sum(int(counts.get(key, 0)) for key in VERDICT_KEYS)


def _config(bed: Testbed, mode: str) -> str:
    if mode == "passthrough":
        return dsr_config(bed, "ip", mode="passthrough", server_port=IP_SERVER_PORT)
    return dsr_config(bed, mode.removeprefix("dsr-"))


def measure_mode(bed: Testbed, mode: str, seconds: float = 5.0, size: int = 200_000_000) -> dict[str, Any]:
    """One mode on ``bed`` (an L2 bed whose servers run the test httpd on ports 80 and 8080): download and
    request figures, see the module doc."""
    rewrite = mode.removeprefix("dsr-") if mode != "passthrough" else None
    row: dict[str, Any] = {"mode": mode}
    if rewrite:
        prepare_servers(bed, rewrite)
    try:
        with ConveyProcess(
            bed, _config(bed, mode), mode="dsr" if rewrite else "passthrough", name=mode
        ) as lb:
            assert lb.proc is not None
            pid = lb.proc.pid
            # download
            before = verdicts(lb.stats())
            curl = bed.client.run(
                ["curl", "-sS", "--fail", "--max-time", "120", "-o", "/dev/null", "-w", "%{speed_download} %{time_total}",
                 f"http://{bed.vip}:{VIP_PORT}/bytes/{size}"],
                timeout=130,
            )  # fmt: skip
            speed, elapsed = (float(x) for x in curl.stdout.split())
            packets = verdicts(lb.stats()) - before
            row["download_mbit_s"] = speed * 8 / 1e6
            row["download_lb_packets_s"] = packets / elapsed
            row["download_lb_packets_per_mb"] = packets / (size / 1e6)
            # requests
            before, cpu0, t0 = verdicts(lb.stats()), cpu_times(pid), time.monotonic()
            load = spawn_in(
                bed.client,
                "rr_client",
                bed.vip,
                VIP_PORT,
                seconds,
                CONCURRENCY,
                MAX_REQUESTS,
                0,
                "http",
                ready=False,
            )
            result = result_of(load, seconds + 60)
            wall = time.monotonic() - t0
            packets = verdicts(lb.stats()) - before
            row["requests_s"] = result["per_second"]
            row["requests_failed"] = result["errors"]
            row["request_lb_packets_s"] = packets / result["seconds"]
            row["lb_packets_per_request"] = packets / max(1, result["ok"])
            row["lb_cpu_percent"] = 100 * (cpu_times(pid) - cpu0).total / wall
            lb.stop()
    finally:
        if rewrite:
            unprepare_servers(bed)
    return row


def run(
    quick: bool = False, seconds: float | None = None, size_mb: int | None = None
) -> list[dict[str, Any]]:
    """Build an L2 bed, measure every mode, remove the bed; returns one row per mode."""
    seconds = seconds or (2.0 if quick else 5.0)
    size = int((size_mb or (50 if quick else 200)) * 1e6)
    bed = Testbed.create(kind="l2", servers=2)
    try:
        for server in bed.servers:
            for port in (VIP_PORT, IP_SERVER_PORT):
                start_httpd(server, port, name=server.role, bind="0.0.0.0")
        return [measure_mode(bed, mode, seconds, size) for mode in MODES]
    finally:
        bed.destroy()


def ratios(rows: list[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(DSR mode, metric, DSR / passthrough) for the headline metrics."""
    base = next(r for r in rows if r["mode"] == "passthrough")
    out = []
    for row in rows:
        if row["mode"] == "passthrough":
            continue
        for metric in NAMES:
            if base.get(metric):
                out.append((row["mode"], metric, row[metric] / base[metric]))
    return out


def report(rows: list[dict[str, Any]]) -> str:
    head = (
        f"{'mode':<12} {'download':>10} {'lb pkt/s':>9} {'lb pkt/MB':>9} {'req/s':>7} {'lb pkt/s':>9} "
        f"{'pkt/req':>7} {'lb CPU':>6}"
    )
    sub = f"{'':<12} {'Mbit/s':>10} {'(dl)':>9} {'(dl)':>9} {'':>7} {'(req)':>9} {'':>7} {'%':>6}"
    lines = [head, sub]
    for r in rows:
        lines.append(
            f"{r['mode']:<12} {r['download_mbit_s']:>10.0f} {r['download_lb_packets_s']:>9.0f} "
            f"{r['download_lb_packets_per_mb']:>9.1f} {r['requests_s']:>7.0f} {r['request_lb_packets_s']:>9.0f} "
            f"{r['lb_packets_per_request']:>7.1f} {r['lb_cpu_percent']:>6.0f}"
        )
    lines.append("")
    lines.append("DSR / passthrough on the same L2 bed:")
    for mode, metric, value in ratios(rows):
        lines.append(f"  {mode:<8} {NAMES[metric]:<42} x{value:.2f}")
    failed = sum(r["requests_failed"] for r in rows)
    if failed:
        lines.append(f"(failed requests across the runs: {failed})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="bench/dsr.py", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="2 s of requests and a 50 MB download per mode")
    parser.add_argument("--seconds", type=float, help="request load per mode [5]")
    parser.add_argument("--size", type=int, metavar="MB", help="download size [200]")
    parser.add_argument("--json", type=Path, help="also write the rows as JSON")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/dsr.py needs root (network namespaces, iptables)", file=sys.stderr)
        return 1
    rows = run(args.quick, args.seconds, args.size)
    print(report(rows))
    if args.json:
        with contextlib.suppress(OSError):
            args.json.write_text(json.dumps(rows, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
