"""Hostile frames for the robustness test (issue 10): built in advance, replayed fast from the client side.

    python -m tests.netns.hostile '{"iface": "eth0", "src_mac": ..., "dst_mac": ..., "client": ..., ...}'

Builds ``total`` Ethernet frames addressed to the balancer's MAC, prints ``ready N``, waits for a line on
stdin, sends them with an AF_PACKET socket (so the kernel changes nothing: bad IP checksums and lengths go out
as they are) at about ``rate`` frames/s, and prints a JSON report (frames sent, sends the kernel refused,
seconds, frames per kind).

scapy builds a few templates per kind; the bulk are variants of them whose random fields (sequence and
acknowledgement numbers, ports, IP ids, quoted sequence numbers, option bytes) are patched in place with
checksums recomputed here (scapy takes ~100 us a packet: 100,000 would take longer than the download). The
kinds (``KINDS``, frames each; ``filler`` takes the rest of ``total``):

- ``live_rst``, ``live_synfin``, ``live_syn``, ``live_ack``: the live download's client tuple (client:cport ->
  VIP:vport), random sequence and acknowledgement numbers, no payload (a blind attacker who knows the tuple);
- ``ret_rst_sweep``: a RST from the server (server:sport -> the balancer's server-side address) to every port
  of the balancer's ephemeral range, so the live flow's port is hit too; ``ret_synfin``: SYN|FIN to random
  ports;
- ``icmp_live``: ICMP errors (fragmentation needed with odd MTUs, port and host unreachable, time exceeded,
  parameter problem) to the VIP quoting the live flow's VIP -> client packet with random sequence numbers,
  quotes of 8, 20 and 40 TCP bytes; ``icmp_ret``: the same from the server to the balancer quoting
  balancer:eport -> server at random ports; ``icmp_odd``: quotes of UDP, cut quotes, bad ICMP checksums,
  echo requests;
- ``ip_options``: NOP, record route, timestamp, router alert and garbage options on ACKs (random tuples and
  the live tuple); ``tcp_options``: random option bytes on ACKs and on SYNs (the SYNs open flows);
- ``fragments``: first fragments alone, later fragments alone, complete sets (8-byte first fragments too) and
  overlapping pairs;
- ``truncated``: TCP headers cut, IP total length beyond the frame or short of it, data offset 15 and 2, IP
  header length 15 with garbage options and below 5, version 6;
- ``bad_checksum``: wrong IP header checksums, wrong TCP checksums (random tuples, and the live tuple with a
  payload: forwarded, then dropped by the server);
- ``filler`` (to the balancer's own ports): SYN, ACK and RST from the client to the balancer's addresses on
  ports inside and outside the ephemeral range (not for convey: the balancer's kernel answers).
"""

from __future__ import annotations

import json
import random
import socket
import struct
import sys
import time
from collections.abc import Callable
from typing import Any

from scapy.compat import raw
from scapy.layers.inet import ICMP, IP, TCP, UDP, IPOption_NOP, fragment
from scapy.layers.l2 import Ether
from scapy.packet import Raw

ETH = 14
KINDS = {
    "live_rst": 12_000,
    "live_synfin": 8_000,
    "live_syn": 2_000,
    "live_ack": 3_000,
    "ret_rst_sweep": -1,  # one per port of the range
    "ret_synfin": 5_000,
    "icmp_live": 6_000,
    "icmp_ret": 4_000,
    "icmp_odd": 2_000,
    "ip_options": 5_000,
    "tcp_options": 5_000,
    "fragments": 8_000,
    "truncated": 7_500,
    "bad_checksum": 5_000,
    # "filler": the rest of ``total``
}
SYN_SHARE = 0.2  # of tcp_options: SYNs, each opens a flow (bounded so the port pool stays far from full)

Frame = bytearray
Maker = Callable[[random.Random], list[Frame]]


def checksum(data: bytes | bytearray) -> int:
    if len(data) % 2:
        data = bytes(data) + b"\0"
    total = sum(struct.unpack(f"!{len(data) // 2}H", data))
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    return int(~total & 0xFFFF)


def fix_ip(frame: Frame) -> None:
    ihl = (frame[ETH] & 0x0F) * 4
    frame[ETH + 10 : ETH + 12] = b"\0\0"
    frame[ETH + 10 : ETH + 12] = struct.pack("!H", checksum(frame[ETH : ETH + ihl]))


def fix_tcp(frame: Frame) -> None:
    """Recompute the TCP checksum of a whole packet whose IP total length fits the frame."""
    at = ETH + (frame[ETH] & 0x0F) * 4
    end = ETH + struct.unpack_from("!H", frame, ETH + 2)[0]
    frame[at + 16 : at + 18] = b"\0\0"
    pseudo = bytes(frame[ETH + 12 : ETH + 20]) + struct.pack("!BBH", 0, 6, end - at)
    frame[at + 16 : at + 18] = struct.pack("!H", checksum(pseudo + bytes(frame[at:end])))


def patch(frame: Frame, at: int, new: bytes, csum_at: int) -> None:
    """Write ``new`` (an even number of bytes, at an even offset from the checksummed area's start) at ``at``
    and update the checksum at ``csum_at`` incrementally (RFC 1624): a wrong checksum stays exactly as
    wrong."""
    total = ~struct.unpack_from("!H", frame, csum_at)[0] & 0xFFFF
    for i in range(0, len(new), 2):
        total += (~struct.unpack_from("!H", frame, at + i)[0] & 0xFFFF) + struct.unpack_from("!H", new, i)[0]
    while total >> 16:
        total = (total & 0xFFFF) + (total >> 16)
    frame[at : at + len(new)] = new
    struct.pack_into("!H", frame, csum_at, ~total & 0xFFFF)


def vary(rng: random.Random, group: list[Frame]) -> list[Frame]:
    """A copy of a template group with fresh random fields: the TCP sequence number, or the sequence number an
    ICMP error quotes, or (fragments) the IP id, the same for the whole group; checksums updated
    incrementally."""
    out = [bytearray(frame) for frame in group]
    new_id = rng.randbytes(2)
    for frame in out:
        if len(frame) < ETH + 20 or frame[ETH] >> 4 != 4 or (frame[ETH] & 0x0F) < 5:
            continue
        at = ETH + (frame[ETH] & 0x0F) * 4
        if len(group) > 1 or struct.unpack_from("!H", frame, ETH + 6)[0] & 0x3FFF:
            patch(frame, ETH + 4, new_id, ETH + 10)
        elif frame[ETH + 9] == 6 and len(frame) >= at + 18:
            patch(frame, at + 4, rng.randbytes(4), at + 16)
        elif frame[ETH + 9] == 1 and len(frame) >= at + 28 and (frame[at + 8] & 0x0F) >= 5:
            quoted = at + 8 + (frame[at + 8] & 0x0F) * 4
            if frame[at + 17] == 6 and len(frame) >= quoted + 8:
                patch(frame, quoted + 4, rng.randbytes(4), at + 2)
    return out


class Builder:
    """Template groups per kind (scapy); ``build`` varies them."""

    def __init__(self, a: dict[str, Any]) -> None:
        self.a = a
        self.eth = Ether(src=a["src_mac"], dst=a["dst_mac"])

    def frame(self, pkt: Any) -> Frame:
        return bytearray(raw(self.eth / pkt))

    def cport(self, rng: random.Random) -> int:
        while (port := rng.randrange(1024, 65536)) == self.a["cport"]:
            pass
        return port

    def eport(self, rng: random.Random) -> int:
        return rng.randrange(self.a["port_lo"], self.a["port_hi"] + 1)

    def tcp(
        self, rng: random.Random, flags: str, live: bool = True, payload: bytes = b"", **ip: Any
    ) -> Frame:
        """client -> VIP:vport (from the live client port, or a random other one), random seq and ack."""
        a = self.a
        sport = a["cport"] if live else self.cport(rng)
        seq, ack = rng.randrange(1 << 32), rng.randrange(1 << 32)
        segment = TCP(sport=sport, dport=a["vport"], flags=flags, seq=seq, ack=ack)
        return self.frame(IP(src=a["client"], dst=a["vip"], **ip) / segment / Raw(payload))

    def ret(self, rng: random.Random, flags: str, eport: int | None = None) -> Frame:
        """server:sport -> the balancer's server-side address:eport (default: a random port of the range)."""
        a = self.a
        segment = TCP(
            sport=a["sport"], dport=eport or self.eport(rng), flags=flags, seq=rng.randrange(1 << 32)
        )
        return self.frame(IP(src=a["server"], dst=a["lb_server_side"]) / segment)

    def icmp(self, rng: random.Random, src: str, dst: str, quoted: Any) -> Frame:
        kind = rng.choice([(3, 4), (3, 4), (3, 3), (3, 1), (11, 0), (12, 0)])
        extra: dict[str, Any] = {}
        if kind == (3, 4):
            extra["nexthopmtu"] = rng.choice([0, 68, 576, 1000, 1280, 1400, 1499, 65535])
        elif kind == (12, 0):
            extra["ptr"] = rng.randrange(40)
        quote = raw(quoted)[: 20 + rng.choice([8, 20, 40])]
        return self.frame(IP(src=src, dst=dst) / ICMP(type=kind[0], code=kind[1], **extra) / Raw(quote))

    # one template group per call, for each kind

    def icmp_live(self, rng: random.Random) -> list[Frame]:
        a = self.a
        segment = TCP(sport=a["vport"], dport=a["cport"], flags="A", seq=rng.randrange(1 << 32))
        quoted = IP(src=a["vip"], dst=a["client"]) / segment / Raw(b"x" * 40)
        return [self.icmp(rng, a["client"], a["vip"], quoted)]

    def icmp_ret(self, rng: random.Random) -> list[Frame]:
        a = self.a
        segment = TCP(sport=self.eport(rng), dport=a["sport"], flags="A", seq=rng.randrange(1 << 32))
        quoted = IP(src=a["lb_server_side"], dst=a["server"]) / segment / Raw(b"y" * 40)
        return [self.icmp(rng, a["server"], a["lb_server_side"], quoted)]

    def icmp_odd(self, rng: random.Random) -> list[Frame]:
        a = self.a
        choice = rng.randrange(5)
        if choice == 0:  # a quote of UDP
            quoted = IP(src=a["vip"], dst=a["client"]) / UDP(sport=53, dport=a["cport"]) / Raw(b"z" * 8)
            return [self.icmp(rng, a["client"], a["vip"], quoted)]
        if choice == 1:  # a quote too short to hold the ports
            cut = raw(IP(src=a["vip"], dst=a["client"]) / TCP(sport=a["vport"], dport=a["cport"]))
            quote = Raw(cut[: 20 + rng.randrange(4)])
            return [self.frame(IP(src=a["client"], dst=a["vip"]) / ICMP(type=3, code=4) / quote)]
        if choice == 2:  # a wrong ICMP checksum
            frame = self.icmp_live(rng)[0]
            frame[ETH + 22] ^= 0x5A
            return [frame]
        if choice == 3:  # no quote at all
            dst = rng.choice([a["vip"], a["lb_server_side"]])
            return [self.frame(IP(src=a["client"], dst=dst) / ICMP(type=3, code=1))]
        return [self.frame(IP(src=a["client"], dst=a["vip"]) / ICMP(type=8) / Raw(b"ping"))]

    def ip_options(self, rng: random.Random) -> list[Frame]:
        content = rng.choice([
            b"\x01" * 4,  # NOPs
            b"\x07\x0b\x04" + bytes(9),  # record route
            b"\x94\x04\x00\x00",  # router alert
            b"\x44\x0c\x05\x00" + bytes(8),  # timestamp
            rng.randbytes(rng.choice([4, 8, 20, 40])),  # garbage
        ])  # fmt: skip
        size = (len(content) + 3) // 4 * 4
        frame = self.tcp(rng, "A", live=rng.random() < 0.3, options=[IPOption_NOP()] * size)
        frame[ETH + 20 : ETH + 20 + size] = content.ljust(size, b"\0")
        fix_tcp(frame)
        fix_ip(frame)
        return [frame]

    def tcp_options(self, rng: random.Random) -> list[Frame]:
        n = rng.choice([4, 8, 20, 40])
        frame = self.tcp(rng, "S" if rng.random() < SYN_SHARE else "A", live=False)
        options = bytearray(rng.randbytes(n))
        if rng.random() < 0.5:  # a known kind with a silly length
            options[:3] = bytes([rng.choice([2, 3, 4, 5, 8]), rng.choice([0, 1, 2, 40, 255]), 14])
        # the same segment with n option bytes: longer data offset, IP total length
        at = ETH + 20
        frame[at + 20 : at + 20] = options
        frame[at + 12] = ((20 + n) // 4) << 4
        struct.pack_into("!H", frame, ETH + 2, len(frame) - ETH)
        fix_tcp(frame)
        fix_ip(frame)
        return [frame]

    def fragments(self, rng: random.Random) -> list[Frame]:
        size = rng.choice([8, 16, 200])
        payload = rng.randbytes(64 if size < 200 else 600)
        a = self.a
        segment = TCP(sport=self.cport(rng), dport=a["vport"], flags="PA", seq=rng.randrange(1 << 32))
        pkt = IP(src=a["client"], dst=a["vip"], id=rng.randrange(1, 65536)) / segment / Raw(payload)
        pieces = fragment(pkt, fragsize=size)  # type: ignore[no-untyped-call]
        frags = [bytearray(raw(self.eth / f)) for f in pieces]
        choice = rng.randrange(4)
        if choice == 0:
            return frags[:1]
        if choice == 1:
            return frags[1:2] or frags[:1]
        if choice == 2:
            return frags
        overlap = bytearray(frags[0])  # a second first fragment with other bytes
        overlap[-4:] = b"\xde\xad\xbe\xef"
        return [frags[0], overlap]

    def truncated(self, rng: random.Random) -> list[Frame]:
        frame = self.tcp(rng, "PA", live=False, payload=b"q" * 32)
        tcp_at = ETH + 20
        choice = rng.randrange(7)
        if choice == 0:  # the TCP header cut, total length consistent
            del frame[tcp_at + rng.randrange(1, 20) :]
            struct.pack_into("!H", frame, ETH + 2, len(frame) - ETH)
        elif choice == 1:  # total length beyond the frame
            del frame[rng.randrange(tcp_at, len(frame)) :]
        elif choice == 2:  # total length short of the frame (the kernel trims the rest)
            struct.pack_into("!H", frame, ETH + 2, 40 + rng.randrange(32))
        elif choice == 3:  # data offset 15 (60 bytes) in a 52-byte segment, or 2 (less than the header)
            frame[tcp_at + 12] = rng.choice([0xF0, 0x20]) | (frame[tcp_at + 12] & 0x0F)
        elif choice == 4:  # IP header length 15: 40 bytes of TCP header and payload read as options
            frame[ETH] = 0x4F
        elif choice == 5:  # IP header length below 5
            frame[ETH] = 0x40 | rng.randrange(5)
        else:  # version 6 in an IPv4 frame
            frame[ETH] = 0x65
        if choice in (0, 2, 3, 4):
            fix_ip(frame)
        return [frame]

    def bad_checksum(self, rng: random.Random) -> list[Frame]:
        choice = rng.randrange(3)  # the IP header's; TCP's on a random tuple; TCP's on the live tuple
        frame = self.tcp(rng, "PA", live=choice == 2, payload=b"b" * rng.choice([1, 100]))
        frame[ETH + 10 if choice == 0 else ETH + 20 + 16] ^= 0xA5
        return [frame]

    def filler(self, rng: random.Random) -> list[Frame]:
        a = self.a
        dst = rng.choice([a["vip"], a["lb_server_side"]])
        dport = rng.choice([self.eport(rng), rng.randrange(1, 1024), 7000])
        segment = TCP(sport=self.cport(rng), dport=dport, flags=rng.choice(["S", "A", "R", "PA"]))
        return [self.frame(IP(src=a["client"], dst=dst) / segment)]


TEMPLATES = 40  # scapy-built template groups per kind (~2 ms each here); the frames are variants of them


def build(a: dict[str, Any]) -> tuple[list[bytes], dict[str, int]]:
    """Every frame, shuffled, and how many of each kind."""
    rng = random.Random(a["seed"])
    b = Builder(a)
    makers: dict[str, Maker] = {
        "live_rst": lambda r: [b.tcp(r, "R")],
        "live_synfin": lambda r: [b.tcp(r, "SF")],
        "live_syn": lambda r: [b.tcp(r, "S")],
        "live_ack": lambda r: [b.tcp(r, "A")],
        "ret_synfin": lambda r: [b.ret(r, "SF")],
        "icmp_live": b.icmp_live,
        "icmp_ret": b.icmp_ret,
        "icmp_odd": b.icmp_odd,
        "ip_options": b.ip_options,
        "tcp_options": b.tcp_options,
        "fragments": b.fragments,
        "truncated": b.truncated,
        "bad_checksum": b.bad_checksum,
        "filler": b.filler,
    }
    frames: list[Frame] = []
    counts: dict[str, int] = {}
    only = set(a.get("only") or [*KINDS, "ret_rst_sweep", "filler"])  # a subset, to find which kind does what
    template = b.ret(rng, "R", a["port_lo"])
    for eport in range(a["port_lo"], a["port_hi"] + 1) if "ret_rst_sweep" in only else ():  # every port
        frame = bytearray(template)
        patch(frame, ETH + 22, eport.to_bytes(2, "big"), ETH + 36)
        frames += vary(rng, [frame])
    counts["ret_rst_sweep"] = len(frames)
    for kind, maker in makers.items():
        pool = [maker(rng) for _ in range(TEMPLATES)]
        goal = (a["total"] - len(frames) if kind == "filler" else KINDS[kind]) if kind in only else 0
        start = len(frames)
        while len(frames) - start < goal:
            frames += vary(rng, rng.choice(pool))
        counts[kind] = len(frames) - start
    rng.shuffle(frames)
    return [bytes(f) for f in frames], counts


def send(frames: list[bytes], iface: str, rate: float, burst: int = 200) -> dict[str, Any]:
    out = socket.socket(socket.AF_PACKET, socket.SOCK_RAW)
    out.bind((iface, 0))
    sent = refused = 0
    started = time.monotonic()
    for first in range(0, len(frames), burst):
        for frame in frames[first : first + burst]:
            try:
                out.send(frame)
                sent += 1
            except OSError:  # ENOBUFS: the receiving side's backlog was full
                refused += 1
        ahead = started + (first + burst) / rate - time.monotonic()
        if ahead > 0:
            time.sleep(ahead)
    return {"sent": sent, "refused": refused, "seconds": round(time.monotonic() - started, 3)}


def main(argv: list[str]) -> int:
    a = json.loads(argv[0])
    started = time.monotonic()
    frames, counts = build(a)
    print(f"ready {len(frames)} {time.monotonic() - started:.2f}", flush=True)
    sys.stdin.readline()
    report = send(frames, a["iface"], a["rate"])
    print(json.dumps(report | {"kinds": counts, "frames": len(frames)}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
