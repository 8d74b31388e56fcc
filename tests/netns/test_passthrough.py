"""Passthrough mode end to end: the real ``convey --passthrough`` in the balancer namespace of a routed test bed,
real clients in the client namespace, real servers (testbed/httpd.py) behind it, the real kernel path
(iptables raw PREROUTING -> NFQUEUE -> rewrite -> routing). Root only.

Every exchange is checked end to end (which server answered, the source address it saw, byte counts, sha256)
and against convey's /stats, whose counters must be exact: connections opened and closed and TCP payload bytes
per direction, per server, and the packet-path counters (verdicts, drops by reason, flows, ports in use, queue
drops). Nothing waits by sleeping: every wait polls a condition with a deadline.

Most tests run twice (the ``offload`` fixture): per packet (every packet through convey) and with flow offload
(``[passthrough] offload = true``: convey decides the first packet, conntrack NAT carries the rest, and the
counters come from conntrack events, so they settle a moment after the client is done: tests poll for them).
Tests of per-packet internals (flow table, port allocator, per-packet verdicts) run per packet only, each
saying why. tests/netns/test_offload_passthrough.py has what only offload has.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.dsr import suite_workers
from testbed.host import Host
from testbed.httpd import payload_sha256
from testbed.httpd_proc import HttpServer, start_httpd
from testbed.process import REPO_ROOT, read_line, wait_until

VIP_PORT = 80
WORKERS = suite_workers()  # CONVEY_TEST_WORKERS: the whole suite with worker processes (make test-workers)
SERVER_PORT = 8080
GET = b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n"

# Runs in the client namespace (``python -c CLIENT '{"op": ...}'``): real sockets, results as JSON on stdout.
CLIENT = textwrap.dedent(
    r'''
    import hashlib, json, select, selectors, socket, sys, time
    from testbed.httpd import payload_chunks

    def exchange(addr, port, head, body=(), timeout=10.0, ip_options=None):
        """One HTTP exchange on a fresh connection: bytes each way, status, body sha256, first body bytes."""
        start = time.monotonic()
        res = {"start": start, "sent": 0, "received": 0, "error": None, "header_len": 0}
        try:
            sock = socket.socket()
            with sock:
                sock.settimeout(timeout)
                if ip_options:
                    sock.setsockopt(socket.IPPROTO_IP, socket.IP_OPTIONS, bytes.fromhex(ip_options))
                sock.connect((addr, port))
                res["connected"] = time.monotonic() - start
                sock.sendall(head)
                res["sent"] += len(head)
                for chunk in body:
                    sock.sendall(chunk)
                    res["sent"] += len(chunk)
                digest, head, first = hashlib.sha256(), b"", b""
                while chunk := sock.recv(1 << 18):
                    res["received"] += len(chunk)
                    if not res["header_len"]:
                        head += chunk
                        if b"\r\n\r\n" not in head:
                            continue
                        head, _, chunk = head.partition(b"\r\n\r\n")
                        res["status"] = head.split(b"\r\n")[0].decode()
                        res["header_len"] = len(head) + 4
                    digest.update(chunk)
                    if len(first) < 200:
                        first += chunk[: 200 - len(first)]
                    if time.monotonic() - start > timeout:
                        raise TimeoutError(f"exchange not finished after {timeout}s")
                res["sha256"] = digest.hexdigest()
                res["body_start"] = first.decode(errors="replace")
        except OSError as exc:
            res["error"] = f"{type(exc).__name__}: {exc}"
        res["dt"] = time.monotonic() - start
        return res

    def get_head(path):
        return f"GET {path} HTTP/1.1\r\nHost: vip\r\n\r\n".encode()

    def op_get(a):
        return [exchange(a["addr"], a["port"], get_head(a.get("path", "/")), timeout=a.get("timeout", 10.0),
                         ip_options=a.get("ip_options")) for _ in range(a["n"])]

    def op_upload(a):
        size = a["size"]
        head = f"POST /upload HTTP/1.1\r\nHost: vip\r\nContent-Length: {size}\r\n\r\n".encode()
        return exchange(a["addr"], a["port"], head, payload_chunks(size), timeout=a.get("timeout", 60.0))

    def op_loop(a):
        """GET / one connection after another until told to stop (a line on stdin), or max_n or max_time."""
        results, end = [], time.monotonic() + a["max_time"]
        while len(results) < a["max_n"] and time.monotonic() < end:
            if select.select([sys.stdin], [], [], 0)[0]:
                break
            results.append(exchange(a["addr"], a["port"], get_head("/"), timeout=a.get("timeout", 3.0)))
        return results

    def op_concurrent(a):
        """Open n connections at once; print CONNECTED, wait for a line on stdin; then GET / on each."""
        n, deadline = a["n"], time.monotonic() + a.get("timeout", 30.0)
        sel, socks, errors = selectors.DefaultSelector(), [], []
        for _ in range(n):
            sock = socket.socket()
            sock.setblocking(False)
            sock.connect_ex((a["addr"], a["port"]))
            socks.append(sock)
            sel.register(sock, selectors.EVENT_WRITE)
        pending = set(socks)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                sock = key.fileobj
                err = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
                sel.unregister(sock)
                pending.discard(sock)
                if err:
                    errors.append(err)
                    socks.remove(sock)
                    sock.close()
        connected = len(socks) - len(pending)
        print(f"CONNECTED {connected}", flush=True)
        sys.stdin.readline()
        replies = {}
        for sock in socks:
            if sock in pending:
                continue
            sock.send(b"GET / HTTP/1.1\r\nHost: vip\r\n\r\n")
            replies[sock] = b""
            sel.register(sock, selectors.EVENT_READ)
        while sel.get_map() and time.monotonic() < deadline:
            for key, _ in sel.select(max(0.0, deadline - time.monotonic())):
                try:
                    chunk = key.fileobj.recv(65536)
                except OSError as exc:
                    errors.append(str(exc))
                    chunk = b""
                if chunk:
                    replies[key.fileobj] += chunk
                else:
                    sel.unregister(key.fileobj)
        out = [r.decode(errors="replace") for r in replies.values()]
        for sock in socks:
            sock.close()
        return {"connected": connected, "errors": errors, "replies": out, "unfinished": len(sel.get_map())}

    args = json.loads(sys.argv[1])
    result = globals()["op_" + args["op"]](args)
    print(json.dumps(result), flush=True)
    '''
)


# -- helpers --------------------------------------------------------------------------------------------------


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)
    if isinstance(value, list | tuple):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return str(value)


def make_config(
    bed: Testbed,
    servers: list[int] | None = None,
    weights: dict[int, int] | None = None,
    *,
    interval: float = 1.0,
    rise: int = 2,
    fall: int = 3,
    offload: bool = False,
    **passthrough: Any,
) -> str:
    """A passthrough config for the bed: one frontend on the VIP, the given servers (default all) in one backend;
    ``passthrough`` keys go to ``[passthrough]`` (fin_linger defaults to 0.3 s so closed flows leave quickly);
    ``offload`` turns flow offload on."""
    servers = list(range(len(bed.servers))) if servers is None else servers
    lines = [
        "[frontends.web]",
        f'listen_addr = "{bed.vip}:{VIP_PORT}"',
        'backend = "web_servers"',
        "[backends.web_servers]",
        f"health_check_interval = {interval}",
        f"health_check_timeout = {min(interval, 1.0)}",
        f"rise = {rise}",
        f"fall = {fall}",
    ]
    for i in servers:
        lines += [f"[backends.web_servers.servers.s{i}]", f'addr = "{bed.servers[i].addr}:{SERVER_PORT}"']
        if weights and i in weights:
            lines.append(f"weight = {weights[i]}")
    passthrough.setdefault("fin_linger", 0.3)
    if offload:
        passthrough["offload"] = True
    if suite_workers() > 1:  # CONVEY_TEST_WORKERS (testbed/dsr.py): the suite with worker processes
        passthrough.setdefault("workers", suite_workers())
    lines.append("[passthrough]")
    lines += [f"{key} = {toml_value(value)}" for key, value in passthrough.items()]
    return "\n".join(lines) + "\n"


def client(bed: Testbed, op: str, run_timeout: float = 120.0, **args: Any) -> Any:
    """Run one CLIENT operation in the client namespace and return its JSON result."""
    args.setdefault("addr", bed.vip)
    args.setdefault("port", VIP_PORT)
    proc = bed.client.python(["-c", CLIENT, json.dumps({"op": op, **args})], timeout=run_timeout, check=False)
    assert proc.returncode == 0, f"client {op} failed: {proc.stderr[-3000:]}"
    return json.loads(proc.stdout)


def client_popen(bed: Testbed, op: str, **args: Any) -> subprocess.Popen[bytes]:
    args.setdefault("addr", bed.vip)
    args.setdefault("port", VIP_PORT)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return bed.client.popen(
        [sys.executable, "-c", CLIENT, json.dumps({"op": op, **args})],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )


def finish(proc: subprocess.Popen[bytes], timeout: float) -> Any:
    """Tell a client_popen process to stop (a line on stdin) and return its JSON result."""
    try:
        out, err = proc.communicate(b"stop\n", timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        raise
    assert proc.returncode == 0, err.decode(errors="replace")[-3000:]
    return json.loads(out)


def served_by(result: dict[str, Any]) -> tuple[str, str, int]:
    """(server name, the source address it saw, the source port) from a GET / result."""
    assert result["error"] is None, result
    assert result["status"].startswith("HTTP/1.1 200"), result
    name, peer = result["body_start"].split()
    addr, _, port = peer.rpartition(":")
    return name, addr, int(port)


def counters(doc: dict[str, Any]) -> dict[str, int]:
    """The packet-path verdict counters of a /stats document."""
    verdicts: dict[str, int] = doc["packet"]["verdicts"]
    return verdicts


def offloaded(doc: dict[str, Any]) -> bool:
    return "offload" in doc


def open_flows(doc: dict[str, Any]) -> int:
    """Connections the packet path holds: flows per packet, conntrack's connections with offload."""
    packet = doc["packet"]
    return int(packet["connections"] if offloaded(doc) else packet["flows"])


def settled(doc: dict[str, Any]) -> bool:
    """No open connection, no flow, no port in use (offload: conntrack reported every close)."""
    packet = doc["packet"]
    if offloaded(doc):
        return doc["current_connections"] == 0 and packet["connections"] == 0
    return doc["current_connections"] == 0 and packet["flows"] == 0 and packet["ports_in_use"] == 0


def settled_with(sent: int, received: int) -> Callable[[dict[str, Any]], bool]:
    """Settled, and at least these payload bytes counted each way (offload: the byte counts come from conntrack
    at the close, a moment after the close itself)."""
    return lambda doc: settled(doc) and doc["bytes_tx"] >= sent and doc["bytes_rx"] >= received


def assert_clean(doc: dict[str, Any]) -> None:
    """Nothing went wrong in the packet path."""
    packet = doc["packet"]
    verdicts = counters(doc)
    assert packet["io_errors"] == 0
    assert verdicts["errors"] == 0
    assert packet["queue"]["queue_dropped"] == 0
    assert packet["queue"]["queue_user_dropped"] == 0
    assert verdicts["rewrites"] == verdicts["ingress_accepted"] + verdicts["return_accepted"]


def stop_clean(convey: ConveyProcess) -> str:
    log = convey.stop()
    assert "Traceback" not in log, log[-4000:]
    assert not re.search(r" (ERROR|CRITICAL) ", log), log[-4000:]
    return log


def retransmitted_segments(host: Host) -> int:
    """The namespace's TCP RetransSegs counter (/proc/net/snmp)."""
    lines = [line.split() for line in host.run(["cat", "/proc/net/snmp"]).stdout.splitlines()]
    tcp = [line for line in lines if line and line[0] == "Tcp:"]
    return int(tcp[1][tcp[0].index("RetransSegs")])


def queued_packets(lb: Host) -> dict[str, int]:
    """Packets each NFQUEUE rule of convey's chains sent to the queue, keyed by the rule's comment (per packet
    the rules are in ``raw``, with offload in ``mangle``)."""
    found: dict[str, int] = {}
    for table in ("raw", "mangle"):
        for line in lb.run(["iptables-save", "-c", "-t", table]).stdout.splitlines():
            match = re.match(
                r"\[(\d+):\d+\] -A CONVEY-PREROUTING .*--comment \"?([^\"]+?)\"? -j NFQUEUE", line
            )
            if match:
                found[match.group(2)] = found.get(match.group(2), 0) + int(match.group(1))
    return found


def connect_refused_quickly(bed: Testbed, deadline: float = 1.0) -> float:
    """Connect to the VIP from the client namespace, expect ECONNREFUSED (a RST) within ``deadline`` seconds;
    returns how long it took. A dropped SYN would show as a timeout instead."""
    sock = bed.client.socket()
    sock.settimeout(5.0)
    start = time.monotonic()
    try:
        with pytest.raises(ConnectionRefusedError):
            sock.connect((bed.vip, VIP_PORT))
    finally:
        sock.close()
    took = time.monotonic() - start
    assert took < deadline, f"refusal took {took:.2f}s"
    return took


@pytest.fixture(params=[False, True], ids=["per_packet", "offload"])
def offload(request: pytest.FixtureRequest) -> bool:
    """Run the test per packet and with flow offload."""
    return bool(request.param)


@pytest.fixture
def beds() -> Iterator[Callable[..., Testbed]]:
    """Build routed beds on demand; each is destroyed (processes killed, namespaces deleted) at the end."""
    made: list[Testbed] = []

    def make(servers: int = 2) -> Testbed:
        bed = Testbed.create(kind="routed", servers=servers)
        made.append(bed)
        return bed

    yield make
    for bed in made:
        bed.destroy()


def start_servers(bed: Testbed) -> list[HttpServer]:
    return [start_httpd(server, port=SERVER_PORT) for server in bed.servers]


# -- traffic --------------------------------------------------------------------------------------------------


def test_requests_follow_weights_and_servers_see_the_balancer(
    beds: Callable[..., Testbed], offload: bool
) -> None:
    bed = beds(2)
    webs = start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, weights={0: 3, 1: 1}, offload=offload)).start()
    results = client(bed, "get", n=40)
    by_server: dict[str, list[dict[str, Any]]] = {"server0": [], "server1": []}
    for result in results:
        name, addr, port = served_by(result)
        assert addr == bed.lb_addr_towards(int(name[-1])), "the server must see the balancer's address"
        assert 33768 <= port <= 61000
        by_server[name].append(result)
    split = (len(by_server["server0"]), len(by_server["server1"]))
    if WORKERS == 1:
        assert split == (30, 10)  # wrr 3:1, exactly
    else:  # each worker keeps its own turn: 3:1 within each, so within a few connections overall
        assert abs(split[0] - 30) <= 3 * WORKERS, split

    sent = sum(r["sent"] for r in results)
    received = sum(r["received"] for r in results)
    doc = convey.wait_stats(settled_with(sent, received), 10, "every flow closed and its port freed")
    assert_clean(doc)
    verdicts = counters(doc)
    if offload:  # one decision per connection; conntrack reports the closes and the bytes
        assert verdicts["flows_opened"] == doc["offload"]["closed"] == 40
        assert verdicts["ingress_accepted"] == 40 and verdicts["return_accepted"] == 0
    else:
        assert verdicts["flows_opened"] == verdicts["flows_closed"] == 40
        assert (verdicts["bytes_tx"], verdicts["bytes_rx"]) == (sent, received)
    assert verdicts["ingress_dropped"] == verdicts["return_dropped"] == 0
    assert doc["total_connections"] == 40 and doc["refused"] == 0
    assert (doc["bytes_tx"], doc["bytes_rx"]) == (sent, received)  # the original convey's directions
    for scope in (doc["frontends"]["web"], doc["backends"]["web_servers"]):
        assert (scope["total_connections"], scope["current_connections"]) == (40, 0)
        assert (scope["bytes_tx"], scope["bytes_rx"]) == (sent, received)
    detail = doc["backends"]["web_servers"]["server_detail"]
    for i, name in enumerate(("server0", "server1")):
        mine = by_server[name]
        server = detail[f"s{i}"]
        assert (server["total_connections"], server["current_connections"]) == (len(mine), 0)
        assert server["bytes_tx"] == sum(r["sent"] for r in mine)
        assert server["bytes_rx"] == sum(r["received"] for r in mine)
    # every packet the rules queued got a verdict, and was counted
    queued = queued_packets(bed.lb)
    assert queued["convey frontend web"] == verdicts["ingress_accepted"] + verdicts["ingress_dropped"]
    assert sum(queued.values()) == sum(verdicts[k] for k in ("ingress_accepted", "ingress_dropped",
                                                             "return_accepted", "return_dropped"))  # fmt: skip
    stop_clean(convey)
    assert all(web.errors() == "" for web in webs)


def test_50mb_download_and_upload_arrive_intact(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(1)
    start_servers(bed)
    # default fin_linger (2 s): the flow is still in the table when the stats are read right after
    convey = ConveyProcess(bed, make_config(bed, fin_linger=2.0, offload=offload)).start()
    size = 50 * 1024 * 1024
    retrans_before = retransmitted_segments(bed.client) + retransmitted_segments(bed.servers[0])

    down = client(bed, "get", n=1, path=f"/bytes/{size}", timeout=60)[0]
    assert down["error"] is None and down["status"].startswith("HTTP/1.1 200"), down
    assert down["received"] - down["header_len"] == size
    assert down["sha256"] == payload_sha256(size)
    if offload:  # conntrack's counters arrive with the close
        doc = convey.wait_stats(settled_with(down["sent"], down["received"]), 10, "the download's bytes")
    else:  # read at once: open (lingering) flows' bytes must already be in the per-server counters
        doc = convey.stats()
    server = doc["backends"]["web_servers"]["server_detail"]["s0"]
    exact = retransmitted_segments(bed.client) + retransmitted_segments(bed.servers[0]) == retrans_before
    if exact:  # a retransmitted segment is payload the balancer forwarded twice
        assert (server["bytes_tx"], server["bytes_rx"]) == (down["sent"], down["received"])
    assert server["bytes_rx"] >= down["received"]

    up = client(bed, "upload", size=size, timeout=60)
    assert up["error"] is None and up["status"].startswith("HTTP/1.1 200"), up
    assert up["body_start"] == payload_sha256(size)  # the server's sha256 of what it received
    sent, received = down["sent"] + up["sent"], down["received"] + up["received"]
    doc = convey.wait_stats(settled_with(sent, received), 10, "both flows closed")
    assert_clean(doc)
    exact = retransmitted_segments(bed.client) + retransmitted_segments(bed.servers[0]) == retrans_before
    if exact:
        assert (doc["bytes_tx"], doc["bytes_rx"]) == (sent, received)
    assert doc["bytes_tx"] >= sent and doc["bytes_rx"] >= received
    assert doc["total_connections"] == 2
    stop_clean(convey)


def test_bytes_tx_counts_client_to_server_and_bytes_rx_the_replies(
    beds: Callable[..., Testbed], offload: bool
) -> None:
    """The original convey's directions at every level: ``bytes_tx`` the payload the clients sent towards the
    servers, ``bytes_rx`` the payload that came back. An upload and a download of known, different sizes."""
    bed = beds(1)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, offload=offload)).start()
    retrans_before = retransmitted_segments(bed.client) + retransmitted_segments(bed.servers[0])
    up_size, down_size = 400_000, 150_000
    up = client(bed, "upload", size=up_size)
    assert up["error"] is None and up["body_start"] == payload_sha256(up_size), up
    down = client(bed, "get", n=1, path=f"/bytes/{down_size}")[0]
    assert down["error"] is None and down["sha256"] == payload_sha256(down_size), down
    sent, received = up["sent"] + down["sent"], up["received"] + down["received"]
    assert sent > up_size > received > down_size  # the two directions differ by far
    doc = convey.wait_stats(settled_with(sent, received), 10, "both flows closed")
    assert_clean(doc)
    retransmitted = (
        retransmitted_segments(bed.client) + retransmitted_segments(bed.servers[0]) - retrans_before
    )
    detail = doc["backends"]["web_servers"]["server_detail"]["s0"]
    for scope in (doc, doc["frontends"]["web"], doc["backends"]["web_servers"], detail):
        assert scope["total_connections"] == 2
        if not retransmitted:  # a retransmitted segment is payload the balancer forwarded twice
            assert (scope["bytes_tx"], scope["bytes_rx"]) == (sent, received)
        assert sent <= scope["bytes_tx"] < received + sent and received <= scope["bytes_rx"] < sent
    assert (doc["total_bytes_tx"], doc["total_bytes_rx"]) == (doc["bytes_tx"], doc["bytes_rx"])
    stop_clean(convey)


def test_500_concurrent_connections_complete(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(2)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, offload=offload)).start()
    n = 500
    proc = client_popen(bed, "concurrent", n=n, timeout=60)
    try:
        line = read_line(proc, 60)
        assert line == f"CONNECTED {n}", line
        # all of them open through the balancer at the same time (offload: once conntrack reported them)
        doc = convey.wait_stats(lambda d: d["current_connections"] >= n, 10, f"{n} connections open")
        assert doc["current_connections"] == n and open_flows(doc) == n
        if not offload:
            assert doc["packet"]["ports_in_use"] == n
            # one per (source, server, port), per worker
            assert 1 <= doc["packet"]["port_pools"] <= len(bed.servers) * WORKERS
        result = finish(proc, 60)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert result["errors"] == [] and result["unfinished"] == 0
    replies = result["replies"]
    assert len(replies) == n
    names = Counter()
    for reply in replies:
        assert reply.startswith("HTTP/1.1 200") and reply.endswith("\n"), reply[-200:]
        names[reply.rsplit("\r\n\r\n", 1)[1].split()[0]] += 1
    assert abs(names["server0"] - n // 2) <= (WORKERS if WORKERS > 1 else 0), names  # per worker round robin
    doc = convey.wait_stats(settled, 15, "all 500 flows closed")
    assert_clean(doc)
    closed = doc["offload"]["closed"] if offload else counters(doc)["flows_closed"]
    assert doc["total_connections"] == n and closed == n
    detail = doc["backends"]["web_servers"]["server_detail"]
    assert [detail[s]["total_connections"] for s in ("s0", "s1")] == [names["server0"], names["server1"]]
    stop_clean(convey)


# -- servers come and go --------------------------------------------------------------------------------------


def test_killed_server_is_taken_out_and_new_connections_succeed(
    beds: Callable[..., Testbed], offload: bool
) -> None:
    bed = beds(2)
    webs = start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, interval=0.2, rise=1, fall=2, offload=offload)).start()
    load = client_popen(bed, "loop", max_n=5000, max_time=60, timeout=3.0)
    try:
        convey.wait_stats(lambda d: d["total_connections"] >= 20, 20, "load through both servers")
        os.killpg(webs[1].proc.pid, signal.SIGKILL)  # mid-run, no goodbye
        down = convey.wait_stats(
            lambda d: not d["backends"]["web_servers"]["server_detail"]["s1"]["healthy"],
            10,
            "the health checks to take server1 out",
        )
        taken_out_at = time.monotonic()
        target = down["total_connections"] + 30
        convey.wait_stats(lambda d: d["total_connections"] >= target, 20, "30 more connections")
        results = finish(load, 30)
    finally:
        if load.poll() is None:
            load.kill()
    before = [r for r in results if r["start"] < taken_out_at]
    after = [r for r in results if r["start"] > taken_out_at]
    # before the take-out a request may fail in any way the kill allows: an error, or the server's kernel closing
    # the connection (FIN) after the request was read and before any answer (no error, nothing received)
    answered = [r for r in before if r["error"] is None and r["received"] > 0]
    assert {served_by(r)[0] for r in answered} == {"server0", "server1"}
    assert len(after) >= 30
    assert [served_by(r)[0] for r in after] == ["server0"] * len(after)  # every one succeeded, on server0
    doc = convey.wait_stats(settled, 10, "flows closed")
    assert_clean(doc)
    s1 = doc["backends"]["web_servers"]["server_detail"]["s1"]
    assert s1["state"] == "down" and s1["checks_failed"] >= 2
    stop_clean(convey)


def test_reload_adds_a_third_server_which_gets_traffic(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(3)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, servers=[0, 1], offload=offload)).start()
    first = [served_by(r)[0] for r in client(bed, "get", n=4 * WORKERS)]
    assert sorted(first) == ["server0", "server0", "server1", "server1"] or (
        WORKERS > 1 and len(set(first)) == 2
    )
    convey.write_config(make_config(bed, servers=[0, 1, 2], offload=offload))  # the file watcher notices
    convey.wait_stats(
        lambda d: d["reloads"] == 1 and "s2" in d["backends"]["web_servers"]["server_detail"],
        15,
        "the reload adding server2",
    )
    results = client(bed, "get", n=6 * WORKERS)
    seen = [served_by(r) for r in results]
    by_name = Counter(name for name, _, _ in seen)
    if WORKERS == 1:
        assert by_name == {"server0": 2, "server1": 2, "server2": 2}
    else:  # per worker round robin: every server, within a turn per worker
        assert (
            set(by_name) == {"server0", "server1", "server2"}
            and max(by_name.values()) - min(by_name.values()) <= 2 * WORKERS
        )
    assert {addr for name, addr, _ in seen if name == "server2"} == {bed.lb_addr_towards(2)}
    s2_received = sum(
        r["received"] for r, (name, _, _) in zip(results, seen, strict=True) if name == "server2"
    )
    doc = convey.wait_stats(
        lambda d: (
            settled(d) and d["backends"]["web_servers"]["server_detail"]["s2"]["bytes_rx"] >= s2_received
        ),
        10,
        "flows closed",
    )
    assert_clean(doc)
    s2 = doc["backends"]["web_servers"]["server_detail"]["s2"]
    assert s2["total_connections"] == by_name["server2"]
    assert s2["bytes_rx"] == s2_received
    # per packet its return path is queued (raw); with offload the nat table DNATs to it by its mark
    assert "198.18.3.2" in bed.lb.run(["iptables-save", "-t", "nat" if offload else "raw"]).stdout
    stop_clean(convey)


PER_PROCESS = pytest.mark.skipif(
    WORKERS > 1,
    reason="relies on one process's round robin order or limits (its second connection goes to server1, one "
    "flow table or port range); tests/netns/test_workers.py covers this with workers",
)


@PER_PROCESS
def test_removed_server_open_connection_completes(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(2)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, offload=offload)).start()
    socks = [bed.client.connect(bed.vip, VIP_PORT) for _ in range(2)]  # wrr: the second goes to server1
    try:
        doc = convey.wait_stats(lambda d: d["current_connections"] == 2, 5, "both connections open")
        assert [doc["backends"]["web_servers"]["server_detail"][s]["current_connections"] for s in ("s0", "s1")] \
            == [1, 1]  # fmt: skip
        convey.write_config(make_config(bed, servers=[0], offload=offload))
        doc = convey.wait_stats(lambda d: d["reloads"] == 1, 15, "the reload removing server1")
        assert doc["backends"]["web_servers"]["server_detail"]["s1"]["state"] == "removed-draining"
        if offload:  # it keeps its mark while conntrack holds its connection
            assert "web_servers/s1" in doc["offload"]["marks"]
        # new connections go to server0 only
        assert {served_by(r)[0] for r in client(bed, "get", n=4)} == {"server0"}
        # the open connection to server1 still works both ways: a 1 MB download on it
        size = 1_000_000
        sock = socks[1]
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 20
        while chunk := sock.recv(1 << 18):
            data += chunk
            assert time.monotonic() < deadline
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == size
        assert f"x-sha256: {payload_sha256(size)}".encode() in head.lower()
    finally:
        for sock in socks:
            sock.close()
    # once its last flow is gone, server1 is forgotten and its rules go (per packet its return path; with
    # offload its mark: the plan no longer holds it)
    doc = convey.wait_stats(
        lambda d: settled_with(0, size)(d) and "s1" not in d["backends"]["web_servers"]["server_detail"],
        10,
        "server1 to drain",
    )
    assert_clean(doc)
    if offload:  # its mark is released once conntrack reported its last close, and the rules are checked
        convey.wait_stats(
            lambda d: (
                "web_servers/s1" not in d["offload"]["marks"] and d["offload"]["rules_updates_pending"] == 0
            ),
            10,
            "server1's mark to be released",
        )
    wait_until(
        lambda: "198.18.2.2" not in bed.lb.run(["iptables-save"]).stdout,
        10,
        "server1's rules to be removed",
    )
    assert doc["backends"]["web_servers"]["bytes_rx"] >= size
    stop_clean(convey)


@PER_PROCESS
def test_weight_0_drains_a_server_and_its_open_connection_completes(
    beds: Callable[..., Testbed], offload: bool
) -> None:
    bed = beds(2)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, offload=offload)).start()
    socks = [bed.client.connect(bed.vip, VIP_PORT) for _ in range(2)]  # wrr: the second goes to server1
    try:
        convey.wait_stats(lambda d: d["current_connections"] == 2, 5, "both connections open")
        convey.write_config(make_config(bed, weights={1: 0}, offload=offload))
        doc = convey.wait_stats(lambda d: d["reloads"] == 1, 15, "the reload draining server1")
        s1 = doc["backends"]["web_servers"]["server_detail"]["s1"]
        assert s1["state"] == "draining" and s1["current_connections"] == 1
        assert {served_by(r)[0] for r in client(bed, "get", n=4)} == {"server0"}  # no new connection to it
        size = 1_000_000
        sock = socks[1]
        sock.sendall(f"GET /bytes/{size} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        data = b""
        deadline = time.monotonic() + 20
        while chunk := sock.recv(1 << 18):
            data += chunk
            assert time.monotonic() < deadline
        head, _, body = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 200") and len(body) == size
        assert f"x-sha256: {payload_sha256(size)}".encode() in head.lower()
    finally:
        for sock in socks:
            sock.close()
    doc = convey.wait_stats(settled_with(0, size), 10, "every connection closed")
    assert_clean(doc)
    s1 = doc["backends"]["web_servers"]["server_detail"]["s1"]
    assert (s1["total_connections"], s1["current_connections"], s1["state"]) == (1, 0, "draining")
    assert s1["bytes_rx"] >= size
    stop_clean(convey)


def test_no_healthy_server_refuses_with_rst_promptly(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(2)  # no server process runs: every health check fails
    convey = ConveyProcess(bed, make_config(bed, interval=0.2, rise=1, fall=1, offload=offload)).start()
    convey.wait_stats(
        lambda d: not any(s["healthy"] for s in d["backends"]["web_servers"]["server_detail"].values()),
        10,
        "both servers marked down",
    )
    for _ in range(3):
        connect_refused_quickly(bed)
    doc = convey.stats()
    verdicts = counters(doc)
    assert verdicts["no_server"] == 3 and verdicts["rst_queued"] == 3
    assert doc["packet"]["resets_sent"] == 3 and doc["packet"]["resets_failed"] == 0
    assert doc["refused"] == 3 and doc["total_connections"] == 0
    assert doc["frontends"]["web"]["refused"] == 3 and doc["backends"]["web_servers"]["refused"] == 3
    assert verdicts["flows_opened"] == 0 and open_flows(doc) == 0
    if not offload:
        assert doc["packet"]["ports_in_use"] == 0
    # a server comes up: it is taken in, and connections succeed again
    start_httpd(bed.servers[1], port=SERVER_PORT)
    convey.wait_stats(
        lambda d: d["backends"]["web_servers"]["server_detail"]["s1"]["healthy"], 10, "server1 up again"
    )
    assert served_by(client(bed, "get", n=1)[0])[0] == "server1"
    stop_clean(convey)


# -- flows and ports ------------------------------------------------------------------------------------------


# Per packet only: the flow table's timeouts and the port allocator are the per-packet path's own; with offload
# conntrack's timeouts hold the connection and the kernel picks the port (test_offload_passthrough.py).
def test_closed_and_expired_flows_free_their_ports(beds: Callable[..., Testbed]) -> None:
    bed = beds(1)
    start_servers(bed)
    config = make_config(bed, idle_timeout=1.0, syn_timeout=1.0, port_range="40000-40999")
    convey = ConveyProcess(bed, config).start()
    # closed (FIN both ways): gone after the linger
    client(bed, "get", n=10)
    doc = convey.wait_stats(settled, 5, "closed flows to leave the table")
    assert counters(doc)["flows_closed"] == 10

    # established and idle: expires after idle_timeout; the client's next segment then meets a RST
    sock = bed.client.connect(bed.vip, VIP_PORT)
    try:
        doc = convey.stats()
        assert doc["packet"]["flows"] == 1 and doc["packet"]["ports_in_use"] == 1
        assert doc["current_connections"] == 1
        doc = convey.wait_stats(settled, 5, "the idle flow to expire")
        assert counters(doc)["flows_closed"] == 11
        sock.settimeout(5)
        started = time.monotonic()
        sock.sendall(GET)
        with pytest.raises(ConnectionResetError):
            sock.recv(4096)
        assert time.monotonic() - started < 1.0
    finally:
        sock.close()
    verdicts = counters(convey.stats())
    assert verdicts["unknown_flow"] == 1 and verdicts["rst_queued"] == 1

    # embryonic (the server never answers the SYN): expires after syn_timeout
    bed.servers[0].run(
        ["iptables", "-A", "INPUT", "-p", "tcp", "--dport", str(SERVER_PORT), "--sport", "40000:40999",
         "-j", "DROP"]
    )  # fmt: skip
    sock = bed.client.socket()
    sock.settimeout(0.5)
    with pytest.raises(TimeoutError):
        sock.connect((bed.vip, VIP_PORT))
    sock.close()  # no SYN retransmission after this
    doc = convey.stats()
    assert doc["packet"]["flows"] == 1 and doc["packet"]["ports_in_use"] == 1
    doc = convey.wait_stats(settled, 5, "the embryonic flow to expire")
    verdicts = counters(doc)
    assert verdicts["flows_opened"] == verdicts["flows_closed"] == 12
    assert_clean(doc)
    stop_clean(convey)


# Per packet only: convey's port allocator and port_reuse_delay; with offload the kernel's SNAT picks the port
# (2 x 30,000 connections through one source address: test_offload_passthrough.py).
@PER_PROCESS
def test_more_connections_than_the_port_range_holds(beds: Callable[..., Testbed]) -> None:
    """300 connections one after another to one server through a 50-port range: the server keeps each
    (balancer addr, port) tuple in TIME_WAIT for 60 s, so ports are not reused within port_reuse_delay and six
    balancer addresses give 300 distinct tuples. None waits for a SYN retransmission (1 s); the 301st finds no
    free port and is refused at once."""
    bed = beds(1)
    start_servers(bed)
    extra = [f"198.18.1.{101 + i}" for i in range(5)]
    with bed.lb.iproute() as ipr:
        index = ipr.link_lookup(ifname="s0")[0]
        for addr in extra:
            ipr.addr("add", index=index, address=addr, prefixlen=24)
    sources = [bed.lb_addr_towards(0), *extra]
    config = make_config(
        bed, port_range="40000-40049", port_reuse_delay=60, fin_linger=0.2, source_addrs=sources
    )
    convey = ConveyProcess(bed, config).start()
    started = time.monotonic()
    results = client(bed, "get", n=300, timeout=5.0)
    took = time.monotonic() - started
    tuples = [served_by(r)[1:] for r in results]
    slowest = max(r["dt"] for r in results)
    assert slowest < 0.9, f"a connection stalled for {slowest:.2f}s"
    assert len(set(tuples)) == 300  # the server never saw a tuple twice
    assert Counter(addr for addr, _ in tuples) == dict.fromkeys(sources, 50)
    assert {port for _, port in tuples} == set(range(40000, 40050))
    assert took < 60
    connect_refused_quickly(bed)
    doc = convey.wait_stats(settled, 5, "all flows closed, ports released")
    verdicts = counters(doc)
    assert verdicts["no_port"] == 1 and verdicts["flows_closed"] == 300
    assert doc["total_connections"] == 300 and doc["refused"] == 1
    assert doc["packet"]["source_addrs"] == sources
    assert_clean(doc)
    stop_clean(convey)


@PER_PROCESS
def test_table_full_refuses_with_rst_and_counts(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(1)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, connection_tracker_capacity=5, offload=offload)).start()
    socks = [bed.client.connect(bed.vip, VIP_PORT) for _ in range(5)]
    try:
        # offload: the table is the connections conntrack reported open
        doc = convey.wait_stats(lambda d: open_flows(d) == 5, 5, "5 connections open")
        capacity = doc["packet"]["connection_capacity" if offload else "flow_capacity"]
        assert open_flows(doc) == 5 and capacity == 5
        connect_refused_quickly(bed)
        doc = convey.stats()
        assert counters(doc)["table_full"] == 1 and doc["packet"]["resets_sent"] == 1
        assert doc["refused"] == 1 and doc["total_connections"] == 5
        for sock in socks:  # the open connections are unaffected
            sock.sendall(GET)
            reply = b""
            while chunk := sock.recv(4096):
                reply += chunk
            assert reply.startswith(b"HTTP/1.1 200") and b"server0 198.18.1.1:" in reply
    finally:
        for sock in socks:
            sock.close()
    convey.wait_stats(settled, 5, "the table to empty")
    assert served_by(client(bed, "get", n=1)[0])[0] == "server0"
    doc = convey.wait_stats(settled, 5, "the table to empty again")
    assert counters(doc)["table_full"] == 1 and doc["total_connections"] == 6
    assert_clean(doc)
    stop_clean(convey)


# -- overload -------------------------------------------------------------------------------------------------

# Runs in the client namespace: writes one prebuilt Ethernet frame (hex in argv) to an AF_PACKET socket in a
# tight loop for at most argv[2] seconds, or until a line arrives on stdin.
FLOOD = textwrap.dedent(
    r"""
    import select, socket, sys, time
    frame, seconds = bytes.fromhex(sys.argv[1]), float(sys.argv[2])
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind(("eth0", 0))
    send, sent, end = sock.send, 0, time.monotonic() + seconds
    print("ready", flush=True)
    while time.monotonic() < end and not select.select([sys.stdin], [], [], 0)[0]:
        for _ in range(256):
            send(frame)
        sent += 256
    print(sent, flush=True)
    """
)


def flood_frame(bed: Testbed, cport: int, payload: bytes) -> bytes:
    """An Ethernet frame client:cport -> VIP:80, ACK|PSH, with ``payload``: a packet of an existing flow."""
    from convey.packet.checksum import internet_checksum, ip_header_checksum

    src, dst = (bytes(int(x) for x in a.split(".")) for a in (bed.client.addr, bed.vip))
    tcp = bytearray(
        int.to_bytes(cport, 2, "big") + VIP_PORT.to_bytes(2, "big") + (10**6).to_bytes(4, "big")
        + (2 * 10**6).to_bytes(4, "big") + bytes([0x50, 0x18]) + b"\xff\xff\x00\x00\x00\x00" + payload
    )  # fmt: skip
    ip = bytearray(
        bytes([0x45, 0]) + (20 + len(tcp)).to_bytes(2, "big") + b"\x00\x00\x40\x00\x40\x06\x00\x00"
    )
    ip += src + dst
    ip[10:12] = ip_header_checksum(ip).to_bytes(2, "big")
    tcp[16:18] = internet_checksum(src + dst + b"\x00\x06" + len(tcp).to_bytes(2, "big") + tcp).to_bytes(
        2, "big"
    )
    mac = [bytes.fromhex(m.replace(":", "")) for m in (bed.lb.mac, bed.client.mac)]
    return mac[0] + mac[1] + b"\x08\x00" + bytes(ip) + bytes(tcp)


# Per packet only: the flood repeats a segment of an established flow, which with offload never leaves the kernel.
def test_a_flood_does_not_stall_the_control_plane(beds: Callable[..., Testbed]) -> None:
    """More packets than the handler can take: the queue overflows (the kernel drops and counts), and convey's
    event loop still runs between batches of verdicts: /stats answers, health checks go on, SIGTERM stops it."""
    bed = beds(1)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, interval=0.2)).start()
    sock = bed.client.connect(bed.vip, VIP_PORT)  # the flood repeats a segment of this established flow
    payload = b"flood-of-17-bytes"
    # the flooded segments die after their verdict (rewritten, forwarded, dropped): the server is not involved
    bed.lb.run(["iptables", "-A", "FORWARD", "-p", "tcp", "-m", "length", "--length", str(40 + len(payload)),
                "-j", "DROP"])  # fmt: skip
    frame = flood_frame(bed, sock.getsockname()[1], payload)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    flood = bed.client.popen(
        [sys.executable, "-c", FLOOD, frame.hex(), "20"],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env,
    )  # fmt: skip
    try:
        assert read_line(flood, 20) == "ready"
        before = convey.stats()

        def checks(doc: dict[str, Any]) -> int:  # health checks run, whatever their result (the host is busy)
            s0 = doc["backends"]["web_servers"]["server_detail"]["s0"]
            return int(s0["checks_ok"] + s0["checks_failed"])

        checks_before = checks(before)
        # the flood is on: the handler is busy and the queue overflows
        convey.wait_stats(
            lambda d: (
                counters(d)["ingress_accepted"] > counters(before)["ingress_accepted"] + 20_000
                and d["packet"]["queue"]["queue_dropped"] + d["packet"]["queue"]["queue_user_dropped"] > 0
            ),
            10,
            "the flood to saturate the queue",
        )
        # under the flood, every /stats answers within a second and health checks keep running
        deadline = time.monotonic() + 10
        while checks(convey.stats(timeout=1.0)) < checks_before + 3:
            assert time.monotonic() < deadline, "health checks stalled under the flood"
            time.sleep(0.05)  # poll interval
        assert flood.poll() is None, "the flood ended early: this proves nothing"
        convey.stop(timeout=5)  # SIGTERM is handled under the flood too
    finally:
        sock.close()
        if flood.poll() is None:
            with contextlib.suppress(Exception):
                assert flood.stdin is not None
                flood.stdin.write(b"stop\n")
                flood.stdin.flush()
                flood.wait(10)


# -- malformed packets ----------------------------------------------------------------------------------------

# Runs in the client namespace: crafts each case with scapy and sends it with a raw socket (the kernel fills in
# the IPv4 total length and checksum) or, for headers the kernel will not send, as an Ethernet frame. Then a
# marker: an ACK of no flow, which convey must drop as unknown_flow and answer with a RST. Its verdict shows
# that the engine has seen everything sent before it.
CRAFT = textwrap.dedent(
    r"""
    import json, random, socket, sys
    from scapy.all import IP, TCP, Ether, Raw, IPOption_NOP, IPOption_EOL, fragment, fuzz, raw
    a = json.loads(sys.argv[1])
    vip, src = a["vip"], a["src"]
    ip = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    def send(packet):
        ip.sendto(packet if isinstance(packet, bytes) else raw(packet), (vip, 0))
    def send_frame(packet):
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as eth:
            eth.bind(("eth0", 0))
            eth.send(raw(Ether(src=a["mac"], dst=a["lb_mac"], type=0x0800) / Raw(packet)))
    def syn(sport, **kw):
        return IP(src=src, dst=vip, **kw) / TCP(sport=sport, dport=80, flags="S", seq=1000)
    def craft(case, marker):
        if case == "tcp_offset_beyond_packet":  # data offset 15 (60 bytes) in a 20-byte TCP header
            send(IP(src=src, dst=vip) / TCP(sport=41001, dport=80, flags="S", dataofs=15))
        elif case == "tcp_offset_too_small":  # data offset 2
            send(IP(src=src, dst=vip) / TCP(sport=41002, dport=80, flags="S", dataofs=2))
        elif case == "truncated_tcp_header":  # 12 of the 20 bytes of a TCP header
            send(IP(src=src, dst=vip, proto=6) / Raw(raw(TCP(sport=41003, dport=80, flags="S"))[:12]))
        elif case == "first_fragment":  # MF set: the first 200 bytes of a SYN carrying data
            send(fragment(syn(41004, id=4242) / Raw(b"x" * 400), fragsize=200)[0])
        elif case == "other_fragments":  # offsets > 0: no TCP header
            for frag in fragment(syn(41005, id=4243) / Raw(b"x" * 400), fragsize=200)[1:]:
                send(frag)
        elif case == "ip_options":  # NOP NOP NOP EOL: valid options on a real SYN
            send(syn(41006, options=[IPOption_NOP(), IPOption_NOP(), IPOption_NOP(), IPOption_EOL()]))
        elif case == "ihl_below_5":  # a raw socket refuses it: sent as an Ethernet frame
            packet = bytearray(raw(syn(41007)))
            packet[0] = 0x44
            send_frame(bytes(packet))
        elif case == "ihl_beyond_packet":  # IHL 15 (60 bytes) in a 40-byte packet
            packet = bytearray(raw(syn(41008)))
            packet[0] = 0x4F
            send_frame(bytes(packet))
        elif case == "fuzz":  # random TCP headers (flags, offsets, options, checksums), seeded
            random.seed(20241126)
            for i in range(200):
                send(IP(src=src, dst=vip) / fuzz(TCP(sport=42000 + i, dport=80)))
        else:
            raise SystemExit(f"unknown case {case}")
        send(IP(src=src, dst=vip) / TCP(sport=marker, dport=80, flags="A", seq=1, ack=1))
    print("ready", flush=True)
    for line in sys.stdin:  # one case per line: "CASE MARKER_PORT"
        case, marker = line.split()
        craft(case, int(marker))
        print("sent", case, flush=True)
    """
)

MARKER = {"unknown_flow": 1, "ingress_dropped": 1, "rst_queued": 1}

# case -> (how much the packet-path counters move, marker excluded; how much the parse error codes move)
MALFORMED: dict[str, tuple[dict[str, int], dict[str, int]]] = {
    "tcp_offset_beyond_packet": ({"malformed": 1, "ingress_dropped": 1}, {"truncated": 1}),
    "tcp_offset_too_small": ({"malformed": 1, "ingress_dropped": 1}, {"bad_tcp_header": 1}),
    "truncated_tcp_header": ({"malformed": 1, "ingress_dropped": 1}, {"truncated": 1}),
    "first_fragment": ({"fragment": 1, "ingress_dropped": 1}, {"fragment": 1}),
    # no TCP header: the rules' tcp match does not queue them; the kernel keeps them for reassembly
    "other_fragments": ({}, {}),
    # dropped by the kernel's IPv4 input checks before PREROUTING: never queued
    "ihl_below_5": ({}, {}),
    "ihl_beyond_packet": ({}, {}),
}


# Per packet only: with offload conntrack classifies these packets before the queue (INVALID ones are dropped by
# the rules, no marker reaches convey once a connection exists); the offload decision's handling of any bytes
# is property-tested in tests/unit/test_packet_offload.py.
def test_malformed_packets_do_not_crash_the_engine(beds: Callable[..., Testbed]) -> None:
    bed = beds(1)
    start_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, syn_timeout=1.0)).start()
    args = {"vip": bed.vip, "src": bed.client.addr, "mac": bed.client.mac, "lb_mac": bed.lb.mac}
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    crafter = bed.client.popen(
        [sys.executable, "-c", CRAFT, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
    )
    assert crafter.stdin is not None
    assert read_line(crafter, 30) == "ready"
    markers = iter(range(43000, 44000))

    def craft(case: str) -> dict[str, Any]:
        """Send ``case`` and the marker; return the /stats document once the marker's verdict shows."""
        before = counters(convey.stats())["unknown_flow"]
        assert crafter.stdin is not None
        crafter.stdin.write(f"{case} {next(markers)}\n".encode())
        crafter.stdin.flush()
        assert read_line(crafter, 30) == f"sent {case}"
        return convey.wait_stats(
            lambda d: counters(d)["unknown_flow"] > before, 5, f"the marker's verdict after {case}"
        )

    def verdicts_given(doc: dict[str, Any]) -> int:
        return counters(doc)["ingress_accepted"] + counters(doc)["ingress_dropped"]

    for case, (moved, codes) in MALFORMED.items():
        before = convey.stats()
        after = craft(case)
        delta = {k: v - counters(before)[k] for k, v in counters(after).items() if v != counters(before)[k]}
        expected = {k: moved.get(k, 0) + MARKER.get(k, 0) for k in {*moved, *MARKER}}
        assert delta == expected, f"{case}: counters moved by {delta}, expected {expected}"
        old_codes, new_codes = before["packet"]["parse_errors"], after["packet"]["parse_errors"]
        code_delta = {k: v - old_codes.get(k, 0) for k, v in new_codes.items() if v != old_codes.get(k, 0)}
        assert code_delta == codes, f"{case}: parse errors moved by {code_delta}, expected {codes}"
        # every packet the frontend rule queued got exactly one verdict
        assert queued_packets(bed.lb)["convey frontend web"] == verdicts_given(after)

    # a SYN with IP options is valid: rewritten (options kept) and answered by the server
    before = counters(convey.stats())
    craft("ip_options")
    convey.wait_stats(
        lambda d: counters(d)["return_accepted"] > before["return_accepted"],
        5,
        "the server's SYN-ACK to the SYN with IP options",
    )
    after = counters(convey.stats())
    assert after["ip_options"] == before["ip_options"] + 1
    assert after["flows_opened"] == before["flows_opened"] + 1

    # a whole connection whose client packets all carry IP options (NOP NOP NOP EOL)
    result = client(bed, "get", n=1, ip_options="01010100")[0]
    assert served_by(result)[:2] == ("server0", bed.lb_addr_towards(0))
    assert counters(convey.stats())["ip_options"] >= after["ip_options"] + 3  # SYN, ACK, request, ...

    # random TCP headers: whatever they hold, every queued packet gets one verdict and nothing raises
    doc = craft("fuzz")
    assert queued_packets(bed.lb)["convey frontend web"] == verdicts_given(doc)
    # and the engine still serves normally
    result = client(bed, "get", n=1, path="/bytes/100000")[0]
    assert result["error"] is None and result["sha256"] == payload_sha256(100000)
    doc = convey.stats()
    assert doc["packet"]["io_errors"] == 0 and counters(doc)["errors"] == 0
    assert convey.running
    stop_clean(convey)


# -- rules ----------------------------------------------------------------------------------------------------


def saved_ruleset(host: Host) -> list[str]:
    """``iptables-save`` without comments and counters, every table and chain; a table holding nothing but
    empty built-in chains with policy ACCEPT is left out (iptables-nft shows such a table once anything has
    touched it, and it filters nothing: it equals no table)."""
    tables: list[list[str]] = []
    for line in host.run(["iptables-save"]).stdout.splitlines():
        if not line or line.startswith("#"):
            continue
        if line.startswith("*"):
            tables.append([])
        tables[-1].append(re.sub(r" \[\d+:\d+\]$", "", line))
    return [
        line
        for table in tables
        if not all(re.fullmatch(r":[A-Z]+ ACCEPT", line) for line in table[1:-1])
        for line in table
    ]


def passthrough_sysctls(host: Host, ifaces: list[str]) -> dict[str, str]:
    keys = ["net.ipv4.ip_forward", "net.ipv4.ip_local_reserved_ports"]
    keys += [f"net.netfilter.nf_conntrack_{key}" for key in ("acct", "events", "tcp_loose")]
    for iface in ["all", *ifaces]:
        keys += [f"net.ipv4.conf.{iface}.accept_local", f"net.ipv4.conf.{iface}.rp_filter"]
    return {key: host.read_sysctl(key) for key in keys}


def test_make_install_rules_then_remove_rules_restores_the_ruleset(
    beds: Callable[..., Testbed], offload: bool
) -> None:
    venv = Path(sys.executable).parent.parent
    if not (venv / "bin" / "convey").exists():
        pytest.skip(f"the convey command is not installed in {venv} (pip install -e .)")
    bed = beds(2)
    start_servers(bed)
    lb = bed.lb
    # someone else's rules, which must survive untouched
    lb.run(
        ["iptables", "-t", "raw", "-A", "PREROUTING", "-p", "udp", "--dport", "53", "-j", "CT", "--notrack"]
    )
    lb.run(["iptables", "-A", "INPUT", "-p", "tcp", "--dport", "22", "-j", "ACCEPT"])
    ifaces = ["c0", "s0", "s1"]
    rules_before, sysctls_before = saved_ruleset(lb), passthrough_sysctls(lb, ifaces)
    # writes the config file
    convey = ConveyProcess(bed, make_config(bed, offload=offload), install_rules=False)
    config = convey.config_path
    # `-o` keeps make from (re)building the venv; VENV is the one running these tests
    make = ["make", "-s", "-C", str(REPO_ROOT), f"VENV={venv}", "-o", f"{venv}/.installed"]

    lb.run([*make, "install-rules", f"CONFIG={config}", "MODE=passthrough", *(["OFFLOAD=1"] if offload else [])],
           timeout=60)  # fmt: skip
    installed = saved_ruleset(lb)
    assert "-A PREROUTING -m comment --comment convey -j CONVEY-PREROUTING" in installed
    assert passthrough_sysctls(lb, ifaces) != sysctls_before
    # convey uses the installed rules (without --install-rules) and leaves them in place at exit
    convey.start()
    assert served_by(client(bed, "get", n=1)[0])[1] == bed.lb_addr_towards(0)
    stop_clean(convey)
    assert saved_ruleset(lb) == installed

    lb.run([*make, "remove-rules", f"CONFIG={config}"], timeout=60)
    assert saved_ruleset(lb) == rules_before
    assert passthrough_sysctls(lb, ifaces) == sysctls_before
    # and convey refuses to start without them, saying how to install them
    convey = ConveyProcess(bed, make_config(bed, offload=offload), install_rules=False, name="again")
    with pytest.raises(Exception, match="install-rules"):
        convey.start(timeout=10)
    with contextlib.suppress(Exception):
        convey.kill()


def test_convey_removes_the_rules_it_installed(beds: Callable[..., Testbed], offload: bool) -> None:
    bed = beds(1)
    start_servers(bed)
    before = saved_ruleset(bed.lb), passthrough_sysctls(bed.lb, ["c0", "s0"])
    convey = ConveyProcess(bed, make_config(bed, offload=offload)).start()
    assert served_by(client(bed, "get", n=1)[0])[0] == "server0"
    assert saved_ruleset(bed.lb) != before[0]
    stop_clean(convey)
    assert (saved_ruleset(bed.lb), passthrough_sysctls(bed.lb, ["c0", "s0"])) == before
