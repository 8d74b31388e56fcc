"""The BIRD 2 configuration convey gives its speaker (pure text rendering).

One static protocol, ``convey_vips``, holds a blackhole /32 per announced VIP (BIRD never installs it anywhere:
there is no kernel protocol, so the balancer's own routing table is left alone); one BGP protocol per peer exports
exactly those routes with this host as the next hop and imports nothing. Announcing or withdrawing is a new
static route set and ``configure``: BIRD reconfigures the static protocol in place, the BGP sessions stay up.

Graceful restart is off on purpose: with it, a router keeps a dead speaker's routes as stale for the restart time
(120 s) instead of dropping them when the session ends, and a killed balancer would keep attracting traffic.
"""

from __future__ import annotations

from collections.abc import Iterable

from convey.bgp.model import BgpConfig

STATIC_PROTOCOL = "convey_vips"
CONNECT_RETRY = 5  # seconds between connection attempts to a peer (BIRD's default, 120 s, is a long outage)


def render(config: BgpConfig, router_id: str, vips: Iterable[str]) -> str:
    """The whole bird.conf for ``config`` announcing ``vips`` (IPv4 addresses, each as a /32)."""
    keepalive = max(1, config.hold_time // 3)
    lines = [
        "# Written by convey (convey/bgp/bird_config.py); rewritten on every change: do not edit.",
        f"router id {router_id};",
        "log stderr { info, remote, warning, error, auth, fatal, bug };",
        "protocol device { scan time 10; }",
        f"protocol static {STATIC_PROTOCOL} {{",
        "  ipv4;",
        *(f"  route {vip}/32 blackhole;" for vip in sorted(set(vips))),
        "}",
    ]
    for peer in sorted(config.peers.values(), key=lambda p: p.name):
        lines += [
            f"protocol bgp {peer.name} {{",
            f"  local as {config.local_as};",
            f"  neighbor {peer.address} as {peer.asn};",
            f"  hold time {config.hold_time};",
            f"  keepalive time {keepalive};",
            f"  connect retry time {CONNECT_RETRY};",
            "  error wait time 1, 30;",
            "  graceful restart off;",
            "  long lived graceful restart off;",
            "  ipv4 {",
            "    import none;",
            f'    export where proto = "{STATIC_PROTOCOL}";',
            "    next hop self;",
            "  };",
            "}",
        ]
    return "\n".join([*lines, ""])
