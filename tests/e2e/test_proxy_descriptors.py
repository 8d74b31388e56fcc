"""A real `convey` (proxy mode) that runs out of descriptors (issue 10, defect 1).

The child process starts with RLIMIT_NOFILE (40, 64): convey raises the soft limit to the hard one and logs it. Idle
clients then fill every descriptor. While that lasts: health checks fail with EMFILE and must not take the server
down; new clients must wait in the accept queue (not be accepted and dropped in a loop, which is what uvloop's own
accept path does); the process must not spin. Once the idle clients leave, the clients that waited are served.
The config uses no key that HEAD lacks, so the same test shows the failure on the code before the fix.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import socketserver
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.conftest import ROOT, free_port, stats, wait_for

LOOPS = ["asyncio", "uvloop"]
CHILD = (
    "import resource, sys\n"
    "resource.setrlimit(resource.RLIMIT_NOFILE, (40, 64))\n"
    "from convey.cli import main\n"
    "sys.exit(main(sys.argv[1:]))\n"
)
CLK_TCK = os.sysconf("SC_CLK_TCK")


class _Echo(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        with contextlib.suppress(OSError):
            while data := self.request.recv(65536):
                self.request.sendall(data)


class _EchoServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


@pytest.fixture
def echo_server() -> Iterator[int]:
    server = _EchoServer(("127.0.0.1", 0), _Echo)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    server.server_close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime, stime


def echoes(sock: socket.socket, data: bytes, timeout: float) -> str:
    """'ok' when ``data`` comes back within ``timeout``, 'waiting' when nothing comes, 'closed' on EOF/RST."""
    sock.settimeout(timeout)
    try:
        sock.sendall(data)
        got = sock.recv(len(data))
    except TimeoutError:
        return "waiting"
    except OSError:
        return "closed"
    return "ok" if got == data else "closed"


def still_open(sock: socket.socket) -> bool:
    """Neither EOF nor RST has arrived (nothing is read)."""
    sock.setblocking(False)
    try:
        return sock.recv(1, socket.MSG_PEEK) != b""
    except BlockingIOError:
        return True
    except OSError:
        return False


@pytest.mark.parametrize("loop", LOOPS)
def test_out_of_descriptors_pauses_accepting_and_keeps_servers_up(
    loop: str, tmp_path: Path, echo_server: int
) -> None:
    if loop == "uvloop":
        pytest.importorskip("uvloop")
    port, stats_port = free_port(), free_port()
    config = tmp_path / "convey.toml"
    config.write_text(
        f'[frontends.web]\nlisten_addr = "127.0.0.1:{port}"\nbackend = "app"\n'
        "[backends.app]\nhealth_check_interval = 0.2\nhealth_check_timeout = 0.2\nrise = 1\nfall = 1\n"
        f'[backends.app.servers.echo]\naddr = "127.0.0.1:{echo_server}"\n'
        f"[stats]\nport = {stats_port}\n"
    )
    log_path = tmp_path / "convey.log"
    env = {**os.environ, "CONVEY_LOOP": loop}
    clients: list[socket.socket] = []
    with open(log_path, "wb") as log_file:
        proc = subprocess.Popen(
            [sys.executable, "-c", CHILD, f"--config={config}", "--log-level=DEBUG", "--no-watch"],
            cwd=ROOT,
            stdout=log_file,
            stderr=subprocess.STDOUT,
            env=env,
        )
    try:

        def logs() -> str:
            return log_path.read_text(errors="replace")

        wait_for(lambda: "event=started" in logs(), 15, "convey to start")
        assert "event=nofile_limit soft=64 hard=64" in logs()

        # Idle clients until one is not served: descriptors are exhausted.
        waiting: socket.socket | None = None
        for _ in range(60):
            sock = socket.create_connection(("127.0.0.1", port), timeout=2)
            clients.append(sock)
            outcome = echoes(sock, b"i", 0.5)
            if outcome == "closed":
                pytest.fail(f"client {len(clients)} was dropped when descriptors ran out\n{logs()[-3000:]}")
            if outcome == "waiting":
                waiting = sock
                break
        assert waiting is not None, "60 idle clients never exhausted the descriptors"
        idle = clients[:-1]
        assert len(idle) >= 5, len(idle)

        # While exhausted: late clients wait in the queue, health checks do not take the server down, no spinning.
        late = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(3)]
        clients += late
        for sock in late:
            sock.sendall(b"L")
        cpu_before, started = cpu_seconds(proc.pid), time.monotonic()
        wait_for(
            lambda: "event=health_local_error" in logs(), 5, f"a health check to hit the limit:\n{logs()}"
        )
        while time.monotonic() - started < 1.2:  # several health rounds (0.2 s) and accept pauses
            time.sleep(0.1)
        cpu = cpu_seconds(proc.pid) - cpu_before
        elapsed = time.monotonic() - started
        assert "event=server_down" not in logs(), logs()[-3000:]
        assert "event=accept_paused" in logs()
        assert cpu < 0.4 * elapsed, f"convey used {cpu:.2f}s CPU in {elapsed:.2f}s while out of descriptors"
        assert all(still_open(s) for s in late), (
            f"a client waiting to be accepted was dropped\n{logs()[-4000:]}"
        )

        # The idle clients leave: every client that waited is served.
        for sock in idle:
            sock.close()
        for sock, sent in [(waiting, b"i"), *((s, b"L") for s in late)]:
            sock.setblocking(True)
            sock.settimeout(5)
            assert sock.recv(1) == sent, logs()[-3000:]
        fresh = socket.create_connection(("127.0.0.1", port), timeout=2)
        clients.append(fresh)
        assert echoes(fresh, b"f", 5) == "ok"

        doc = wait_for(lambda: stats(stats_port), 10, "/stats")
        assert doc["backends"]["app"]["servers"] == {f"127.0.0.1:{echo_server}": True}
        assert doc["backends"]["app"]["server_detail"]["echo"]["failed"] == 0
        assert doc["backends"]["app"]["server_detail"]["echo"]["checks_failed"] == 0
        assert doc["failed"] == 0
        assert doc["health"]["local_errors"] > 0
        assert doc["proxy"]["frontends"]["web"]["accept_pauses"] > 0
    finally:
        for sock in clients:
            sock.close()
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
