"""The TOML configuration: parsing, validation and the typed, frozen result.

Reads the original (Rust) convey's files unchanged and accepts a few optional extensions. Every problem is reported
as one :class:`ConfigError` that names the file, the key and the problem; nothing here touches the network.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

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


@dataclass(frozen=True, slots=True)
class Config:
    path: str
    frontends: Mapping[str, FrontendConfig]
    backends: Mapping[str, BackendConfig]
    stats: StatsConfig = field(default_factory=StatsConfig)
    passthrough: PassthroughConfig = field(default_factory=PassthroughConfig)
    dsr: DsrConfig = field(default_factory=DsrConfig)


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
    if config.stats.port is None:
        lines.append("  stats: disabled (no [stats] port)")
    else:
        lines.append(f"  stats: http://{config.stats.address}:{config.stats.port}/stats")
    return "\n".join(lines)
