"""Command line: compatible with the original convey, plus ``check`` and ``rules``.

convey [--config=FILE]                      proxy mode (the default)
convey (-p|--passthrough) [--config=FILE]   packet mode through NFQUEUE, full NAT
convey (-d|--dsr) [--config=FILE]           direct server return
convey check [--config=FILE] [-p|-d]        validate a config and print a summary (exit 0 or 1)
convey rules show|install|remove [--config=FILE] [-p|-d]
convey -h | --help,  convey -v | --version
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from convey import __version__
from convey.config import Config, ConfigError, load_config, summary, validate_for_mode, with_offload
from convey.errors import ConveyError
from convey.modes import Mode

if TYPE_CHECKING:
    from convey.engine import Engine

log = logging.getLogger("convey")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STARTUP = 2


def _add_common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="config.toml", metavar="FILE", help="config file [default: config.toml]"
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "-p", "--passthrough", action="store_true", help="packet mode through NFQUEUE (full NAT)"
    )
    mode.add_argument("-d", "--dsr", action="store_true", help="direct server return mode")
    parser.add_argument(
        "--offload",
        action="store_true",
        help="packet modes: convey decides each connection's first packet and the kernel carries the rest "
        "(as [passthrough] offload = true or [dsr] offload = true)",
    )
    parser.add_argument(
        "--log-level",
        default="INFO",
        type=str.upper,
        metavar="LEVEL",
        choices=("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"),
        help="DEBUG, INFO, WARNING, ERROR [default: INFO]",
    )


def _mode(args: argparse.Namespace) -> Mode:
    if args.passthrough:
        return Mode.PASSTHROUGH
    if args.dsr:
        return Mode.DSR
    return Mode.PROXY


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convey",
        description="convey: a Layer 4 (TCP) load balancer. Subcommands: 'convey check', 'convey rules' "
        "(see 'convey check -h', 'convey rules -h').",
    )
    _add_common(parser)
    parser.add_argument("-v", "--version", action="version", version=f"convey {__version__}")
    parser.add_argument(
        "--install-rules",
        action="store_true",
        help="packet modes: install the iptables rules and sysctls at start and remove the rules at exit",
    )
    parser.add_argument(
        "--no-watch", action="store_true", help="do not watch the config file (SIGHUP still reloads)"
    )
    return parser


def setup_logging(level: str) -> None:
    logging.basicConfig(
        level=getattr(logging, level),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    for noisy in ("pyroute2", "asyncio"):  # their DEBUG lines are about their own internals
        logging.getLogger(noisy).setLevel(max(logging.INFO, getattr(logging, level)))


def _load(args: argparse.Namespace, mode: Mode) -> Config | None:
    """The config file, with ``--offload`` applied; None after printing why not."""
    if args.offload and mode == Mode.PROXY:
        print("convey: --offload needs a packet mode: add --passthrough or --dsr", file=sys.stderr)
        return None
    try:
        config = load_config(args.config)
        validate_for_mode(config, mode)
    except ConfigError as exc:
        print(f"convey: config error: {exc}", file=sys.stderr)
        return None
    return with_offload(config, mode) if args.offload else config


def cmd_check(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="convey check", description="Validate a config file and summarise it."
    )
    _add_common(parser)
    args = parser.parse_args(argv)
    mode = _mode(args)
    config = _load(args, mode)
    if config is None:
        return EXIT_CONFIG
    if mode != Mode.PROXY:
        from convey.dataplane import rules

        try:
            rules.show(config, mode)  # every check `convey rules show` makes (VIPs, marks, route tables)
        except ConfigError as exc:
            print(f"convey: config error: {exc}", file=sys.stderr)
            return EXIT_CONFIG
        except ConveyError as exc:
            print(f"convey: {exc}", file=sys.stderr)
            return EXIT_CONFIG
    print(summary(config, mode))
    return EXIT_OK


def cmd_rules(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="convey rules",
        description="Show, install or remove the iptables rules (and sysctls) a packet mode needs, in the current "
        "network namespace. Passthrough unless -d is given.",
    )
    parser.add_argument("action", choices=("show", "install", "remove"))
    _add_common(parser)
    args = parser.parse_args(argv)
    setup_logging(args.log_level)
    mode = Mode.DSR if args.dsr else Mode.PASSTHROUGH
    config = _load(args, mode)
    if config is None:
        return EXIT_CONFIG
    from convey.dataplane import rules

    try:
        if args.action == "show":
            print(rules.show(config, mode), end="")
        elif args.action == "install":
            for line in rules.install(config, mode):
                print(line)
        else:
            for line in rules.remove(config):
                print(line)
    except ConfigError as exc:
        print(f"convey: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (ConveyError, OSError, RuntimeError) as exc:
        print(f"convey: rules {args.action} failed: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return EXIT_OK


def run(argv: Sequence[str]) -> int:
    args = main_parser().parse_args(argv)
    setup_logging(args.log_level)
    mode = _mode(args)
    config = _load(args, mode)
    if config is None:
        return EXIT_CONFIG
    from convey.engine import Engine
    from convey.errors import StartupError

    options = {"install_rules": args.install_rules} if mode != Mode.PROXY else {}
    try:
        engine = Engine(config, mode, watch=not args.no_watch, force_offload=args.offload, **options)
        _run_engine(engine)
    except ConfigError as exc:
        print(f"convey: config error: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    except (StartupError, ConveyError) as exc:
        print(f"convey: cannot start {mode} mode: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    except OSError as exc:
        print(f"convey: cannot start {mode} mode: {exc}", file=sys.stderr)
        return EXIT_STARTUP
    return EXIT_OK


def _run_engine(engine: Engine) -> None:
    """Run on uvloop when it is installed (measured faster for the proxy relay), else on asyncio's loop.
    CONVEY_LOOP=asyncio forces the standard library's loop (for debugging or comparison)."""
    if os.environ.get("CONVEY_LOOP", "").lower() != "asyncio":
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(engine.run())
            return
    asyncio.run(engine.run())


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] == "check":
            return cmd_check(argv[1:])
        if argv and argv[0] == "rules":
            return cmd_rules(argv[1:])
        return run(argv)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
