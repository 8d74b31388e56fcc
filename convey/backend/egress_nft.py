"""Egress NAT with nftables: ``table ip convey_dsr``, a ``postrouting`` filter chain (priority 100) with one rule
per VIP::

    oifname DEV ip saddr SERVER ip daddr != {VIP, BALANCERS} tcp sport SPORT ip saddr set VIP [tcp sport set PORT]

nftables fixes the IP and TCP checksums itself. The table is ours; it is rewritten as a whole (atomically) on each
change and deleted with its last rule.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Sequence

from convey.backend.state import BackendNatError, Entry

NFT_FAMILY = "ip"
NFT_TABLE = "convey_dsr"
NFT_CHAIN = "postrouting"
NFT_PRIORITY = 100  # srcnat: after every mangle and filter hook that might care about the original source
TIMEOUT = 30


def _nft(script: str) -> str:
    if shutil.which("nft") is None:
        raise BackendNatError(
            "the nft command is missing: install nftables (Debian: apt-get install nftables)"
        )
    try:
        proc = subprocess.run(
            ["nft", "-f", "-"], input=script, capture_output=True, text=True, timeout=TIMEOUT, check=False
        )
    except subprocess.TimeoutExpired:
        raise BackendNatError(f"nft did not finish within {TIMEOUT} seconds") from None
    if proc.returncode != 0:
        detail = proc.stderr.strip() or f"exit status {proc.returncode}"
        raise BackendNatError(f"nft refused the egress NAT rules: {detail}\n--- script ---\n{script}")
    return proc.stdout


def _table_text() -> str | None:
    if shutil.which("nft") is None:
        return None
    try:
        proc = subprocess.run(
            ["nft", "list", "table", NFT_FAMILY, NFT_TABLE],
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
            check=False,
        )
    except subprocess.TimeoutExpired:
        raise BackendNatError(f"nft did not finish within {TIMEOUT} seconds") from None
    return proc.stdout if proc.returncode == 0 else None


def comment(entry: Entry) -> str:
    return f"convey-dsr {entry.key}"


def rule(entry: Entry) -> str:
    """The rule restoring ``VIP:PORT`` as the source of ``entry``'s replies."""
    skip = list(dict.fromkeys([entry.vip, *entry.balancers]))
    daddr = skip[0] if len(skip) == 1 else "{ " + ", ".join(skip) + " }"
    parts = [
        f'oifname "{entry.dev}"',
        f"ip saddr {entry.server_addr}",
        f"ip daddr != {daddr}",
        f"tcp sport {entry.server_port}",
        f"ip saddr set {entry.vip}",
    ]
    if entry.server_port != entry.port:
        parts.append(f"tcp sport set {entry.port}")
    parts.append(f'comment "{comment(entry)}"')
    return " ".join(parts)


def script(entries: Sequence[Entry], table_exists: bool) -> str:
    """One atomic nft transaction: our table replaced by one holding ``entries`` (deleted when none)."""
    lines = []
    if table_exists or entries:
        lines += [f"table {NFT_FAMILY} {NFT_TABLE}", f"delete table {NFT_FAMILY} {NFT_TABLE}"]
    if entries:
        lines += [
            f"table {NFT_FAMILY} {NFT_TABLE} {{",
            f"\tchain {NFT_CHAIN} {{",
            f"\t\ttype filter hook postrouting priority {NFT_PRIORITY}; policy accept;",
            *(f"\t\t{rule(e)}" for e in entries),
            "\t}",
            "}",
        ]
    return "\n".join(lines) + "\n"


def sync(entries: Sequence[Entry]) -> None:
    """Make our table hold exactly ``entries`` (no table when there are none)."""
    current = _table_text()
    if current is None and not entries:
        return
    _nft(script(entries, current is not None))


def present(entry: Entry) -> bool:
    text = _table_text()
    return text is not None and f'comment "{comment(entry)}"' in text
