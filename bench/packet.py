#!/usr/bin/env python3
"""Packet-path benchmark: convey's passthrough handler against an accept-only NFQUEUE loop and kernel forwarding.

    sudo python bench/packet.py [--quick] [--seconds N] [--rounds N] [--json FILE]

Builds a routed namespace test bed (tests/netns/testbed.py: client -- lb -- server, all in 198.18.0.0/15; the
host's own namespace is never touched) and measures, in one run:

* packets/s through an **accept-only** NFQUEUE loop: a tiny program bound to convey's queue with convey's own
  rules and binding parameters (same queue length, copy range and socket buffer) that reads with
  ``run(block=False)``, the cheapest read loop the binding has, and whose callback only counts and accepts. That
  is the ceiling for any userspace verdict path.
* packets/s through **convey's passthrough handler**: the real ``convey --passthrough`` process, counted from its
  /stats verdict counters.

  Both get the same load: a blaster in the client namespace writes prebuilt Ethernet frames to an AF_PACKET
  socket, as fast as one Python loop can: TCP segments (ACK|PSH, 17 bytes of payload) of 64 connections from the
  client to the VIP. For convey those 64 connections are real and established through it (opened before the
  blast, from the same fixed ports), so every frame takes its hot path: lookup, rewrite, ``set_payload``,
  accept. Without convey nothing rewrites them and they go to the VIP, a local address. Either way the packets
  die right after the verdict: one iptables rule drops IP packets of exactly that length in INPUT (accept-only)
  and FORWARD (convey), so the server is not involved (the kernel still does a little more for convey's
  packets: the rewrite is copied back, and forwarding costs more than local delivery).
  The verdict process runs on the last CPU, the blaster (with the kernel's work of sending and queueing its
  packets) on the first. Packets/s counts verdicts at the queue side between the start of the blast and the
  moment the program answers after it (that is, once the queue has drained); the program's CPU time gives CPU
  microseconds per packet (user and system), which depends less on other load than packets/s does. The kernel's
  queue drop counter shows whether the handler was saturated (drops > 0: the blaster offered more than it could
  take; no drops: the blaster was the limit and the figure is a lower bound).
* TCP bulk Mbit/s (one stream, server -> client, for a fixed time) and connections/s (concurrent short
  connections: connect, 32-byte request, 32-byte reply, the server closes) **through convey** (client -> VIP)
  against **plain kernel forwarding** (client -> server directly, routed by the balancer namespace with no rule
  and no queue).

Prints a table and the ratios convey/accept-only packets/s, convey/kernel bulk and convey/kernel connections/s.
Each measurement is a function taking the bed and a data path (``KernelPath``, ``AcceptOnlyPath``,
``ConveyPath``), so DSR rows can be added as one more path. Every loop is bounded in count and time; every
process and namespace is removed on exit, on failure and on Ctrl-C. On a shared or small machine the figures are
noisy (the load generators share the CPUs with what they measure): compare ratios from one run, not absolute
numbers across runs.

Internal child roles (run inside the namespaces): ``_accept_only``, ``_blast``, ``_flows``, ``_source``,
``_rr_server``, ``_bulk_client``, ``_rr_client``.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import functools
import json
import os
import select
import signal
import socket
import statistics
import struct
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from convey.packet.checksum import internet_checksum, ip_header_checksum  # noqa: E402
from tests.netns.convey_proc import ConveyProcess  # noqa: E402
from tests.netns.testbed import Host, Testbed, read_line  # noqa: E402

VIP_WEB_PORT = 80  # frontend for short connections -> server RR_PORT
VIP_BULK_PORT = 81  # frontend for bulk -> server SOURCE_PORT
RR_PORT = 8080
SOURCE_PORT = 9000
QUEUE_MAXLEN = 8192  # as convey.dataplane.nfqueue
COPY_RANGE = 4016
SOCK_RCVBUF = 8 * 1024 * 1024
BLAST_FLOWS = 64
BLAST_SPORT = 45000
BLAST_PAYLOAD = b"convey-bench-pps!"  # 17 bytes: IP length 57, which the drop rules match
BLAST_LENGTH = 20 + 20 + len(BLAST_PAYLOAD)
MAX_BLAST_PACKETS = 50_000_000
MAX_CONNECTIONS = 20_000  # per connections/s run: within convey's fresh ephemeral ports for one server
REQUEST = b"Q" * 32
REPLY = b"R" * 32
CHUNK = 256 * 1024


# ---------------------------------------------------------------------------------------------------------------
# child roles (each runs inside one namespace of the bed)
# ---------------------------------------------------------------------------------------------------------------


def role_accept_only(queue_num: int, max_seconds: float) -> None:
    """Bind the queue like convey does; accept every packet. A line on stdin -> print the count."""
    from netfilterqueue import NetfilterQueue

    count = 0

    def callback(pkt: Any) -> None:
        nonlocal count
        count += 1
        pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(queue_num, callback, max_len=QUEUE_MAXLEN, range=COPY_RANGE, sock_len=SOCK_RCVBUF)
    fd = nfq.get_fd()
    print("ready", flush=True)
    end = time.monotonic() + max_seconds
    try:
        while time.monotonic() < end:
            readable, _, _ = select.select([fd, sys.stdin], [], [], 1.0)
            if fd in readable:
                nfq.run(block=False)
            if sys.stdin in readable:
                if sys.stdin.readline().strip() in ("", "stop"):
                    break
                print(count, flush=True)
    finally:
        nfq.unbind()


def role_blast(iface: str, seconds: float) -> None:
    """Frames (hex, one JSON list on stdin) to an AF_PACKET socket in a tight loop for ``seconds``."""
    frames = [bytes.fromhex(h) for h in json.loads(sys.stdin.readline())]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    send = sock.send
    print("ready", flush=True)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while sent < MAX_BLAST_PACKETS:
        for frame in frames:
            send(frame)
        sent += len(frames)
        if time.monotonic() >= end:
            break
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


def role_flows(vip: str, port: int, first_sport: int, count: int, max_seconds: float) -> None:
    """Open ``count`` connections from fixed source ports; print ready; hold them until stdin says stop; then
    reset them (SO_LINGER 0: no TIME_WAIT on the client, so the ports are free for the next run)."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", first_sport + i))
        sock.settimeout(5)
        sock.connect((vip, port))
        socks.append(sock)
    print("ready", flush=True)
    select.select([sys.stdin], [], [], max_seconds)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    print("closed", flush=True)


def role_source(addr: str, port: int) -> None:
    """Bulk source: for each connection, send zeros until the peer goes away (one thread per connection)."""
    import threading

    data = memoryview(bytes(CHUNK))
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind((addr, port))
    listener.listen(128)

    def serve(conn: socket.socket) -> None:
        with conn, contextlib.suppress(OSError):
            if conn.recv(16) != b"stream\n":
                return
            deadline = time.monotonic() + 120
            while time.monotonic() < deadline:
                conn.sendall(data)

    print("ready", flush=True)
    while True:
        conn, _ = listener.accept()
        threading.Thread(target=serve, args=(conn,), daemon=True).start()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop

        return uvloop.new_event_loop()
    except ImportError:
        return asyncio.new_event_loop()


class _RRServer(asyncio.Protocol):
    def connection_made(self, transport: Any) -> None:
        self.transport = transport
        self.got = 0

    def data_received(self, data: bytes) -> None:
        self.got += len(data)
        if self.got >= len(REQUEST):
            self.transport.write(REPLY)
            self.transport.close()  # the server closes first: TIME_WAIT stays on the server


def role_rr_server(addr: str, port: int) -> None:
    loop = _new_loop()
    server = loop.run_until_complete(
        loop.create_server(_RRServer, addr, port, backlog=4096, reuse_address=True)
    )
    print("ready", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()


def role_bulk_client(addr: str, port: int, seconds: float) -> None:
    """One stream: receive for ``seconds`` (after a short warm-up) and report bytes and time."""
    buf = bytearray(CHUNK)
    with socket.create_connection((addr, port), timeout=10) as sock:
        sock.sendall(b"stream\n")
        warm_end = time.monotonic() + min(0.3, seconds / 4)
        while time.monotonic() < warm_end:
            if not sock.recv_into(buf):
                raise SystemExit("the source closed during warm-up")
        received = 0
        start = time.monotonic()
        end = start + seconds
        while (now := time.monotonic()) < end:
            n = sock.recv_into(buf)
            if not n:
                raise SystemExit("the source closed early")
            received += n
    print(json.dumps({"bytes": received, "seconds": now - start}), flush=True)


def role_rr_client(addr: str, port: int, seconds: float, concurrency: int, limit: int) -> None:
    """``concurrency`` connections at a time: connect, send 32 bytes, read the reply to EOF, close."""

    class Client(asyncio.Protocol):
        def __init__(self, done: asyncio.Future[bool]) -> None:
            self.done = done
            self.got = 0

        def connection_made(self, transport: Any) -> None:
            transport.write(REQUEST)

        def data_received(self, data: bytes) -> None:
            self.got += len(data)

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.done.done():
                self.done.set_result(exc is None and self.got == len(REPLY))

    counts = {"ok": 0, "errors": 0, "started": 0}

    async def worker(end: float) -> None:
        loop = asyncio.get_running_loop()
        while time.monotonic() < end and counts["started"] < limit:
            counts["started"] += 1
            done: asyncio.Future[bool] = loop.create_future()
            try:
                await asyncio.wait_for(loop.create_connection(functools.partial(Client, done), addr, port), 5)
                ok = await asyncio.wait_for(done, 5)
            except (OSError, TimeoutError):
                ok = False
            counts["ok" if ok else "errors"] += 1

    async def main() -> float:
        start = time.monotonic()
        await asyncio.gather(*(worker(start + seconds) for _ in range(concurrency)))
        return time.monotonic() - start

    loop = _new_loop()
    elapsed = loop.run_until_complete(main())
    print(json.dumps({**counts, "seconds": elapsed}), flush=True)


ROLES: dict[str, tuple[Callable[..., None], tuple[type, ...]]] = {
    "_accept_only": (role_accept_only, (int, float)),
    "_blast": (role_blast, (str, float)),
    "_flows": (role_flows, (str, int, int, int, float)),
    "_source": (role_source, (str, int)),
    "_rr_server": (role_rr_server, (str, int)),
    "_bulk_client": (role_bulk_client, (str, int, float)),
    "_rr_client": (role_rr_client, (str, int, float, int, int)),
}


def child(argv: list[str]) -> int:
    func, types = ROLES[argv[0]]
    func(*(t(a) for t, a in zip(types, argv[1:], strict=True)))
    return 0


# ---------------------------------------------------------------------------------------------------------------
# the bed and the data paths
# ---------------------------------------------------------------------------------------------------------------


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
    return env


def spawn(
    host: Host, role: str, *args: Any, ready: bool = True, stdin: bool = False
) -> subprocess.Popen[bytes]:
    """Start one of this script's roles in ``host``'s namespace (the bed kills it on destroy)."""
    proc: subprocess.Popen[bytes] = host.popen(
        [sys.executable, str(Path(__file__).resolve()), role, *map(str, args)],
        stdin=subprocess.PIPE if stdin else subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=_env(),
    )
    if ready:
        line = read_line(proc, 20)
        if line != "ready":
            raise RuntimeError(f"{role} did not start: {line!r}")
    return proc


def ask(proc: subprocess.Popen[bytes], line: str, timeout: float) -> str:
    assert proc.stdin is not None
    proc.stdin.write(line.encode() + b"\n")
    proc.stdin.flush()
    return read_line(proc, timeout)


def result_of(proc: subprocess.Popen[bytes], timeout: float) -> dict[str, Any]:
    """The JSON line a role prints at its end."""
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise RuntimeError(f"{proc.args!r} did not finish within {timeout:g}s") from None
    if proc.returncode != 0:
        raise RuntimeError(
            f"{proc.args!r} failed ({proc.returncode}): {err.decode(errors='replace')[-2000:]}"
        )
    doc: dict[str, Any] = json.loads(out.decode().strip().splitlines()[-1])
    return doc


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def config_text(bed: Testbed) -> str:
    server = bed.servers[0].addr
    return f"""
[frontends.web]
listen_addr = "{bed.vip}:{VIP_WEB_PORT}"
backend = "rr"
[frontends.bulk]
listen_addr = "{bed.vip}:{VIP_BULK_PORT}"
backend = "bulk"
[backends.rr]
health_check_interval = 2
[backends.rr.servers.s0]
addr = "{server}:{RR_PORT}"
[backends.bulk]
health_check_interval = 2
[backends.bulk.servers.s0]
addr = "{server}:{SOURCE_PORT}"
[passthrough]
fin_linger = 0.5
"""


def queue_drops(lb: Host, queue_num: int = 0) -> int:
    """The kernel's drop counters for the queue (queue full + netlink socket full)."""
    text = lb.run(["cat", "/proc/net/netfilter/nfnetlink_queue"], check=False).stdout
    for line in text.splitlines():
        fields = line.split()
        if len(fields) >= 7 and fields[0] == str(queue_num):
            return int(fields[5]) + int(fields[6])
    return 0


class DataPath:
    """One way through the balancer namespace. ``target(service)`` is where clients connect."""

    name = "?"

    def __init__(self, bed: Testbed) -> None:
        self.bed = bed

    def target(self, service: str) -> tuple[str, int]:
        raise NotImplementedError

    def verdicts(self, timeout: float = 60.0) -> int:
        """Packets given a verdict so far."""
        raise NotImplementedError

    @property
    def pid(self) -> int:
        """The process giving the verdicts."""
        raise NotImplementedError

    def prepare_blast(self) -> None:
        """Before a blast: make the blasted flows whatever this path needs them to be."""

    def end_blast(self) -> None:
        """After a blast."""

    def close(self) -> None:
        pass

    def __enter__(self) -> DataPath:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class KernelPath(DataPath):
    """Plain routing through the balancer namespace: no rule, no queue."""

    name = "kernel forwarding"

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.servers[0].addr, RR_PORT if service == "rr" else SOURCE_PORT


def stop(proc: subprocess.Popen[bytes], timeout: float = 5.0) -> None:
    """End a child: EOF on its stdin (roles that read it finish), then SIGTERM, then SIGKILL."""
    with contextlib.suppress(OSError):
        if proc.stdin is not None:
            proc.stdin.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout)
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout)


class AcceptOnlyPath(DataPath):
    """convey's rules (installed with ``convey rules install``), with the accept-only loop bound to the queue."""

    name = "accept-only loop"

    def __init__(self, bed: Testbed, max_seconds: float) -> None:
        super().__init__(bed)
        self.config = bed.logdir / "accept-only.toml"
        self.config.write_text(config_text(bed))
        self._rules("install", "--passthrough")
        self.proc: subprocess.Popen[bytes] | None = spawn(bed.lb, "_accept_only", 0, max_seconds, stdin=True)

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_WEB_PORT if service == "rr" else VIP_BULK_PORT

    def verdicts(self, timeout: float = 60.0) -> int:
        assert self.proc is not None
        return int(ask(self.proc, "count", timeout))

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def _rules(self, *action: str) -> None:
        self.bed.lb.run(
            [sys.executable, "-m", "convey", "rules", *action, f"--config={self.config}"], env=_env()
        )

    def close(self) -> None:
        if self.proc is not None:
            stop(self.proc)
            self.proc = None
            self._rules("remove")


class ConveyPath(DataPath):
    """The real ``convey --passthrough`` process, rules installed by it (``--install-rules``)."""

    name = "convey passthrough"

    def __init__(self, bed: Testbed) -> None:
        super().__init__(bed)
        self.convey: Any = ConveyProcess(bed, config_text(bed), name="bench-convey").start()
        self._flows: subprocess.Popen[bytes] | None = None

    def target(self, service: str) -> tuple[str, int]:
        return self.bed.vip, VIP_WEB_PORT if service == "rr" else VIP_BULK_PORT

    def verdicts(self, timeout: float = 60.0) -> int:
        doc = self.convey.stats(timeout=timeout)
        v = doc["packet"]["verdicts"]
        return int(v["ingress_accepted"] + v["ingress_dropped"] + v["egress_accepted"] + v["egress_dropped"])

    @property
    def pid(self) -> int:
        return int(self.convey.proc.pid)

    def prepare_blast(self) -> None:
        """The blasted connections, established through convey, so every frame is a packet of a known flow."""
        self._flows = spawn(self.bed.client, "_flows", self.bed.vip, VIP_WEB_PORT, BLAST_SPORT, BLAST_FLOWS, 120,
                            stdin=True)  # fmt: skip
        flows = self.convey.stats()["packet"]["flows"]
        if flows < BLAST_FLOWS:
            raise RuntimeError(f"convey tracks {flows} flows, expected at least {BLAST_FLOWS}")

    def end_blast(self) -> None:
        if self._flows is not None:
            ask(self._flows, "stop", 20)
            self._flows.wait(10)
            self._flows = None

    def close(self) -> None:
        self.end_blast()
        self.convey.stop()


# ---------------------------------------------------------------------------------------------------------------
# measurements
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Pps:
    pps: float
    cpu_us: float  # CPU microseconds of the verdict process per packet
    user_us: float  # of which in user space
    offered: float  # packets/s the blaster sent
    drops: int  # kernel queue drops during the blast

    def show(self) -> str:
        return f"{self.pps:,.0f}"


def blast_frames(bed: Testbed) -> list[bytes]:
    """Ethernet frames: client -> VIP:80, ACK|PSH, 17 bytes of payload, from the BLAST_FLOWS fixed ports."""

    def mac(text: str) -> bytes:
        return bytes.fromhex(text.replace(":", ""))

    frames = []
    src, dst = socket.inet_aton(bed.client.addr), socket.inet_aton(bed.vip)
    for i in range(BLAST_FLOWS):
        tcp = bytearray(struct.pack("!HHIIBBHHH", BLAST_SPORT + i, VIP_WEB_PORT, 1_000_000, 2_000_000, 0x50,
                                    0x18, 65535, 0, 0) + BLAST_PAYLOAD)  # fmt: skip
        ip = bytearray(struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + len(tcp), i, 0x4000, 64, 6, 0, src, dst))
        struct.pack_into("!H", ip, 10, ip_header_checksum(ip))
        pseudo = src + dst + struct.pack("!HH", 6, len(tcp))
        struct.pack_into("!H", tcp, 16, internet_checksum(pseudo + tcp))
        frames.append(mac(bed.lb.mac) + mac(bed.client.mac) + b"\x08\x00" + ip + tcp)
    return frames


def pin(pid: int, cpu: int) -> None:
    """Keep a process (all its threads) on one CPU, when the machine has more than one."""
    if (os.cpu_count() or 1) < 2:
        return
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            os.sched_setaffinity(int(tid), {cpu})


def measure_pps(bed: Testbed, path: DataPath, frames: list[bytes], seconds: float) -> Pps:
    """Verdicts/s at the queue while the blaster runs for ``seconds`` (see the module doc). The verdict process
    runs on the last CPU, the blaster (and the kernel work of sending and queueing its packets) on the first."""
    path.prepare_blast()
    last_cpu = (os.cpu_count() or 1) - 1
    pin(path.pid, last_cpu)
    try:
        count0, cpu0 = path.verdicts(), cpu_seconds(path.pid)
        drops0 = queue_drops(bed.lb)
        blaster = spawn(bed.client, "_blast", "eth0", seconds, ready=False, stdin=True)
        assert blaster.stdin is not None
        pin(blaster.pid, 0)
        blaster.stdin.write(json.dumps([f.hex() for f in frames]).encode() + b"\n")
        blaster.stdin.flush()
        if read_line(blaster, 20) != "ready":
            raise RuntimeError("the blaster did not start")
        started = time.monotonic()
        sent = result_of(blaster, seconds + 30)
        count1 = path.verdicts()  # answered once the queue has drained
        cpu1 = cpu_seconds(path.pid)
        elapsed = time.monotonic() - started
        drops = queue_drops(bed.lb) - drops0
    finally:
        path.end_blast()
    packets = count1 - count0
    if packets <= 0:
        raise RuntimeError(f"{path.name}: no packet got a verdict")
    user, system = cpu1[0] - cpu0[0], cpu1[1] - cpu0[1]
    return Pps(
        packets / elapsed,
        (user + system) * 1e6 / packets,
        user * 1e6 / packets,
        sent["sent"] / sent["seconds"],
        drops,
    )


def measure_bulk(bed: Testbed, path: DataPath, seconds: float) -> float:
    """Mbit/s of one TCP stream server -> client through ``path``."""
    addr, port = path.target("bulk")
    result = result_of(spawn(bed.client, "_bulk_client", addr, port, seconds, ready=False), seconds + 30)
    return float(result["bytes"]) * 8 / float(result["seconds"]) / 1e6


def measure_conns(bed: Testbed, path: DataPath, seconds: float, concurrency: int) -> tuple[float, int]:
    """(connections/s, failed connections) for short connections through ``path``."""
    addr, port = path.target("rr")
    proc = spawn(bed.client, "_rr_client", addr, port, seconds, concurrency, MAX_CONNECTIONS, ready=False)
    result = result_of(proc, seconds + 60)
    return result["ok"] / result["seconds"], int(result["errors"])


# ---------------------------------------------------------------------------------------------------------------
# the run
# ---------------------------------------------------------------------------------------------------------------


@dataclass
class Results:
    pps: dict[str, list[Pps]] = field(default_factory=dict)
    bulk: dict[str, float] = field(default_factory=dict)
    conns: dict[str, tuple[float, int]] = field(default_factory=dict)


def bench(args: argparse.Namespace) -> Results:
    results = Results()
    bed = Testbed.create(kind="routed", servers=1)
    try:
        spawn(bed.servers[0], "_rr_server", bed.servers[0].addr, RR_PORT)
        spawn(bed.servers[0], "_source", bed.servers[0].addr, SOURCE_PORT)
        # blasted packets die right after the verdict, the same way on both paths
        for chain in ("INPUT", "FORWARD"):
            bed.lb.run(["iptables", "-A", chain, "-p", "tcp", "-m", "length", "--length", str(BLAST_LENGTH),
                        "-j", "DROP"])  # fmt: skip
        frames = blast_frames(bed)
        say = progress()

        with KernelPath(bed) as kernel:
            say("kernel forwarding: bulk")
            results.bulk[kernel.name] = measure_bulk(bed, kernel, args.seconds)
            say("kernel forwarding: connections")
            results.conns[kernel.name] = measure_conns(bed, kernel, args.seconds, args.concurrency)
        for round_ in range(args.rounds):
            paths: list[Callable[[], DataPath]] = [
                functools.partial(AcceptOnlyPath, bed, 600),
                functools.partial(ConveyPath, bed),
            ]
            for make in paths if round_ % 2 == 0 else paths[::-1]:
                with make() as path:
                    say(f"round {round_ + 1}: {path.name}: packets/s")
                    results.pps.setdefault(path.name, []).append(measure_pps(bed, path, frames, args.seconds))
                    if isinstance(path, ConveyPath) and path.name not in results.bulk:
                        say("convey passthrough: bulk")
                        results.bulk[path.name] = measure_bulk(bed, path, args.seconds)
                        say("convey passthrough: connections")
                        results.conns[path.name] = measure_conns(bed, path, args.seconds, args.concurrency)
    finally:
        bed.destroy()
    return results


def progress() -> Any:
    """A function printing a progress line with the time since this call, on stderr."""
    started = time.monotonic()

    def say(text: str) -> None:
        print(f"  [{time.monotonic() - started:5.1f}s] {text}", file=sys.stderr, flush=True)

    return say


def report(results: Results) -> str:
    accept, convey = "accept-only loop", "convey passthrough"
    kernel = "kernel forwarding"
    lines = ["| path | packets/s | CPU us/packet (user) | offered pkt/s | queue drops | bulk Mbit/s | conn/s |",
             "|---|---:|---:|---:|---:|---:|---:|"]  # fmt: skip

    def median(name: str) -> Pps | None:
        runs = results.pps.get(name)
        if not runs:
            return None
        return Pps(
            statistics.median(r.pps for r in runs),
            statistics.median(r.cpu_us for r in runs),
            statistics.median(r.user_us for r in runs),
            statistics.median(r.offered for r in runs),
            sum(r.drops for r in runs),
        )

    for name in (kernel, accept, convey):
        p = median(name)
        cells = (
            [f"{p.pps:,.0f}", f"{p.cpu_us:.2f} ({p.user_us:.2f})", f"{p.offered:,.0f}", f"{p.drops:,}"]
            if p
            else ["-"] * 4
        )
        bulk = results.bulk.get(name)
        conns = results.conns.get(name)
        cells.append(f"{bulk:,.0f}" if bulk is not None else "-")
        cells.append(f"{conns[0]:,.0f}" + (f" ({conns[1]} failed)" if conns[1] else "") if conns else "-")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines.append("")
    a, c = median(accept), median(convey)
    if a and c:
        lines.append(f"convey / accept-only packets/s:   {c.pps / a.pps:.2f}x   (target >= 0.8x)")
        lines.append(f"accept-only / convey CPU/packet:  {a.cpu_us / c.cpu_us:.2f}x")
        for name in (accept, convey):
            if not results.pps[name] or all(r.drops == 0 for r in results.pps[name]):
                lines.append(
                    f"  note: no queue drops for {name}: the blaster, not the handler, was the limit"
                )
        if len(results.pps[accept]) > 1:
            lines.append(
                "  rounds, packets/s: "
                + "; ".join(
                    f"{name} " + ", ".join(f"{r.pps:,.0f}" for r in results.pps[name])
                    for name in (accept, convey)
                )
            )
    if convey in results.bulk and kernel in results.bulk:
        lines.append(f"convey / kernel bulk Mbit/s:      {results.bulk[convey] / results.bulk[kernel]:.2f}x")
    if convey in results.conns and kernel in results.conns:
        lines.append(
            f"convey / kernel connections/s:    {results.conns[convey][0] / results.conns[kernel][0]:.2f}x"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0].startswith("_"):
        return child(argv)
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="shorter measurements, one packets/s round")
    parser.add_argument("--seconds", type=float, help="seconds per measurement (default 3, quick 1.5)")
    parser.add_argument(
        "--rounds", type=int, help="packets/s rounds per path, alternating (default 3, quick 1)"
    )
    parser.add_argument(
        "--concurrency", type=int, default=32, help="concurrent short connections (default 32)"
    )
    parser.add_argument("--json", type=Path, help="also write the results to this JSON file")
    parser.add_argument(
        "--no-dsr",
        action="store_true",
        help="skip the DSR vs passthrough part (bench/dsr.py, an L2 test bed)",
    )
    args = parser.parse_args(argv)
    args.seconds = args.seconds or (1.5 if args.quick else 3.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    if not 0.5 <= args.seconds <= 20 or not 1 <= args.rounds <= 5:
        parser.error("--seconds must be 0.5..20 and --rounds 1..5")
    if os.geteuid() != 0:
        print("bench/packet.py builds network namespaces: run it as root", file=sys.stderr)
        return 1

    main_pid = os.getpid()

    def on_term(signum: int, frame: Any) -> None:
        if os.getpid() != main_pid:  # a forked helper (pyroute2 forks for namespace work): just go
            os._exit(128 + signum)
        raise KeyboardInterrupt  # clean up as on Ctrl-C

    signal.signal(signal.SIGTERM, on_term)
    print(
        f"convey packet-path benchmark: {args.seconds:g}s per measurement, {args.rounds} packets/s round(s), "
        f"{os.cpu_count()} CPUs (load generators share them with what they measure)",
        file=sys.stderr,
    )
    started = time.monotonic()
    dsr_rows: list[dict[str, Any]] = []
    try:
        results = bench(args)
        print(report(results), flush=True)
        if not args.no_dsr:
            from bench import (
                dsr,
            )  # DSR vs passthrough on one L2 test bed: balancer packets/s and download Mbit/s

            print("\nDSR vs passthrough (same L2 test bed; bench/dsr.py):", file=sys.stderr)
            dsr_rows = dsr.run(quick=args.quick)
            print()
            print(dsr.report(dsr_rows))
    except KeyboardInterrupt:
        print("interrupted; the test bed and every process in it are gone", file=sys.stderr)
        return 130
    print(f"\n({time.monotonic() - started:.0f}s)")
    if args.json:
        doc = {
            "seconds": args.seconds,
            "pps": {k: [r.__dict__ for r in v] for k, v in results.pps.items()},
            "bulk_mbit_s": results.bulk,
            "conn_s": {k: {"per_second": v[0], "failed": v[1]} for k, v in results.conns.items()},
            "dsr": dsr_rows,
        }
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(doc, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
