"""A tier of balancers behind a router with ECMP, the VIP announced over BGP by each balancer (root only; needs BIRD 2,
Debian ``bird2``).

```
 client eth0 198.18.100.2/24 --- c0 198.18.100.1/24  router (BIRD 2, AS 65000, ECMP: merge paths,
                                                     |  fib_multipath_hash_policy = 1)
                                              br0 198.18.5.1/24  (a bridge inside the router's namespace)
                     +---------------+---------------+----------------+----------------+
               lb0 .2          lb1 .3          lb2 .4 (spare)    server0 .10      server1 .11
               convey --dsr (Maglev) + BIRD, AS 65001 each       httpd :8080, egress NAT -> VIP:80
```

The VIP, 198.18.50.1, lives on no interface: the router reaches it through whichever balancers announce it. A
balancer forwards client -> VIP packets to a server on the shared segment (DSR, ``rewrite = "ip"``); the server's
egress NAT (scripts/setup-dsr-backend.sh, every balancer listed with ``--balancer`` so health-check replies keep
their address) sends replies with the VIP as their source straight to the router. The router peers with every
balancer slot from the start (``lb2`` idle until a test starts convey there), with hold time 3 s, graceful restart
off and short retry timers so sessions come up within a second or two.

Namespaces are ``cvy-<6 hex>-rt``, ``-client``, ``-lb<i>``, ``-s<i>``; :meth:`Cluster.destroy` kills every process
in them and deletes them, also at interpreter exit for a cluster not destroyed.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import secrets
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from pyroute2 import IPRoute, netns

from convey.bgp.speaker import remove_stale_runtime_dirs
from testbed.bed import Testbed, _address, _veth, has_carrier, release
from testbed.convey_proc import ConveyProcess
from testbed.dsr import IP_SERVER_PORT, setup_script
from testbed.host import Host
from testbed.httpd_proc import HttpServer, start_httpd
from testbed.namespaces import PREFIX
from testbed.process import TestbedError, stop_process, wait_until

CLIENT_NET = "198.18.100"
TIER_NET = "198.18.5"
ROUTER_ADDR = f"{TIER_NET}.1"
VIP = "198.18.50.1"
VIP_PORT = 80
ROUTER_AS, TIER_AS = 65000, 65001
HOLD_TIME = 3


def balancer_addr(i: int) -> str:
    return f"{TIER_NET}.{2 + i}"


def server_addr(i: int) -> str:
    return f"{TIER_NET}.{10 + i}"


def router_bird_conf(slots: int) -> str:
    """The router's BIRD: one passive-enough BGP session per balancer slot, ECMP into the kernel table."""
    lines = [
        f"router id {ROUTER_ADDR};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "protocol device { scan time 1; }",
        "protocol kernel { ipv4 { import none; export all; }; merge paths yes limit 16; }",
    ]
    for i in range(slots):
        lines += [
            f"protocol bgp lb{i} {{",
            f"  local as {ROUTER_AS};",
            f"  neighbor {balancer_addr(i)} as {TIER_AS};",
            f"  hold time {HOLD_TIME}; keepalive time 1;",
            "  connect delay time 1; connect retry time 1; error wait time 1, 2;",
            "  graceful restart off; long lived graceful restart off;",
            "  ipv4 { import all; export none; };",
            "}",
        ]
    return "\n".join([*lines, ""])


def convey_config(servers: int, mode: str = "dsr", health_interval: float = 0.5, extra: str = "") -> str:
    """The config every balancer runs (the same file: Maglev then agrees everywhere)."""
    lines = [
        "[frontends.web]",
        f'listen_addr = "{VIP}:{VIP_PORT}"',
        'backend = "web"',
        "[backends.web]",
        f"health_check_interval = {health_interval}",
        f"health_check_timeout = {health_interval}",
        "fall = 2",
        "rise = 1",
    ]
    if mode == "passthrough":
        lines.append('scheduler = "maglev"')
    for i in range(servers):
        lines += [f"[backends.web.servers.s{i}]", f'addr = "{server_addr(i)}:{IP_SERVER_PORT}"']
    if mode == "dsr":
        lines += ["[dsr]", 'rewrite = "ip"']
    lines += [
        "[bgp]",
        f"local_as = {TIER_AS}",
        f"hold_time = {HOLD_TIME}",
        "withdraw_grace = 1",
        "[bgp.peers.r1]",
        f'address = "{ROUTER_ADDR}"',
        f"as = {ROUTER_AS}",
    ]
    return "\n".join([*lines, extra, ""])


@dataclass(eq=False)
class Cluster:
    __test__ = False

    tag: str
    slots: int
    mode: str = "dsr"
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cvy-cluster-")))
    router: Host | None = None
    client: Host | None = None
    balancers: list[Host] = field(default_factory=list)
    servers: list[Host] = field(default_factory=list)
    web: list[HttpServer] = field(default_factory=list)
    convey: dict[int, ConveyProcess] = field(default_factory=dict)
    router_bird: subprocess.Popen[Any] | None = None

    @classmethod
    def create(cls, balancers: int = 3, servers: int = 2, mode: str = "dsr") -> Cluster:
        """Build the namespaces, the router's BIRD and the servers (httpd + egress NAT); convey runs nowhere yet
        (:meth:`start_balancer`). Everything half-built is removed if this fails."""
        if shutil.which("bird") is None:
            raise TestbedError("the cluster needs BIRD 2: apt-get install bird2")
        cluster = cls(secrets.token_hex(3), balancers, mode)
        _live.append(cluster)
        try:
            cluster._build(servers)
        except BaseException:
            cluster.destroy()
            raise
        return cluster

    # -- construction -------------------------------------------------------------------------------------------

    def _ns(self, role: str) -> str:
        name = f"{PREFIX}{self.tag}-{role}"
        self.namespaces.append(name)
        netns.create(name)
        Testbed._prepare_ns(name)
        return name

    def _host(self, role: str, ns: str, iface: str, addr: str) -> Host:
        host = Host(role, ns, addr, iface, "", bed=self)  # type: ignore[arg-type]  # duck-typed: processes, logdir
        with host.iproute() as ipr:
            index = ipr.link_lookup(ifname=iface)[0]
            ipr.addr("add", index=index, address=addr, prefixlen=24)
            ipr.link("set", index=index, state="up")
            host.mac = ipr.get_links(index)[0].get_attr("IFLA_ADDRESS")
        return host

    def _build(self, servers: int) -> None:
        rt = self._ns("rt")
        self.router = Host("router", rt, ROUTER_ADDR, "br0", "", bed=self)  # type: ignore[arg-type]
        client_ns = self._ns("client")
        lb_ns = [self._ns(f"lb{i}") for i in range(self.slots)]
        srv_ns = [self._ns(f"s{i}") for i in range(servers)]
        with IPRoute(netns=rt) as ipr:
            _veth(ipr, "c0", client_ns, "eth0")
            _address(ipr, "c0", f"{CLIENT_NET}.1", 24)
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
            bridge = ipr.link_lookup(ifname="br0")[0]
            for port, ns in [
                *((f"p-lb{i}", n) for i, n in enumerate(lb_ns)),
                *((f"p-s{i}", n) for i, n in enumerate(srv_ns)),
            ]:
                _veth(ipr, port, ns, "eth0")
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge, state="up")
            _address(ipr, "br0", ROUTER_ADDR, 24)
            for name in ("br0", "c0"):
                ipr.link("set", index=ipr.link_lookup(ifname=name)[0], state="up")
        for key, value in (
            ("net.ipv4.ip_forward", 1),
            ("net.ipv4.fib_multipath_hash_policy", 1),  # ECMP on the L4 tuple: connections spread by port
            ("net.ipv4.conf.all.rp_filter", 0),
            ("net.ipv4.conf.default.rp_filter", 0),
            ("net.ipv4.conf.br0.rp_filter", 0),
        ):
            self.router.sysctl(key, value)
        self.client = self._host("client", client_ns, "eth0", f"{CLIENT_NET}.2")
        self.balancers = [self._host(f"lb{i}", ns, "eth0", balancer_addr(i)) for i, ns in enumerate(lb_ns)]
        self.servers = [self._host(f"server{i}", ns, "eth0", server_addr(i)) for i, ns in enumerate(srv_ns)]
        for host in [self.client, *self.balancers, *self.servers]:
            gateway = f"{CLIENT_NET}.1" if host is self.client else ROUTER_ADDR
            with host.iproute() as ipr:
                ipr.route("add", dst="0.0.0.0/0", gateway=gateway)
        # A small receive buffer: a rate-limited curl then paces the server, so a download stays in flight on the
        # wire for its whole duration (the default buffer grows to megabytes and takes it in at once).
        self.client.sysctl("net.ipv4.tcp_rmem", "4096 65536 131072")
        for lb in self.balancers:
            lb.sysctl("net.ipv4.conf.all.send_redirects", 0)
            lb.sysctl("net.ipv4.conf.eth0.send_redirects", 0)
        self._wait_carrier()
        self._start_router_bird()
        self.web = [start_httpd(s, IP_SERVER_PORT, name=s.role, bind="0.0.0.0") for s in self.servers]
        if self.mode == "dsr":
            lbs = [arg for i in range(self.slots) for arg in ("--balancer", balancer_addr(i))]
            for server in self.servers:
                setup_script(
                    server,
                    "install",
                    *("--vip", VIP, "--port", str(VIP_PORT), "--rewrite", "ip"),
                    *("--server-port", str(IP_SERVER_PORT), "--server-addr", server.addr, *lbs),
                )

    def _wait_carrier(self) -> None:
        assert self.router is not None
        for host, iface in [(self.router, "c0"), *((h, "eth0") for h in self.hosts)]:
            with host.iproute() as ipr:
                index = ipr.link_lookup(ifname=iface)[0]
                wait_until(lambda ipr=ipr, index=index: has_carrier(ipr, index), 5.0, f"carrier on {host.ns}")

    def _start_router_bird(self) -> None:
        assert self.router is not None
        conf = self.logdir / "router-bird.conf"
        conf.write_text(router_bird_conf(self.slots))
        with (self.logdir / "router-bird.log").open("wb") as log:
            self.router_bird = self.router.popen(
                [
                    "bird",
                    "-f",
                    "-c",
                    str(conf),
                    "-s",
                    self.router_socket,
                    "-P",
                    str(self.logdir / "router.pid"),
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        wait_until(lambda: os.path.exists(self.router_socket), 10.0, "the router's BIRD control socket")

    @property
    def router_socket(self) -> str:
        return str(self.logdir / "router-bird.ctl")

    @property
    def hosts(self) -> list[Host]:
        assert self.client is not None
        return [self.client, *self.balancers, *self.servers]

    # -- balancers ----------------------------------------------------------------------------------------------

    def start_balancer(self, i: int, config: str | None = None, announce: bool = True) -> ConveyProcess:
        """convey in balancer ``i``'s namespace (the tier's config unless ``config``); with ``announce``, wait
        until the router's kernel route for the VIP goes through it."""
        view = SimpleNamespace(lb=self.balancers[i], logdir=self.logdir)
        text = config or convey_config(len(self.servers), self.mode)
        proc = ConveyProcess(view, text, mode=self.mode, name=f"convey-lb{i}")  # type: ignore[arg-type]
        self.convey[i] = proc.start()
        if announce:
            wait_until(lambda: balancer_addr(i) in self.next_hops(), 15.0, f"the router's route via lb{i}")
        return proc

    def next_hops(self, vip: str = VIP) -> list[str]:
        """The gateways of the router's kernel route for ``vip`` (two or more: ECMP), sorted."""
        assert self.router is not None
        out = self.router.run(["ip", "-j", "route", "show", f"{vip}/32"], timeout=10).stdout
        hops: list[str] = []
        for route in json.loads(out or "[]"):
            hops += [hop["gateway"] for hop in route.get("nexthops", [])]
            if "gateway" in route:
                hops.append(route["gateway"])
        return sorted(hops)

    def router_route(self) -> str:
        assert self.router is not None
        return str(self.router.run(["ip", "route", "show", f"{VIP}/32"], timeout=10).stdout.strip())

    def router_sessions(self) -> str:
        assert self.router is not None
        return str(
            self.router.run(["birdc", "-s", self.router_socket, "show", "protocols"], timeout=10).stdout
        )

    def kill_balancer(self, i: int) -> None:
        """SIGKILL convey in balancer ``i`` (its BIRD must die with it: PR_SET_PDEATHSIG)."""
        proc = self.convey.pop(i)
        assert proc.proc is not None
        proc.proc.kill()
        proc.proc.wait(10)
        proc.proc = None

    def stop_balancer(self, i: int, timeout: float = 15.0) -> str:
        """SIGTERM convey in balancer ``i`` and wait for it; returns its log."""
        return self.convey.pop(i).stop(timeout)

    def bird_pids(self, i: int) -> list[int]:
        """BIRD processes in balancer ``i``'s namespace."""
        return [pid for pid in self.balancers[i].pids() if _comm(pid) == "bird"]

    # -- teardown -----------------------------------------------------------------------------------------------

    def destroy(self) -> None:
        with contextlib.suppress(ValueError):
            _live.remove(self)
        for proc in list(self.convey.values()):  # SIGKILL: no grace needed, the namespaces go (BIRD dies too)
            if proc.proc is not None:
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.proc.pid, signal.SIGKILL)
                with contextlib.suppress(Exception):
                    proc.proc.wait(10)
                proc.proc = None
        self.convey.clear()
        remove_stale_runtime_dirs()  # the runtime directories of the convey processes killed above
        for server in self.servers:
            with contextlib.suppress(Exception):
                setup_script(server, "remove", "--vip", VIP, "--port", str(VIP_PORT), check=False)
            Path(f"/run/convey/backend-nat/{server.ns}.json").unlink(missing_ok=True)
        release(self.processes, self.namespaces, self.logdir, "cluster")


def _comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


@contextlib.contextmanager
def cluster(balancers: int = 3, servers: int = 2, mode: str = "dsr") -> Iterator[Cluster]:
    built = Cluster.create(balancers, servers, mode)
    try:
        yield built
    finally:
        built.destroy()


def wait_seconds(condition: Any, timeout: float, what: str) -> float:
    """Poll ``condition`` (at most ``timeout`` s); the seconds it took."""
    start = time.monotonic()
    wait_until(condition, timeout, what, interval=0.05)
    return time.monotonic() - start


_live: list[Cluster] = []
_CREATOR = os.getpid()


@atexit.register
def _destroy_live() -> None:
    if os.getpid() != _CREATOR:
        return
    for built in list(_live):
        with contextlib.suppress(Exception):
            built.destroy()


@dataclass
class Download:
    """One curl from the client: its exit status, whether the bytes were intact, when it ended."""

    returncode: int | None = None
    intact: bool = False
    ended: float = 0.0
    error: str = ""


class Downloads:
    """``n`` concurrent rate-limited downloads of ``size`` bytes through the VIP (curl in the client's namespace),
    each written to a file and checked against the server's sha256."""

    def __init__(self, tier: Cluster, n: int, size: int, rate: str = "600k", max_time: float = 60.0) -> None:
        from testbed.httpd import payload_sha256

        assert tier.client is not None
        self.size, self.expected, self.max_time = size, payload_sha256(size), max_time
        self.paths = [tier.logdir / f"dl-{secrets.token_hex(4)}-{i}" for i in range(n)]
        self.started = time.monotonic()
        url = f"http://{VIP}:{VIP_PORT}/bytes/{size}"
        self.procs = [
            tier.client.popen(
                [
                    "curl",
                    "-sS",
                    "--fail",
                    "--max-time",
                    f"{max_time:g}",
                    "--limit-rate",
                    rate,
                    "-o",
                    str(p),
                    url,
                ],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.PIPE,
            )
            for p in self.paths
        ]
        self.results = [Download() for _ in self.procs]

    def wait(self) -> list[Download]:
        """Until every curl ended (bounded by its --max-time); the results, files removed."""
        import hashlib

        deadline = self.started + self.max_time + 10
        pending = set(range(len(self.procs)))
        while pending and time.monotonic() < deadline:
            for i in list(pending):
                proc = self.procs[i]
                if proc.poll() is None:
                    continue
                pending.discard(i)
                result = self.results[i]
                result.returncode, result.ended = proc.returncode, time.monotonic()
                result.error = proc.stderr.read().decode(errors="replace").strip() if proc.stderr else ""
                if proc.returncode == 0:
                    digest = hashlib.sha256(self.paths[i].read_bytes()).hexdigest()
                    result.intact = digest == self.expected
                self.paths[i].unlink(missing_ok=True)
            time.sleep(0.05)  # poll interval
        for i in pending:
            stop_process(self.procs[i])
            self.results[i].error = "still running after --max-time"
        return self.results


def http(
    host: Host, port: int, method: str, path: str, body: bytes = b"", timeout: float = 10.0
) -> tuple[int, bytes]:
    """One HTTP/1.0 request from ``host``'s namespace to 127.0.0.1:``port``: (status, body)."""
    with host.connect("127.0.0.1", port, timeout) as sock:
        head = f"{method} {path} HTTP/1.0\r\nHost: convey\r\nContent-Length: {len(body)}\r\n"
        sock.sendall(head.encode() + b"Content-Type: application/json\r\n\r\n" + body)
        chunks = []
        while chunk := sock.recv(1 << 16):
            chunks.append(chunk)
    head_bytes, _, payload = b"".join(chunks).partition(b"\r\n\r\n")
    return int(head_bytes.split(b" ", 2)[1]), payload


def choose(tier: Cluster, i: int, tuples: list[list[Any]]) -> list[str | None]:
    """Balancer ``i``'s picks for ``tuples`` (POST /debug/choose)."""
    status, body = http(
        tier.balancers[i],
        tier.convey[i].stats_port,
        "POST",
        "/debug/choose",
        json.dumps({"tuples": tuples}).encode(),
    )
    if status != 200:
        raise TestbedError(f"/debug/choose on lb{i}: {status} {body[:300]!r}")
    servers: list[str | None] = json.loads(body)["servers"]
    return servers


LOOP = r"""
import json, socket, sys, time
vip, port, seconds = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
done, errors = 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    try:
        with socket.create_connection((vip, port), timeout=5) as s:
            s.settimeout(5)
            s.sendall(f"GET / HTTP/1.1\r\nHost: {vip}\r\n\r\n".encode())
            data = b""
            while chunk := s.recv(65536):
                data += chunk
        if not data.partition(b"\r\n\r\n")[2].startswith(b"server"):
            raise ValueError(f"bad answer {data[:80]!r}")
        done += 1
    except (OSError, ValueError) as exc:
        errors.append(repr(exc))
print(json.dumps({"done": done, "failed": len(errors), "errors": errors[:5]}))
"""


class RequestLoop:
    """Short connections one after the other from the client for ``seconds`` (each GET / checked)."""

    def __init__(self, tier: Cluster, seconds: float) -> None:
        import sys

        from testbed.process import python_env

        assert tier.client is not None
        self.seconds = seconds
        self.proc = tier.client.popen(
            [sys.executable, "-c", LOOP, VIP, str(VIP_PORT), f"{seconds:g}"],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=python_env(),
        )

    def result(self) -> dict[str, Any]:
        out, err = self.proc.communicate(timeout=self.seconds + 30)
        if self.proc.returncode != 0:
            raise TestbedError(f"request loop failed: {err.decode(errors='replace')[-2000:]}")
        doc: dict[str, Any] = json.loads(out)
        return doc
