"""The TOML configuration: parsing, validation and the typed, frozen result.

Reads the original (Rust) convey's files unchanged and accepts a few optional extensions. Every problem is reported
as one :class:`ConfigError` that names the file, the key and the problem; nothing here touches the network.
"""

from __future__ import annotations

import ipaddress
import math
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from convey.errors import ConveyError
from convey.modes import Mode, Rewrite

SCHEDULERS = ("wrr", "least_conn", "maglev")
DSR_REWRITES = tuple(Rewrite)
EGRESS_NAT_METHODS = ("auto", "tc", "nft")

DEFAULT_HEALTH_INTERVAL = 5.0
DEFAULT_HEALTH_TIMEOUT = 1.0
DEFAULT_RISE = 2
DEFAULT_FALL = 3
DEFAULT_STATS_ADDRESS = "127.0.0.1"
DEFAULT_PORT_RANGE = (33768, 61000)


class ConfigError(ConveyError):
    """A configuration problem: which file, which key, what is wrong."""

    def __init__(self, file: str, key: str, problem: str) -> None:
        self.file = file
        self.key = key
        self.problem = problem
        where = f"{file}: {key}: " if key else f"{file}: "
        super().__init__(f"{where}{problem}")


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

    def scheduler_for(self, mode: str) -> str:
        if self.scheduler is not None:
            return self.scheduler
        return "maglev" if mode == Mode.DSR else "wrr"


@dataclass(frozen=True, slots=True)
class FrontendConfig:
    name: str
    listen_addr: Address
    backend: str


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
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(name, "", "file not found") from None
    except OSError as exc:
        raise ConfigError(name, "", f"cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ConfigError(name, "", f"not UTF-8 text: {exc.reason}") from None
    return parse_config(text, name)


def parse_config(text: str, path: str = "<config>") -> Config:
    try:
        raw = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, "", f"TOML syntax error: {exc}") from None
    return _Parser(path).config(raw)


class _Parser:
    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    # -- generic checks -------------------------------------------------------------------------------------------

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {_kind(value)}")
        return value

    def known(self, table: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in table:
            if name not in allowed:
                raise self.fail(_join(key, name), f"unknown key (allowed: {', '.join(allowed)})")

    def string(self, table: dict[str, Any], key: str, name: str, default: str | None = None) -> str:
        value = table.get(name, default)
        if value is None:
            raise self.fail(_join(key, name), "missing (required)")
        if not isinstance(value, str):
            raise self.fail(_join(key, name), f"must be a string, got {_kind(value)}")
        return value

    def integer(self, table: dict[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
        value = table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(_join(key, name), f"must be an integer, got {_kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(_join(key, name), f"must be between {lo} and {hi}, got {value}")
        return value

    def flag(self, table: dict[str, Any], key: str, name: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(_join(key, name), f"must be true or false, got {_kind(value)}")
        return value

    def seconds(self, table: dict[str, Any], key: str, name: str, default: float, lo: float = 0.0) -> float:
        value = table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
            raise self.fail(_join(key, name), f"must be a number of seconds, got {_kind(value)}")
        if value <= lo:
            raise self.fail(_join(key, name), f"must be greater than {lo:g} seconds, got {value}")
        return float(value)

    def choice(
        self, table: dict[str, Any], key: str, name: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.string(table, key, name, default)
        if value not in choices:
            raise self.fail(_join(key, name), f"must be one of {', '.join(choices)}, got {value!r}")
        return value

    def ipv4(self, value: str, key: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise self.fail(key, f"not an IPv4 address: {value!r}") from None

    def address(self, table: dict[str, Any], key: str, name: str) -> Address:
        value = self.string(table, key, name)
        full = _join(key, name)
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text:
            raise self.fail(full, f"must be IP:port, got {value!r}")
        host = self.ipv4(host, full)
        if not port_text.isdigit() or not 1 <= int(port_text) <= 65535:
            raise self.fail(full, f"port must be 1-65535, got {port_text!r}")
        return Address(host, int(port_text))

    # -- sections -------------------------------------------------------------------------------------------------

    def config(self, raw: dict[str, Any]) -> Config:
        self.known(raw, "", ("frontends", "backends", "stats", "passthrough", "dsr"))
        backends = self.backends(raw.get("backends", {}))
        frontends = self.frontends(raw.get("frontends", {}), backends)
        stats = self.stats(raw.get("stats", {}))
        passthrough = self.passthrough(raw.get("passthrough", {}))
        dsr = self.dsr(raw.get("dsr", {}), frontends, backends)
        return Config(self.path, frontends, backends, stats, passthrough, dsr)

    def backends(self, value: Any) -> dict[str, BackendConfig]:
        section = self.table(value, "backends")
        result: dict[str, BackendConfig] = {}
        for name, body in section.items():
            key = f"backends.{name}"
            body = self.table(body, key)
            self.known(
                body,
                key,
                (
                    "servers",
                    "health_check_interval",
                    "health_check_timeout",
                    "rise",
                    "fall",
                    "scheduler",
                    "maglev_table_size",
                ),
            )
            servers = self.servers(body.get("servers", {}), f"{key}.servers")
            interval = self.seconds(body, key, "health_check_interval", DEFAULT_HEALTH_INTERVAL)
            timeout = self.seconds(body, key, "health_check_timeout", min(DEFAULT_HEALTH_TIMEOUT, interval))
            scheduler = body.get("scheduler")
            if scheduler is not None:
                scheduler = self.choice(body, key, "scheduler", SCHEDULERS, "wrr")
            table_size = self.integer(body, key, "maglev_table_size", 65537, 3, 1_000_003)
            if not _is_prime(table_size):
                raise self.fail(f"{key}.maglev_table_size", f"must be a prime number, got {table_size}")
            if table_size < 100 * max(1, len(servers)):
                raise self.fail(
                    f"{key}.maglev_table_size",
                    f"must be at least 100 x the number of servers ({len(servers)}) for an even spread, "
                    f"got {table_size}",
                )
            result[name] = BackendConfig(
                name=name,
                servers=servers,
                health_check_interval=interval,
                health_check_timeout=timeout,
                rise=self.integer(body, key, "rise", DEFAULT_RISE, 1, 1000),
                fall=self.integer(body, key, "fall", DEFAULT_FALL, 1, 1000),
                scheduler=scheduler,
                maglev_table_size=table_size,
            )
        return result

    def servers(self, value: Any, key: str) -> tuple[ServerConfig, ...]:
        section = self.table(value, key)
        servers: list[ServerConfig] = []
        seen: dict[Address, str] = {}
        for name, body in section.items():
            skey = f"{key}.{name}"
            body = self.table(body, skey)
            self.known(body, skey, ("addr", "weight"))
            addr = self.address(body, skey, "addr")
            if addr in seen:
                raise self.fail(f"{skey}.addr", f"{addr} is already used by server {seen[addr]!r}")
            seen[addr] = name
            weight = body.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise self.fail(f"{skey}.weight", f"must be an integer, got {_kind(weight)}")
            if weight < 0:
                raise self.fail(f"{skey}.weight", f"must not be negative, got {weight} (0 drains the server)")
            if weight > 1_000_000:
                raise self.fail(f"{skey}.weight", f"must be at most 1000000, got {weight}")
            servers.append(ServerConfig(name, addr, weight))
        return tuple(servers)

    def frontends(self, value: Any, backends: Mapping[str, BackendConfig]) -> dict[str, FrontendConfig]:
        section = self.table(value, "frontends")
        result: dict[str, FrontendConfig] = {}
        seen: dict[Address, str] = {}
        for name, body in section.items():
            key = f"frontends.{name}"
            body = self.table(body, key)
            self.known(body, key, ("listen_addr", "backend"))
            listen = self.address(body, key, "listen_addr")
            if listen in seen:
                raise self.fail(
                    f"{key}.listen_addr", f"{listen} is already used by frontend {seen[listen]!r}"
                )
            seen[listen] = name
            backend = self.string(body, key, "backend")
            if backend not in backends:
                known = ", ".join(sorted(backends)) or "none defined"
                raise self.fail(f"{key}.backend", f"unknown backend {backend!r} (backends: {known})")
            result[name] = FrontendConfig(name, listen, backend)
        return result

    def stats(self, value: Any) -> StatsConfig:
        section = self.table(value, "stats")
        self.known(section, "stats", ("port", "address"))
        port: int | None = None
        if "port" in section:
            raw = section["port"]
            if isinstance(raw, str) and raw.strip().isdigit():
                raw = int(raw.strip())
            if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
                raise self.fail(
                    "stats.port", f"must be a port number 1-65535 (integer or string), got {raw!r}"
                )
            port = raw
        address = self.ipv4(self.string(section, "stats", "address", DEFAULT_STATS_ADDRESS), "stats.address")
        return StatsConfig(port, address)

    def passthrough(self, value: Any) -> PassthroughConfig:
        key = "passthrough"
        section = self.table(value, key)
        self.known(
            section,
            key,
            (
                "connection_tracker_capacity",
                "workers",
                "stats_update_frequency",
                "port_range",
                "port_reuse_delay",
                "source_addrs",
                "queue_num",
                "idle_timeout",
                "syn_timeout",
                "fin_linger",
                "offload",
            ),
        )
        port_range = self.port_range(section.get("port_range"), f"{key}.port_range")
        addrs = section.get("source_addrs", [])
        if not isinstance(addrs, list) or not all(isinstance(a, str) for a in addrs):
            raise self.fail(f"{key}.source_addrs", "must be a list of IPv4 address strings")
        source_addrs = tuple(self.ipv4(a, f"{key}.source_addrs") for a in addrs)
        if len(set(source_addrs)) != len(source_addrs):
            raise self.fail(f"{key}.source_addrs", "lists an address twice")
        return PassthroughConfig(
            connection_tracker_capacity=self.integer(
                section, key, "connection_tracker_capacity", 20000, 1, 10**7
            ),
            workers=self.integer(section, key, "workers", 1, 1, 256),
            stats_update_frequency=self.seconds(section, key, "stats_update_frequency", 5.0),
            port_range=port_range,
            port_reuse_delay=self.seconds(section, key, "port_reuse_delay", 60.0, lo=-1.0),
            source_addrs=source_addrs,
            queue_num=self.integer(section, key, "queue_num", 0, 0, 65535),
            idle_timeout=self.seconds(section, key, "idle_timeout", 300.0),
            syn_timeout=self.seconds(section, key, "syn_timeout", 10.0),
            fin_linger=self.seconds(section, key, "fin_linger", 2.0),
            offload=self.flag(section, key, "offload", False),
        )

    def port_range(self, value: Any, key: str) -> tuple[int, int]:
        if value is None:
            return DEFAULT_PORT_RANGE
        if isinstance(value, str):
            lo_text, sep, hi_text = value.partition("-")
            if not sep or not lo_text.strip().isdigit() or not hi_text.strip().isdigit():
                raise self.fail(key, f'must be "LOW-HIGH" or [LOW, HIGH], got {value!r}')
            lo, hi = int(lo_text), int(hi_text)
        elif isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
            lo, hi = value
        else:
            raise self.fail(key, f'must be "LOW-HIGH" or [LOW, HIGH], got {value!r}')
        if not 1024 <= lo <= hi <= 65535:
            raise self.fail(key, f"must satisfy 1024 <= LOW <= HIGH <= 65535, got {lo}-{hi}")
        return (lo, hi)

    def dsr(
        self, value: Any, frontends: Mapping[str, FrontendConfig], backends: Mapping[str, BackendConfig]
    ) -> DsrConfig:
        key = "dsr"
        section = self.table(value, key)
        self.known(
            section,
            key,
            (
                "rewrite",
                "egress_nat",
                "queue_num",
                "idle_timeout",
                "fwmark_base",
                "route_table_base",
                "offload",
            ),
        )
        rewrite = Rewrite(self.choice(section, key, "rewrite", DSR_REWRITES, "ip"))
        egress = self.choice(section, key, "egress_nat", EGRESS_NAT_METHODS, "auto")
        if rewrite == Rewrite.IP and egress == "tc":
            # tc's nat action rewrites addresses only: a server port that differs from the listen port could not be
            # put back in the server's replies.
            for front in frontends.values():
                for server in backends[front.backend].servers:
                    if server.addr.port != front.listen_addr.port:
                        raise self.fail(
                            f"backends.{front.backend}.servers.{server.name}.addr",
                            f"port {server.addr.port} differs from frontends.{front.name}.listen_addr port "
                            f'{front.listen_addr.port}; dsr.egress_nat = "tc" cannot restore ports '
                            '(use "nft" or "auto", or the same port)',
                        )
        return DsrConfig(
            rewrite=rewrite,
            egress_nat=egress,
            queue_num=self.integer(section, key, "queue_num", 0, 0, 65535),
            idle_timeout=self.seconds(section, key, "idle_timeout", 300.0),
            fwmark_base=self.integer(section, key, "fwmark_base", 0x100, 1, 0x7FFF0000),
            route_table_base=self.integer(section, key, "route_table_base", 100, 1, 0x7FFF0000),
            offload=self.flag(section, key, "offload", False),
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


def _join(key: str, name: str) -> str:
    return f"{key}.{name}" if key else name


def _kind(value: Any) -> str:
    names = {
        bool: "a boolean",
        int: "an integer",
        float: "a number",
        str: "a string",
        list: "a list",
        dict: "a table",
    }
    return names.get(type(value), type(value).__name__)


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, math.isqrt(n) + 1, 2))


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
