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
from typing import TYPE_CHECKING, Any

from convey import __version__
from convey.config import (
    MAX_WORKERS,
    Config,
    ConfigError,
    auto_workers,
    check_warnings,
    load_config,
    summary,
    validate_for_mode,
    with_offload,
    with_workers,
)
from convey.errors import ConveyError
from convey.modes import Mode

if TYPE_CHECKING:
    from convey.engine import Engine

log = logging.getLogger("convey")

EXIT_OK = 0
EXIT_CONFIG = 1
EXIT_STARTUP = 2
EXIT_INTERRUPTED = 130  # Ctrl-C before the balancer was running

EPILOG = f"""\
exit status:
  {EXIT_OK}    stopped cleanly (SIGTERM, SIGINT), or the command succeeded
  {EXIT_CONFIG}    config error: the file is missing, unreadable or invalid for the mode
  {EXIT_STARTUP}    could not start (ports, rules, permissions, a missing module) or a command-line error
  {EXIT_INTERRUPTED}  interrupted (Ctrl-C) before starting

signals:
  SIGTERM, SIGINT  stop: listeners close, open connections get a drain period, then the rest are closed
  SIGHUP           reload the config file now (an invalid file is logged and the running config kept)

With NOTIFY_SOCKET set (systemd Type=notify) convey sends READY=1 once running, RELOADING=1 and READY=1 around
a reload and STOPPING=1 when it stops (docs/service.md)."""


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
    parser.add_argument(
        "--workers",
        type=_workers_arg,
        metavar="N",
        help='worker processes, a number or "auto" (one per CPU) [default: the mode\'s workers key, 1]',
    )
    parser.add_argument(
        "--log-format",
        default="kv",
        choices=("kv", "json"),
        help="log lines as key=value pairs or one JSON object per line [default: kv]",
    )


def _workers_arg(text: str) -> int:
    if text == "auto":
        return auto_workers()
    try:
        count = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f'must be a number or "auto", got {text!r}') from None
    if not 1 <= count <= MAX_WORKERS:
        raise argparse.ArgumentTypeError(f"must be between 1 and {MAX_WORKERS}, got {count}")
    return count


def _mode(args: argparse.Namespace) -> Mode:
    if args.passthrough:
        return Mode.PASSTHROUGH
    if args.dsr:
        return Mode.DSR
    return Mode.PROXY


def main_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="convey",
        description="convey: a Layer 4 (TCP) load balancer. Subcommands: 'convey check', 'convey rules', "
        "'convey ctl', 'convey flows' (see 'convey check -h', ...).",
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
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


def setup_logging(level: str, fmt: str = "kv") -> None:
    """Log lines on stderr: key=value or JSON (see convey.logs)."""
    from convey.logs import setup_logging as setup

    setup(level, fmt)


def _load(args: argparse.Namespace, mode: Mode) -> Config | None:
    """The config file, with ``--offload`` applied; None after printing why not."""
    if args.offload and mode == Mode.PROXY:
        print("convey: --offload needs a packet mode: add --passthrough or --dsr", file=sys.stderr)
        return None
    try:
        config = load_config(args.config)
        if args.workers is not None:
            config = with_workers(config, mode, args.workers)
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
    parser.add_argument(
        "--diff",
        action="store_true",
        help="preview a reload: what --config changes against the running instance (--url, or the one the "
        "file's [stats] names) or against --against=OLD.toml; exit 0, 1 config error, 2 cannot reach",
    )
    parser.add_argument("--url", help="with --diff: the running instance's stats service")
    parser.add_argument("--against", metavar="OLD", help="with --diff: compare with this file instead")
    args = parser.parse_args(argv)
    mode = _mode(args)
    config = _load(args, mode)
    if config is None:
        return EXIT_CONFIG
    if args.diff:
        from convey.ctl import check_diff

        return check_diff(config, mode, args.url, args.against)
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
    for warning in check_warnings(config, mode):  # valid, but probably not what was meant: exit status 0
        print(f"convey: warning: {warning}", file=sys.stderr)
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
    setup_logging(args.log_level, args.log_format)
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
    setup_logging(args.log_level, args.log_format)
    mode = _mode(args)
    config = _load(args, mode)
    if config is None:
        return EXIT_CONFIG
    from convey.engine import Engine
    from convey.errors import StartupError

    options: dict[str, Any] = {"install_rules": args.install_rules} if mode != Mode.PROXY else {}
    options.update(log_level=args.log_level, log_format=args.log_format)  # for worker processes
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
    except ImportError as exc:  # an extra not installed: pyroute2, NetfilterQueue
        print(f"convey: cannot start {mode} mode: {exc.name or exc} is missing: pip install 'convey[packet]'",
              file=sys.stderr)  # fmt: skip
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
        if argv and argv[0] in ("ctl", "flows"):  # clients of the runtime API (convey/ctl.py)
            from convey import ctl

            return ctl.cmd_ctl(argv[1:]) if argv[0] == "ctl" else ctl.cmd_flows(argv[1:])
        return run(argv)
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
