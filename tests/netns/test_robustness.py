"""Robustness of passthrough per packet (issue 10): a soak of 10,000 concurrent connections, hostile traffic
through the real queue during a download, and server faults under load. Root only; namespaces ``cvy-rb-*``.

Each test is bounded in time and fails on what it checks; the figures it measured are printed (``pytest -s``).
The proxy's soak is tests/netns/test_proxy_soak.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.host import Host
from testbed.httpd import payload_sha256
from testbed.httpd_proc import HttpServer, start_httpd
from testbed.process import python_env, read_line
from tests.netns import hostile
from tests.netns.soak import WARM_N, assert_memory_returned, deep_backlogs, soak_rounds
from tests.netns.test_passthrough import (
    SERVER_PORT,
    VIP_PORT,
    assert_clean,
    counters,
    make_config,
    retransmitted_segments,
    settled,
    stop_clean,
)

PREFIX = "cvy-rb-"
SOAK_N = int(os.environ.get("CONVEY_SOAK_CONNECTIONS", "10000"))
FAULTS_SECONDS = float(os.environ.get("CONVEY_FAULTS_SECONDS", "60"))


@pytest.fixture
def beds() -> Iterator[Callable[..., Testbed]]:
    """Routed beds named cvy-rb-*, destroyed (processes killed, namespaces deleted), pass or fail."""
    made: list[Testbed] = []

    def make(servers: int = 2) -> Testbed:
        bed = Testbed.create(kind="routed", servers=servers, prefix=PREFIX)
        made.append(bed)
        return bed

    yield make
    for bed in made:
        bed.destroy()


def report(name: str, **figures: Any) -> None:
    print(f"\n{name}: " + json.dumps(figures, default=str), flush=True)


# -- soak ----------------------------------------------------------------------------------------------------


@pytest.mark.timeout(240)
def test_soak_10k_concurrent_connections_per_packet(beds: Callable[..., Testbed]) -> None:
    """SOAK_N connections open at once through passthrough, each moving 1-4 KB checked by sha256, twice: none
    lost or corrupted, every byte counted, every flow and port released, convey's memory returned
    (tests/netns/soak.py)."""
    bed = beds(2)
    deep_backlogs(bed)
    webs = [start_httpd(server, port=SERVER_PORT) for server in bed.servers]
    # the flow table and the port range must hold every connection: SOAK_N flows, SOAK_N / 2 ports per server
    # out of 27,233 per round (a port waits port_reuse_delay, 60 s, before reuse: 2 rounds and the warm-up fit
    # together)
    config = make_config(bed, connection_tracker_capacity=max(20_000, 2 * SOAK_N), port_range=[33768, 61000])
    convey = ConveyProcess(bed, config).start()
    rounds = soak_rounds(bed, convey, SOAK_N, settled)
    doc = rounds.doc
    assert all(set(r.client["servers"]) == {"server0", "server1"} for r in rounds.rounds)
    assert_clean(doc)
    verdicts = counters(doc)
    total = WARM_N + SOAK_N * len(rounds.rounds)
    assert verdicts["flows_opened"] == verdicts["flows_closed"] == total, verdicts
    assert doc["total_connections"] == total and doc["refused"] == 0
    # every payload byte counted; a retransmitted segment (an accept queue briefly full during the ramp, the
    # endpoints' own timers) is counted again, as the kernel's own accounting does
    retransmitted = sum(retransmitted_segments(host) for host in [bed.client, *bed.servers])
    assert doc["bytes_tx"] >= rounds.sent and doc["bytes_rx"] >= rounds.received
    if retransmitted == 0:
        assert (doc["bytes_tx"], doc["bytes_rx"]) == (rounds.sent, rounds.received)
    assert doc["packet"]["flows"] == 0 and doc["packet"]["ports_in_use"] == 0
    report(
        "soak per packet",
        **rounds.figures(),
        counted_over_sent={"tx": doc["bytes_tx"] - rounds.sent, "rx": doc["bytes_rx"] - rounds.received},
        retransmitted_segments=retransmitted,
        queue=doc["packet"]["queue"],
    )
    assert_memory_returned(rounds)
    stop_clean(convey)
    assert all(web.errors() == "" for web in webs)


# -- hostile traffic through the real queue ------------------------------------------------------------------

DOWNLOAD = 50 * 1024 * 1024
CPORT = 45_999  # the download's client port: the forger knows the tuple, not the sequence numbers
HOSTILE_FRAMES = 100_000
HOSTILE_RATE = 25_000  # frames/s: ~4 s of hostile traffic; convey's per-packet path does ~50k packets/s here
ICMP_VERDICTS = ("icmp_translated", "icmp_unrelated", "icmp_malformed")


def hostile_kinds() -> list[str]:
    """Every kind of tests/netns/hostile.py, less those CONVEY_HOSTILE_SKIP names (comma-separated): a way to
    find which kind breaks something, for local runs only."""
    skip = set(filter(None, os.environ.get("CONVEY_HOSTILE_SKIP", "").split(",")))
    return [kind for kind in [*hostile.KINDS, "filler"] if kind not in skip]


def verdict_total(verdicts: dict[str, int]) -> int:
    """Packets the decision was given: each lands in exactly one of these (convey/packet/counters.py)."""
    names = ("ingress_accepted", "ingress_dropped", "return_accepted", "return_dropped", *ICMP_VERDICTS)
    return sum(verdicts.get(name, 0) for name in names)


def kernel_queue(lb: Host, num: int) -> dict[str, int]:
    """The kernel's side of queue ``num`` (/proc/net/netfilter/nfnetlink_queue in the balancer's namespace):
    id_sequence counts every packet given an id (delivered, or lost when the netlink send failed:
    user_dropped); queue_dropped counts those refused because the queue was full (they never get an id)."""
    for line in lb.run(["cat", "/proc/net/netfilter/nfnetlink_queue"]).stdout.splitlines():
        f = line.split()
        if f and int(f[0]) == num:
            return {"waiting": int(f[2]), "dropped": int(f[5]), "user_dropped": int(f[6]), "ids": int(f[7])}
    raise AssertionError(f"queue {num} is not bound")


def queued_by_rules(lb: Host) -> int:
    """Packets every NFQUEUE rule of convey's chains matched (raw table, PREROUTING and OUTPUT)."""
    text = lb.run(["iptables-save", "-c", "-t", "raw"]).stdout
    return sum(int(m.group(1)) for m in re.finditer(r"^\[(\d+):\d+\] -A CONVEY-\S+ .*-j NFQUEUE", text, re.M))


def accounting(convey: ConveyProcess) -> dict[str, Any]:
    """One consistent reading: the kernel's queue counters, /stats, the rules' counters, taken while nothing
    waits in the queue and nothing moved during the reading (retried until so, bounded)."""
    num = convey.stats()["packet"]["queue"]["num"]
    deadline = time.monotonic() + 15
    while True:
        first = kernel_queue(convey.bed.lb, num)
        doc = convey.stats()
        rules = queued_by_rules(convey.bed.lb)
        again = kernel_queue(convey.bed.lb, num)
        if first == again and first["waiting"] == 0 and rules == queued_by_rules(convey.bed.lb):
            return {"kernel": first, "stats": doc, "rules": rules}
        assert time.monotonic() < deadline, f"the queue never settled: {first} {again}"
        time.sleep(0.1)


def slow_download(bed: Testbed, result: dict[str, Any]) -> None:
    """GET /bytes/DOWNLOAD from client port CPORT, read at ~6 MB/s so the hostile frames meet a live flow."""
    sock = bed.client.socket()
    try:
        sock.settimeout(20.0)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", CPORT))
        sock.connect((bed.vip, VIP_PORT))
        result["connected"] = time.monotonic()
        sock.sendall(f"GET /bytes/{DOWNLOAD} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
        head, digest, body, in_body = b"", hashlib.sha256(), 0, False
        while chunk := sock.recv(1 << 16):
            if not in_body:
                head += chunk
                if b"\r\n\r\n" not in head:
                    continue
                head, _, chunk = head.partition(b"\r\n\r\n")
                in_body = True
            digest.update(chunk)
            body += len(chunk)
            result["progress"] = body
            time.sleep(0.01)
        result.update(status=head.split(b"\r\n")[0].decode(), body=body, sha256=digest.hexdigest())
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        result["ended"] = time.monotonic()
        sock.close()


# ~90 lines: one scenario and its accounting, read top to bottom
@pytest.mark.timeout(180)
def test_hostile_traffic_through_the_queue_during_a_download(beds: Callable[..., Testbed]) -> None:
    """100,000 crafted frames (tests/netns/hostile.py) from the client namespace at the VIP and the balancer's
    ports while a 50 MB download runs per packet: the download arrives intact, convey stays up and clean, and
    every packet the queue delivered in that time landed in exactly one verdict counter.

    The accounting: the kernel gives each packet it queues an id (id_sequence) unless the queue is full
    (queue_dropped); a packet with an id is delivered to convey unless the netlink send fails (user_dropped).
    So delivered = d(id_sequence) - d(user_dropped), which must equal d(sum of the verdict counters): the
    download's packets, the crafted ones that reached the queue, and whatever the endpoints answered to them
    (their RSTs and challenge ACKs come back through the queue too). The rules' counters must equal
    d(id_sequence) + d(queue_dropped) (with GSO-sized verdicts nothing is segmented on the way in). Crafted
    frames the kernel drops before the raw table (bad IP checksums or lengths, version 6) or that no rule
    matches (packets from the client to the balancer's own ports, later fragments) never reach convey, and are
    not expected to."""
    bed = beds(1)
    lb_mac = next(link.mac for link in bed.lb.links if link.iface == "c0")
    args = {
        "iface": "eth0", "src_mac": bed.client.mac, "dst_mac": lb_mac, "client": bed.client.addr,
        "vip": bed.vip, "vport": VIP_PORT, "cport": CPORT, "server": bed.servers[0].addr,
        "sport": SERVER_PORT, "lb_server_side": bed.lb_addr_towards(0), "port_lo": 33768, "port_hi": 61000,
        "total": HOSTILE_FRAMES, "seed": 10, "rate": HOSTILE_RATE, "only": hostile_kinds(),
    }  # fmt: skip
    forger = bed.client.popen(
        [sys.executable, "-m", "tests.netns.hostile", json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_env(),
    )
    start_httpd(bed.servers[0], port=SERVER_PORT)
    convey = ConveyProcess(bed, make_config(bed, fin_linger=2.0)).start()
    try:
        ready = read_line(forger, 60)
        assert ready.startswith("ready "), ready
        before = accounting(convey)
        result: dict[str, Any] = {}
        reader = threading.Thread(target=slow_download, args=(bed, result))
        reader.start()
        deadline = time.monotonic() + 5
        while "connected" not in result and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert "connected" in result, result
        assert forger.stdin is not None
        forger.stdin.write(b"go\n")
        forger.stdin.flush()
        out, err = forger.communicate(timeout=60)
        assert forger.returncode == 0, err.decode(errors="replace")[-3000:]
        sent = json.loads(out)
        reader.join(60)
        assert not reader.is_alive(), "the download hung"
    finally:
        if forger.poll() is None:
            forger.kill()
    assert sent["frames"] == HOSTILE_FRAMES and sent["sent"] + sent["refused"] == HOSTILE_FRAMES, sent
    assert convey.running

    after = accounting(convey)
    k0, k1 = before["kernel"], after["kernel"]
    v0, v1 = counters(before["stats"]), counters(after["stats"])
    delivered = (k1["ids"] - k0["ids"]) - (k1["user_dropped"] - k0["user_dropped"])
    counted = verdict_total(v1) - verdict_total(v0)
    edge0, edge1 = before["stats"]["packet"]["queue"], after["stats"]["packet"]["queue"]
    no_verdict = edge1.get("no_verdict", 0) - edge0.get("no_verdict", 0)
    delta = {k: v1[k] - v0.get(k, 0) for k in v1 if v1[k] != v0.get(k, 0)}
    report(
        "hostile traffic",
        frames=sent,
        download={k: result.get(k) for k in ("status", "body", "progress", "error")}
        | {"seconds": round(result["ended"] - result["connected"], 1)},
        delivered=delivered,
        counted=counted,
        rules=after["rules"] - before["rules"],
        kernel_before=k0,
        kernel_after=k1,
        verdicts=delta,
        parse_errors=after["stats"]["packet"].get("parse_errors"),
        edge=edge1,
    )
    assert counted + no_verdict == delivered, f"{delivered} packets delivered, {counted} counted"
    assert no_verdict == 0
    assert after["rules"] - before["rules"] == (k1["ids"] - k0["ids"]) + (k1["dropped"] - k0["dropped"])
    # the crafted frames did reach convey and landed where their kind must: RSTs for the live tuple outside
    # the window (a few percent fall inside the conservative superset of it and pass); RSTs from the server to
    # every port of the range, almost all unused; ACKs with odd options from unknown client tuples; ICMP
    # errors (all but the echo requests are queued and each lands in one icmp_* counter)
    kinds = sent["kinds"]
    assert delta.get("rst_out_of_window", 0) >= 0.9 * kinds["live_rst"], delta
    assert delta.get("unknown_return", 0) >= 0.9 * kinds["ret_rst_sweep"], delta
    assert delta.get("unknown_flow", 0) >= 0.5 * (kinds["tcp_options"] + kinds["ip_options"]), delta
    assert delta.get("malformed", 0) > 0 and delta.get("ip_options", 0) > 0, delta
    icmp = sum(delta.get(name, 0) for name in ICMP_VERDICTS)
    assert icmp >= kinds["icmp_live"] + kinds["icmp_ret"], delta
    assert delta.get("errors", 0) == 0 and after["stats"]["packet"]["io_errors"] == 0
    # last, so that a broken download still shows the accounting above
    assert "error" not in result and result.get("body") == DOWNLOAD, f"the download failed: {result}"
    assert result["status"].startswith("HTTP/1.1 200"), result
    assert result["sha256"] == payload_sha256(DOWNLOAD)
    stop_clean(convey)


# -- faults under load ---------------------------------------------------------------------------------------

FAST = 2.0  # seconds: a connection to a killed server must have failed within this (a RST, not a timeout)
# seconds: a download open when its server was killed ends once the client has read what the server's kernel
# still held (its send buffer, up to 4 MB, read at ~1.5 MB/s), then sees the end of a short body
DRAINED = 5.0


def kill(web: HttpServer) -> float:
    """SIGKILL the server's process group; returns when the signal was sent."""
    killed = time.monotonic()
    os.killpg(web.proc.pid, signal.SIGKILL)
    web.proc.wait(5)
    return killed


def faults_config(bed: Testbed, servers: list[int], weights: dict[int, int] | None = None) -> str:
    """Health checks every 0.5 s, 2 to fall or rise: a killed server is out within ~1 s."""
    return make_config(bed, servers=servers, weights=weights, interval=0.5, rise=2, fall=2)


def detail(doc: dict[str, Any], server: str) -> dict[str, Any]:
    found: dict[str, Any] = doc["backends"]["web_servers"]["server_detail"].get(server, {})
    return found


# ~120 lines: one timeline of faults and the checks on the records it produced, kept together on purpose
@pytest.mark.timeout(max(150, FAULTS_SECONDS + 90))
def test_faults_under_load_fail_only_the_killed_servers_clients_and_fast(
    beds: Callable[..., Testbed],
) -> None:
    """FAULTS_SECONDS of short (GET /) and long (4 MB read slowly, sha256) connections per packet while
    server1 is killed and restarted, server2 is added by a reload, server0 drained (weight 0) and restored,
    server2 killed and restarted. Every failed connection must be one to a server that was just killed: named
    by the response (long downloads cut by the kill) or, when no byte came back (a connect refused by the dead
    server's RST), ended between the kill and the moment /stats showed the server down; and it failed fast,
    never by timeout. Every other connection succeeded with intact bytes; the restarted and the added servers
    got traffic again, the drained one got no new connection while drained."""
    bed = beds(3)
    webs = [start_httpd(server, port=SERVER_PORT) for server in bed.servers]
    convey = ConveyProcess(bed, faults_config(bed, [0, 1])).start()  # server2 runs, not configured yet
    load_args = {"addr": bed.vip, "port": VIP_PORT, "seconds": FAULTS_SECONDS, "short": 12, "long": 4}
    load = bed.client.popen(
        [sys.executable, "-m", "testbed.conn_load", "mixed", json.dumps(load_args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=python_env(),
    )
    started = time.monotonic()
    kills: list[tuple[str, float, float]] = []  # (server, killed at, seen down at)
    marks: dict[str, float] = {}
    reloads = 0

    def at(fraction: float) -> None:
        time.sleep(max(0.0, started + fraction * FAULTS_SECONDS - time.monotonic()))

    def kill_and_wait(i: int) -> None:
        killed = kill(webs[i])
        convey.wait_stats(lambda d: not detail(d, f"s{i}")["healthy"], 10, f"server{i} taken out")
        kills.append((f"server{i}", killed, time.monotonic()))

    def restart(i: int) -> None:
        webs[i] = start_httpd(bed.servers[i], port=SERVER_PORT)
        convey.wait_stats(lambda d: detail(d, f"s{i}").get("healthy"), 10, f"server{i} back")
        marks[f"server{i} up"] = time.monotonic()

    def reload(text: str, what: str) -> None:
        nonlocal reloads
        convey.write_config(text)
        reloads += 1
        convey.wait_stats(lambda d: d["reloads"] == reloads, 10, what)
        marks[what] = time.monotonic()

    try:
        at(0.12)
        kill_and_wait(1)
        at(0.25)
        restart(1)
        at(0.40)
        reload(faults_config(bed, [0, 1, 2]), "server2 added")
        convey.wait_stats(lambda d: detail(d, "s2").get("healthy"), 10, "server2 healthy")
        at(0.55)
        reload(faults_config(bed, [0, 1, 2], {0: 0}), "server0 drained")
        at(0.70)
        kill_and_wait(2)
        at(0.80)
        restart(2)
        at(0.90)
        reload(faults_config(bed, [0, 1, 2]), "server0 restored")
        at(1.0)
        out, err = load.communicate(timeout=FAULTS_SECONDS * 0.1 + 30)
    finally:
        if load.poll() is None:
            load.kill()
    assert load.returncode == 0, err.decode(errors="replace")[-3000:]
    records: list[dict[str, Any]] = json.loads(out)["records"]

    def excused(r: dict[str, Any]) -> bool:
        for server, killed, down in kills:
            # open to it when it died: cut, at once or once the data its kernel had buffered was read
            if r["server"] == server and r["start"] < killed <= r["end"] <= killed + DRAINED:
                return True
            if (
                r["server"] is None
                and killed <= r["end"] <= down + 1.0
                and r["end"] - max(r["start"], killed) < FAST
            ):
                return True
        return False

    failed = [r for r in records if r["error"]]
    unexcused = [r for r in failed if not excused(r)]
    short = [r for r in records if r["kind"] == "short"]
    long = [r for r in records if r["kind"] == "long"]
    by_server = {
        name: sum(1 for r in records if r["server"] == name) for name in ("server0", "server1", "server2")
    }
    doc = convey.wait_stats(settled, 20, "every flow closed")
    report(
        "faults under load",
        seconds=FAULTS_SECONDS,
        connections=len(records),
        short=len(short),
        long=len(long),
        failed=len(failed),
        failures=sorted({r["error"].split(":")[0] for r in failed}),
        slowest_failure=max((round(r["end"] - r["start"], 2) for r in failed), default=None),
        by_server=by_server,
        kills=[(s, round(k - started, 1), round(d - k, 2)) for s, k, d in kills],
        marks={what: round(t - started, 2) for what, t in marks.items()},
        queue=doc["packet"]["queue"],
    )
    for r in unexcused:  # times relative to the start of the load, as in the report above
        r.update({k: round(r[k] - started, 3) for k in ("start", "connected", "end") if k in r})
    assert not unexcused, f"{len(unexcused)} failures not explained by a kill: {unexcused[:5]}"
    assert not [r for r in failed if r["error"].startswith("Timeout")], "a connection hung"
    assert len(short) >= 10 * FAULTS_SECONDS and len(long) >= FAULTS_SECONDS / 4, (len(short), len(long))
    assert all(r["error"] is None for r in long if r["server"] == "server0"), "server0 was never killed"

    def served(name: str, since: float, until: float = float("inf")) -> int:
        return sum(
            1 for r in records if r["server"] == name and since < r.get("connected", r["start"]) < until
        )

    assert served("server1", marks["server1 up"]) > 0, "restarted server1 got no traffic"
    assert served("server2", marks["server2 added"]) > 0, "added server2 got no traffic"
    drained = served("server0", marks["server0 drained"] + 0.2, marks["server0 restored"] - 0.2)
    assert drained == 0, f"drained server0 got {drained} new connections"
    assert_clean(doc)
    stop_clean(convey)
