"""The ``[bgp]`` section: types and validation (core, sans-I/O).

```toml
[bgp]
local_as = 65001
router_id = "198.18.5.2"        # optional: the address convey's host uses towards the first peer
hold_time = 9                   # optional, seconds (3-65535)
withdraw_grace = 5              # optional, seconds between the withdrawal on SIGTERM and the stop
  [bgp.peers.r1]
  address = "198.18.5.1"
  as = 65000
```

Every problem is a ConfigError naming the key, through the config parser's own checks.
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from convey.config_parser import Parser

MAX_AS = 4_294_967_295  # 4-octet AS numbers (RFC 6793)
MIN_HOLD, MAX_HOLD = 3, 65535  # RFC 4271: 0 (no keepalives) or at least 3; convey insists on keepalives
DEFAULT_HOLD_TIME = 9
DEFAULT_WITHDRAW_GRACE = 5.0
MAX_WITHDRAW_GRACE = 3600.0
KEYS = ("local_as", "router_id", "hold_time", "withdraw_grace", "peers")
PEER_KEYS = ("address", "as")
# A peer's name becomes the BGP protocol's name in the speaker's config: a plain symbol.
PEER_NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]{0,31}")
PEER_NAME_RULE = "a letter, then up to 31 letters, digits or '_'"


@dataclass(frozen=True, slots=True)
class BgpPeer:
    name: str
    address: str
    asn: int  # ``as`` in the file


@dataclass(frozen=True, slots=True)
class BgpConfig:
    local_as: int
    peers: Mapping[str, BgpPeer]
    router_id: str | None = None  # None: the source address towards the first peer (by name), found at start
    hold_time: int = DEFAULT_HOLD_TIME
    withdraw_grace: float = DEFAULT_WITHDRAW_GRACE


def parse_bgp(parser: Parser, value: Any) -> BgpConfig | None:
    """``[bgp]`` as a BgpConfig; None when the section is absent."""
    if value is None:
        return None
    key = "bgp"
    section = parser.table(value, key)
    parser.known(section, key, KEYS)
    if "local_as" not in section:
        raise parser.fail("bgp.local_as", "missing (required)")
    local_as = parser.integer(section, key, "local_as", 0, 1, MAX_AS)
    router_id = None
    if "router_id" in section:
        router_id = parser.ipv4(parser.string(section, key, "router_id"), "bgp.router_id")
    peers_raw = parser.table(section.get("peers", {}), "bgp.peers")
    if not peers_raw:
        raise parser.fail("bgp.peers", "at least one peer is required ([bgp.peers.NAME] address, as)")
    peers: dict[str, BgpPeer] = {}
    seen: dict[str, str] = {}
    for name, body in peers_raw.items():
        if not PEER_NAME.fullmatch(name):
            raise parser.fail(
                f"bgp.peers.{name}", f"a peer name must be {PEER_NAME_RULE} (it names the session)"
            )
        pkey = f"bgp.peers.{name}"
        body = parser.table(body, pkey)
        parser.known(body, pkey, PEER_KEYS)
        address = parser.ipv4(parser.string(body, pkey, "address"), f"{pkey}.address")
        if address in seen:
            raise parser.fail(f"{pkey}.address", f"{address} is already used by peer {seen[address]!r}")
        seen[address] = name
        if "as" not in body:
            raise parser.fail(f"{pkey}.as", "missing (required)")
        peers[name] = BgpPeer(name, address, parser.integer(body, pkey, "as", 0, 1, MAX_AS))
    return BgpConfig(
        local_as=local_as,
        peers=peers,
        router_id=router_id,
        hold_time=parser.integer(section, key, "hold_time", DEFAULT_HOLD_TIME, MIN_HOLD, MAX_HOLD),
        withdraw_grace=parser.seconds(
            section, key, "withdraw_grace", DEFAULT_WITHDRAW_GRACE, MAX_WITHDRAW_GRACE, zero_ok=True
        ),
    )


def announced_vips(frontends: Mapping[str, tuple[str, bool]]) -> frozenset[str]:
    """The /32s to announce: ``frontends`` maps a frontend's name to (its address, whether its backend has an
    eligible server). An address is announced while any frontend on it can be served; a wildcard (0.0.0.0) or
    loopback listen address is never announced (it is no VIP a router could send to)."""
    return frozenset(addr for addr, servable in frontends.values() if servable and announceable(addr))


def announceable(addr: str) -> bool:
    ip = ipaddress.IPv4Address(addr)
    return not (ip.is_unspecified or ip.is_loopback)
