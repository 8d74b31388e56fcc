"""One namespace of a test bed, as a :class:`Host`: run commands and Python in it, open sockets from it, set its
sysctls, talk netlink to it."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from pyroute2 import IPRoute, netns

from testbed.namespaces import namespace_pids, ns_exec
from testbed.process import REPO_ROOT, TestbedError, python_env

if TYPE_CHECKING:
    from testbed.bed import Testbed

Socket = socket.socket  # the method Host.socket hides the module's name inside the class


class CommandError(TestbedError):
    def __init__(self, ns: str, argv: Sequence[str], returncode: int, stdout: Any, stderr: Any) -> None:
        self.ns = ns
        self.argv = list(argv)
        self.returncode = returncode
        self.stdout = stdout
        self.stderr = stderr
        err = stderr.decode(errors="replace") if isinstance(stderr, bytes) else (stderr or "")
        super().__init__(f"[{ns}] {' '.join(self.argv)} exited with {returncode}: {err.strip()[-2000:]}")


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
        env = python_env(kwargs.pop("env", None))
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

    def socket(self, family: int = socket.AF_INET, type: int = socket.SOCK_STREAM) -> Socket:
        """A socket created in this namespace, usable from this process (connect, bind, ...)."""
        sock: Socket = netns.create_socket(self.ns, family, type)
        return sock

    def connect(self, addr: str, port: int, timeout: float = 10.0) -> Socket:
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
