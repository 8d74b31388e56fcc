"""The bed itself: a client, a balancer and N servers in namespaces wired with veth pairs (root only).

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
:func:`testbed.httpd_proc.start_httpd`) and every process left in its namespaces is killed by
:meth:`Testbed.destroy`, which tolerates a half-built bed and runs at interpreter exit for any bed not destroyed.
IPv6 is disabled in the namespaces so no stray router solicitations or MLD reports show up in packet captures.
"""

from __future__ import annotations

import atexit
import contextlib
import functools
import ipaddress
import os
import secrets
import shutil
import socket
import subprocess
import tempfile
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyroute2 import IPRoute, netns

from testbed.host import Host, Link
from testbed.namespaces import PREFIX, delete_namespace, ns_exec
from testbed.process import TestbedError, stop_process, wait_until

ROUTED_CLIENT_NET = "198.18.0"
L2_NET = "198.19.0"
L2_VIP = "198.19.0.100"
MAX_SERVERS = 200

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
                        functools.partial(has_carrier, ipr, index), 5.0, f"carrier on {host.ns} {link.iface}"
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
        release(self.processes, self.namespaces, self.logdir, "test bed")

    def __enter__(self) -> Testbed:
        return self

    def __exit__(self, *exc: object) -> None:
        self.destroy()


def release(processes: list[Any], namespaces: list[str], logdir: Path, what: str) -> None:
    """Stop ``processes``, delete ``namespaces`` (last made first) and ``logdir``; every step is tried, and a
    TestbedError at the end names what stayed behind. Empties both lists."""
    for proc in processes:
        stop_process(proc)
    processes.clear()
    problems = []
    for name in reversed(namespaces):
        try:
            delete_namespace(name)
        except Exception as exc:
            problems.append(f"{name}: {exc}")
    namespaces.clear()
    shutil.rmtree(logdir, ignore_errors=True)
    if problems:
        raise TestbedError(f"{what} teardown left things behind: " + "; ".join(problems))


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


def has_carrier(ipr: Any, index: int) -> bool:
    """Whether the interface ``index`` of ``ipr``'s namespace reports carrier (its veth peer is up)."""
    return bool(ipr.get_links(index)[0].get_attr("IFLA_CARRIER") == 1)


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
