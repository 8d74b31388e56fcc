"""Proxy mode with worker processes (``--workers`` / ``[proxy] workers``), end to end on loopback.

Every worker listens on every frontend with SO_REUSEPORT (the kernel spreads connections by their addresses and
ports); the supervisor runs the health checks, the reloads and the stats service, and sums the workers' counters.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ROOT, Convey, HttpServer, free_port, http_get, stats, wait_for, who
from tests.e2e.test_proxy_mode import _refused, write_config

REQUESTS = 200


def start(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey], workers: int = 2
) -> tuple[Convey, Path, str, int, list[HttpServer]]:
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 1), "b": (b.addr, 1)}, port, sport)
    lb = convey_proc(cfg, f"--workers={workers}")
    wait_for(lambda: len(stats(sport)["workers"]) == workers, 15, "the workers and the stats service")
    return lb, cfg, f"127.0.0.1:{port}", sport, [a, b]


def workers_with_connections(doc: dict[str, Any]) -> int:
    return sum(1 for w in doc["workers"] if w["total_connections"] > 0)


def test_two_workers_share_the_connections_and_stats_add_up(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    lb, _, vip, sport, _ = start(tmp_path, servers, convey_proc)
    answers = Counter(who(vip) for _ in range(REQUESTS))
    # each worker keeps its own round robin: the two servers' shares differ by at most one per worker
    assert abs(answers["a"] - answers["b"]) <= 2, answers
    doc = wait_for(
        lambda: (d := stats(sport))["current_connections"] == 0 and d, 5, "every connection closed"
    )
    assert doc["total_connections"] == REQUESTS
    assert workers_with_connections(doc) == 2, doc["workers"]
    for key in ("total_connections", "bytes_tx", "bytes_rx"):
        assert sum(w[key] for w in doc["workers"]) == doc[key], key
    detail = doc["backends"]["pool"]["server_detail"]
    assert (detail["a"]["total_connections"], detail["b"]["total_connections"]) == (
        answers["a"],
        answers["b"],
    )
    assert doc["frontends"]["web"]["total_connections"] == REQUESTS
    metrics = stats(sport, "/metrics")
    assert "convey_" in metrics
    pids = [w["pid"] for w in doc["workers"]]
    assert lb.stop() == 0
    assert all(not os.path.exists(f"/proc/{pid}") for pid in pids)
    assert lb.logs().count("event=listening frontend=web") == 2  # once per worker


def test_reload_and_health_reach_every_worker(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    lb, cfg, vip, sport, (a, b) = start(tmp_path, servers, convey_proc)
    # a new frontend: every worker listens on it
    port2 = free_port()
    extra = f'[frontends.second]\nlisten_addr = "127.0.0.1:{port2}"\nbackend = "pool"\n'
    write_config(
        cfg, {"a": (a.addr, 1), "b": (b.addr, 1)}, int(vip.split(":")[1]), sport, extra_frontends=extra
    )
    wait_for(
        lambda: all("second" in w["proxy"]["frontends"] for w in stats(sport)["workers"]),
        10,
        "every worker to listen on the new frontend",
    )
    assert {who(f"127.0.0.1:{port2}") for _ in range(20)} <= {"a", "b"}
    # weight 0 for a: no worker sends it anything new
    write_config(
        cfg, {"a": (a.addr, 0), "b": (b.addr, 1)}, int(vip.split(":")[1]), sport, extra_frontends=extra
    )
    lb.wait_log("weight 1 -> 0")
    wait_for(lambda: {who(vip) for _ in range(10)} == {"b"}, 10, "every worker to send everything to b")
    # b dies: the supervisor's checks take it out of every worker (and the second frontend goes from all)
    write_config(cfg, {"a": (a.addr, 1), "b": (b.addr, 1)}, int(vip.split(":")[1]), sport)
    lb.wait_log("weight 0 -> 1")
    wait_for(
        lambda: not any("second" in w["proxy"]["frontends"] for w in stats(sport)["workers"]),
        10,
        "every worker to stop listening on the removed frontend",
    )
    wait_for(lambda: _refused(port2), 5, "the removed frontend to refuse connections")
    b.stop()
    lb.wait_log("event=server_down backend=pool server=b")
    assert {who(vip) for _ in range(20)} == {"a"}
    doc = wait_for(
        lambda: (d := stats(sport))["current_connections"] == 0 and d, 5, "every connection closed"
    )
    assert doc["backends"]["pool"]["server_detail"]["b"]["state"] == "down"
    assert workers_with_connections(doc) == 2
    assert lb.stop() == 0


def test_a_killed_worker_is_restarted(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    lb, _, vip, sport, _ = start(tmp_path, servers, convey_proc)
    victim = stats(sport)["workers"][1]["pid"]
    os.kill(victim, signal.SIGKILL)
    lb.wait_log("event=worker_died worker=1")
    doc = wait_for(
        lambda: (d := stats(sport))["workers"][1]["alive"] and d["workers"][1]["pid"] != victim and d,
        15,
        "worker 1 to be restarted",
    )
    assert doc["workers"][1]["restarts"] == 1
    assert all(http_get(vip) for _ in range(40))
    assert lb.stop() == 0
    assert "event=worker_restarted worker=1" in lb.logs()


def test_bad_worker_counts_are_clear_errors(tmp_path: Path) -> None:
    port = free_port()
    cfg = write_config(tmp_path / "c.toml", {"a": ("127.0.0.1:1", 1)}, port, free_port())
    for args, code, text in (
        (["--workers=0"], 2, "--workers: must be between 1 and 256, got 0"),
        (["--workers=many"], 2, '--workers: must be a number or "auto"'),
    ):
        proc = subprocess.run(
            [sys.executable, "-m", "convey", f"--config={cfg}", *args],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert proc.returncode == code and text in proc.stderr, (args, proc.returncode, proc.stderr)
    cfg.write_text(cfg.read_text() + "[proxy]\nworkers = -1\n")
    proc = subprocess.run(
        [sys.executable, "-m", "convey", "check", f"--config={cfg}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 1 and "proxy.workers" in proc.stderr, proc.stderr


def test_the_runtime_api_reaches_every_worker(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    """A drain through the API applies to every worker at once, and GET /flows lists every worker's flows."""
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 1), "b": (b.addr, 1)}, port, sport)
    cfg.write_text(cfg.read_text() + f'api_token = "{TOKEN}"\n')
    convey_proc(cfg, "--workers=2")
    wait_for(lambda: len(stats(sport)["workers"]) == 2, 15, "the workers")
    vip = f"127.0.0.1:{port}"
    answer = api(sport, "POST", "/api/servers/pool/a/drain")
    assert answer["state"] == "draining", answer
    assert {who(vip) for _ in range(30)} == {"b"}  # at once, in both workers
    api(sport, "POST", "/api/servers/pool/a/ready")
    assert {who(vip) for _ in range(30)} == {"a", "b"}
    # open connections held in both workers show up in /flows
    held = [socket.create_connection(("127.0.0.1", port)) for _ in range(20)]
    try:
        doc = wait_for(
            lambda: (d := api(sport, "GET", "/flows?limit=100"))["total"] >= 20 and d, 5, "20 flows"
        )
        assert doc["total"] == 20 and len(doc["flows"]) == 20
        assert workers_with_active(stats(sport)) == 2
    finally:
        for sock in held:
            sock.close()


TOKEN = "a-test-token-of-enough-length"


def workers_with_active(doc: dict[str, Any]) -> int:
    return sum(1 for w in doc["workers"] if w["current_connections"] > 0)


def api(port: int, method: str, path: str) -> Any:
    request = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        method=method,
        headers={"Authorization": f"Bearer {TOKEN}"},
        data=b"" if method == "POST" else None,
    )
    with urllib.request.urlopen(request, timeout=5) as resp:
        return json.loads(resp.read())
