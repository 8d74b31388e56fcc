"""Every benchmark role by name: ``python -m bench.lib.roles NAME ARG...`` (the repository on PYTHONPATH; the
spawn helpers in bench/lib/procs.py build that command line). Arguments are positional and converted to the
types the table below gives."""

from __future__ import annotations

import asyncio
import functools
import json
import signal
import sys
import time
from collections.abc import Callable
from typing import cast

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


def floor_relay(addr: str, bulk_listen: int, bulk_server: int, rr_listen: int, rr_server: int) -> None:
    """The least a relay of asyncio Protocols on uvloop does per connection, as a floor for convey's relay: the
    loop's own accept (``create_server``), one task per connection for ``create_connection``, bytes passed on as
    they come and EOF passed on; no scheduling, counting, limits, timeouts or error handling. Not a proxy to run:
    a measure of what the event loop and the kernel cost before convey's own code. SIGTERM ends it."""
    import uvloop

    class Upstream(asyncio.Protocol):
        eof = False

        def __init__(self, client: Client) -> None:
            self.client = client

        def data_received(self, data: bytes) -> None:
            self.client.transport.write(data)

        def eof_received(self) -> bool:
            self.eof = True
            client = self.client
            if client.eof or client.transport.is_closing():  # both ways ended (what was written is flushed)
                client.transport.close()
                return False
            client.transport.write_eof()
            return True

        def pause_writing(self) -> None:  # the server is slow to read: stop reading the client
            self.client.transport.pause_reading()

        def resume_writing(self) -> None:
            self.client.transport.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            if not self.client.transport.is_closing():
                self.client.transport.close()

    class Client(asyncio.Protocol):
        transport: asyncio.Transport
        server: asyncio.Transport | None = None
        upstream: Upstream | None = None
        early: bytes = b""  # what the client sent before the server connection was up
        eof = False

        def __init__(self, port: int) -> None:
            self.port = port

        def connection_made(self, transport: asyncio.BaseTransport) -> None:
            self.transport = cast(asyncio.Transport, transport)
            asyncio.get_running_loop().create_task(self.connect())

        async def connect(self) -> None:
            loop = asyncio.get_running_loop()
            server, self.upstream = await loop.create_connection(lambda: Upstream(self), addr, self.port)
            self.server = server
            if self.transport.is_closing():  # the client went away meanwhile
                server.close()
                return
            if self.early:
                server.write(self.early)
            if self.eof:
                server.write_eof()

        def data_received(self, data: bytes) -> None:
            if self.server is None:
                self.early += data
            else:
                self.server.write(data)

        def eof_received(self) -> bool:
            self.eof = True
            if self.server is None:
                return True  # connect() passes it on
            if self.upstream is not None and self.upstream.eof:  # both ways ended
                self.server.close()
                return False
            self.server.write_eof()
            return True

        def pause_writing(self) -> None:  # the client is slow to read: stop reading the server
            if self.server is not None:
                self.server.pause_reading()

        def resume_writing(self) -> None:
            if self.server is not None:
                self.server.resume_reading()

        def connection_lost(self, exc: Exception | None) -> None:
            if self.server is not None and not self.server.is_closing():
                self.server.close()

    async def main() -> None:
        loop = asyncio.get_running_loop()
        servers = [await loop.create_server(functools.partial(Client, port), addr, listen, backlog=1024)
                   for listen, port in ((bulk_listen, bulk_server), (rr_listen, rr_server))]  # fmt: skip
        print("ready", flush=True)
        stop = asyncio.Event()
        loop.add_signal_handler(signal.SIGTERM, stop.set)
        await stop.wait()
        for server in servers:
            server.close()

    uvloop.run(main())


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
    "floor_relay": (floor_relay, (str, int, int, int, int)),
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
