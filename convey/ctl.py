"""Clients of the runtime API (convey/control/), standard library only: ``convey ctl``, ``convey flows`` and the
running-instance side of ``convey check --diff``.

convey ctl status|drain B/S|maintenance B/S|ready B/S|weight B/S N [--url URL] [--token T | --token-file F]
convey flows [--frontend F] [--server S] [--client C] [--limit N] [--json] [--url URL]

The URL defaults to the config's ``[stats]`` address and port (``--config``); the token to ``--token``,
``--token-file``, or the config's own ``api_token``/``api_token_file``. Exit codes: 0 ok, 1 the API refused
(its message is printed), 2 it cannot be reached (or there is no URL to reach).
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from typing import Any

from convey.config import Config, ConfigError, load_config
from convey.control.token import read_token

__all__ = ["EXIT_API", "EXIT_OK", "EXIT_UNREACHABLE", "ApiClient", "cmd_ctl", "cmd_flows", "running_diff"]

EXIT_OK, EXIT_API, EXIT_UNREACHABLE = 0, 1, 2
TIMEOUT = 10.0


class Unreachable(Exception):
    """No answer from the API (or no URL to ask)."""


class Refused(Exception):
    """The API answered with an error; the message is its own."""


class ApiClient:
    def __init__(self, url: str, token: str | None = None) -> None:
        self.url = url.rstrip("/")
        self.token = token

    def call(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method)
        if data is not None:
            req.add_header("Content-Type", "application/json")
        if self.token:
            req.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(req, timeout=TIMEOUT) as answer:
                return json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            try:
                message = json.loads(exc.read()).get("error", exc.reason)
            except (ValueError, AttributeError):
                message = f"HTTP {exc.code} {exc.reason}"
            raise Refused(f"{message} (HTTP {exc.code})") from None
        except (urllib.error.URLError, OSError, ValueError) as exc:
            reason = getattr(exc, "reason", exc)
            raise Unreachable(f"cannot reach {self.url}: {reason}") from None


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--config", default="config.toml", metavar="FILE", help="for the default URL and token"
    )
    parser.add_argument("--url", help="the stats service, e.g. http://127.0.0.1:9000 [from the config]")
    token = parser.add_mutually_exclusive_group()
    token.add_argument("--token", help="the API token [the config's api_token]")
    token.add_argument("--token-file", metavar="FILE", help="a file holding the API token")


def _config(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError:
        return None


def client(args: argparse.Namespace) -> ApiClient:
    """The API client the arguments describe; Unreachable when there is no URL, OSError for a token file."""
    config = _config(args.config) if not args.url or not (args.token or args.token_file) else None
    url = args.url
    if not url:
        if config is None or config.stats.port is None:
            raise Unreachable(f"no --url given and {args.config} has no usable [stats] port")
        host = config.stats.address if config.stats.address != "0.0.0.0" else "127.0.0.1"
        url = f"http://{host}:{config.stats.port}"
    token = args.token or (read_token(args.token_file) if args.token_file else None)
    if token is None and config is not None:
        token = config.stats.api_token
    return ApiClient(url, token)


def _entry_line(name: str, entry: dict[str, Any]) -> str:
    weight = str(entry["weight"])
    if entry["weight"] != entry["configured_weight"]:
        weight += f" (file {entry['configured_weight']})"
    overlay = entry.get("overlay") or {}
    admin = f"  [{overlay['admin']}]" if overlay.get("admin") not in (None, entry["state"]) else ""
    return f"  {name:<20} {entry['address']:<21} {entry['state']:<16} weight {weight:<14} active {entry.get('active', 0)}{admin}"


def _status(doc: dict[str, Any]) -> str:
    lines = ["read-only: no [stats] api_token configured"] if doc.get("read_only") else []
    for name, backend in doc["backends"].items():
        lines.append(f"backend {name} ({backend['scheduler']})")
        lines += [_entry_line(s, e) for s, e in backend["servers"].items()]
    return "\n".join(lines)


def cmd_ctl(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="convey ctl",
        description="Change servers at run time through the API (an overlay on the file: not written back). "
        "Exit codes: 0 ok, 1 the API refused, 2 cannot reach it.",
    )
    parser.add_argument("action", choices=("status", "drain", "maintenance", "ready", "weight"))
    parser.add_argument("server", nargs="?", metavar="BACKEND/SERVER")
    parser.add_argument("weight", nargs="?", type=int, metavar="N", help="for weight: the new weight")
    _common(parser)
    args = parser.parse_args(argv)
    if args.action != "status" and (not args.server or args.server.count("/") != 1):
        parser.error(f"{args.action} needs BACKEND/SERVER")
    if (args.action == "weight") != (args.weight is not None):
        parser.error("weight needs BACKEND/SERVER N (and only weight takes N)")
    try:
        api = client(args)
        if args.action == "status":
            print(_status(api.call("GET", "/api/backends")))
            return EXIT_OK
        backend, server = (urllib.parse.quote(p, safe="") for p in args.server.split("/"))
        path = f"/api/servers/{backend}/{server}/{args.action}"
        if args.action == "weight":
            entry = api.call("PUT", path, {"weight": args.weight})
        else:
            entry = api.call("POST", path, {})
        print(_entry_line(args.server, entry).strip())
        return EXIT_OK
    except Refused as exc:
        print(f"convey ctl: {exc}", file=sys.stderr)
        return EXIT_API
    except (Unreachable, OSError) as exc:
        print(f"convey ctl: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE


def _flows_table(doc: dict[str, Any]) -> str:
    lines = [
        f"{'client':<22} {'frontend':<12} {'server':<20} {'state':<12} {'age':>8} {'in':>10} {'out':>10}  why"
    ]
    for f in doc["flows"]:
        lines.append(
            f"{f['client']:<22} {f['frontend']:<12} {f['server']:<20} {f['state']:<12} {f['age']:>7.1f}s "
            f"{f['bytes_in']:>10} {f['bytes_out']:>10}  {f['why']}"
        )
    lines.append(f"{doc['shown']} of {doc['total']} flows shown")
    return "\n".join(lines)


def cmd_flows(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(
        prog="convey flows",
        description="List the connections convey tracks (GET /flows) and why each went to its server. "
        "Exit codes: 0 ok, 1 the API refused, 2 cannot reach it.",
    )
    parser.add_argument("--frontend", help="only this frontend's")
    parser.add_argument("--server", help="only this server's (BACKEND/SERVER, or a backend or server name)")
    parser.add_argument("--client", help="only this client's (IP or IP:PORT)")
    parser.add_argument("--limit", type=int, default=100, help="show at most N [100; at most 10000]")
    parser.add_argument("--json", action="store_true", help="print the API's JSON document")
    _common(parser)
    args = parser.parse_args(argv)
    params = {k: getattr(args, k) for k in ("frontend", "server", "client") if getattr(args, k)}
    params["limit"] = str(args.limit)
    try:
        doc = client(args).call("GET", "/flows?" + urllib.parse.urlencode(params))
    except Refused as exc:
        print(f"convey flows: {exc}", file=sys.stderr)
        return EXIT_API
    except (Unreachable, OSError) as exc:
        print(f"convey flows: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(json.dumps(doc, indent=2) if args.json else _flows_table(doc))
    return EXIT_OK


def running_diff(api: ApiClient, new: Config) -> list[str]:
    """What loading ``new`` into the running instance behind ``api`` would change (Refused, Unreachable)."""
    from convey.control.diff import config_doc, diff

    running = api.call("GET", "/api/config")
    runtime = api.call("GET", "/api/backends")
    flows = api.call("GET", "/flows?limit=10000")
    return diff(running, config_doc(new, running["mode"]), runtime, flows)


def check_diff(new: Config, mode: str, url: str | None, against: str | None) -> int:
    """``convey check --config=NEW --diff``: print what NEW changes; 0, 1 (a config error), 2 (cannot reach)."""
    from convey.control.diff import config_doc, diff

    try:
        if against is not None:
            lines = diff(config_doc(load_config(against), mode), config_doc(new, mode))
            where = against
        else:
            if not url and new.stats.port is None:
                raise Unreachable(f"no --url given and {new.path} has no [stats] port")
            host = new.stats.address if new.stats.address != "0.0.0.0" else "127.0.0.1"
            api = ApiClient(url or f"http://{host}:{new.stats.port}")
            lines = running_diff(api, new)
            where = f"the instance at {api.url}"
    except ConfigError as exc:
        print(f"convey: config error: {exc}", file=sys.stderr)
        return EXIT_API
    except (Unreachable, Refused) as exc:
        print(f"convey check: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    print(f"{new.path} against {where}:")
    print("\n".join(lines) if lines else "  no changes")
    return EXIT_OK
