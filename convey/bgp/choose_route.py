"""``POST /debug/choose``: the server this balancer would pick for client tuples (a tier's consistency check).

Every balancer of a tier must send a connection to the same server, whichever balancer the router hands it to;
asking each of them for the same tuples shows that they agree. The body is JSON
``{"tuples": [["198.18.100.2", 40001, "198.18.50.1", 80], ...]}`` (client address and port, VIP and port; at most
``MAX_TUPLES``); the answer is ``{"servers": ["backend/server" or null, ...]}`` in the same order, null when the
tuple is no frontend's or its backend has no eligible server. Only hashing schedulers (``maglev``) can be asked:
another scheduler's pick would advance its own state. The picks are made on the event loop's thread, from the live
pools, with the flow hash the packet planes use. Installed when ``[bgp]`` is configured.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
from collections.abc import Callable, Mapping
from typing import Any

import bottle

from convey.balancing.pool import Pool
from convey.balancing.schedulers import flow_hash
from convey.config import Config

MAX_TUPLES = 100_000
HASHING = ("maglev",)


class BadRequest(ValueError):
    pass


def choose(pools: Mapping[str, Pool], config: Config, tuples: Any) -> list[str | None]:
    """The pick for each tuple; BadRequest for malformed input or a pool that does not hash."""
    if not isinstance(tuples, list) or len(tuples) > MAX_TUPLES:
        raise BadRequest(f"tuples must be a list of at most {MAX_TUPLES} [src, sport, dst, dport]")
    frontends = {(f.listen_addr.host, f.listen_addr.port): f.backend for f in config.frontends.values()}
    result: list[str | None] = []
    for item in tuples:
        try:
            src, sport, dst, dport = item
            src_int, dst_int = int(ipaddress.IPv4Address(src)), int(ipaddress.IPv4Address(dst))
            if not (isinstance(sport, int) and isinstance(dport, int)):
                raise ValueError
        except (TypeError, ValueError):
            raise BadRequest(f"not a [src, sport, dst, dport] tuple: {str(item)[:80]}") from None
        backend = frontends.get((str(dst), dport))
        pool = pools.get(backend) if backend is not None else None
        if pool is not None and pool.scheduler_name not in HASHING:
            raise BadRequest(f"backend {pool.name} uses {pool.scheduler_name}, not a hashing scheduler")
        server = pool.pick(flow_hash(src_int, sport, dst_int, dport)) if pool is not None else None
        result.append(f"{pool.name}/{server.name}" if pool is not None and server is not None else None)
    return result


def install(
    app: bottle.Bottle,
    pools: Mapping[str, Pool],
    config: Callable[[], Config],
    loop: Callable[[], asyncio.AbstractEventLoop | None],
) -> None:
    @app.post("/debug/choose")  # type: ignore[untyped-decorator]
    def debug_choose() -> str:
        bottle.response.content_type = "application/json"
        try:
            body = json.loads(bottle.request.body.read(64 * MAX_TUPLES) or b"{}")
            tuples = body.get("tuples") if isinstance(body, dict) else None
            running = loop()
            if running is None:
                raise BadRequest("not running")

            async def pick() -> list[str | None]:
                return choose(pools, config(), tuples)

            servers = asyncio.run_coroutine_threadsafe(pick(), running).result(10)
        except (ValueError, BadRequest) as exc:  # json.JSONDecodeError is a ValueError
            bottle.response.status = 400
            return json.dumps({"error": str(exc)})
        return json.dumps({"servers": servers})
