"""Roles for packet-path benchmarks (run in a test bed's namespaces, see bench/lib/roles.py): an accept-only
NFQUEUE loop, a frame blaster, and a set of held-open connections for the blasted frames to belong to."""

from __future__ import annotations

import json
import select
import socket
import struct
import sys
import time
from typing import Any

# convey.dataplane.nfqueue's binding parameters
QUEUE_MAXLEN = 8192
COPY_RANGE = 4016
SOCK_RCVBUF = 8 * 1024 * 1024
MAX_BLAST_PACKETS = 50_000_000


def accept_only(queue_num: int, max_seconds: float) -> None:
    """Bind the queue like convey does; accept every packet. A line on stdin -> print the count; an empty line,
    ``stop`` or EOF -> unbind and exit."""
    from netfilterqueue import NetfilterQueue

    count = 0

    def callback(pkt: Any) -> None:
        nonlocal count
        count += 1
        pkt.accept()

    nfq = NetfilterQueue()
    nfq.bind(queue_num, callback, max_len=QUEUE_MAXLEN, range=COPY_RANGE, sock_len=SOCK_RCVBUF)
    fd = nfq.get_fd()
    print("ready", flush=True)
    end = time.monotonic() + max_seconds
    try:
        while time.monotonic() < end:
            readable, _, _ = select.select([fd, sys.stdin], [], [], 1.0)
            if fd in readable:
                nfq.run(block=False)
            if sys.stdin in readable:
                if sys.stdin.readline().strip() in ("", "stop"):
                    break
                print(count, flush=True)
    finally:
        nfq.unbind()


def blast(iface: str, seconds: float) -> None:
    """Frames (hex, one JSON list on stdin) to an AF_PACKET socket in a tight loop for ``seconds``."""
    frames = [bytes.fromhex(h) for h in json.loads(sys.stdin.readline())]
    sock = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    sock.bind((iface, 0))
    send = sock.send
    print("ready", flush=True)
    sent = 0
    start = time.monotonic()
    end = start + seconds
    while sent < MAX_BLAST_PACKETS:
        for frame in frames:
            send(frame)
        sent += len(frames)
        if time.monotonic() >= end:
            break
    print(json.dumps({"sent": sent, "seconds": time.monotonic() - start}), flush=True)


def flows(vip: str, port: int, first_sport: int, count: int, max_seconds: float) -> None:
    """Open ``count`` connections from fixed source ports; print ready; hold them until stdin says stop; then
    reset them (SO_LINGER 0: no TIME_WAIT on the client, so the ports are free for the next run)."""
    socks = []
    for i in range(count):
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("0.0.0.0", first_sport + i))
        sock.settimeout(5)
        sock.connect((vip, port))
        socks.append(sock)
    print("ready", flush=True)
    select.select([sys.stdin], [], [], max_seconds)
    for sock in socks:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()
    print("closed", flush=True)
