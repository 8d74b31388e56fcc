"""Forged resets and SYN|FINs against a live passthrough flow (issue 10, defects 2 and 5), end to end. Root only.

Before the fix one forged RST with any sequence number closed the flow and a forged SYN|FIN then removed it, so
a download through passthrough broke with a RST. Here the client namespace sends, while a download runs through
convey per packet, RSTs with random sequence numbers and SYN|FINs carrying the download's 4-tuple towards the
VIP (prepared with scapy in advance, sent with a raw socket); the download must complete intact.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from testbed.bed import Testbed
from testbed.convey_proc import ConveyProcess
from testbed.httpd import payload_sha256
from testbed.httpd_proc import start_httpd
from testbed.process import read_line
from tests.netns.test_passthrough import (
    SERVER_PORT,
    VIP_PORT,
    assert_clean,
    counters,
    make_config,
    stop_clean,
)

SIZE = 30 * 1024 * 1024
CPORT = 45_678  # the download's client port, known to the forger
FORGED = 1500  # of each kind

# Runs in the client namespace: builds every packet first, prints "ready", waits for a line, then sends them
# spread over ``seconds`` and prints how many it sent.
FORGER = textwrap.dedent(
    r"""
    import json, random, socket, sys, time
    from scapy.all import IP, TCP, raw
    a = json.loads(sys.argv[1])
    rng = random.Random(a["seed"])
    def tcp(flags):
        return raw(IP(src=a["src"], dst=a["vip"]) / TCP(sport=a["cport"], dport=a["vport"], flags=flags,
                                                         seq=rng.randrange(2**32), ack=rng.randrange(2**32)))
    packets = []
    for _ in range(a["n"]):
        packets += [tcp("R"), tcp("SF")]
    out = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    print("ready", flush=True)
    sys.stdin.readline()
    if a.get("near"):
        # RSTs inside the window, off the exact sequence number: learnt from one of the client's own ACKs
        from scapy.all import sniff
        seen = sniff(iface="eth0", filter=f"tcp and src port {a['cport']}", count=1, timeout=5)[0][TCP]
        base = seen.seq + len(seen.payload)
        packets = [raw(IP(src=a["src"], dst=a["vip"]) / TCP(sport=a["cport"], dport=a["vport"], flags="R",
                                                            seq=(base + rng.randrange(1, 20000)) % 2**32))
                   for _ in range(len(packets))]
    pause = a["seconds"] / len(packets)
    for packet in packets:
        out.sendto(packet, (a["vip"], 0))
        time.sleep(pause)
    print(json.dumps({"sent": len(packets)}), flush=True)
    """
)


@pytest.fixture
def bed() -> Iterator[Testbed]:
    made = Testbed.create(kind="routed", servers=1)
    try:
        yield made
    finally:
        made.destroy()


def download(bed: Testbed, result: dict[str, Any]) -> None:
    """GET /bytes/SIZE from the client port CPORT, read at ~10 MB/s so the forged packets meet a live flow."""
    sock = bed.client.socket()
    try:
        sock.settimeout(20.0)
        sock.bind(("0.0.0.0", CPORT))
        sock.connect((bed.vip, VIP_PORT))
        result["connected"] = True
        sock.sendall(f"GET /bytes/{SIZE} HTTP/1.1\r\nHost: vip\r\n\r\n".encode())
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
            time.sleep(0.005)
            if body >= SIZE:
                break
        result.update(status=head.split(b"\r\n")[0].decode(), body=body, sha256=digest.hexdigest())
    except OSError as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
    finally:
        sock.close()


def download_under_forgery(bed: Testbed, near: bool = False) -> dict[str, Any]:
    """The download from CPORT while the client namespace sends FORGED RSTs and SYN|FINs with its 4-tuple and
    random sequence numbers (``near``: 2 x FORGED RSTs inside the window, off the exact number); asserts it
    arrived intact and returns what ``download`` found."""
    args = {"src": bed.client.addr, "vip": bed.vip, "cport": CPORT, "vport": VIP_PORT, "n": FORGED,
            "seconds": 2.5, "seed": 10, "near": near}  # fmt: skip
    forger = bed.client.popen(
        [sys.executable, "-c", FORGER, json.dumps(args)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        assert forger.stdin is not None
        assert read_line(forger, 30) == "ready"
        result: dict[str, Any] = {}
        reader = threading.Thread(target=download, args=(bed, result))
        reader.start()
        deadline = time.monotonic() + 5
        while "connected" not in result and reader.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert result.get("connected"), result
        forger.stdin.write(b"go\n")
        forger.stdin.flush()
        out, err = forger.communicate(timeout=20)
        assert forger.returncode == 0, err.decode(errors="replace")[-2000:]
        assert json.loads(out)["sent"] == 2 * FORGED
        reader.join(25)
        assert not reader.is_alive(), "the download hung"
    finally:
        if forger.poll() is None:
            forger.kill()
    assert "error" not in result, result
    assert result["status"].startswith("HTTP/1.1 200") and result["body"] == SIZE, result
    assert result["sha256"] == payload_sha256(SIZE)
    return result


def test_forged_resets_and_syn_fins_do_not_break_a_download(bed: Testbed) -> None:
    start_httpd(bed.servers[0], port=SERVER_PORT)
    convey = ConveyProcess(bed, make_config(bed, fin_linger=2.0)).start()
    download_under_forgery(bed)
    doc = convey.stats()
    verdicts = counters(doc)
    assert_clean(doc)
    # The forged RSTs outside the window were dropped and counted. The window is a superset of the server's real
    # one (its window scale allows up to 65535 << 14), so a few percent of random guesses fall inside it: they
    # pass, the flow starts its linger (kept alive by the traffic) and the server answers a challenge ACK. The
    # SYN|FINs were forwarded and changed nothing.
    assert verdicts["rst_out_of_window"] >= FORGED * 0.9, verdicts
    assert verdicts["flows_opened"] == 1 and verdicts["unknown_flow"] == 0, verdicts
    stop_clean(convey)


def test_forged_in_window_resets_end_neither_an_offloaded_download_nor_its_accounting(bed: Testbed) -> None:
    """With offload conntrack judges the forged packets. 3,000 RSTs inside the window but off the exact sequence
    number leave the entry ESTABLISHED (the kernel waits for the endpoint's challenge ACK): the rules still OR
    the RST bit into its connmark, but that event carries no TCP state and is no close. Had one closed the
    accounting, its counters would have been read then and /stats would miss most of the download (measured:
    27.1 of 31.5 MB when a RST's mark change alone was taken as the close).

    Random sequence numbers (the per-packet test above) are not run here: in 3 of about 80 runs with offload the
    download stalled under them, conntrack's own weakness (one RST inside the window moves its idea of the
    client's window and the server's next segments become INVALID; docs/modes.md)."""
    start_httpd(bed.servers[0], port=SERVER_PORT)
    convey = ConveyProcess(bed, make_config(bed, offload=True)).start()
    download_under_forgery(bed, near=True)
    doc = convey.wait_stats(
        lambda d: d["current_connections"] == 0 and d["total_connections"] >= 1, 15, "the download closed"
    )
    assert doc["total_connections"] == 1 and doc["offload"]["lost"] == 0, doc
    # the body and the response's head: the whole download, counted once, at its real close
    assert SIZE <= doc["bytes_rx"] <= SIZE * 1.01, (doc["bytes_rx"], SIZE)
    assert_clean(doc)
    stop_clean(convey)
