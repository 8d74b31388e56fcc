"""GET /flows in the packet modes on the namespace test bed: open connections listed with their tuple, server,
state, bytes and why the scheduler chose that server; a runtime drain moves new flows only. Root only.

Passthrough (routed bed, wrr): the WRR turn; DSR (L2 bed, rewrite = "ip", Maglev): the slot of the client
tuple's hash, checked against a Maglev table built here from the same config.
"""

from __future__ import annotations

import json
import socket
from collections.abc import Iterator
from typing import Any

import pytest

from convey.balancing.pool import Pool
from convey.balancing.schedulers import flow_hash
from convey.config import parse_config
from testbed.bed import Testbed
from testbed.convey_proc import STATS_PORT, ConveyProcess
from testbed.dsr import dsr_config, prepare_servers, start_servers, unprepare_servers
from testbed.httpd_proc import start_httpd
from testbed.process import wait_until

VIP_PORT, SERVER_PORT = 80, 8080
TOKEN = "netns-flows-token-0123456789"
STATS = f'\n[stats]\nport = {STATS_PORT}\naddress = "127.0.0.1"\napi_token = "{TOKEN}"\n'
PARTIAL = b"GET / HTTP/1.1\r\nHost: vip\r\n"  # no blank line: the server waits, the connection stays open


def api(lb: ConveyProcess, path: str) -> Any:
    """GET a JSON document from the stats service, through a socket in the balancer's namespace."""
    with lb.bed.lb.connect("127.0.0.1", STATS_PORT, 5) as sock:
        sock.sendall(f"GET {path} HTTP/1.0\r\nHost: convey\r\n\r\n".encode())
        data = b""
        while chunk := sock.recv(1 << 16):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0], data[:300]
    return json.loads(body)


def hold(bed: Testbed, n: int) -> list[socket.socket]:
    socks = []
    for _ in range(n):
        sock = bed.client.connect(bed.vip, VIP_PORT)
        sock.sendall(PARTIAL)
        socks.append(sock)
    return socks


def listed(lb: ConveyProcess, socks: list[socket.socket]) -> dict[str, dict[str, Any]]:
    """The /flows entries of ``socks`` by client tuple, once each is listed with its bytes from the client."""
    wanted = {"{}:{}".format(*s.getsockname()) for s in socks}
    found: dict[str, dict[str, Any]] = {}

    def check() -> bool:
        found.clear()
        found.update({f["client"]: f for f in api(lb, "/flows?limit=1000")["flows"] if f["client"] in wanted})
        return len(found) == len(wanted) and all(f["bytes_in"] == len(PARTIAL) for f in found.values())

    wait_until(check, 10, f"the held connections in /flows: {wanted}")
    return found


def passthrough_config(bed: Testbed) -> str:
    """The bed's servers (each running the test httpd, started here) behind one frontend on the VIP."""
    for server in bed.servers:
        start_httpd(server, port=SERVER_PORT)
    lines = [f'[frontends.web]\nlisten_addr = "{bed.vip}:{VIP_PORT}"\nbackend = "web_servers"']
    lines += [
        f'[backends.web_servers.servers.s{i}]\naddr = "{s.addr}:{SERVER_PORT}"'
        for i, s in enumerate(bed.servers)
    ]
    return "\n".join(lines)


def test_passthrough_flows_say_why_and_a_drain_moves_new_flows_only(routed_bed: Testbed) -> None:
    bed = routed_bed
    base = passthrough_config(bed)
    with ConveyProcess(bed, base + "\n[passthrough]\nfin_linger = 0.3\n" + STATS) as lb:
        socks = hold(bed, 4)
        try:
            flows = listed(lb, socks)
            turns = sorted(f["why"] for f in flows.values())
            assert turns == [f"wrr turn {n} (weight 1 of 2)" for n in (1, 2, 3, 4)], turns
            assert {f["server"] for f in flows.values()} == {"web_servers/s0", "web_servers/s1"}
            assert all(f["state"] == "established" and f["frontend"] == "web" for f in flows.values())
            assert all(f["bytes_out"] == 0 and f["age"] >= 0 for f in flows.values())
            doc = api(lb, "/flows?server=web_servers/s0&limit=1")
            assert (doc["total"], doc["shown"]) == (2, 1)

            done = bed.lb.python(
                ["-m", "convey", "ctl", "drain", "web_servers/s0", f"--config={lb.config_path}"]
            )
            assert "draining" in done.stdout
            more = hold(bed, 2)
            socks += more
            assert {f["server"] for f in listed(lb, more).values()} == {"web_servers/s1"}
            assert api(lb, "/flows?server=s0")["total"] == 2  # the open ones stay where they are
            done = bed.lb.python(["-m", "convey", "flows", f"--config={lb.config_path}", "--server=s0"])
            assert "wrr turn" in done.stdout and "2 of 2 flows shown" in done.stdout
        finally:
            for sock in socks:
                sock.close()


@pytest.fixture
def dsr_l2_bed() -> Iterator[Testbed]:
    bed = Testbed.create(kind="l2", servers=2)
    try:
        start_servers(bed, "ip")
        prepare_servers(bed, "ip")
        yield bed
    finally:
        try:
            unprepare_servers(bed)
        finally:
            bed.destroy()


def test_dsr_flows_name_the_maglev_slot(dsr_l2_bed: Testbed) -> None:
    bed = dsr_l2_bed
    config = dsr_config(bed, "ip") + STATS
    pool = Pool(parse_config(config).backends["web_servers"], "dsr")
    with ConveyProcess(bed, config, mode="dsr") as lb:
        socks = hold(bed, 6)
        try:
            flows = listed(lb, socks)
            vip = int.from_bytes(socket.inet_aton(bed.vip), "big")
            for client, flow in flows.items():
                addr, _, port = client.rpartition(":")
                hashed = flow_hash(int.from_bytes(socket.inet_aton(addr), "big"), int(port), vip, VIP_PORT)
                server = pool.pick(hashed)
                assert server is not None and flow["server"] == f"web_servers/{server.name}"
                assert flow["why"] == f"maglev slot {hashed % 65537} of 65537 for hash 0x{hashed:016x}"
                assert flow["bytes_out"] == 0  # DSR: the replies bypass the balancer
        finally:
            for sock in socks:
                sock.close()


def test_offloaded_flows_are_listed_from_every_worker(routed_bed: Testbed) -> None:
    """Passthrough offload with 2 workers: the connections conntrack reported open, from both workers' ledgers
    (state "offloaded"; their bytes arrive with the close, so none are shown while they are open)."""
    bed = routed_bed
    base = passthrough_config(bed)
    config = base + "\n[passthrough]\noffload = true\nworkers = 2\n" + STATS
    with ConveyProcess(bed, config) as lb:
        socks = hold(bed, 12)
        try:
            wanted = {"{}:{}".format(*s.getsockname()) for s in socks}

            def all_listed() -> dict[str, Any] | None:
                doc = api(lb, "/flows?limit=1000")
                return doc if {f["client"] for f in doc["flows"]} >= wanted else None

            doc = wait_until(all_listed, 10, "the held connections in /flows")
            flows = [f for f in doc["flows"] if f["client"] in wanted]
            assert all(f["state"] == "offloaded" and f["frontend"] == "web" for f in flows), flows
            assert {f["server"] for f in flows} == {"web_servers/s0", "web_servers/s1"}
            assert all(f["why"] == "wrr (not recorded)" and f["age"] >= 0 for f in flows), flows
            per_worker = [w["total_connections"] for w in api(lb, "/stats")["workers"]]
            assert sum(per_worker) >= 12 and min(per_worker) > 0, per_worker
        finally:
            for sock in socks:
                sock.close()
