"""Packets built and checked with scapy, shared by the packet-core tests (scapy stays out of convey/)."""

from __future__ import annotations

from scapy.layers.inet import IP, TCP


def tcp_packet(
    src: str,
    dst: str,
    sport: int,
    dport: int,
    flags: str,
    seq: int = 0,
    ack: int = 0,
    payload: bytes = b"",
    ip_options: list[object] | None = None,
    tcp_options: list[tuple[str, object]] | None = None,
) -> bytearray:
    """An IPv4/TCP packet with valid checksums, as the kernel would queue it."""
    ip = IP(src=src, dst=dst, options=ip_options) if ip_options else IP(src=src, dst=dst)
    tcp = TCP(sport=sport, dport=dport, flags=flags, seq=seq, ack=ack, options=tcp_options or [])
    return bytearray(bytes(ip / tcp / payload))


def check(raw: bytes | bytearray) -> IP:
    """Parse with scapy and assert both checksums equal the ones scapy recomputes."""
    pkt = IP(bytes(raw))
    fresh = IP(bytes(raw))
    del fresh.chksum
    del fresh[TCP].chksum
    fresh = IP(bytes(fresh))
    assert pkt.chksum == fresh.chksum, "IPv4 checksum"
    assert pkt[TCP].chksum == fresh[TCP].chksum, "TCP checksum"
    return pkt


def tuple_of(pkt: IP) -> tuple[str, str, int, int]:
    return (pkt.src, pkt.dst, pkt[TCP].sport, pkt[TCP].dport)
