"""DSR on the namespace test bed: helpers shared by the DSR tests, ``make demo`` and ``bench/dsr.py`` (root only).

``demo_dsr(rewrite)`` (or ``demo_dsr(bed, rewrite)`` with an L2 bed of yours) prepares the servers with
``scripts/setup-dsr-backend.sh``, runs ``convey --dsr`` in the balancer's namespace, sends a few requests from the
client, prints which server answered, shows that the reply bytes did not cross the balancer, and tears everything
down again (the bed too, when it made it).

Topologies (see testbed/bed.py for the beds):

- ``l2``: client, balancer and servers on one bridge; both flavours work. The balancer forwards client -> VIP
  packets out of the interface they came in by; the servers answer the client on the segment.
- ``routed`` plus :func:`add_return_router`: the servers are on their own subnets behind the balancer, as in the
  routed bed, and their default route goes to a second router, ``gw``, which also reaches the client. Requests
  go client -> balancer -> server; replies go server -> gw -> client and never enter the balancer's namespace.
  Only ``rewrite = "ip"`` works here (``mac`` needs one L2 segment).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

from testbed.bed import Testbed, _address, _veth
from testbed.convey_proc import ConveyProcess
from testbed.host import Host
from testbed.httpd import payload_sha256
from testbed.httpd_proc import HttpServer, start_httpd
from testbed.namespaces import PREFIX
from testbed.process import REPO_ROOT, TestbedError, read_line, wait_until

SETUP_SCRIPT = REPO_ROOT / "scripts" / "setup-dsr-backend.sh"
BACKEND_STATE_DIR = Path("/run/convey/backend-nat")
VIP_PORT = 80
IP_SERVER_PORT = (
    8080  # rewrite = "ip": servers listen elsewhere than the VIP's port; the egress NAT restores it
)

FETCH = r"""
import collections, json, socket, sys, time
vip, port, n, path, deadline = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4], float(sys.argv[5])
counts, peers, errors = collections.Counter(), set(), []
end = time.monotonic() + deadline
for _ in range(n):
    if time.monotonic() > end:
        errors.append("deadline")
        break
    try:
        with socket.create_connection((vip, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(f"GET {path} HTTP/1.1\r\nHost: {vip}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        name, peer = data.partition(b"\r\n\r\n")[2].decode().split()
        counts[name] += 1
        peers.add(peer.rpartition(":")[0])
    except (OSError, ValueError) as exc:
        errors.append(repr(exc))
print(json.dumps({"counts": counts, "peers": sorted(peers), "failed": len(errors), "errors": errors[:5]}))
"""


# -- config and servers --------------------------------------------------------------------------------------


def server_port_for(rewrite: str) -> int:
    """``mac`` servers must listen on the VIP's port (the packet is not rewritten); ``ip`` servers need not."""
    return VIP_PORT if rewrite == "mac" else IP_SERVER_PORT


def suite_workers() -> int:
    """``CONVEY_TEST_WORKERS=N``: the packet-mode suites run with N worker processes (default 1: none);
    ``make test-workers`` runs them so. Tests whose figures are per process (exact WRR shares, one flow table)
    skip with the reason."""
    return int(os.environ.get("CONVEY_TEST_WORKERS", "1") or 1)


def dsr_config(
    bed: Testbed,
    rewrite: str,
    *,
    weights: Sequence[int] | None = None,
    server_port: int | None = None,
    egress_nat: str = "auto",
    health_interval: float = 1.0,
    fall: int = 3,
    rise: int = 2,
    mode: str = "dsr",
    offload: bool = False,
    extra: str = "",
) -> str:
    """A convey config for ``bed``: the VIP on port 80, every server in one backend with ``weights``;
    ``offload``: ``[dsr] offload = true`` (convey decides the SYN, the kernel steers the rest)."""
    server_port = server_port or server_port_for(rewrite)
    weights = list(weights or [1] * len(bed.servers))
    lines = [
        "[frontends.web]",
        f'listen_addr = "{bed.vip}:{VIP_PORT}"',
        'backend = "web_servers"',
        "",
        "[backends.web_servers]",
        f"health_check_interval = {health_interval}",
        f"health_check_timeout = {min(1.0, health_interval)}",
        f"fall = {fall}",
        f"rise = {rise}",
    ]
    for i, (server, weight) in enumerate(zip(bed.servers, weights, strict=True)):
        lines += [
            f"[backends.web_servers.servers.s{i}]",
            f'addr = "{server.addr}:{server_port}"',
            f"weight = {weight}",
        ]
    if mode == "dsr":
        lines += ["", "[dsr]", f'rewrite = "{rewrite}"', f'egress_nat = "{egress_nat}"']
        if offload:
            lines.append("offload = true")
        elif (
            suite_workers() > 1
        ):  # CONVEY_TEST_WORKERS: the suite with worker processes (DSR offload has none)
            lines.append(f"workers = {suite_workers()}")
    return "\n".join([*lines, "", extra, ""])


def setup_script(
    host: Host, *args: str, check: bool = True, timeout: float = 60.0
) -> subprocess.CompletedProcess[Any]:
    """Run scripts/setup-dsr-backend.sh in ``host``'s namespace."""
    return host.run([str(SETUP_SCRIPT), *args], check=check, timeout=timeout)


def backend_args(bed: Testbed, server: Host, rewrite: str, method: str = "auto") -> list[str]:
    """The setup script's arguments for ``server`` of ``bed``: the README's command, ``--vip VIP --port PORT
    --balancer LB_ADDR --rewrite ip|mac`` (LB_ADDR: where the health checks come from, whose replies the egress
    NAT must leave alone), then what this bed needs besides."""
    lb_addr = bed.lb_addr_towards(bed.servers.index(server))
    args = ["--vip", bed.vip, "--port", str(VIP_PORT), "--balancer", lb_addr, "--rewrite", rewrite]
    if rewrite == "ip":
        args += ["--server-port", str(IP_SERVER_PORT)]
        if method != "auto":
            args += ["--method", method]
        if bed.kind != "l2":  # the default route leads to the return router, not to where requests arrive
            args += ["--server-addr", server.addr]
    return args


def prepare_servers(bed: Testbed, rewrite: str, method: str = "auto") -> list[str]:
    """``setup-dsr-backend.sh install`` on every server; returns the output lines."""
    out = []
    for server in bed.servers:
        proc = setup_script(server, "install", *backend_args(bed, server, rewrite, method))
        out += [f"[{server.role}] {line}" for line in proc.stdout.splitlines()]
    return out


def unprepare_servers(bed: Testbed) -> list[str]:
    """``setup-dsr-backend.sh remove`` on every server (tolerant: used in finalizers)."""
    out = []
    for server in bed.servers:
        proc = setup_script(server, "remove", "--vip", bed.vip, "--port", str(VIP_PORT), check=False)
        out += [f"[{server.role}] {line}" for line in (proc.stdout + proc.stderr).splitlines()]
        (BACKEND_STATE_DIR / f"{server.ns}.json").unlink(missing_ok=True)
    return out


def start_servers(bed: Testbed, rewrite: str) -> list[HttpServer]:
    """The test httpd on every server, on all addresses (``mac``: the VIP on lo too)."""
    port = server_port_for(rewrite)
    return [start_httpd(server, port, name=server.role, bind="0.0.0.0") for server in bed.servers]


def add_return_router(bed: Testbed) -> Host:
    """Turn a routed bed into a DSR one: a router ``gw`` linked to the client and to every server, the servers'
    default route via gw. The balancer still reaches each server (and health-checks it) on its own link.

    Addresses: gw 198.18.200.1/24 -- client eth1 198.18.200.2/24; gw 198.18.<210+i>.1/24 -- server i eth1
    198.18.<210+i>.2/24. The client accepts replies from the VIP on eth1 (rp_filter off there: the VIP is
    routed via eth0); so do the servers for requests arriving on eth0 while their default route is eth1."""
    assert bed.kind == "routed"
    gw_ns = bed._new_ns(PREFIX, "gw")
    with Host("gw", gw_ns, "", "", "", bed=bed).iproute() as ipr:
        _veth(ipr, "c", bed.client.ns, "eth1")
        _address(ipr, "c", "198.18.200.1", 24)
        ipr.link("set", index=ipr.link_lookup(ifname="c")[0], state="up")
        for i, server in enumerate(bed.servers):
            _veth(ipr, f"s{i}", server.ns, "eth1")
            _address(ipr, f"s{i}", f"198.18.{210 + i}.1", 24)
            ipr.link("set", index=ipr.link_lookup(ifname=f"s{i}")[0], state="up")
        ipr.route("add", dst=f"{bed.client.addr}/32", gateway="198.18.200.2")
    gw = Host("gw", gw_ns, "198.18.200.1", "c", "", bed=bed)
    gw.sysctl("net.ipv4.ip_forward", 1)
    with bed.client.iproute() as ipr:
        eth1 = ipr.link_lookup(ifname="eth1")[0]
        ipr.addr("add", index=eth1, address="198.18.200.2", prefixlen=24)
        ipr.link("set", index=eth1, state="up")
    for conf in ("all", "eth1"):
        bed.client.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
    for i, server in enumerate(bed.servers):
        with server.iproute() as ipr:
            eth1 = ipr.link_lookup(ifname="eth1")[0]
            ipr.addr("add", index=eth1, address=f"198.18.{210 + i}.2", prefixlen=24)
            ipr.link("set", index=eth1, state="up")
            ipr.route("replace", dst="0.0.0.0/0", gateway=f"198.18.{210 + i}.1")
        for conf in ("all", "eth0"):
            server.sysctl(f"net.ipv4.conf.{conf}.rp_filter", 0)
    for host, iface in ((bed.client, "eth1"), *((s, "eth1") for s in bed.servers)):
        with host.iproute() as ipr:
            index = ipr.link_lookup(ifname=iface)[0]
            wait_until(
                lambda ipr=ipr, index=index: ipr.get_links(index)[0].get_attr("IFLA_CARRIER") == 1,
                5.0,
                f"carrier on {host.ns} {iface}",
            )
    return gw


# -- traffic and observation ---------------------------------------------------------------------------------


def fetch_many(host: Host, addr: str, port: int, n: int, deadline: float = 60.0) -> dict[str, Any]:
    """``n`` sequential ``GET /`` on fresh connections from ``host``: which server answered how often
    (``counts``), the client addresses the servers saw (``peers``), failures."""
    proc = host.python(["-c", FETCH, addr, str(port), str(n), "/", str(deadline)], timeout=deadline + 15)
    result: dict[str, Any] = json.loads(proc.stdout)
    return result


def iface_bytes(host: Host) -> dict[str, tuple[int, int]]:
    """(rx_bytes, tx_bytes) of every interface of ``host`` except lo."""
    out = {}
    with host.iproute() as ipr:
        for link in ipr.get_links():
            name = link.get_attr("IFLA_IFNAME")
            if name != "lo":
                stats = link.get_attr("IFLA_STATS64")
                out[str(name)] = (int(stats["rx_bytes"]), int(stats["tx_bytes"]))
    return out


def rx_total(before: dict[str, tuple[int, int]], after: dict[str, tuple[int, int]]) -> int:
    return sum(after[name][0] - before.get(name, (0, 0))[0] for name in after)


def download(host: Host, url: str, path: Path, timeout: float = 60.0) -> str:
    """Fetch ``url`` with curl in ``host`` into ``path`` and delete it again; returns its sha256."""
    host.run(
        ["curl", "-sS", "--fail", "--max-time", f"{timeout:g}", "-o", str(path), url], timeout=timeout + 10
    )
    digest = hashlib.sha256()
    with path.open("rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    path.unlink(missing_ok=True)
    return digest.hexdigest()


@contextlib.contextmanager
def capture(
    host: Host, iface: str, bpf: str, count: int, path: Path, timeout: float = 30.0
) -> Iterator[Path]:
    """tcpdump on ``host``'s ``iface`` (at most ``count`` packets, ``timeout`` seconds) while the block runs;
    the pcap is at ``path`` afterwards."""
    proc = host.popen(
        [
            "timeout",
            f"{timeout:g}",
            "tcpdump",
            "-i",
            iface,
            "-nn",
            "-U",
            "-c",
            str(count),
            "-w",
            str(path),
            bpf,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        deadline = time.monotonic() + 10.0
        while "listening on" not in read_line(proc, max(0.1, deadline - time.monotonic())):
            pass
        yield path
    finally:
        time.sleep(0.2)  # let the last packets reach the file (tcpdump -U flushes per packet)
        with contextlib.suppress(ProcessLookupError):
            proc.terminate()
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(5)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)


def frame_sources(path: Path) -> list[tuple[str, str, int]]:
    """(source MAC, source IP, source port) of the TCP packets in a pcap file."""
    from scapy.layers.inet import IP, TCP
    from scapy.layers.l2 import Ether
    from scapy.utils import rdpcap

    out = []
    for packet in rdpcap(str(path)):
        if Ether in packet and IP in packet and TCP in packet:
            out.append((str(packet[Ether].src), str(packet[IP].src), int(packet[TCP].sport)))
    return out


# -- the demo ------------------------------------------------------------------------------------------------


def demo_dsr(bed: Testbed | str | None = None, rewrite: str = "ip") -> None:
    """Show DSR working on an L2 bed, then remove everything again. ``demo_dsr("mac")`` builds (and destroys)
    its own bed; ``demo_dsr(bed, "mac")`` uses an L2 bed of yours (and leaves the bed)."""
    if isinstance(bed, str):
        bed, rewrite = None, bed
    own = bed is None
    if bed is None:
        bed = Testbed.create(kind="l2", servers=2)
    assert bed.kind == "l2", "the DSR demo needs an L2 bed (both flavours work on one segment)"
    lb: ConveyProcess | None = None
    try:
        print(
            f"  test bed: client {bed.client.addr}, balancer {bed.lb.addr} holding the VIP {bed.vip}, servers "
            f"{', '.join(bed.server_addrs)}, all on one bridge (netns {bed.lb.ns} ...)"
        )
        start_servers(bed, rewrite)
        for server in bed.servers:
            args = backend_args(bed, server, rewrite)
            print(f"  [{server.role}] $ scripts/setup-dsr-backend.sh install {' '.join(args)}")
            for line in setup_script(server, "install", *args).stdout.splitlines():
                print(f"      {line}")
        lb = ConveyProcess(bed, dsr_config(bed, rewrite), mode="dsr", name=f"convey-dsr-{rewrite}")
        print(
            f"  [lb] $ convey --dsr --config={lb.config_path.name} --install-rules   (rewrite = {rewrite!r})"
        )
        lb.start()
        answers: Counter[str] = Counter()
        for i in range(6):
            body = bed.client.curl(f"http://{bed.vip}:{VIP_PORT}/").decode().strip()
            answers[body.split()[0]] += 1
            print(f"  request {i + 1}: {body}   (the server saw the client's own address)")
        print(f"  share: {dict(answers)} (equal weights, Maglev on the client's address and port)")
        size = 10_000_000
        before = iface_bytes(bed.lb)
        digest = download(bed.client, f"http://{bed.vip}:{VIP_PORT}/bytes/{size}", bed.logdir / "dl")
        seen = rx_total(before, iface_bytes(bed.lb))
        ok = "intact" if digest == payload_sha256(size) else "CORRUPTED"
        print(
            f"  a {size / 1e6:.0f} MB download through DSR: {ok}; the balancer received {seen / 1e3:.0f} kB "
            "meanwhile (the client's ACKs): the data went from the server straight to the client"
        )
        doc = lb.stats()
        print(f"  GET /stats -> dsr: {json.dumps(doc.get('dsr'), sort_keys=True)}")
        print(f"  GET /stats -> packet.verdicts.accepted = {doc['packet']['verdicts']['accepted']}")
    finally:
        if lb is not None:
            with contextlib.suppress(Exception):
                lb.stop()
        for line in unprepare_servers(bed):
            print(f"  {line}")
        if own:
            bed.destroy()
            print("  test bed removed")


def main(argv: Sequence[str] | None = None) -> int:
    rewrites = list(argv if argv is not None else sys.argv[1:]) or ["ip", "mac"]
    for rewrite in rewrites:
        print(f'== DSR, rewrite = "{rewrite}" ==')
        try:
            demo_dsr(rewrite)
        except TestbedError as exc:
            print(f"demo failed: {exc}", file=sys.stderr)
            return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
