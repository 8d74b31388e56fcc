"""The TOML configuration: parsing, validation and the typed, frozen result.

Reads the original (Rust) convey's files unchanged and accepts a few optional extensions. Every problem is reported
as one :class:`ConfigError` that names the file, the key and the problem; nothing here touches the network.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from convey.bgp.model import BgpConfig
from convey.errors import ConveyError
from convey.modes import Mode, Rewrite

SCHEDULERS = ("wrr", "least_conn", "maglev")
DSR_REWRITES = tuple(Rewrite)
EGRESS_NAT_METHODS = ("auto", "tc", "nft")
# How the packet modes talk to NFQUEUE (convey/dataplane/nfqueue.py): the netfilterqueue package or our own socket.
QUEUE_BINDINGS = ("netfilterqueue", "netlink")
DEFAULT_QUEUE_BINDING = "netlink"

DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_HEALTH_TIMEOUT = 1.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_STATS_ADDRESS = "127.0.0.1"
DEFAULT_PORT_RANGE = (33768, 61000)
# Proxy mode (docs/modes.md): seconds to connect to a server; seconds with no byte either way before a connection is
# closed (0: never), as passthrough's flow idle_timeout.
DEFAULT_CONNECT_TIMEOUT = 3.0
DEFAULT_PROXY_IDLE_TIMEOUT = 300.0
# Backend and server names: they make "backend/server" ids (marks, flows), /metrics labels and log fields, so a
# name is 1-64 of these characters (every TOML bare key qualifies; "/" and spaces do not).
NAME = re.compile(r"[A-Za-z0-9_.-]{1,64}")
NAME_RULE = "1-64 letters, digits, '_', '-' or '.'"
MAX_WEIGHT = 1_000_000  # a server's weight: 0 (drains) to this
MAX_CONFIG_BYTES = 16 * 1024 * 1024  # a larger file is refused before it is read


class ConfigError(ConveyError):
    """A configuration problem: which file, which key, what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(_printable(f"{where}{problem}"))


def _printable(text: str, limit: int = 1000) -> str:
    """One line of printable text: control characters escaped (a key may hold any), long text cut."""
    if not text.isprintable():
        text = "".join(ch if ch.isprintable() else ch.encode("unicode_escape").decode("ascii") for ch in text)
    return text if len(text) <= limit else text[: limit - 3] + "..."


@dataclass(frozen=True, slots=True)
class Address:
    """An IPv4 address and a TCP port."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    name: str
    addr: Address
    weight: int = 1


@dataclass(frozen=True, slots=True)
class BackendConfig:
    name: str
    servers: tuple[ServerConfig, ...]
    health_check_interval: float = DEFAULT_HEALTH_INTERVAL
    health_check_timeout: float = DEFAULT_HEALTH_TIMEOUT
    rise: int = DEFAULT_RISE
    fall: int = DEFAULT_FALL
    # None means "the mode's default": wrr for proxy and passthrough, maglev for DSR.
    scheduler: str | None = None
    maglev_table_size: int = 65537
    connect_timeout: float = DEFAULT_CONNECT_TIMEOUT  # proxy mode: per connect attempt to a server

    def scheduler_for(self, mode: str) -> str:
        if self.scheduler is not None:
            return self.scheduler
        return "maglev" if mode == Mode.DSR else "wrr"


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    name: str
    listen_addr: Address
    backend: str
    # Proxy mode only: see docs/modes.md.
    idle_timeout: float = DEFAULT_PROXY_IDLE_TIMEOUT  # no byte either way for this long: closed; 0: never
    max_connections: int = 0  # open client connections beyond which new ones are refused; 0: no limit
    tcp_keepalive: bool = False  # SO_KEEPALIVE on both sockets of each connection


@dataclass(frozen=True, slots=True)
class StatsConfig:
    port: int | None = None  # None: no stats service
    address: str = DEFAULT_STATS_ADDRESS
    # The runtime API's bearer token (``api_token``, or read from ``api_token_file`` when the config is loaded);
    # None: the API is read-only. Kept out of repr so no log line shows it.
    api_token: str | None = field(default=None, repr=False)
    api_token_file: str | None = None


@dataclass(frozen=True, slots=True)
class PassthroughConfig:
    connection_tracker_capacity: int = 20000
    workers: int = 1
    stats_update_frequency: float = 5.0
    port_range: tuple[int, int] = DEFAULT_PORT_RANGE
    port_reuse_delay: float = 60.0
    # Addresses of the balancer used as the source towards servers. Empty: the kernel's choice for the route.
    source_addrs: tuple[str, ...] = ()
    queue_num: int = 0
    queue_binding: str = DEFAULT_QUEUE_BINDING
    idle_timeout: float = 300.0
    syn_timeout: float = 10.0
    fin_linger: float = 2.0
    # Flow offload: convey decides each connection's first packet, the kernel's conntrack NAT carries the rest.
    offload: bool = False


@dataclass(frozen=True, slots=True)
class DsrConfig:
    rewrite: Rewrite = Rewrite.IP
    egress_nat: str = "auto"
    queue_num: int = 0
    queue_binding: str = DEFAULT_QUEUE_BINDING
    idle_timeout: float = 300.0
    fwmark_base: int = 0x100
    route_table_base: int = 100
    offload: bool = False  # after a connection's first packet, the kernel steers the rest
    workers: int = 1  # worker processes (convey/workers/); "auto" in the file: one per CPU


@dataclass(frozen=True, slots=True)
class LogConfig:
    connections: bool = False  # one line per connection when it closes (client, server, duration, bytes)


@dataclass(frozen=True, slots=True)
class ProxyConfig:
    workers: int = 1  # worker processes sharing the listeners with SO_REUSEPORT


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    frontends: Mapping[str, FrontendConfig]
    backends: Mapping[str, BackendConfig]
    stats: StatsConfig = field(default_factory=StatsConfig)
    passthrough: PassthroughConfig = field(default_factory=PassthroughConfig)
    dsr: DsrConfig = field(default_factory=DsrConfig)
    proxy: ProxyConfig = field(default_factory=ProxyConfig)
    bgp: BgpConfig | None = None  # [bgp]: announce the VIPs over BGP (convey/bgp/, docs/scale-out.md)
    log: LogConfig = field(default_factory=LogConfig)  # [log]


def load_config(path: str | Path) -> Config:
    """Read and validate a config file. Raises ConfigError for every problem, I/O ones included."""
    name = str(path)
    try:
        with open(path, "rb") as file:
            data = file.read(MAX_CONFIG_BYTES + 1)
        if len(data) > MAX_CONFIG_BYTES:
            raise ConfigError(name, "", f"file too large (over {MAX_CONFIG_BYTES // (1024 * 1024)} MiB)")
        text = data.decode("utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text: {exc.reason} at byte {exc.start}") from None
    except ValueError as exc:  # a path with a NUL byte
        raise ConfigError(name, "", f"cannot read: {exc}") from None
    return parse_config(text, name)


def parse_config(text: str, path: str = "<config>") -> Config:
    """Validate TOML text: a Config, or a ConfigError for any input whatsoever (nothing else is raised)."""
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    except RecursionError:
        raise ConfigError(path, "", "TOML syntax error: arrays or tables nested too deeply") from None
    except ValueError as exc:  # tomllib lets int()'s "Exceeds the limit (4300 digits)" through
        raise ConfigError(path, "", f"TOML value error: {exc}") from None
    if not raw:
        raise ConfigError(path, "", "empty config (no [frontends] or [backends] tables)")
    from convey.config_parser import Parser  # the validating reader; it imports the types above

    return Parser(path).config(raw)


def validate_for_mode(config: Config, mode: str) -> None:
    """The checks only a mode makes; ConfigError for the first problem. Passthrough: convey SNATs to its source
    addresses with ports from ``port_range``, and a server's reply to (address, port) is taken for client traffic
    when that pair is a VIP. With ``source_addrs`` the parser already refused that; without them the kernel picks
    the source per server (possibly a VIP's address), so no VIP port may lie inside the range."""
    check_workers(config, mode)
    if mode != Mode.PASSTHROUGH or config.passthrough.source_addrs:
        return
    lo, hi = config.passthrough.port_range
    for front in config.frontends.values():
        if lo <= front.listen_addr.port <= hi:
            raise ConfigError(
                config.path,
                f"frontends.{front.name}.listen_addr",
                f"port {front.listen_addr.port} lies inside passthrough.port_range {lo}-{hi}: the servers' "
                "replies to the balancer's ports would be taken for client traffic when the kernel picks "
                f"{front.listen_addr.host} as the source towards a server; move the port or the range, or list "
                "the balancer's source addresses in passthrough.source_addrs (without this address)",
            )


def offloaded(config: Config, mode: str) -> bool:
    """Whether ``mode`` runs with flow offload under ``config`` (``[passthrough] offload`` or ``[dsr] offload``)."""
    if mode == Mode.PASSTHROUGH:
        return config.passthrough.offload
    return mode == Mode.DSR and config.dsr.offload


def with_offload(config: Config, mode: str) -> Config:
    """``config`` with flow offload on for ``mode`` (the command line's ``--offload``)."""
    if mode == Mode.PASSTHROUGH:
        return replace(config, passthrough=replace(config.passthrough, offload=True))
    if mode == Mode.DSR:
        return replace(config, dsr=replace(config.dsr, offload=True))
    raise ValueError(f"--offload needs a packet mode (--passthrough or --dsr), not {mode}")


MAX_WORKERS = 256
MAX_OFFLOAD_WORKERS = 255  # convey.dataplane.rules.offload: the worker field of a connection's mark
MIN_WORKER_PORTS = 64  # passthrough: the fewest ephemeral ports one worker's slice may hold


def auto_workers() -> int:
    """``workers = "auto"``: one worker per CPU this process may run on."""
    return max(1, min(MAX_WORKERS, len(os.sched_getaffinity(0))))


def workers_key(mode: str) -> str:
    """The config key that sets ``mode``'s number of worker processes."""
    return {Mode.PASSTHROUGH: "passthrough", Mode.DSR: "dsr"}.get(Mode(mode), "proxy") + ".workers"


def workers_for(config: Config, mode: str) -> int:
    """How many worker processes ``mode`` runs under ``config`` (1: no supervisor, one process)."""
    if mode == Mode.PASSTHROUGH:
        return config.passthrough.workers
    if mode == Mode.DSR:
        return config.dsr.workers
    return config.proxy.workers


def check_workers(config: Config, mode: str) -> None:
    """ConfigError when ``mode``'s worker count cannot be split: passthrough gives every worker a disjoint slice
    of ``port_range`` (at least ``MIN_WORKER_PORTS`` ports) and of ``connection_tracker_capacity``."""
    count = workers_for(config, mode)
    if count == 1 or mode == Mode.PROXY:
        return
    queue = config.passthrough.queue_num if mode == Mode.PASSTHROUGH else config.dsr.queue_num
    if queue + count - 1 > 65535:
        raise ConfigError(
            config.path,
            workers_key(mode),
            f"{count} workers need queues {queue}-{queue + count - 1}: NFQUEUE numbers end at 65535",
        )
    if offloaded(config, mode):
        # the worker's number is part of each connection's mark (convey.dataplane.rules.offload): at most 255,
        # and DSR's server marks must leave bits 24-31 free ("mac": its ip rules then compare bits 0-23 only)
        servers = sum(len(b.servers) for b in config.backends.values())
        problem = None
        if count > MAX_OFFLOAD_WORKERS:
            problem = f"at most {MAX_OFFLOAD_WORKERS} workers with flow offload"
        elif mode == Mode.DSR and config.dsr.fwmark_base + servers >= 1 << 24:
            problem = "DSR offload with workers needs dsr.fwmark_base + servers below 0x1000000"
        if problem is not None:
            raise ConfigError(config.path, workers_key(mode), f"{count} workers: {problem}")
    if mode != Mode.PASSTHROUGH:
        return
    pt = config.passthrough
    ports = pt.port_range[1] - pt.port_range[0] + 1
    if ports // count < MIN_WORKER_PORTS:
        raise ConfigError(
            config.path,
            workers_key(mode),
            f"{count} workers cannot share passthrough.port_range {pt.port_range[0]}-{pt.port_range[1]} "
            f"({ports} ports): each worker needs at least {MIN_WORKER_PORTS} ports of its own; "
            + (
                f"use at most {ports // MIN_WORKER_PORTS} workers or a wider range"
                if ports >= 2 * MIN_WORKER_PORTS
                else f"use 1 worker or a range of at least {count * MIN_WORKER_PORTS} ports"
            ),
        )
    if pt.connection_tracker_capacity < count:
        raise ConfigError(
            config.path,
            workers_key(mode),
            f"{count} workers cannot share passthrough.connection_tracker_capacity "
            f"{pt.connection_tracker_capacity}: each worker needs at least one flow",
        )


def with_workers(config: Config, mode: str, count: int) -> Config:
    """``config`` with ``count`` worker processes for ``mode`` (the command line's ``--workers``); checked."""
    if mode == Mode.PASSTHROUGH:
        config = replace(config, passthrough=replace(config.passthrough, workers=count))
    elif mode == Mode.DSR:
        config = replace(config, dsr=replace(config.dsr, workers=count))
    else:
        config = replace(config, proxy=replace(config.proxy, workers=count))
    check_workers(config, mode)
    return config


def summary(config: Config, mode: str) -> str:
    """A human summary of a valid config, for `convey check`."""
    lines = [f"{config.path}: OK ({mode} mode)"]
    for front in config.frontends.values():
        lines.append(f"  frontend {front.name}: {front.listen_addr} -> backend {front.backend}")
    for back in config.backends.values():
        lines.append(
            f"  backend {back.name}: scheduler={back.scheduler_for(mode)} "
            f"health every {back.health_check_interval:g}s (timeout {back.health_check_timeout:g}s, "
            f"rise {back.rise}, fall {back.fall})"
        )
        for server in back.servers:
            state = " (draining)" if server.weight == 0 else ""
            lines.append(f"    server {server.name}: {server.addr} weight={server.weight}{state}")
    count = workers_for(config, mode)
    if count > 1:
        line = f"  workers: {count} processes under one supervisor ({workers_key(mode)})"
        if mode != Mode.PROXY:
            first = config.passthrough.queue_num if mode == Mode.PASSTHROUGH else config.dsr.queue_num
            line += f", NFQUEUE {first}-{first + count - 1}"
        lines.append(line)
    if config.bgp is not None:
        peers = ", ".join(f"{p.name} {p.address} AS{p.asn}" for p in config.bgp.peers.values())
        lines.append(f"  bgp: AS{config.bgp.local_as}, VIPs announced by health to {peers}")
    if config.stats.port is None:
        lines.append("  stats: disabled (no [stats] port)")
    else:
        lines.append(f"  stats: http://{config.stats.address}:{config.stats.port}/stats")
    return "\n".join(lines)


# Per mode, the sections it ignores, but for the fields named, for `convey check`'s warnings. DSR reads the flow
# table's size and FIN linger from [passthrough]; frontends' idle_timeout, max_connections and tcp_keepalive and
# backends' connect_timeout are the proxy's.
_IGNORED: dict[str, dict[str, tuple[str, ...]]] = {
    Mode.PROXY: {"passthrough": (), "dsr": ()},
    Mode.PASSTHROUGH: {"dsr": (), "proxy": ()},
    Mode.DSR: {"passthrough": ("connection_tracker_capacity", "fin_linger"), "proxy": ()},
}
_PROXY_ONLY_FRONTEND = ("idle_timeout", "max_connections", "tcp_keepalive")


def _changed(value: Any) -> list[str]:
    """The fields of a config dataclass that differ from its defaults (what the file set)."""
    default = type(value)()
    return [f.name for f in fields(value) if getattr(value, f.name) != getattr(default, f.name)]


def check_warnings(config: Config, mode: str) -> list[str]:
    """What `convey check` warns about in a valid config: backends without servers, and settings ``mode``
    ignores (those that differ from their defaults)."""
    out: list[str] = []
    for front in config.frontends.values():
        backend = config.backends.get(front.backend)
        if backend is not None and not backend.servers:
            out.append(f"frontend {front.name}: backend {front.backend} has no servers: clients are refused")
    for section, used in _IGNORED.get(mode, {}).items():
        value = getattr(config, section, None)
        keys = [k for k in _changed(value) if k not in used] if value is not None else []
        if keys:
            out.append(f"[{section}] {', '.join(keys)}: ignored in {mode} mode")
    if mode != Mode.PROXY:
        default = FrontendConfig("", Address("0.0.0.0", 1), "")
        for front in config.frontends.values():
            keys = [k for k in _PROXY_ONLY_FRONTEND if getattr(front, k) != getattr(default, k)]
            if keys:
                out.append(f"frontends.{front.name}: {', '.join(keys)}: proxy mode only, ignored in {mode}")
        for back in config.backends.values():
            if back.connect_timeout != DEFAULT_CONNECT_TIMEOUT:
                out.append(f"backends.{back.name}.connect_timeout: proxy mode only, ignored in {mode} mode")
    return out
