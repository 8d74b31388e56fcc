"""Proxy mode end to end: the real `convey` command, real test servers, real clients, all on loopback."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from tests.e2e.conftest import ROOT, WORKERS, Convey, HttpServer, free_port, http_get, stats, wait_for
from tests.e2e.conftest import who as who_answered


def write_config(
    path: Path,
    servers: dict[str, tuple[str, int]],
    listen_port: int,
    stats_port: int,
    interval: float = 0.2,
    extra_frontends: str = "",
) -> Path:
    lines = [
        "[frontends.web]",
        f'listen_addr = "127.0.0.1:{listen_port}"',
        'backend = "pool"',
        extra_frontends,
        "[backends.pool]",
        f"health_check_interval = {interval}",
        "health_check_timeout = 0.5",
        "rise = 2",
        "fall = 2",
    ]
    for name, (addr, weight) in servers.items():
        lines += [f"[backends.pool.servers.{name}]", f'addr = "{addr}"', f"weight = {weight}"]
    lines += ["[stats]", f'port = "{stats_port}"']
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)  # atomic, as an operator's tooling would do
    return path


def test_weights_reload_health_stats_end_to_end(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    vip = f"127.0.0.1:{port}"
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 10000), "b": (b.addr, 1)}, port, sport)
    lb = convey_proc(cfg)
    wait_for(lambda: stats(sport), 10, "the stats service")
    answers: Counter[str] = Counter()

    def who(addr: str) -> str:  # every request counted, to check /stats exactly at the end
        name = who_answered(addr)
        answers[name] += 1
        return name

    # weights 10000:1 -> all of 10 requests go to a
    assert [who(vip) for _ in range(10)] == ["a"] * 10

    # weight 0 for a (written to the file, no restart) -> new requests go to b within a few seconds
    write_config(cfg, {"a": (a.addr, 0), "b": (b.addr, 1)}, port, sport)
    lb.wait_log("weight 10000 -> 0")
    wait_for(lambda: who(vip) == "b", 5, "traffic to move to b after the reload")
    assert [who(vip) for _ in range(5)] == ["b"] * 5

    # a broken reload is logged with the key and the running config keeps serving
    (tmp_path / "c.toml").write_text(
        (tmp_path / "c.toml").read_text().replace("weight = 1\n", "weight = -4\n")
    )
    lb.wait_log("event=reload_rejected")
    assert "backends.pool.servers.b.weight" in lb.logs()
    assert who(vip) == "b"
    doc = stats(sport)
    assert doc["reload_failures"] >= 1 and "weight" in doc["last_reload_error"]

    # back to equal weights; kill b -> taken out after `fall` checks; restart -> back after `rise`
    write_config(cfg, {"a": (a.addr, 1), "b": (b.addr, 1)}, port, sport)
    lb.wait_log("weight 0 -> 1")
    b.stop()
    lb.wait_log("event=server_down backend=pool server=b")
    assert wait_for(
        lambda: stats(sport)["backends"]["pool"]["servers"][b.addr] is False, 5, "b down in /stats"
    )
    assert {who(vip) for _ in range(6)} == {"a"}
    b.start()
    lb.wait_log("event=server_up backend=pool server=b")
    answered = Counter(who(vip) for _ in range(6))
    if WORKERS:  # each worker keeps its own round robin turn: both servers, not exactly 3 and 3
        assert set(answered) == {"a", "b"}, answered
    else:
        assert answered == Counter({"a": 3, "b": 3})

    # /stats, /metrics and / agree with what happened
    doc = wait_for(
        lambda: (d := stats(sport))["current_connections"] == 0 and d, 5, "connections to close in /stats"
    )
    assert doc["mode"] == "proxy"
    assert doc["total_connections"] == sum(answers.values())
    pool = doc["backends"]["pool"]
    assert pool["servers"] == {a.addr: True, b.addr: True}
    assert pool["server_detail"]["a"]["total_connections"] == answers["a"]
    assert pool["server_detail"]["b"]["total_connections"] == answers["b"]
    assert doc["frontends"]["web"]["total_connections"] == sum(answers.values())
    assert doc["frontends"]["web"]["backend"] == "pool"
    assert doc["bytes_rx"] > 0 and doc["bytes_tx"] > 0
    assert (doc["total_bytes_rx"], doc["total_bytes_tx"]) == (doc["bytes_rx"], doc["bytes_tx"])
    assert doc["total_bytes_rx"] == pool["bytes_rx"] and doc["total_bytes_tx"] == pool["bytes_tx"]
    metrics = stats(sport, "/metrics")
    assert 'convey_server_up{backend="pool",server="a"} 1.0' in metrics
    assert f'convey_server_info{{addr="{a.addr}",backend="pool",server="a"}} 1.0' in metrics
    assert 'convey_server_state{backend="pool",server="a",state="up"} 1.0' in metrics
    assert f'convey_frontend_connections_total{{frontend="web"}} {float(sum(answers.values()))}' in metrics
    for key, result in (("reloads", "applied"), ("reload_failures", "rejected"), ("reload_errors", "error")):
        assert f'convey_reloads_total{{result="{result}"}} {float(doc[key])}' in metrics
    page = stats(sport, "/")
    assert "convey (proxy mode)" in page and a.addr in page

    assert lb.stop() == 0
    assert "event=stopped" in lb.logs()


def exchange(addr: str, request: bytes, timeout: float = 10.0) -> tuple[int, int]:
    """Send ``request`` on a fresh connection, read until the server closes: (bytes sent, bytes received)."""
    host, port = addr.rsplit(":", 1)
    received = 0
    with socket.create_connection((host, int(port)), timeout=timeout) as s:
        s.sendall(request)
        while chunk := s.recv(1 << 16):
            received += len(chunk)
    return len(request), received


def test_bytes_tx_counts_client_to_server_and_bytes_rx_the_replies(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    """The original convey's directions: ``bytes_tx`` what the clients sent, ``bytes_rx`` what came back, exact at
    every level. An upload and a download of known, different sizes make the two directions unmistakable."""
    a = servers("a")
    port, sport = free_port(), free_port()
    vip = f"127.0.0.1:{port}"
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 1)}, port, sport)
    convey_proc(cfg)
    wait_for(lambda: stats(sport)["backends"]["pool"]["servers"][a.addr], 10, "server a up")
    up_size, down_size = 400_000, 150_000
    upload = (
        f"POST /upload HTTP/1.1\r\nHost: x\r\nContent-Length: {up_size}\r\n\r\n".encode() + b"u" * up_size
    )
    sent_up, received_up = exchange(vip, upload)
    sent_down, received_down = exchange(vip, f"GET /bytes/{down_size} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
    assert received_up < 300 and sent_down < 100 and received_down > down_size  # the server answered both
    sent, received = sent_up + sent_down, received_up + received_down
    doc = wait_for(
        lambda: (d := stats(sport))["current_connections"] == 0 and d, 5, "connections to close in /stats"
    )
    assert (doc["total_bytes_tx"], doc["total_bytes_rx"]) == (sent, received)
    pool = doc["backends"]["pool"]
    for scope in (doc, doc["frontends"]["web"], pool, pool["server_detail"]["a"]):
        assert (scope["bytes_tx"], scope["bytes_rx"]) == (sent, received)
        assert scope["total_connections"] == 2


def test_reload_adds_and_removes_frontends(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    a = servers("a")
    port, port2, sport = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 1)}, port, sport)
    lb = convey_proc(cfg)
    wait_for(lambda: stats(sport), 10, "the stats service")
    extra = f'[frontends.second]\nlisten_addr = "127.0.0.1:{port2}"\nbackend = "pool"\n'
    write_config(cfg, {"a": (a.addr, 1)}, port, sport, extra_frontends=extra)
    lb.wait_log("frontend second listening")
    assert who_answered(f"127.0.0.1:{port2}") == "a"
    write_config(cfg, {"a": (a.addr, 1)}, port, sport)
    lb.wait_log("frontend second stopped listening")
    wait_for(lambda: _refused(port2), 5, "the removed frontend to stop accepting")
    assert who_answered(f"127.0.0.1:{port}") == "a"


def _refused(port: int) -> bool:
    try:
        http_get(f"127.0.0.1:{port}", timeout=1)
    except ConnectionRefusedError:
        return True
    return False


def test_no_healthy_server_refuses_and_counts(tmp_path: Path, convey_proc: Callable[..., Convey]) -> None:
    port, sport, dead = free_port(), free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", {"x": (f"127.0.0.1:{dead}", 1)}, port, sport)
    lb = convey_proc(cfg)
    lb.wait_log("event=server_down")
    for _ in range(3):
        try:
            body = http_get(f"127.0.0.1:{port}", timeout=3)
        except (ConnectionResetError, AssertionError):
            body = ""
        assert body == ""
    doc = wait_for(lambda: (d := stats(sport))["refused"] == 3 and d, 5, "3 refused connections in /stats")
    assert doc["current_connections"] == 0
    assert doc["frontends"]["web"]["refused"] == 3


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convey", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def test_bad_config_exits_non_zero_naming_the_key(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[frontends.f]\nlisten_addr = "127.0.0.1:1"\nbackend = "missing"\n')
    for args in ([f"--config={bad}"], ["check", f"--config={bad}"], ["--passthrough", f"--config={bad}"]):
        result = run_cli(*args)
        assert result.returncode == 1, result
        assert f"{bad}: frontends.f.backend: unknown backend 'missing'" in result.stderr
        assert "Traceback" not in result.stderr
    missing = run_cli(f"--config={tmp_path / 'nope.toml'}")
    assert missing.returncode == 1 and "file not found" in missing.stderr


def test_check_version_and_help() -> None:
    ok = run_cli("check", "--config=samples/sample-proxy.toml")
    assert (
        ok.returncode == 0
        and "OK (proxy mode)" in ok.stdout
        and "server one: 127.0.0.1:9001 weight=3" in ok.stdout
    )
    version = run_cli("--version")
    assert version.returncode == 0 and version.stdout.startswith("convey ")
    helptext = run_cli("--help")
    assert helptext.returncode == 0 and "--passthrough" in helptext.stdout and "--dsr" in helptext.stdout


def test_port_in_use_is_a_clear_startup_error(tmp_path: Path) -> None:
    import socket

    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        cfg = write_config(tmp_path / "c.toml", {"a": ("127.0.0.1:1", 1)}, port, free_port())
        result = run_cli(f"--config={cfg}")
    assert result.returncode == 2, result
    assert "web" in result.stderr and f"127.0.0.1:{port}" in result.stderr
    assert "Traceback" not in result.stderr


def test_sighup_reloads(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    cfg = write_config(tmp_path / "c.toml", {"a": (a.addr, 1)}, port, sport)
    lb = convey_proc(cfg, "--no-watch")
    wait_for(lambda: stats(sport), 10, "the stats service")
    write_config(cfg, {"b": (b.addr, 1)}, port, sport)
    assert lb.proc is not None
    lb.proc.send_signal(signal.SIGHUP)
    lb.wait_log("event=reload reason=signal")
    wait_for(lambda: who_answered(f"127.0.0.1:{port}") == "b", 5, "b to serve after SIGHUP")
