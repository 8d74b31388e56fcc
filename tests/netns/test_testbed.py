"""The test bed itself: the path through the balancer works by plain routing; teardown leaves nothing."""

from __future__ import annotations

import concurrent.futures
import hashlib
import os
import secrets
import subprocess
import sys
import time

import pytest

from testbed import bed as testbed
from testbed.bed import Testbed
from testbed.host import Host
from testbed.httpd import payload, payload_sha256
from testbed.httpd_proc import start_httpd
from testbed.process import REPO_ROOT, wait_until


def counters(host: Host, iface: str) -> tuple[int, int]:
    """(rx_bytes, tx_bytes) of an interface."""
    with host.iproute() as ipr:
        stats = ipr.get_links(ipr.link_lookup(ifname=iface)[0])[0].get_attr("IFLA_STATS64")
        return int(stats["rx_bytes"]), int(stats["tx_bytes"])


def http_get(
    host: Host, addr: str, port: int, path: str, timeout: float = 20.0
) -> tuple[dict[str, str], bytes]:
    """A GET with a socket made in ``host``'s namespace: headers and body."""
    with host.connect(addr, port, timeout) as sock:
        sock.sendall(f"GET {path} HTTP/1.1\r\nHost: {addr}\r\n\r\n".encode())
        chunks = []
        deadline = time.monotonic() + timeout
        while chunk := sock.recv(1 << 18):
            chunks.append(chunk)
            assert time.monotonic() < deadline, "response took too long"
    head, _, body = b"".join(chunks).partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    assert lines[0].startswith("HTTP/1.1 200"), lines[0]
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    return headers, body


def bed_namespaces(bed: Testbed) -> list[str]:
    return [name for name in testbed.netns.listnetns() if name.startswith(f"cvy-{bed.tag}-")]


def test_routed_client_reaches_each_server_through_the_balancer(routed_bed: Testbed) -> None:
    bed = routed_bed
    assert (bed.client.addr, bed.lb.addr, bed.vip) == ("198.18.0.2", "198.18.0.1", "198.18.0.1")
    assert bed.server_addrs == ["198.18.1.2", "198.18.2.2"]
    assert bed.lb.read_sysctl("net.ipv4.ip_forward") == "1"
    servers = [start_httpd(server, port=8080) for server in bed.servers]
    for i, (server, web) in enumerate(zip(bed.servers, servers, strict=True)):
        lb_iface = f"s{i}"
        before = counters(bed.lb, lb_iface)
        # curl: which server answered, and it saw the client's own address (routing, no NAT)
        body = bed.client.curl(web.url("/"))
        name, peer = body.decode().split()
        assert name == server.role
        assert peer.startswith(f"{bed.client.addr}:")
        # a Python socket from the client's namespace, bytes checked end to end
        headers, data = http_get(bed.client, server.addr, 8080, "/bytes/300000")
        assert len(data) == 300000
        assert data == payload(300000)
        assert headers["x-sha256"] == hashlib.sha256(data).hexdigest() == payload_sha256(300000)
        # the bytes crossed the balancer's interface towards that server
        after = counters(bed.lb, lb_iface)
        assert after[0] - before[0] > 300000, "the response did not pass through the balancer"
        assert after[1] > before[1]
    for web in servers:
        assert web.errors() == ""


def test_routed_upload_and_large_download(routed_bed: Testbed) -> None:
    bed = routed_bed
    web = start_httpd(bed.servers[1], port=8080)
    size = 50 * 1024 * 1024
    started = time.monotonic()
    proc = bed.client.run(
        ["sh", "-c", f"curl -sS --fail --max-time 60 {web.url(f'/bytes/{size}')} | sha256sum"], timeout=70
    )
    assert proc.stdout.split()[0] == payload_sha256(size)
    data = os.urandom(3 * 1024 * 1024 + 17)
    upload = bed.client.run(
        ["curl", "-sS", "--fail", "--max-time", "30", "--data-binary", "@-", web.url("/upload")],
        input=data,
        text=False,
        timeout=40,
    )
    assert upload.stdout.decode() == hashlib.sha256(data).hexdigest()
    assert time.monotonic() - started < 30


def test_routed_many_concurrent_connections(routed_bed: Testbed) -> None:
    bed = routed_bed
    web = start_httpd(bed.servers[0], port=8080)
    count = 300
    socks = [bed.client.connect(bed.servers[0].addr, 8080) for _ in range(count)]  # all open at once
    try:
        for sock in socks:
            sock.sendall(b"GET / HTTP/1.1\r\n\r\n")
        replies = []
        for sock in socks:
            data = b""
            while chunk := sock.recv(4096):
                data += chunk
            replies.append(data)
    finally:
        for sock in socks:
            sock.close()
    assert all(reply.endswith(b"\n") and b"\r\n\r\nserver0 198.18.0.2:" in reply for reply in replies)
    assert len({reply.rsplit(b":", 1)[1] for reply in replies}) == count  # distinct client ports
    assert web.errors() == ""


def test_l2_bed_is_one_segment(l2_bed: Testbed) -> None:
    bed = l2_bed
    assert bed.bridge is not None
    assert (bed.lb.addr, bed.client.addr, bed.vip) == ("198.19.0.1", "198.19.0.2", "198.19.0.100")
    assert bed.server_addrs == ["198.19.0.11", "198.19.0.12"]
    servers = [start_httpd(server, port=80) for server in bed.servers]
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        bodies = list(pool.map(lambda web: bed.client.curl(web.url("/")).decode(), servers))
    assert [body.split()[0] for body in bodies] == ["server0", "server1"]
    assert all(body.split()[1].startswith("198.19.0.2:") for body in bodies)
    # the client resolves the VIP to the balancer's MAC, each server to its own
    with pytest.raises(OSError):
        bed.client.connect(bed.vip, 9, timeout=5)  # nothing listens; the RST comes from the balancer
    neighbours = bed.client.run(["ip", "-4", "neigh", "show", "dev", "eth0"]).stdout
    assert f"{bed.vip} lladdr {bed.lb.mac}" in neighbours
    for server in bed.servers:
        assert f"{server.addr} lladdr {server.mac}" in neighbours


def test_l2_vip_on_lo_does_not_answer_arp(l2_bed: Testbed) -> None:
    bed = l2_bed
    for server in bed.servers:
        server.add_vip_on_lo(bed.vip)
        assert server.read_sysctl("net.ipv4.conf.all.arp_ignore") == "1"
        assert server.read_sysctl("net.ipv4.conf.eth0.arp_announce") == "2"
        assert f"inet {bed.vip}/32" in server.run(["ip", "-4", "addr", "show", "dev", "lo"]).stdout
    with pytest.raises(OSError):
        bed.client.connect(bed.vip, 9, timeout=5)
    neighbours = bed.client.run(["ip", "-4", "neigh", "show", bed.vip]).stdout
    assert bed.lb.mac in neighbours
    assert not any(server.mac in neighbours for server in bed.servers)


def test_destroy_kills_processes_and_removes_namespaces() -> None:
    bed = Testbed.create(kind="routed", servers=1)
    try:
        names = bed_namespaces(bed)
        assert len(names) == 3
        web = start_httpd(bed.servers[0])
        sleeper = bed.client.popen(["sleep", "300"])
        stray = subprocess.Popen(  # not started through the bed: found in the namespace by `ip netns pids`
            ["ip", "netns", "exec", bed.lb.ns, "sleep", "300"], start_new_session=True
        )
        wait_until(lambda: stray.pid in bed.lb.pids(), 5, "the stray process to show up in the lb namespace")
    finally:
        bed.destroy()
    assert bed_namespaces(bed) == []
    assert web.proc.poll() is not None
    assert sleeper.poll() is not None
    assert stray.wait(5) is not None
    bed.destroy()  # twice is fine


def test_failed_creation_leaves_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    tag = secrets.token_hex(3)
    monkeypatch.setattr(testbed.secrets, "token_hex", lambda n: tag)
    calls = []

    def broken_veth(ipr: object, name: str, peer_ns: str, peer_name: str) -> None:
        calls.append(name)
        if len(calls) == 2:
            raise RuntimeError("simulated failure half way")
        real_veth(ipr, name, peer_ns, peer_name)

    real_veth = testbed._veth
    monkeypatch.setattr(testbed, "_veth", broken_veth)
    with pytest.raises(RuntimeError, match="half way"):
        Testbed.create(kind="routed", servers=2)
    assert [n for n in testbed.netns.listnetns() if n.startswith(f"cvy-{tag}-")] == []


def test_clean_command_removes_leftovers() -> None:
    prefix = f"cvy-t{secrets.token_hex(2)}-"  # our own prefix: leaves other runs' namespaces alone
    bed = Testbed.create(kind="l2", servers=1, prefix=prefix)
    try:
        bed.client.popen(["sleep", "300"])
        names = sorted(n for n in testbed.netns.listnetns() if n.startswith(prefix))
        assert len(names) == 4
        proc = subprocess.run(
            [sys.executable, "-m", "testbed", "clean", "--prefix", prefix],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0, proc.stderr
        assert sorted(line.split()[1] for line in proc.stdout.splitlines()) == names
        assert [n for n in testbed.netns.listnetns() if n.startswith(prefix)] == []
    finally:
        bed.destroy()
