"""Every benchmark role by name: ``python -m bench.lib.roles NAME ARG...`` (the repository on PYTHONPATH; the
spawn helpers in bench/lib/procs.py build that command line). Arguments are positional and converted to the
types the table below gives."""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import time
from collections.abc import Callable

from bench.lib import packet_roles, traffic


def convey_proxy(
    addr: str, bulk_listen: int, bulk_server: int, rr_listen: int, rr_server: int, use_uvloop: bool
) -> None:
    """convey's proxy relay (``ProxyFrontend``) built from a TOML string with the real ``parse_config``, ``Pool``
    and ``Stats``: two frontends, bulk and request/reply. SIGTERM closes them and prints the totals."""
    from convey.balancing.pool import Pool
    from convey.config import parse_config
    from convey.proxy.frontend import ProxyFrontend
    from convey.stats import Stats

    config = parse_config(
        f"""
[frontends.bulk]
listen_addr = "{addr}:{bulk_listen}"
backend = "bulk"
[frontends.rr]
listen_addr = "{addr}:{rr_listen}"
backend = "rr"
[backends.bulk.servers.s1]
addr = "{addr}:{bulk_server}"
[backends.rr.servers.s1]
addr = "{addr}:{rr_server}"
""",
        "bench.toml",
    )
    pools = {name: Pool(b, "proxy") for name, b in config.backends.items()}
    stats = Stats(mode="proxy", started=time.time())
    loop = traffic.new_loop(use_uvloop)

    async def main() -> None:
        fronts = [ProxyFrontend(f, pools, stats) for f in config.frontends.values()]
        for front in fronts:
            await front.start()
        print("ready", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for front in fronts:
            await front.close(1.0)
        print(json.dumps({"total": stats.total.as_dict()}), flush=True)

    loop.run_until_complete(main())


def _flag(text: str) -> bool:
    return bool(int(text))


ROLES: dict[str, tuple[Callable[..., None], tuple[Callable[[str], object], ...]]] = {
    "rr_server": (traffic.rr_server, (str, int)),
    "rr_client": (traffic.rr_client, (str, int, float, int, int, float, str)),
    "bulk_server": (traffic.bulk_server, (str, int, int)),
    "bulk_client": (traffic.bulk_client, (str, int, float, int, str, float, int)),
    "accept_only": (packet_roles.accept_only, (int, float)),
    "blast": (packet_roles.blast, (str, float)),
    "flows": (packet_roles.flows, (str, int, int, int, float)),
    "convey_proxy": (convey_proxy, (str, int, int, int, int, _flag)),
}


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ROLES:
        print(f"usage: python -m bench.lib.roles {{{','.join(ROLES)}}} ARG...", file=sys.stderr)
        return 2
    func, types = ROLES[argv[0]]
    if len(argv) - 1 != len(types):
        print(f"{argv[0]} takes {len(types)} arguments, got {len(argv) - 1}", file=sys.stderr)
        return 2
    func(*(convert(arg) for convert, arg in zip(types, argv[1:], strict=True)))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
