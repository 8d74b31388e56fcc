"""`make demo`: convey in every mode, with real servers and real traffic, then everything removed again.

1. proxy: two test servers on loopback, convey with samples/sample-proxy.toml, requests through 127.0.0.1:8080.
2. passthrough (root): a namespace test bed (client, balancer, two servers; 198.18.0.0/15), the rules installed in
   the balancer's namespace as `make install-rules` would, convey --passthrough with samples/sample-passthrough.toml.
3. DSR (root): an L2 test bed, servers prepared with scripts/setup-dsr-backend.sh, convey --dsr, both flavours.

Each step prints which server answered each request and the /stats document, and cleans up even when it fails.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.bed import Testbed  # noqa: E402
from testbed.httpd_proc import start_httpd  # noqa: E402
from testbed.process import wait_until  # noqa: E402

PY = sys.executable
SAMPLES = ROOT / "samples"


def banner(text: str) -> None:
    print(f"\n{'=' * 100}\n{text}\n{'=' * 100}", flush=True)


def brief(doc: dict[str, object]) -> str:
    """The /stats document without the per-server detail (printed separately), for a readable demo."""
    slim = json.loads(json.dumps(doc))
    for backend in slim.get("backends", {}).values():
        backend.pop("server_detail", None)
    return json.dumps(slim, indent=2, sort_keys=True)


def port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(
            socket.SOL_SOCKET, socket.SO_REUSEADDR, 1
        )  # as convey and the servers do: TIME_WAIT is fine
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def http_get(url: str, timeout: float = 5.0) -> str:
    return fetch(url, timeout).decode()


def fetch(url: str, timeout: float = 5.0) -> bytes:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return bytes(resp.read())


def demo_proxy() -> None:
    banner(
        "1. proxy mode: convey --config=samples/sample-proxy.toml (servers one:9001 weight 3, two:9002 weight 1)"
    )
    busy = [p for p in (8080, 7000, 9001, 9002) if not port_free(p)]
    if busy:
        print(
            f"skipped: ports {busy} on 127.0.0.1 are in use (the sample config needs 8080, 7000, 9001, 9002)"
        )
        return
    procs: list[subprocess.Popen[bytes]] = []
    log = Path(tempfile.mkdtemp(prefix="convey-demo-")) / "convey.log"
    try:
        for name, port in (("one", 9001), ("two", 9002)):
            p = subprocess.Popen(
                [PY, "-m", "testbed.httpd", "--bind", f"127.0.0.1:{port}", "--name", name],
                cwd=ROOT,
                stdout=subprocess.PIPE,
            )
            procs.append(p)
            assert p.stdout is not None and b"READY" in p.stdout.readline()
        with log.open("wb") as out:
            lb = subprocess.Popen(
                [PY, "-m", "convey", f"--config={SAMPLES / 'sample-proxy.toml'}"],
                cwd=ROOT,
                stdout=out,
                stderr=out,
            )
        procs.append(lb)
        wait_until(lambda: http_get("http://127.0.0.1:7000/stats"), 10, "convey's stats service")
        answers = []
        for i in range(8):
            body = http_get("http://127.0.0.1:8080/")
            answers.append(body.split()[0])
            print(f"  request {i + 1}: answered by {body.strip()}")
        print(f"  share: {dict(Counter(answers))} (weights 3:1)")
        big = fetch("http://127.0.0.1:8080/bytes/5000000", timeout=30)
        print(f"  a 5 MB download through the proxy: {len(big)} bytes")
        doc = json.loads(http_get("http://127.0.0.1:7000/stats"))
        print("  GET /stats ->")
        print(brief(doc))
    finally:
        for p in reversed(procs):
            p.send_signal(signal.SIGTERM)
            try:
                p.wait(10)
            except subprocess.TimeoutExpired:
                p.kill()
        print(f"  convey's log: {log}")


def run_in(host: object, argv: list[str]) -> str:
    result = host.run(argv)  # type: ignore[attr-defined]
    return str(result.stdout)


def demo_passthrough() -> None:
    banner("2. passthrough mode: NFQUEUE full NAT in a namespace test bed (samples/sample-passthrough.toml)")
    config = SAMPLES / "sample-passthrough.toml"
    with Testbed.create(kind="routed", servers=2) as bed:
        print(
            f"  test bed: client {bed.client.addr} -> VIP {bed.vip} (balancer ns {bed.lb.ns}) -> servers "
            f"{', '.join(bed.server_addrs)}"
        )
        for server in bed.servers:
            start_httpd(server, 8080, name=f"server-{server.addr}")
        print(
            "  $ make install-rules CONFIG=samples/sample-passthrough.toml   (inside the balancer namespace)"
        )
        print(
            "    "
            + run_in(
                bed.lb,
                [
                    PY,
                    "-m",
                    "convey",
                    "rules",
                    "install",
                    f"--config={config}",
                    "--passthrough",
                    "--log-level=WARNING",
                ],
            ).replace("\n", "\n    ")
        )
        log = bed.logdir / "convey-passthrough.log"
        with log.open("wb") as out:
            lb = bed.lb.popen(
                [PY, "-m", "convey", "--passthrough", f"--config={config}"], stdout=out, stderr=out
            )
        try:
            wait_until(lambda: run_in(bed.lb, ["curl", "-sf", "http://127.0.0.1:7000/stats"]), 15, "convey")
            answers = []
            for i in range(6):
                body = bed.client.curl(f"http://{bed.vip}:80/").decode()
                answers.append(body.split()[0])
                print(
                    f"  request {i + 1}: {body.strip()}   (the server saw the balancer's address:ephemeral port)"
                )
            print(f"  share: {dict(Counter(answers))} (equal weights)")
            data = bed.client.curl(f"http://{bed.vip}:80/bytes/20000000", timeout=60)
            print(f"  a 20 MB download through passthrough: {len(data)} bytes")
            doc = json.loads(run_in(bed.lb, ["curl", "-s", "http://127.0.0.1:7000/stats"]))
            print("  GET /stats ->")
            print(brief(doc))
        finally:
            lb.send_signal(signal.SIGTERM)
            lb.wait(15)
            print("  $ make remove-rules CONFIG=samples/sample-passthrough.toml")
            print(
                "    "
                + run_in(
                    bed.lb,
                    [PY, "-m", "convey", "rules", "remove", f"--config={config}", "--log-level=WARNING"],
                ).replace("\n", "\n    ")
            )
    print("  test bed removed")


def demo_dsr() -> None:
    try:
        from testbed.dsr import demo_dsr as run_dsr
    except ImportError:
        print("DSR demo not available in this checkout")
        return
    for rewrite in ("ip", "mac"):
        banner(f'3. DSR mode, rewrite = "{rewrite}": servers answer the client directly')
        run_dsr(rewrite)


def main() -> int:
    started = time.monotonic()
    demo_proxy()
    if os.geteuid() != 0:
        print(
            "\npassthrough and DSR need root (network namespaces, iptables): run `sudo make demo` to see them"
        )
        return 0
    demo_passthrough()
    demo_dsr()
    banner(
        f"demo finished in {time.monotonic() - started:.0f}s; nothing left behind (ip netns list is clean)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
