"""A network namespace test bed: a client, a balancer and N servers wired with veth pairs (root only).

Used by the netns tests, ``make demo`` and the benchmarks::

    with Testbed.create(kind="routed", servers=2) as bed:
        web = [start_httpd(server, port=8080) for server in bed.servers]
        body = bed.client.curl(f"http://{bed.servers[0].addr}:8080/")

Topologies (addresses only from 198.18.0.0/15, the benchmarking range):

``routed``
    ``client eth0 198.18.0.2/24 -- c0 198.18.0.1/24 lb s<i> 198.18.<1+i>.1/24 -- eth0 198.18.<1+i>.2/24
    server i``.
    Client and servers route by default via the balancer, which forwards (``ip_forward=1``). The VIP is the
    balancer's client-side address, 198.18.0.1, unless ``vip=`` names another one (added to ``c0`` as a /32).
``l2``
    One L2 segment through a Linux bridge in its own namespace: every host has ``eth0`` plugged into it,
    all in 198.19.0.0/24: balancer .1, client .2, server i .<11+i>. The VIP, 198.19.0.100 by default, is an
    extra /32 on the balancer's ``eth0`` (it answers ARP for it). For DSR ``rewrite = "mac"`` a server can
    hold the VIP on ``lo`` too: :meth:`Host.add_vip_on_lo`.

Every namespace is named ``cvy-<6 hex>-<role>``; every process started through the bed (:meth:`Host.popen`,
:func:`start_httpd`) and every process left in its namespaces is killed by :meth:`Testbed.destroy`, which
tolerates a half-built bed and runs at interpreter exit for any bed not destroyed. IPv6 is disabled in the
namespaces so no stray router solicitations or MLD reports show up in packet captures.

``python -m tests.netns.testbed clean [--prefix cvy-]`` (``make clean-netns``) removes leftover namespaces
of every bed, not only this process's: do not run it while other test runs are using theirs.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ipaddress
import os
import secrets
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pyroute2 import IPRoute, netns

PREFIX = "cvy-"
REPO_ROOT = Path(__file__).resolve().parents[2]
CONVEY_STATE_DIR = Path("/run/convey")  # convey.dataplane.rules keeps per-namespace state here

ROUTED_CLIENT_NET = "198.18.0"
L2_NET = "198.19.0"
L2_VIP = "198.19.0.100"
MAX_SERVERS = 200

T = TypeVar("T")


class TestbedError(Exception):
    """The bed could not be built, or a command in it failed."""


class CommandError(TestbedError):
    def __init__(self, ns: str, argv: Sequence[str], returncode: int, stdout: Any, stderr: Any) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        err = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
        super().__init__(f"[{ns}] {' '.join(self.argv)} exited with {returncode}: {err.strip()[-2000:]}")


def wait_until(condition: Callable[[], T], timeout: float, what: str, interval: float = 0.02) -> T:
    """Poll ``condition`` until it returns something truthy (returned); TestbedError after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    last: BaseException | None = None
    while True:
        try:
            value = condition()
            if value:
                return value
        except Exception as exc:
            last = exc
        if time.monotonic() >= deadline:
            detail = f" (last error: {last!r})" if last else ""
            raise TestbedError(f"timed out after {timeout:g}s waiting for {what}{detail}")
        time.sleep(interval)


def ns_exec(ns: str, argv: Sequence[str]) -> list[str]:
    return ["ip", "netns", "exec", ns, *argv]


# -- hosts ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Link:
    """One interface of a host: its name, IPv4 address, prefix length and MAC."""

    iface: str
    addr: str
    prefixlen: int
    mac: str


@dataclass(eq=False)
class Host:
    """One namespace of the bed. ``addr``/``iface``/``mac`` are its main interface; ``links`` lists all."""

    role: str  # client, lb, server0, server1, ..., bridge
    ns: str
    addr: str
    iface: str
    mac: str
    links: list[Link] = field(default_factory=list)
    bed: Testbed | None = field(default=None, repr=False)

    def run(
        self,
        argv: Sequence[str],
        *,
        check: bool = True,
        timeout: float = 60.0,
        text: bool = True,
        input: str | bytes | None = None,
        env: dict[str, str] | None = None,
    ) -> subprocess.CompletedProcess[Any]:
        """Run a command in this namespace to completion (bounded by ``timeout``), output captured."""
        proc = subprocess.run(
            ns_exec(self.ns, argv),
            capture_output=True,
            text=text,
            input=input,
            timeout=timeout,
            env=env,
            cwd=REPO_ROOT,
            check=False,
        )
        if check and proc.returncode != 0:
            raise CommandError(self.ns, argv, proc.returncode, proc.stdout, proc.stderr)
        return proc

    def popen(self, argv: Sequence[str], **kwargs: Any) -> subprocess.Popen[Any]:
        """Start a command in this namespace, in its own process group; the bed kills it on destroy."""
        kwargs.setdefault("cwd", REPO_ROOT)
        kwargs.setdefault("stdin", subprocess.DEVNULL)
        kwargs["start_new_session"] = True
        proc: subprocess.Popen[Any] = subprocess.Popen(ns_exec(self.ns, argv), **kwargs)
        if self.bed is not None:
            self.bed.processes.append(proc)
        return proc

    def python(self, argv: Sequence[str], **kwargs: Any) -> subprocess.CompletedProcess[Any]:
        """Run this Python in the namespace with the repository importable (``-c CODE`` or ``-m MOD``)."""
        env = dict(kwargs.pop("env", None) or os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
        return self.run([sys.executable, *argv], env=env, **kwargs)

    def sysctl(self, key: str, value: str | int) -> None:
        """Set a kernel parameter in this namespace (``net.ipv4.ip_forward``, or slash-separated)."""
        self.run(["sysctl", "-q", "-w", f"{key}={value}"], timeout=10)

    def read_sysctl(self, key: str) -> str:
        return " ".join(self.run(["sysctl", "-n", key], timeout=10).stdout.split())

    @contextlib.contextmanager
    def iproute(self) -> Iterator[Any]:
        """A pyroute2 IPRoute bound to this namespace."""
        ipr = IPRoute(netns=self.ns)
        try:
            yield ipr
        finally:
            ipr.close()

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> socket.socket:
        """A socket created in this namespace, usable from this process (connect, bind, ...)."""
        return netns.create_socket(self.ns, family, type)

    def connect(self, addr: str, port: int, timeout: float = 10.0) -> socket.socket:
        sock = self.socket()
        sock.settimeout(timeout)
        try:
            sock.connect((addr, port))
        except BaseException:
            sock.close()
            raise
        return sock

    def curl(self, url: str, *args: str, timeout: float = 20.0) -> bytes:
        """The body of ``url`` fetched with curl from this namespace (fails on HTTP errors)."""
        argv = ["curl", "-sS", "--fail", "--max-time", f"{timeout:g}", "-o", "-", *args, url]
        return bytes(self.run(argv, text=False, timeout=timeout + 5).stdout)

    def add_vip_on_lo(self, vip: str, arp: bool = True) -> None:
        """Hold ``vip``/32 on ``lo`` (DSR rewrite=mac servers); with ``arp``, never answer ARP for it
        (``arp_ignore=1``, ``arp_announce=2`` on all and the main interface)."""
        if arp:
            for conf in ("all", self.iface):
                self.sysctl(f"net.ipv4.conf.{conf}.arp_ignore", 1)
                self.sysctl(f"net.ipv4.conf.{conf}.arp_announce", 2)
        with self.iproute() as ipr:
            ipr.addr("replace", index=ipr.link_lookup(ifname="lo")[0], address=vip, prefixlen=32)

    def pids(self) -> list[int]:
        return namespace_pids(self.ns)


# -- the bed -------------------------------------------------------------------------------------------------


_live_beds: weakref.WeakSet[Testbed] = weakref.WeakSet()


@dataclass(eq=False)
class Testbed:
    __test__ = False  # not a pytest test class

    kind: str
    tag: str
    client: Host
    lb: Host
    servers: list[Host]
    vip: str
    bridge: Host | None = None
    namespaces: list[str] = field(default_factory=list)
    processes: list[subprocess.Popen[Any]] = field(default_factory=list)
    logdir: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="cvy-bed-")))

    # construction

    @classmethod
    def create(
        cls, kind: str = "routed", servers: int = 2, vip: str | None = None, prefix: str = PREFIX
    ) -> Testbed:
        """Build a bed; everything half-built is removed again if this fails."""
        if kind not in ("routed", "l2"):
            raise ValueError(f"kind must be 'routed' or 'l2', got {kind!r}")
        if not 1 <= servers <= MAX_SERVERS:
            raise ValueError(f"servers must be 1..{MAX_SERVERS}, got {servers}")
        if vip is not None and ipaddress.IPv4Address(vip) not in ipaddress.IPv4Network("198.18.0.0/15"):
            raise ValueError(f"the VIP must be in 198.18.0.0/15, got {vip}")
        tag = secrets.token_hex(3)
        placeholder = Host("", "", "", "", "")
        bed = cls(kind, tag, placeholder, placeholder, [], vip or "")
        _live_beds.add(bed)
        try:
            if kind == "routed":
                bed._build_routed(servers, vip, prefix)
            else:
                bed._build_l2(servers, vip, prefix)
        except BaseException:
            bed.destroy()
            raise
        return bed

    def _new_ns(self, prefix: str, role: str) -> str:
        name = f"{prefix}{self.tag}-{role}"
        self.namespaces.append(name)  # before creating: destroy() copes with it not existing
        netns.create(name)
        self._prepare_ns(name)
        return name

    @staticmethod
    def _prepare_ns(name: str) -> None:
        with IPRoute(netns=name) as ipr:
            ipr.link("set", index=ipr.link_lookup(ifname="lo")[0], state="up")
        settings = [
            "net.ipv6.conf.all.disable_ipv6=1",
            "net.ipv6.conf.default.disable_ipv6=1",
        ]
        subprocess.run(
            ns_exec(name, ["sysctl", "-q", "-w", *settings]), check=True, capture_output=True, timeout=10
        )

    def _host(self, role: str, ns: str, iface: str) -> Host:
        host = Host(role, ns, "", iface, "", bed=self)
        host.links = _links(ns)
        main = next(link for link in host.links if link.iface == iface)
        host.addr, host.mac = main.addr, main.mac
        return host

    def _build_routed(self, servers: int, vip: str | None, prefix: str) -> None:
        client_ns = self._new_ns(prefix, "client")
        lb_ns = self._new_ns(prefix, "lb")
        server_ns = [self._new_ns(prefix, f"s{i}") for i in range(servers)]
        with IPRoute(netns=lb_ns) as ipr:
            _veth(ipr, "c0", client_ns, "eth0")
            _address(ipr, "c0", f"{ROUTED_CLIENT_NET}.1", 24)
            for i, ns in enumerate(server_ns):
                _veth(ipr, f"s{i}", ns, "eth0")
                _address(ipr, f"s{i}", f"198.18.{1 + i}.1", 24)
            if vip and vip != f"{ROUTED_CLIENT_NET}.1":
                _address(ipr, "c0", vip, 32)
        with IPRoute(netns=client_ns) as ipr:
            _address(ipr, "eth0", f"{ROUTED_CLIENT_NET}.2", 24)
            _up_and_route(ipr, "eth0", f"{ROUTED_CLIENT_NET}.1")
        for i, ns in enumerate(server_ns):
            with IPRoute(netns=ns) as ipr:
                _address(ipr, "eth0", f"198.18.{1 + i}.2", 24)
                _up_and_route(ipr, "eth0", f"198.18.{1 + i}.1")
        with IPRoute(netns=lb_ns) as ipr:
            for name in ["c0", *(f"s{i}" for i in range(servers))]:
                _up_and_route(ipr, name, None)
        subprocess.run(
            ns_exec(lb_ns, ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]), check=True, timeout=10
        )
        self.client = self._host("client", client_ns, "eth0")
        self.lb = self._host("lb", lb_ns, "c0")
        self.servers = [self._host(f"server{i}", ns, "eth0") for i, ns in enumerate(server_ns)]
        self.vip = vip or self.lb.addr
        self._wait_carrier()

    def _build_l2(self, servers: int, vip: str | None, prefix: str) -> None:
        bridge_ns = self._new_ns(prefix, "br")
        roles = [("lb", 1), ("client", 2), *((f"s{i}", 11 + i) for i in range(servers))]
        spaces = {role: self._new_ns(prefix, role) for role, _ in roles}
        with IPRoute(netns=bridge_ns) as ipr:
            ipr.link("add", ifname="br0", kind="bridge", br_stp_state=0, br_forward_delay=0)
            bridge = ipr.link_lookup(ifname="br0")[0]
            for role, _ in roles:
                port = f"p-{role}"
                _veth(ipr, port, spaces[role], "eth0")
                ipr.link("set", index=ipr.link_lookup(ifname=port)[0], master=bridge, state="up")
            ipr.link("set", index=bridge, state="up")
        for role, last in roles:
            with IPRoute(netns=spaces[role]) as ipr:
                _address(ipr, "eth0", f"{L2_NET}.{last}", 24)
                if role == "lb":
                    _address(ipr, "eth0", vip or L2_VIP, 32)
                _up_and_route(ipr, "eth0", None)
        subprocess.run(
            ns_exec(spaces["lb"], ["sysctl", "-q", "-w", "net.ipv4.ip_forward=1"]), check=True, timeout=10
        )
        self.bridge = Host("bridge", bridge_ns, "", "br0", _links(bridge_ns, "br0")[0].mac, bed=self)
        self.client = self._host("client", spaces["client"], "eth0")
        self.lb = self._host("lb", spaces["lb"], "eth0")
        self.servers = [self._host(f"server{i}", spaces[f"s{i}"], "eth0") for i in range(servers)]
        self.vip = vip or L2_VIP
        self._wait_carrier()

    def _wait_carrier(self) -> None:
        """Wait until every interface of the bed reports carrier (veth peers up), bounded."""
        for host in self.hosts:
            with host.iproute() as ipr:
                for link in host.links:
                    index = ipr.link_lookup(ifname=link.iface)[0]
                    wait_until(
                        lambda ipr=ipr, index=index: ipr.get_links(index)[0].get_attr("IFLA_CARRIER") == 1,
                        5.0,
                        f"carrier on {host.ns} {link.iface}",
                    )

    # use

    @property
    def hosts(self) -> list[Host]:
        return [self.client, self.lb, *self.servers]

    @property
    def server_addrs(self) -> list[str]:
        return [server.addr for server in self.servers]

    def lb_addr_towards(self, server: int) -> str:
        """The balancer's address on the segment of ``servers[server]`` (passthrough's source address)."""
        if self.kind == "l2":
            return self.lb.addr
        return f"198.18.{1 + server}.1"

    def config_toml(self, mode: str, port: int = 80, server_port: int = 8080, extra: str = "") -> str:
        """A convey config for this bed: one frontend on the VIP, every server in one backend."""
        lines = [
            "[frontends.web]",
            f'listen_addr = "{self.vip}:{port}"',
            'backend = "web_servers"',
            "",
            "[backends.web_servers]",
            "health_check_interval = 1",
        ]
        for i, server in enumerate(self.servers):
            lines += [f"[backends.web_servers.servers.s{i}]", f'addr = "{server.addr}:{server_port}"']
        if mode == "dsr" and "[dsr]" not in extra:
            lines += ["", "[dsr]", f'rewrite = "{"mac" if self.kind == "l2" else "ip"}"']
        return "\n".join([*lines, "", extra, ""])

    # teardown

    def destroy(self) -> None:
        """Kill every process started through the bed or living in its namespaces, delete the namespaces.

        Safe to call twice and on a half-built bed; raises TestbedError at the end if something stays behind.
        """
        _live_beds.discard(self)
        for proc in self.processes:
            _stop(proc)
        self.processes.clear()
        problems = []
        for name in reversed(self.namespaces):
            try:
                delete_namespace(name)
            except Exception as exc:
                problems.append(f"{name}: {exc}")
        self.namespaces.clear()
        shutil.rmtree(self.logdir, ignore_errors=True)
        if problems:
            raise TestbedError("test bed teardown left things behind: " + "; ".join(problems))

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def _links(ns: str, only: str | None = None) -> list[Link]:
    links = []
    with IPRoute(netns=ns) as ipr:
        addrs: dict[int, tuple[str, int]] = {}
        for msg in ipr.get_addr(family=socket.AF_INET):
            addrs.setdefault(msg["index"], (msg.get_attr("IFA_ADDRESS"), msg["prefixlen"]))
        for msg in ipr.get_links():
            name = msg.get_attr("IFLA_IFNAME")
            if name == "lo" or (only and name != only):
                continue
            addr, plen = addrs.get(msg["index"], ("", 0))
            links.append(Link(name, addr, plen, msg.get_attr("IFLA_ADDRESS")))
    return links


def _veth(ipr: Any, name: str, peer_ns: str, peer_name: str) -> None:
    """A veth pair made inside the namespace of ``ipr`` with its peer directly in ``peer_ns``: the host's
    own namespace never sees either end."""
    ipr.link("add", ifname=name, kind="veth", peer={"ifname": peer_name, "net_ns_fd": peer_ns})


def _address(ipr: Any, iface: str, addr: str, prefixlen: int) -> None:
    ipr.addr("add", index=ipr.link_lookup(ifname=iface)[0], address=addr, prefixlen=prefixlen)


def _up_and_route(ipr: Any, iface: str, gateway: str | None) -> None:
    ipr.link("set", index=ipr.link_lookup(ifname=iface)[0], state="up")
    if gateway:
        ipr.route("add", dst="0.0.0.0/0", gateway=gateway)


# -- processes -----------------------------------------------------------------------------------------------


def _stop(proc: subprocess.Popen[Any], grace: float = 3.0) -> None:
    """SIGTERM the process group, SIGKILL it after ``grace`` seconds, reap it."""
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(grace)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(5)
    else:  # the leader is gone, its group may not be
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGKILL)
    for stream in (proc.stdin, proc.stdout, proc.stderr):
        if stream is not None:
            with contextlib.suppress(Exception):
                stream.close()


@dataclass
class HttpServer:
    """tests/netns/httpd.py running in a host of the bed."""

    host: Host
    proc: subprocess.Popen[bytes]
    name: str
    addr: str
    port: int
    log: Path

    def url(self, path: str = "/") -> str:
        return f"http://{self.addr}:{self.port}{path}"

    def stop(self) -> None:
        _stop(self.proc)

    def errors(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def start_httpd(
    host: Host, port: int = 8080, name: str | None = None, bind: str | None = None, timeout: float = 10.0
) -> HttpServer:
    """Start the test HTTP server in ``host`` on ``bind`` (default: the host's address):``port`` and wait
    (at most ``timeout`` s) until it prints READY."""
    name = name or host.role
    bind = bind or host.addr
    logdir = host.bed.logdir if host.bed is not None else Path(tempfile.gettempdir())
    log = logdir / f"httpd-{host.role}-{port}.log"
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    with log.open("wb") as err:
        proc = host.popen(
            [sys.executable, "-m", "tests.netns.httpd", "--bind", f"{bind}:{port}", "--name", name],
            stdout=subprocess.PIPE,
            stderr=err,
            env=env,
        )
    try:
        line = read_line(proc, timeout)
        if not line.startswith("READY"):
            raise TestbedError(f"httpd in {host.ns} did not start: {line!r}")
    except BaseException as exc:
        _stop(proc)
        text = log.read_text(errors="replace").strip()
        if isinstance(exc, TestbedError):
            raise TestbedError(f"{exc}; stderr: {text[-2000:]}") from None
        raise
    bound = line.split()[1] if len(line.split()) > 1 else f"{bind}:{port}"
    addr, _, real_port = bound.rpartition(":")
    return HttpServer(host, proc, name, addr, int(real_port), log)


def read_line(proc: subprocess.Popen[Any], timeout: float) -> str:
    """One line from ``proc``'s stdout pipe, waiting at most ``timeout`` seconds (no blocking readline)."""
    assert proc.stdout is not None
    fd = proc.stdout.fileno()
    deadline = time.monotonic() + timeout
    data = b""
    while b"\n" not in data:
        left = deadline - time.monotonic()
        if left <= 0:
            raise TestbedError(f"no line from {proc.args!r} within {timeout:g}s (got {data!r})")
        ready, _, _ = select.select([fd], [], [], left)
        if ready:
            chunk = os.read(fd, 4096)
            if not chunk:
                raise TestbedError(f"{proc.args!r} exited (status {proc.wait(5)}) before printing a line")
            data += chunk
    return data.split(b"\n", 1)[0].decode(errors="replace")


# -- namespaces ----------------------------------------------------------------------------------------------


def namespace_pids(ns: str) -> list[int]:
    proc = subprocess.run(
        ["ip", "netns", "pids", ns], capture_output=True, text=True, timeout=10, check=False
    )
    return [int(pid) for pid in proc.stdout.split() if pid.isdigit()]


def delete_namespace(name: str) -> None:
    """Kill every process in namespace ``name`` and delete it; fine if it does not exist."""
    if name not in netns.listnetns():
        return
    for _ in range(3):  # processes may fork while we kill
        pids = namespace_pids(name)
        if not pids:
            break
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        wait_until(
            lambda killed=set(pids): not set(namespace_pids(name)) & killed,
            5.0,
            f"processes in {name} to die",
        )
    netns.remove(name)
    # State files convey's rules and the DSR backend script keep per namespace.
    (CONVEY_STATE_DIR / f"{name}.json").unlink(missing_ok=True)
    (CONVEY_STATE_DIR / "backend-nat" / f"{name}.json").unlink(missing_ok=True)


def cleanup_leftovers(prefix: str = PREFIX) -> list[str]:
    """Delete every namespace named ``prefix...`` (killing its processes); returns their names."""
    if not prefix:
        raise ValueError("refusing to delete every namespace: give a prefix")
    removed = []
    for name in sorted(netns.listnetns()):
        if name.startswith(prefix):
            delete_namespace(name)
            removed.append(name)
    return removed


_CREATOR_PID = os.getpid()


@atexit.register
def _destroy_live_beds() -> None:
    # pyroute2 forks helper processes for namespace work; when one of them exits through normal interpreter
    # shutdown it runs atexit handlers too and must not tear down the parent's beds while they are in use.
    if os.getpid() != _CREATOR_PID:
        return
    for bed in list(_live_beds):
        with contextlib.suppress(Exception):
            bed.destroy()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.netns.testbed", description="convey's namespace test bed"
    )
    sub = parser.add_subparsers(dest="command", required=True)
    clean = sub.add_parser("clean", help="delete leftover test namespaces and kill the processes inside them")
    clean.add_argument("--prefix", default=PREFIX, help=f"namespace name prefix (default {PREFIX})")
    sub.add_parser("list", help="list test namespaces")
    args = parser.parse_args(argv)
    if args.command == "list":
        for name in sorted(netns.listnetns()):
            if name.startswith(PREFIX):
                print(name, " ".join(map(str, namespace_pids(name))))
        return 0
    if os.geteuid() != 0:
        print("clean needs root", file=sys.stderr)
        return 1
    for name in cleanup_leftovers(args.prefix):
        print(f"removed {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
