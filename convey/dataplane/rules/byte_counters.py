"""Passthrough offload's byte counters: an nftables set the kernel counts every forwarded packet into.

With offload the kernel carries a connection's packets, so its bytes must come from the kernel. Asking
conntrack for each entry's counters when it closes (a GET per close, what convey did before) cost convey more
CPU per connection than this (0.89x with the set: bench/README.md, "bytes from kernel counters"). Instead, one nftables
rule in the forward hook adds each packet of a connection convey marked to a counter keyed by
(connmark without the close bits, direction, VIP address, VIP port): the server and source address (and
worker) the mark names, the way the packet went, and the frontend. The set has a few elements per server and
frontend, never one per connection; convey reads it (``nft -j list set``) when /stats, /metrics or the page ask
and turns the growth since its last read into payload bytes (``convey.dataplane.offload_bytes``).

Why nftables for this while the rest is iptables: iptables has no keyed counters (one rule per server and
direction would be walked by every packet), and ``ipset`` has no direction. An nft dynamic set is one hash
lookup per packet. See iptables/README.md.

This module renders the table (pure: :func:`render`, :func:`parse_elements`) and, as the thin edge, installs,
checks, reads and removes it with the ``nft`` tool (:func:`install`, :func:`problems`, :func:`read`,
:func:`remove`). The table is convey's alone (``ip convey_bytes``); nothing else is touched. Install keeps a
table that already has the wanted rule (its counters with it), so a reload or a restart does not reset them.
"""

from __future__ import annotations

import json
import logging
import shutil
import socket
import subprocess
from collections.abc import Sequence
from dataclasses import dataclass

from convey.dataplane.rules.ruleset import RulesError

__all__ = [
    "FAMILY",
    "SET",
    "TABLE",
    "CounterKey",
    "Totals",
    "install",
    "parse_elements",
    "problems",
    "read",
    "remove",
    "render",
]

log = logging.getLogger(__name__)

FAMILY = "ip"
TABLE = "convey_bytes"
SET = "conns"
SET_SIZE = 65536  # elements: (server, source address, worker) x direction x frontend, not connections
TIMEOUT = 30.0
MISSING = "nft not found: install nftables (apt install nftables) for passthrough offload's byte counters"

CounterKey = tuple[int, bytes, int]
"""(connmark & key mask, VIP address as 4 bytes, VIP port)"""


@dataclass(slots=True)
class Totals:
    """What the kernel counted for one key since the table was made: packets and IP bytes each way (original
    = client -> server, reply = server -> client)."""

    packets_orig: int = 0
    bytes_orig: int = 0
    packets_reply: int = 0
    bytes_reply: int = 0


def _comment(key_mask: int) -> str:
    return f"convey offload bytes: key mask {key_mask:#x}"


def render(ours_mask: int, key_mask: int) -> str:
    """The table as ``nft -f`` input: packets of entries with a connmark bit in ``ours_mask`` (the server field)
    are counted by (connmark & ``key_mask``, direction, original destination address and port)."""
    return "\n".join(
        [
            f"table {FAMILY} {TABLE} {{",
            f"\tset {SET} {{",
            "\t\ttype mark . ct_dir . ipv4_addr . inet_service",
            f"\t\tsize {SET_SIZE}",
            "\t\tflags dynamic",
            "\t\tcounter",
            "\t}",
            "\tchain forward {",
            "\t\ttype filter hook forward priority filter + 10; policy accept;",
            f"\t\tct mark & {ours_mask:#x} != 0 ct original protocol tcp update @{SET} {{ ct mark & {key_mask:#x}"
            f' . ct direction . ct original ip daddr . ct original proto-dst }} comment "{_comment(key_mask)}"',
            "\t}",
            "}",
            "",
        ]
    )


def parse_elements(text: str) -> dict[CounterKey, Totals]:
    """``nft -j list set`` output -> totals per key (elements that do not look like ours are skipped)."""
    found: dict[CounterKey, Totals] = {}
    for item in json.loads(text).get("nftables", []):
        body = item.get("set") if isinstance(item, dict) else None
        if not isinstance(body, dict):
            continue
        for elem in body.get("elem", []):
            inner = elem.get("elem", {}) if isinstance(elem, dict) else {}
            parts = inner.get("val", {}).get("concat") if isinstance(inner.get("val"), dict) else None
            counter = inner.get("counter") or {}
            if not isinstance(parts, list) or len(parts) != 4 or not isinstance(counter, dict):
                continue
            mark, direction, addr, port = parts
            try:
                key = (int(mark), socket.inet_aton(str(addr)), int(port))
            except (OSError, TypeError, ValueError):
                continue
            totals = found.setdefault(key, Totals())
            packets, size = int(counter.get("packets", 0)), int(counter.get("bytes", 0))
            if direction == "original":
                totals.packets_orig += packets
                totals.bytes_orig += size
            elif direction == "reply":
                totals.packets_reply += packets
                totals.bytes_reply += size
    return found


# -- the nft tool -----------------------------------------------------------------------------------------------


def _nft(
    args: Sequence[str], stdin: str | None = None, check: bool = True
) -> subprocess.CompletedProcess[str]:
    try:
        proc = subprocess.run(
            ["nft", *args], input=stdin, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except FileNotFoundError:
        raise RulesError(MISSING) from None
    except subprocess.TimeoutExpired:
        raise RulesError(f"nft {' '.join(args)} did not finish within {TIMEOUT:g} seconds") from None
    if check and proc.returncode != 0:
        detail = " ".join(proc.stderr.split()) or f"exit status {proc.returncode}"
        raise RulesError(f"nft {' '.join(args)} failed: {detail}")
    return proc


def available() -> bool:
    return shutil.which("nft") is not None


def _listing() -> str | None:
    """``nft list table`` of ours, or None when there is none."""
    proc = _nft(["list", "table", FAMILY, TABLE], check=False)
    return proc.stdout if proc.returncode == 0 else None


def problems(key_mask: int) -> list[str]:
    """What is off: the table missing, or made for another key mask (another worker count)."""
    if not available():
        return [MISSING]
    listing = _listing()
    if listing is None:
        return [f"the byte counters (nft table {FAMILY} {TABLE}) are missing"]
    if _comment(key_mask) not in listing:
        return [f"the byte counters (nft table {FAMILY} {TABLE}) count by another mark mask"]
    return []


def install(ours_mask: int, key_mask: int) -> list[str]:
    """Make the table (or replace one made for another key mask) in one ``nft -f`` transaction; a table that
    is right already is kept with its counters. Returns what changed."""
    listing = _listing()
    if listing is not None and _comment(key_mask) in listing:
        return []
    text = render(ours_mask, key_mask)
    if listing is not None:
        text = f"delete table {FAMILY} {TABLE}\n{text}"
    log.debug("nft -f input:\n%s", text)
    _nft(["-f", "-"], stdin=text)
    return [
        f"{'replaced' if listing is not None else 'added'} nft table {FAMILY} {TABLE} (offload byte counters)"
    ]


def remove() -> list[str]:
    """Delete the table if it is there (and nft is); returns what changed."""
    if not available() or _listing() is None:
        return []
    _nft(["delete", "table", FAMILY, TABLE])
    return [f"removed nft table {FAMILY} {TABLE}"]


def read() -> dict[CounterKey, Totals]:
    """The kernel's totals now (RulesError when nft fails or the table is gone)."""
    return parse_elements(_nft(["-j", "list", "set", FAMILY, TABLE, SET]).stdout)
