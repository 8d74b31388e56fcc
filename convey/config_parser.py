"""The validating reader behind :func:`convey.config.parse_config`: raw TOML tables in, a frozen
:class:`convey.config.Config` out, or the first :class:`convey.config.ConfigError`, which names the file, the key and
the problem. Split from config.py, which holds the types and the public functions, to keep both readable.
"""

from __future__ import annotations

import ipaddress
import math
from collections.abc import Mapping
from typing import Any

from convey.bgp.model import parse_bgp
from convey.config import (
    DEFAULT_CONNECT_TIMEOUT,
    DEFAULT_FALL,
    DEFAULT_HEALTH_INTERVAL,
    DEFAULT_HEALTH_TIMEOUT,
    DEFAULT_PORT_RANGE,
    DEFAULT_PROXY_IDLE_TIMEOUT,
    DEFAULT_QUEUE_BINDING,
    DEFAULT_RISE,
    DEFAULT_STATS_ADDRESS,
    DSR_REWRITES,
    EGRESS_NAT_METHODS,
    MAX_WEIGHT,
    MAX_WORKERS,
    NAME,
    NAME_RULE,
    QUEUE_BINDINGS,
    SCHEDULERS,
    Address,
    BackendConfig,
    Config,
    ConfigError,
    DsrConfig,
    FrontendConfig,
    LogConfig,
    PassthroughConfig,
    ProxyConfig,
    ServerConfig,
    StatsConfig,
    auto_workers,
)
from convey.config_values import digits, is_prime, join, kind, quoted, show
from convey.control.token import stats_token
from convey.modes import Rewrite

__all__ = ["Parser"]


class Parser:
    """Turns the raw TOML tables into a :class:`Config`, or raises the first :class:`ConfigError`."""

    def __init__(self, path: str) -> None:
        self.path = path

    def fail(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, key, problem)

    # -- generic checks -------------------------------------------------------------------------------------------

    def table(self, value: Any, key: str) -> dict[str, Any]:
        if not isinstance(value, dict):
            raise self.fail(key, f"must be a table, got {kind(value)}")
        return value

    def known(self, table: dict[str, Any], key: str, allowed: tuple[str, ...]) -> None:
        for name in table:
            if name not in allowed:
                raise self.fail(join(key, name), f"unknown key (allowed: {', '.join(allowed)})")

    def string(self, table: dict[str, Any], key: str, name: str, default: str | None = None) -> str:
        value = table.get(name, default)
        if value is None:
            raise self.fail(join(key, name), "missing (required)")
        if not isinstance(value, str):
            raise self.fail(join(key, name), f"must be a string, got {kind(value)}")
        return value

    def integer(self, table: dict[str, Any], key: str, name: str, default: int, lo: int, hi: int) -> int:
        value = table.get(name, default)
        if isinstance(value, bool) or not isinstance(value, int):
            raise self.fail(join(key, name), f"must be an integer, got {kind(value)}")
        if not lo <= value <= hi:
            raise self.fail(join(key, name), f"must be between {lo} and {hi}, got {show(value)}")
        return value

    def flag(self, table: dict[str, Any], key: str, name: str, default: bool) -> bool:
        value = table.get(name, default)
        if not isinstance(value, bool):
            raise self.fail(join(key, name), f"must be true or false, got {kind(value)}")
        return value

    def seconds(
        self, table: dict[str, Any], key: str, name: str, default: float, hi: float, zero_ok: bool = False
    ) -> float:
        """A duration in (0, hi], or [0, hi] with ``zero_ok``."""
        value = table.get(name, default)
        full = join(key, name)
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise self.fail(full, f"must be a number of seconds, got {kind(value)}")
        if isinstance(value, float) and not math.isfinite(value):
            raise self.fail(full, f"must be a number of seconds, got {value}")
        if zero_ok:
            if not 0 <= value <= hi:
                raise self.fail(full, f"must be between 0 and {hi:g} seconds, got {show(value)}")
        elif value <= 0:
            raise self.fail(full, f"must be greater than 0 seconds, got {show(value)}")
        if value > hi:
            raise self.fail(full, f"must be at most {hi:g} seconds, got {show(value)}")
        return float(value)

    def choice(
        self, table: dict[str, Any], key: str, name: str, choices: tuple[str, ...], default: str
    ) -> str:
        value = self.string(table, key, name, default)
        if value not in choices:
            raise self.fail(join(key, name), f"must be one of {', '.join(choices)}, got {show(value)}")
        return value

    def ipv4(self, value: str, key: str) -> str:
        try:
            return str(ipaddress.IPv4Address(value))
        except ValueError:
            raise self.fail(key, f"not an IPv4 address: {show(value)}") from None

    def address(self, table: dict[str, Any], key: str, name: str) -> Address:
        value = self.string(table, key, name)
        full = join(key, name)
        host, sep, port_text = value.rpartition(":")
        if not sep or not host or not port_text:
            raise self.fail(full, f"must be IP:port, got {show(value)}")
        host = self.ipv4(host, full)
        port = digits(port_text)
        if port is None or not 1 <= port <= 65535:
            raise self.fail(full, f"port must be 1-65535, got {show(port_text)}")
        return Address(host, port)

    def name(self, name: str, key: str, what: str) -> None:
        """Backend and server names make "backend/server" ids and /metrics labels: see ``convey.config.NAME``."""
        if not NAME.fullmatch(name):
            raise self.fail(join(key, quoted(name)), f"a {what} name must be {NAME_RULE}")

    # -- sections -------------------------------------------------------------------------------------------------

    def config(self, raw: dict[str, Any]) -> Config:
        self.known(raw, "", ("frontends", "backends", "stats", "passthrough", "dsr", "proxy", "bgp", "log"))
        backends = self.backends(raw.get("backends", {}))
        frontends = self.frontends(raw.get("frontends", {}), backends)
        stats = self.stats(raw.get("stats", {}))
        passthrough = self.passthrough(raw.get("passthrough", {}))
        self.vips_outside_ports(frontends, passthrough)
        dsr = self.dsr(raw.get("dsr", {}), frontends, backends)
        proxy = self.proxy(raw.get("proxy", {}))
        bgp = parse_bgp(self, raw.get("bgp"))
        log = self.log(raw.get("log", {}))
        return Config(self.path, frontends, backends, stats, passthrough, dsr, proxy, bgp, log=log)

    def log(self, value: Any) -> LogConfig:
        section = self.table(value, "log")
        self.known(section, "log", ("connections",))
        return LogConfig(connections=self.flag(section, "log", "connections", False))

    def backends(self, value: Any) -> dict[str, BackendConfig]:
        section = self.table(value, "backends")
        result: dict[str, BackendConfig] = {}
        for name, body in section.items():
            self.name(name, "backends", "backend")
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
                    "connect_timeout",
                ),
            )
            servers = self.servers(body.get("servers", {}), f"{key}.servers")
            interval = self.seconds(body, key, "health_check_interval", DEFAULT_HEALTH_INTERVAL, DAY)
            timeout = self.seconds(
                body, key, "health_check_timeout", min(DEFAULT_HEALTH_TIMEOUT, interval), DAY
            )
            scheduler = body.get("scheduler")
            if scheduler is not None:
                scheduler = self.choice(body, key, "scheduler", SCHEDULERS, "wrr")
            table_size = self.integer(body, key, "maglev_table_size", 65537, 3, 1_000_003)
            if not is_prime(table_size):
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
                connect_timeout=self.seconds(body, key, "connect_timeout", DEFAULT_CONNECT_TIMEOUT, HOUR),
            )
        return result

    def servers(self, value: Any, key: str) -> tuple[ServerConfig, ...]:
        section = self.table(value, key)
        servers: list[ServerConfig] = []
        seen: dict[Address, str] = {}
        for name, body in section.items():
            self.name(name, key, "server")
            skey = f"{key}.{name}"
            body = self.table(body, skey)
            self.known(body, skey, ("addr", "weight"))
            addr = self.address(body, skey, "addr")
            if addr in seen:
                raise self.fail(f"{skey}.addr", f"{addr} is already used by server {seen[addr]!r}")
            seen[addr] = name
            weight = body.get("weight", 1)
            if isinstance(weight, bool) or not isinstance(weight, int):
                raise self.fail(f"{skey}.weight", f"must be an integer, got {kind(weight)}")
            if weight < 0:
                raise self.fail(
                    f"{skey}.weight", f"must not be negative, got {show(weight)} (0 drains the server)"
                )
            if weight > MAX_WEIGHT:
                raise self.fail(f"{skey}.weight", f"must be at most {MAX_WEIGHT}, got {show(weight)}")
            servers.append(ServerConfig(name, addr, weight))
        return tuple(servers)

    def frontends(self, value: Any, backends: Mapping[str, BackendConfig]) -> dict[str, FrontendConfig]:
        section = self.table(value, "frontends")
        result: dict[str, FrontendConfig] = {}
        seen: dict[Address, str] = {}
        for name, body in section.items():
            key = f"frontends.{name}"
            body = self.table(body, key)
            self.known(
                body, key, ("listen_addr", "backend", "idle_timeout", "max_connections", "tcp_keepalive")
            )
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
            result[name] = FrontendConfig(
                name,
                listen,
                backend,
                idle_timeout=self.seconds(
                    body, key, "idle_timeout", DEFAULT_PROXY_IDLE_TIMEOUT, MONTH, zero_ok=True
                ),
                max_connections=self.integer(body, key, "max_connections", 0, 0, 10**7),
                tcp_keepalive=self.flag(body, key, "tcp_keepalive", False),
            )
        return result

    def stats(self, value: Any) -> StatsConfig:
        section = self.table(value, "stats")
        self.known(section, "stats", ("port", "address", "api_token", "api_token_file"))
        port: int | None = None
        if "port" in section:
            raw = section["port"]
            if isinstance(raw, str) and digits(raw.strip()) is not None:
                raw = digits(raw.strip())
            if isinstance(raw, bool) or not isinstance(raw, int) or not 1 <= raw <= 65535:
                raise self.fail(
                    "stats.port", f"must be a port number 1-65535 (integer or string), got {show(raw)}"
                )
            port = raw
        address = self.ipv4(self.string(section, "stats", "address", DEFAULT_STATS_ADDRESS), "stats.address")
        token, token_file = stats_token(section, self.fail)
        return StatsConfig(port, address, token, token_file)

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
                "queue_binding",
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
            workers=self.workers(section, key),
            stats_update_frequency=self.seconds(section, key, "stats_update_frequency", 5.0, DAY),
            port_range=port_range,
            port_reuse_delay=self.seconds(section, key, "port_reuse_delay", 60.0, HOUR, zero_ok=True),
            source_addrs=source_addrs,
            queue_num=self.integer(section, key, "queue_num", 0, 0, 65535),
            queue_binding=self.choice(section, key, "queue_binding", QUEUE_BINDINGS, DEFAULT_QUEUE_BINDING),
            idle_timeout=self.seconds(section, key, "idle_timeout", 300.0, MONTH),
            syn_timeout=self.seconds(section, key, "syn_timeout", 10.0, DAY),
            fin_linger=self.seconds(section, key, "fin_linger", 2.0, HOUR),
            offload=self.flag(section, key, "offload", False),
        )

    def vips_outside_ports(self, frontends: Mapping[str, FrontendConfig], pt: PassthroughConfig) -> None:
        """Passthrough SNATs to ``source_addrs`` with ports from ``port_range``: a VIP on one of those addresses
        with its port in the range would take servers' replies for client traffic. (Without source_addrs,
        ``convey.config.validate_for_mode`` checks in passthrough mode.)"""
        lo, hi = pt.port_range
        for front in frontends.values():
            vip = front.listen_addr
            if vip.host in pt.source_addrs and lo <= vip.port <= hi:
                raise self.fail(
                    f"frontends.{front.name}.listen_addr",
                    f"port {vip.port} lies inside passthrough.port_range {lo}-{hi} and {vip.host} is in "
                    "passthrough.source_addrs: in passthrough mode the servers' replies to that address and "
                    "port would be taken for client traffic; move the port or the range, or use another address",
                )

    def port_range(self, value: Any, key: str) -> tuple[int, int]:
        if value is None:
            return DEFAULT_PORT_RANGE
        if isinstance(value, str):
            lo_text, sep, hi_text = value.partition("-")
            low, high = digits(lo_text.strip()), digits(hi_text.strip())
            if not sep or low is None or high is None:
                raise self.fail(key, f'must be "LOW-HIGH" or [LOW, HIGH], got {show(value)}')
            lo, hi = low, high
        elif isinstance(value, list) and len(value) == 2 and all(type(v) is int for v in value):
            lo, hi = value
        else:
            raise self.fail(key, f'must be "LOW-HIGH" or [LOW, HIGH], got {show(value)}')
        if not 1024 <= lo <= hi <= 65535:
            raise self.fail(key, f"must satisfy 1024 <= LOW <= HIGH <= 65535, got {show(lo)}-{show(hi)}")
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
                "queue_binding",
                "idle_timeout",
                "fwmark_base",
                "route_table_base",
                "offload",
                "workers",
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
            queue_binding=self.choice(section, key, "queue_binding", QUEUE_BINDINGS, DEFAULT_QUEUE_BINDING),
            idle_timeout=self.seconds(section, key, "idle_timeout", 300.0, MONTH),
            fwmark_base=self.integer(section, key, "fwmark_base", 0x100, 1, 0x7FFF0000),
            route_table_base=self.integer(section, key, "route_table_base", 100, 1, 0x7FFF0000),
            offload=self.flag(section, key, "offload", False),
            workers=self.workers(section, key),
        )

    def proxy(self, value: Any) -> ProxyConfig:
        section = self.table(value, "proxy")
        self.known(section, "proxy", ("workers",))
        return ProxyConfig(workers=self.workers(section, "proxy"))

    def workers(self, section: dict[str, Any], key: str) -> int:
        """``workers``: a count 1-MAX_WORKERS, or "auto" (one per CPU this process may run on)."""
        if section.get("workers") == "auto":
            return auto_workers()
        if isinstance(section.get("workers"), str):
            raise self.fail(f"{key}.workers", f'must be an integer or "auto", got {show(section["workers"])}')
        return self.integer(section, key, "workers", 1, 1, MAX_WORKERS)


HOUR = 3600.0
DAY = 86400.0
MONTH = 30 * DAY
