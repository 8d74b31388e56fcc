"""Worker processes in the packet modes, end to end (root only): ``[passthrough] workers`` / ``[dsr] workers``.

The supervisor installs the rules of N queues (client -> VIP packets steered by client port bits, the servers'
replies by the worker's slice of the port range), starts N workers, sums their counters in /stats and restarts a
worker that dies. Checked here with real namespaces, real clients and servers: every connection succeeds, every
counter is exact in the sum, every worker took part, no reply ever reached a worker that does not own its port
(``unknown_return`` stays 0 in each worker), a killed worker comes back, a SIGKILLed supervisor takes its workers
with it, and DSR downloads survive their worker's death (Maglev picks the same server in the new worker).
"""

from __future__ import annotations

import hashlib
import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess, ConveyProcessError
from testbed.dsr import VIP_PORT as DSR_VIP_PORT
from testbed.dsr import dsr_config, fetch_many, prepare_servers, start_servers, unprepare_servers
from testbed.httpd import payload_sha256
from testbed.process import python_env, read_line, wait_until
from tests.netns.test_flows import api, hold
from tests.netns.test_passthrough import (
    assert_clean,
    client,
    client_popen,
    counters,
    finish,
    make_config,
    queued_packets,
    saved_ruleset,
    served_by,
    settled,
    settled_with,
    stop_clean,
)
from tests.netns.test_passthrough import (
    start_servers as start_pt_servers,
)
from tests.netns.test_queue_binding import HOLD_QUEUE

CONNECTIONS = 80
MB = 1_000_000


@pytest.fixture
def beds() -> Iterator[Callable[..., Testbed]]:
    made: list[Testbed] = []

    def make(kind: str = "routed", servers: int = 2) -> Testbed:
        bed = Testbed.create(kind=kind, servers=servers)
        made.append(bed)
        return bed

    yield make
    for bed in made:
        bed.destroy()


def worker_pids(doc: dict[str, Any]) -> list[int]:
    return [int(w["pid"]) for w in doc["workers"] if w.get("alive")]


def traffic(bed: Testbed) -> tuple[int, int]:
    """A 20 MB download while CONNECTIONS short requests run, every one checked: (bytes sent, received)."""
    download = client_popen(bed, "get", n=1, path=f"/bytes/{20 * MB}", timeout=60)
    results = client(bed, "get", n=CONNECTIONS)
    done = finish(download, 70)[0]
    assert done["error"] is None and done["sha256"] == payload_sha256(20 * MB), done
    assert [r["error"] for r in results if r["error"]] == []
    sent = sum(r["sent"] for r in results) + done["sent"]
    return sent, sum(r["received"] for r in results) + done["received"]


def kill_each_worker(convey: ConveyProcess, count: int) -> None:
    """SIGKILL every worker in turn, each time waiting until the supervisor has restarted it."""
    for index in range(count):
        victim = convey.stats()["workers"][index]["pid"]
        os.kill(victim, signal.SIGKILL)
        convey.wait_stats(
            lambda d, i=index, v=victim: d["workers"][i]["alive"] and d["workers"][i]["pid"] != v,
            15,
            f"worker {index} to be restarted",
        )


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    with open(f"/proc/{pid}/stat") as f:  # a zombie no one reaped yet is gone too
        return f.read().split(") ", 1)[1].startswith("Z")


@pytest.mark.parametrize("workers", [1, 2, 4])
def test_passthrough_workers_share_the_load_and_counters_stay_exact(
    beds: Callable[..., Testbed], workers: int
) -> None:
    bed = beds()
    webs = start_pt_servers(bed)
    rules_before = saved_ruleset(bed.lb)
    convey = ConveyProcess(bed, make_config(bed, workers=workers)).start()
    sent, received = traffic(bed)
    doc = convey.wait_stats(settled_with(sent, received), 15, "every flow closed and its port freed")
    assert_clean(doc)
    verdicts = counters(doc)
    assert verdicts["flows_opened"] == verdicts["flows_closed"] == CONNECTIONS + 1
    assert doc["total_connections"] == CONNECTIONS + 1  # bytes: >= (a retransmitted segment counts twice)
    server_total = sum(
        s["total_connections"] for s in doc["backends"]["web_servers"]["server_detail"].values()
    )
    assert server_total == CONNECTIONS + 1
    # every packet the rules queued reached some worker and was counted there
    assert sum(queued_packets(bed.lb).values()) == sum(
        verdicts[k] for k in ("ingress_accepted", "ingress_dropped", "return_accepted", "return_dropped")
    )
    if workers == 1:
        assert "workers" not in doc
    else:
        assert [w["index"] for w in doc["workers"]] == list(range(workers))
        for key in ("total_connections", "bytes_tx", "bytes_rx"):
            assert sum(w[key] for w in doc["workers"]) == doc[key], key
        for w in doc["workers"]:
            assert w["alive"] and w["queue"] == w["index"], w
            assert w["total_connections"] > 0, f"worker {w['index']} got no connection: {doc['workers']}"
            mine = w["packet"]["verdicts"]
            assert mine["unknown_return"] == 0 and mine["unknown_flow"] == 0, (w["index"], mine)
        # the port slices are disjoint and cover the range
        spans = [tuple(int(p) for p in w["port_range"].split("-")) for w in doc["workers"]]
        assert spans[0][0] == 33768 and spans[-1][1] == 61000
        assert all(spans[i][1] + 1 == spans[i + 1][0] for i in range(workers - 1))
    pids = worker_pids(doc) if workers > 1 else []
    stop_clean(convey)
    assert all(pid_gone(pid) for pid in pids)
    assert all(web.errors() == "" for web in webs)
    assert saved_ruleset(bed.lb) == rules_before  # convey removed exactly the rules it installed


def test_passthrough_offload_with_two_workers(beds: Callable[..., Testbed]) -> None:
    """Each worker decides its share of first packets with its number in the mark; conntrack's events of a
    connection reach only the worker that decided it, so the summed counters are exact."""
    bed = beds()
    start_pt_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, workers=2, offload=True)).start()
    sent, received = traffic(bed)
    doc = convey.wait_stats(settled_with(sent, received), 15, "conntrack to report every connection closed")
    assert doc["total_connections"] == CONNECTIONS + 1 and doc["offload"]["closed"] == CONNECTIONS + 1
    assert counters(doc)["ingress_accepted"] == CONNECTIONS + 1  # one decision per connection, no more
    assert doc["offload"]["unknown_mark"] == 0
    for w in doc["workers"]:
        assert w["total_connections"] > 0, doc["workers"]
    assert sum(w["total_connections"] for w in doc["workers"]) == CONNECTIONS + 1
    # every worker killed during a download: the kernel carries the connection meanwhile, and the restarted
    # worker adopts it from conntrack (its number is in the connection's mark)
    download = client_popen(bed, "get", n=1, path=f"/bytes/{40 * MB}", timeout=60)
    wait_until(lambda: convey.stats()["current_connections"] == 1, 10, "the download to open")
    kill_each_worker(convey, 2)
    done = finish(download, 70)[0]
    assert done["error"] is None and done["sha256"] == payload_sha256(40 * MB), done
    doc = convey.wait_stats(lambda d: d["current_connections"] == 0, 15, "the download's close")
    assert doc["offload"]["unknown_mark"] == 0
    pids = worker_pids(doc)
    log = convey.stop()
    assert log.count("event=worker_restarted") == 2 and "Traceback" not in log
    assert all(pid_gone(pid) for pid in pids)


def test_a_removed_server_drains_in_every_worker(beds: Callable[..., Testbed]) -> None:
    """A reload removes server1 while both workers hold connections to it: /stats shows it draining (the workers'
    entries: the supervisor's pool forgot it), new connections go to server0, the open ones complete, and its
    return rules go once the last worker's last flow to it has closed."""
    bed = beds()
    start_pt_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, workers=2)).start()
    socks = hold(bed, 12)
    try:
        wanted = {"{}:{}".format(*s.getsockname()): s for s in socks}

        def all_flows() -> dict[str, Any] | None:
            doc: dict[str, Any] = api(convey, "/flows?limit=100")
            return doc if len(doc["flows"]) == 12 else None

        flows = wait_until(all_flows, 10, "the 12 held connections in /flows")
        on_s1 = [wanted[f["client"]] for f in flows["flows"] if f["server"] == "web_servers/s1"]
        assert on_s1, flows
        convey.write_config(make_config(bed, servers=[0], workers=2))
        doc = convey.wait_stats(lambda d: d["reloads"] == 1, 15, "the reload removing server1")
        s1 = doc["backends"]["web_servers"]["server_detail"]["s1"]
        assert (s1["state"], s1["current_connections"]) == ("removed-draining", len(on_s1)), s1
        assert {served_by(r)[0] for r in client(bed, "get", n=8)} == {"server0"}
        assert "198.18.2.2/32" in bed.lb.run(["iptables-save", "-t", "raw"]).stdout  # still routed back to us
        for sock in on_s1:  # the open connections to the removed server complete
            sock.sendall(b"\r\n")
            sock.settimeout(10)
            assert sock.recv(65536).startswith(b"HTTP/1.1 200")
    finally:
        for sock in socks:
            sock.close()
    convey.wait_stats(
        lambda d: settled(d) and "s1" not in d["backends"]["web_servers"]["server_detail"],
        15,
        "server1 drained",
    )
    wait_until(
        lambda: "198.18.2.2/32" not in bed.lb.run(["iptables-save", "-t", "raw"]).stdout, 10, "its rules gone"
    )
    stop_clean(convey)


def test_a_killed_worker_is_restarted_and_new_connections_succeed(beds: Callable[..., Testbed]) -> None:
    """Per-packet passthrough: the dead worker's mappings are lost (its open connections end); the new worker
    takes the same queue and port slice, and new connections through it succeed."""
    bed = beds()
    start_pt_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, workers=2)).start()
    assert [r["error"] for r in client(bed, "get", n=20) if r["error"]] == []
    before = convey.stats()
    victim = before["workers"][0]["pid"]
    os.kill(victim, signal.SIGKILL)
    doc = convey.wait_stats(
        lambda d: d["workers"][0]["alive"] and d["workers"][0]["pid"] != victim,
        15,
        "worker 0 to be restarted",
    )
    assert doc["workers"][0]["restarts"] == 1 and doc["workers"][1]["pid"] == before["workers"][1]["pid"]
    results = client(bed, "get", n=40)
    assert [r["error"] for r in results if r["error"]] == []
    doc = convey.wait_stats(lambda d: d["current_connections"] == 0, 10, "every connection closed")
    assert doc["total_connections"] == 60  # the dead worker's 20-odd connections are still counted
    assert all(w["total_connections"] > 0 for w in doc["workers"]), doc["workers"]
    log = convey.stop()
    assert "event=worker_died worker=0" in log and "event=worker_restarted worker=0" in log, log[-3000:]
    assert "Traceback" not in log


def test_a_killed_supervisor_takes_its_workers_with_it(beds: Callable[..., Testbed]) -> None:
    bed = beds()
    start_pt_servers(bed)
    convey = ConveyProcess(bed, make_config(bed, workers=2)).start()
    pids = worker_pids(convey.stats())
    assert len(pids) == 2
    assert convey.proc is not None
    os.kill(convey.proc.pid, signal.SIGKILL)  # no chance to stop anything: PR_SET_PDEATHSIG must
    convey.proc.wait(5)
    wait_until(lambda: all(pid_gone(pid) for pid in pids), 10, "the workers to end with their supervisor")
    convey.kill()


def test_config_errors_about_workers_name_the_key(beds: Callable[..., Testbed]) -> None:
    bed = beds()
    for extra, key in (
        ({"workers": 0}, "passthrough.workers"),
        ({"workers": -2}, "passthrough.workers"),
        ({"workers": 8, "port_range": "40000-40300"}, "passthrough.workers"),
        ({"workers": 256, "offload": True}, "passthrough.workers"),
    ):
        proc = ConveyProcess(bed, make_config(bed, **extra))
        with pytest.raises(Exception) as failure:
            proc.start(timeout=10)
        assert key in str(failure.value) or key in proc.log(), (extra, proc.log()[-1000:])
        proc.kill()


def test_a_queue_held_elsewhere_stops_the_start_cleanly(beds: Callable[..., Testbed]) -> None:
    """Worker 1's queue is bound by another process: a start error naming the worker, the queue and how to see
    who holds it; worker 0 is stopped again and the rules are gone."""
    bed = beds()
    before = saved_ruleset(bed.lb)
    holder = bed.lb.popen([sys.executable, "-c", HOLD_QUEUE, "8"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          env=python_env())  # fmt: skip
    try:
        assert read_line(holder, 10) == "ready"
        proc = ConveyProcess(bed, make_config(bed, workers=2, queue_num=7))
        with pytest.raises(ConveyProcessError) as failed:
            proc.start()
        text = str(failed.value)
        assert "worker 1 of 2 could not start" in text and "NFQUEUE 8" in text, text[-2000:]
        assert "cat /proc/net/netfilter/nfnetlink_queue" in text and "Traceback" not in text, text[-3000:]
    finally:
        holder.kill()
        holder.wait(10)
    assert not [line for line in bed.lb.run(["pgrep", "-af", "convey.workers.child"], check=False).stdout.splitlines()
                if bed.lb.ns in line]  # fmt: skip
    assert saved_ruleset(bed.lb) == before


@pytest.fixture
def dsr_bed(beds: Callable[..., Testbed], rewrite: str) -> Iterator[Testbed]:
    bed = beds("l2")
    start_servers(bed, rewrite)
    prepare_servers(bed, rewrite)
    try:
        yield bed
    finally:
        unprepare_servers(bed)


@pytest.mark.parametrize(
    ("workers", "offload", "rewrite"),
    [(2, False, "ip"), (4, False, "ip"), (2, True, "ip"), (2, True, "mac")],
)
def test_dsr_workers_spread_and_keep_downloads_when_a_worker_dies(
    dsr_bed: Testbed, workers: int, offload: bool, rewrite: str
) -> None:
    """Per packet a restarted worker picks the flow up again (Maglev gives the same server); with offload the
    kernel carries it meanwhile and the new worker adopts its entry (its number is in the entry's mark), and each
    worker's conntrack events are its own: the summed counters stay exact. ``mac`` with offload: the worker's
    number rides in every packet's fwmark, and the policy routing's ip rules compare the server's bits only."""
    bed = dsr_bed
    config = _merge_dsr_workers(dsr_config(bed, rewrite, weights=[1, 1], offload=offload), workers)
    ip_rules_before = bed.lb.run(["ip", "rule", "show"]).stdout
    with ConveyProcess(bed, config, mode="dsr") as lb:
        if rewrite == "mac" and offload:
            rules_now = bed.lb.run(["ip", "rule", "show"]).stdout
            assert re.search(r"fwmark 0x[0-9a-f]+/0xffffff lookup", rules_now), rules_now
        result = fetch_many(bed.client, bed.vip, DSR_VIP_PORT, 200)
        assert result["failed"] == 0, result
        assert set(result["counts"]) == {"server0", "server1"}, result
        doc = lb.stats()
        assert len(doc["workers"]) == workers
        assert all(w["packet"]["verdicts"]["accepted"] > 0 for w in doc["workers"]), doc["workers"]
        assert doc["packet"]["verdicts"]["errors"] == 0
        if offload:  # one decision per connection; conntrack (one way: the client's FIN) closes each
            doc = lb.wait_stats(lambda d: d["current_connections"] == 0, 15, "conntrack to report the closes")
            assert doc["total_connections"] == 200 and doc["offload"]["unknown_mark"] == 0, doc["offload"]
            assert sum(w["total_connections"] for w in doc["workers"]) == 200
        # a 60 MB download while every worker is killed in turn: the new worker picks the flow up again
        size = 60 * MB
        url = f"http://{bed.vip}:{DSR_VIP_PORT}/bytes/{size}"
        path = bed.logdir / "big"
        proc = bed.client.popen(["curl", "-sS", "--fail", "--max-time", "60", "-o", str(path), url])
        try:
            kill_each_worker(lb, workers)
            assert proc.wait(70) == 0
        finally:
            if proc.poll() is None:
                proc.kill()
        assert hashlib.sha256(path.read_bytes()).hexdigest() == payload_sha256(size)
        path.unlink()
        log = lb.stop()
        assert log.count("event=worker_restarted") == workers
    assert bed.lb.run(["ip", "rule", "show"]).stdout == ip_rules_before  # removed exactly (mac)


def _merge_dsr_workers(config: str, workers: int) -> str:
    """``config`` with ``workers`` in its [dsr] section (added when it has none)."""
    if "[dsr]\n" in config:
        return config.replace("[dsr]\n", f"[dsr]\nworkers = {workers}\n", 1)
    return config + f"\n[dsr]\nworkers = {workers}\n"
