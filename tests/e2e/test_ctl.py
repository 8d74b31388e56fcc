"""The runtime API end to end in proxy mode on loopback: `convey ctl`, `convey flows`, `convey check --diff`."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import urllib.error
import urllib.request
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

from tests.e2e.conftest import ROOT, WORKERS, Convey, HttpServer, free_port, stats, wait_for, who

TOKEN = "e2e-token-0123456789abcdef"


def write(path: Path, servers: dict[str, tuple[str, int]], port: int, sport: int, token: str | None) -> Path:
    lines = [
        f'[frontends.web]\nlisten_addr = "127.0.0.1:{port}"\nbackend = "pool"',
        "[backends.pool]\nhealth_check_interval = 0.2\nrise = 1\nfall = 2",
    ]
    for name, (addr, weight) in servers.items():
        lines.append(f'[backends.pool.servers.{name}]\naddr = "{addr}"\nweight = {weight}')
    lines.append(f"[stats]\nport = {sport}")
    if token is not None:
        token_file = path.with_name("token")
        token_file.write_text(token + "\n")
        lines.append(f'api_token_file = "{token_file}"')
    tmp = path.with_suffix(".tmp")
    tmp.write_text("\n".join(lines) + "\n")
    os.replace(tmp, path)
    return path


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "convey", *args], cwd=ROOT, capture_output=True, text=True, timeout=30
    )


def api(sport: int, method: str, path: str, body: bytes | None = None, token: str | None = None) -> Any:
    req = urllib.request.Request(f"http://127.0.0.1:{sport}{path}", data=body, method=method)
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=5) as answer:
            return answer.status, json.loads(answer.read())
    except urllib.error.HTTPError as exc:
        return exc.code, json.loads(exc.read())


def test_ctl_drain_weight_flows_and_diff(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    vip = f"127.0.0.1:{port}"
    cfg = write(tmp_path / "c.toml", {"a": (a.addr, 1), "b": (b.addr, 1)}, port, sport, TOKEN)
    lb = convey_proc(cfg)
    wait_for(lambda: stats(sport), 10, "the stats service")
    conf = f"--config={cfg}"

    done = cli("ctl", "status", conf)
    assert done.returncode == 0, done.stderr
    assert "backend pool (wrr)" in done.stdout and a.addr in done.stdout and "up" in done.stdout

    done = cli("ctl", "drain", "pool/a", conf)
    assert done.returncode == 0 and "draining" in done.stdout, done.stderr
    assert Counter(who(vip) for _ in range(6)) == Counter({"b": 6})
    doc = stats(sport)
    assert doc["backends"]["pool"]["server_detail"]["a"]["state"] == "draining"
    assert doc["runtime"]["overlay"] == {"pool/a": {"weight": None, "admin": "drain"}}

    # refused requests: exit 1, the API's message, no change; the wrong token is logged, never shown
    done = cli("ctl", "weight", "pool/a", "2000000", conf)
    assert done.returncode == 1 and "weight must be between 0 and 1000000" in done.stderr
    done = cli("ctl", "ready", "pool/nope", conf)
    assert done.returncode == 1 and "unknown server" in done.stderr
    done = cli("ctl", "ready", "pool/a", conf, "--token=not-the-token-at-all")
    assert done.returncode == 1 and "unauthorized" in done.stderr and "HTTP 401" in done.stderr
    lb.wait_log("event=api_unauthorized")
    assert "not-the-token-at-all" not in lb.logs() and TOKEN not in lb.logs()
    status, _ = api(sport, "PUT", "/api/servers/pool/a/weight", b'{"weight": "x"}', TOKEN)
    assert status == 400
    assert stats(sport)["runtime"]["overlay"] == {"pool/a": {"weight": None, "admin": "drain"}}

    done = cli("ctl", "ready", "pool/a", conf)
    assert done.returncode == 0 and " up " in done.stdout
    done = cli("ctl", "weight", "pool/a", "3", f"--url=http://127.0.0.1:{sport}", f"--token={TOKEN}")
    assert done.returncode == 0 and "weight 3 (file 1)" in done.stdout
    answered = Counter(who(vip) for _ in range(8))
    if WORKERS:  # a round robin turn per worker: mostly a, both seen
        assert answered["a"] > answered["b"] > 0, answered
    else:
        assert answered == Counter({"a": 6, "b": 2})

    # a reload that changes b's file weight keeps a's runtime weight
    write(cfg, {"a": (a.addr, 1), "b": (b.addr, 2)}, port, sport, TOKEN)
    wait_for(lambda: stats(sport)["backends"]["pool"]["server_detail"]["b"]["weight"] == 2, 10, "the reload")
    _, doc = api(sport, "GET", "/api/backends")
    assert doc["backends"]["pool"]["servers"]["a"]["weight"] == 3

    # an open connection, listed with why its server was chosen
    with socket.create_connection(("127.0.0.1", port), timeout=5) as held:
        held.sendall(b"GET / HTTP/1.0\r\n")  # no end of headers: the server waits
        cport = held.getsockname()[1]
        flows = wait_for(
            lambda: [
                f for f in api(sport, "GET", f"/flows?client=127.0.0.1:{cport}")[1]["flows"] if f["bytes_in"]
            ],
            5,
            "the held connection in /flows",
        )
        (flow,) = flows
        assert flow["frontend"] == "web" and flow["state"] == "established" and flow["bytes_in"] == 16
        assert flow["server"] in ("pool/a", "pool/b") and flow["why"].startswith("wrr turn ")
        assert "(weight " in flow["why"] and flow["age"] >= 0
        done = cli("flows", conf, "--server=pool", "--limit=5")
        assert done.returncode == 0 and f"127.0.0.1:{cport}" in done.stdout and "wrr turn" in done.stdout

        # reload preview against the running instance and against a file
        new = write(tmp_path / "new.toml", {"a": (a.addr, 1), "c": ("127.0.0.1:1", 1)}, port, sport, TOKEN)
        done = cli("check", f"--config={new}", "--diff")
        assert done.returncode == 0, done.stderr
        assert "- server pool/b" in done.stdout and "+ server pool/c 127.0.0.1:1 weight 1" in done.stdout
        assert "flows: of 1 open flows" in done.stdout
        done = cli("check", f"--config={new}", "--diff", f"--against={cfg}")
        assert (
            done.returncode == 0 and "~ server pool/b" not in done.stdout and "- server pool/b" in done.stdout
        )

    done = cli("check", f"--config={cfg}", "--diff", f"--against={cfg}")
    assert done.returncode == 0 and "no changes" in done.stdout
    done = cli("ctl", "status", f"--url=http://127.0.0.1:{free_port()}")
    assert done.returncode == 2 and "cannot reach" in done.stderr


def test_without_a_token_the_api_is_read_only(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey]
) -> None:
    a = servers("a")
    port, sport = free_port(), free_port()
    cfg = write(tmp_path / "c.toml", {"a": (a.addr, 1)}, port, sport, None)
    convey_proc(cfg)
    wait_for(lambda: stats(sport), 10, "the stats service")
    status, doc = api(sport, "GET", "/api/backends")
    assert status == 200 and doc["read_only"] is True
    done = cli("ctl", "drain", "pool/a", f"--config={cfg}", f"--token={TOKEN}")
    assert done.returncode == 1 and "read-only: no [stats] api_token configured" in done.stderr
    assert api(sport, "POST", "/api/servers/pool/a/drain", b"", TOKEN)[0] == 403
    assert stats(sport)["backends"]["pool"]["server_detail"]["a"]["state"] == "up"
