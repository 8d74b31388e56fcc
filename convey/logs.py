"""Log lines: one ``key=value`` format (or one JSON object per line), the same keys either way.

A line is ``ts=2026-12-01T21:30:00.123Z level=info logger=convey.engine event=started mode=proxy ...``: the time
in UTC with milliseconds, the level in lower case, the logger, the event, then the message's own fields in their
order. A value is quoted only when it must be (empty, or holding a space, ``"``, ``=`` or a character that is not
printable); inside quotes ``"`` and ``\\`` are escaped and control characters written as JSON escapes, so a quoted
value reads back with ``json.loads`` and every event is one line.

Call sites keep the standard ``logging`` style, ``log.info("event=x server=%s error=%r", name, exc)``: the
formatter renders the arguments itself. A placeholder that is a whole value (``key=%s``, ``key=%r``, ``key=%d``)
becomes that argument's text, quoted when needed: never a Python repr (``%r`` of a string gives the string, of an
exception its message, of a ``(host, port)`` pair ``host:port``). Words of the message that are not ``key=value``
(``(running config kept)``) go to a trailing ``msg`` field. A message with no ``event=`` (other libraries'
lines, free text) becomes ``event=message msg="..."``. A traceback goes, escaped, to an ``exc`` field.

``--log-format=json`` writes the same fields as one JSON object per line; a value that reads as a number (an
``int`` or ``float`` argument, or text such as ``8080`` or ``0.5``, not ``007``) is a JSON number.

:class:`LogLimiter` keeps lines that can repeat per connection (refusals, failed connects) to one per reason per
interval; the next line that gets through carries ``suppressed=N``, the lines left out since the last one.

``[log] connections = true`` turns on one line per connection when it ends (HAProxy's tcplog is the model), on
the ``convey.connections`` logger: ``event=connection frontend=web backend=app server=one client=198.18.0.1:40312
duration=0.012 bytes_tx=78 bytes_rx=4321 end=closed``. The planes test :data:`CONNECTIONS` ``.on`` (one attribute)
when a connection opens and when it closes; the engine sets it from the config at start and on reload.
"""

from __future__ import annotations

import json
import logging
import re
import sys
import time
from collections.abc import Callable, Iterator
from typing import IO, Any

from convey.stats import Counters

__all__ = [
    "CONNECTIONS",
    "FORMATS",
    "ConnectionRecord",
    "JsonFormatter",
    "KvFormatter",
    "LogLimiter",
    "fields",
    "format_kv",
    "log_connection",
    "parse_kv",
    "quote",
    "setup_logging",
]

FORMATS = ("kv", "json")
RESERVED = ("ts", "level", "logger", "event", "msg", "exc", "stack")  # a message key named so gets a "_"

# One ``key=value`` token of a format string or a line: a quoted value (JSON string syntax) or a run of non-spaces.
_TOKEN = re.compile(r'(?<!\S)([A-Za-z_][\w.\-]*)=("(?:[^"\\]|\\.)*"|\S*)')
# A printf placeholder (logging's %-style); ``%%`` is a literal percent sign.
_SPEC = re.compile(r"%(?:%|[-#0 +]*(?:\d+|\*)?(?:\.\d+)?[diouxXeEfFgGcrsa])")
_WHOLE = re.compile(r"%[-#0 +]*\d*(?:\.\d+)?[diouxXeEfFgGcrsa]")
# Numbers as JSON writes them (no leading zeros, no "+", no exponent-only forms): "007" or "1e3" stay text.
_INT = re.compile(r"-?(?:0|[1-9]\d*)")
_FLOAT = re.compile(r"-?(?:0|[1-9]\d*)\.\d+")
_NEEDS_QUOTE = re.compile(r'[\s"=]')

Value = str | int | float | bool


def quote(text: str) -> str:
    """``text`` as a value: as it is, or in double quotes with JSON escapes when it is empty or holds a space,
    ``"``, ``=`` or anything not printable."""
    if text and text.isprintable() and not _NEEDS_QUOTE.search(text):
        return text
    inner = json.dumps(text, ensure_ascii=False)
    if not inner.isprintable():  # json leaves some (U+0085, U+2028, lone surrogates) as they are
        inner = "".join(c if c.isprintable() else json.dumps(c)[1:-1] for c in inner)
    return inner


def _text(value: Any) -> str:
    """A value's text for a log line: never a repr."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, BaseException):
        message = str(value)
        return message if message else type(value).__name__
    if (
        isinstance(value, tuple)
        and len(value) in (2, 4)  # a socket address: (host, port) or IPv6's (host, port, flow, scope)
        and isinstance(value[0], str)
        and isinstance(value[1], int)
    ):
        return f"{value[0]}:{value[1]}"
    if isinstance(value, bytes):
        return value.hex()
    return str(value)


def _typed(value: Any) -> Value:
    """What a whole-value argument is in a JSON line: numbers and booleans stay so, text that reads as a number
    becomes one, the rest is text."""
    if isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return _number(value)
    if isinstance(value, float) and value == value and value not in (float("inf"), float("-inf")):
        return value
    return _text(value)


def _number(text: str) -> Value:
    """A value: a number when it reads as one (as JSON would write it), else the text."""
    if _INT.fullmatch(text):
        return int(text)
    if _FLOAT.fullmatch(text):
        return float(text)
    return text


class _Args:
    """The record's arguments, consumed by the placeholders in order."""

    def __init__(self, args: tuple[Any, ...]) -> None:
        self.args = args
        self.i = 0

    def take(self) -> Any:
        if self.i >= len(self.args):
            raise TypeError("not enough arguments for format string")
        value = self.args[self.i]
        self.i += 1
        return value

    def fill(self, template: str) -> str:
        """``template`` with its placeholders replaced; ``%r``/``%s``/``%a`` give :func:`_text`."""

        def one(m: re.Match[str]) -> str:
            spec = m.group(0)
            if spec == "%%":
                return "%"
            value = self.take()
            if spec[-1] in "rsa":
                return _text(value)
            return str(spec % value)

        return _SPEC.sub(one, template)


def fields(record: logging.LogRecord) -> list[tuple[str, Value]]:
    """A record's fields after ts/level/logger: ``event`` first, then the message's fields, ``msg`` for the rest
    and ``exc`` for a traceback."""
    pairs: list[tuple[str, Value]] = []
    rest: list[str] = []
    msg, args = record.msg, record.args
    try:
        if not isinstance(msg, str) or isinstance(args, dict) or "event=" not in msg:
            raise ValueError("free text")
        values = _Args(tuple(args or ()))
        at = 0
        for m in _TOKEN.finditer(msg):
            rest.append(values.fill(msg[at : m.start()]))
            at = m.end()
            key, template = m.group(1), m.group(2)
            if _WHOLE.fullmatch(template):
                value = values.take()
                pairs.append((key, _typed(value) if template[-1] in "rsa" else _spec_value(template, value)))
            elif template.startswith('"'):
                pairs.append((key, values.fill(json.loads(template))))
            else:
                pairs.append((key, _number(values.fill(template))))
        rest.append(values.fill(msg[at:]))
        if values.i != len(values.args):
            raise TypeError("not all arguments converted")
    except Exception:  # free text, or a message and arguments that do not match: the whole message, as text
        pairs, rest = [], [_message(record)]
    event: Value = "message"
    out: list[tuple[str, Value]] = []
    for key, value in pairs:
        if key == "event" and event == "message":
            event = value
        elif key in RESERVED:
            out.append((key + "_", value))
        else:
            out.append((key, value))
    text = " ".join(part.strip() for part in rest if part.strip())
    if text:
        out.append(("msg", text))
    if record.exc_info:
        out.append(("exc", logging.Formatter().formatException(record.exc_info)))
    elif record.exc_text:
        out.append(("exc", record.exc_text))
    if record.stack_info:
        out.append(("stack", record.stack_info))
    return [("event", event), *out]


def _message(record: logging.LogRecord) -> str:
    try:
        return record.getMessage()
    except Exception:  # the arguments do not fit the message: both, as text
        args = record.args if isinstance(record.args, tuple) else (record.args,)
        return f"{record.msg} (arguments: {', '.join(map(_text, args))})"


def _spec_value(spec: str, value: Any) -> Value:
    """A ``%d``/``%g``/``%.1f`` ... placeholder's value: the number itself in JSON when the spec adds nothing."""
    text = spec % value
    if spec in ("%d", "%i") and isinstance(value, int) and not isinstance(value, bool):
        return value
    return _number(text)


def _timestamp(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def _head(record: logging.LogRecord) -> list[tuple[str, Value]]:
    return [("ts", _timestamp(record.created)), ("level", record.levelname.lower()), ("logger", record.name)]


def format_kv(pairs: list[tuple[str, Value]]) -> str:
    """``key=value`` pairs as one line (values quoted only when needed)."""
    return " ".join(f"{key}={quote(_text(value))}" for key, value in pairs)


class KvFormatter(logging.Formatter):
    """``ts=... level=... logger=... event=... key=value ...``, one line per record."""

    def format(self, record: logging.LogRecord) -> str:
        return format_kv(_head(record) + fields(record))


class JsonFormatter(logging.Formatter):
    """The same fields as :class:`KvFormatter`, as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, Value] = {}
        for key, value in _head(record) + fields(record):
            doc[key] = value
        return json.dumps(doc, ensure_ascii=False, separators=(",", ":"))


def parse_kv(line: str) -> dict[str, str]:
    """A ``key=value`` line back into its fields (quoted values unescaped); the inverse of :func:`format_kv`."""
    out: dict[str, str] = {}
    for m in _TOKEN.finditer(line):
        value = m.group(2)
        out[m.group(1)] = json.loads(value) if value.startswith('"') else value
    return out


def setup_logging(level: str = "INFO", fmt: str = "kv", stream: IO[str] | None = None) -> None:
    """The root logger writes ``fmt`` lines (``kv`` or ``json``) to ``stream`` (stderr) at ``level``."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown log format {fmt!r} (formats: {', '.join(FORMATS)})")
    handler = logging.StreamHandler(stream if stream is not None else sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else KvFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    for noisy in ("pyroute2", "asyncio"):  # their DEBUG lines are about their own internals
        logging.getLogger(noisy).setLevel(max(logging.INFO, getattr(logging, level)))


class LogLimiter:
    """At most one line per key per ``interval`` seconds; the next line logged for a key carries
    ``suppressed=N`` (lines left out since the last one). Keys are bounded by the config (frontend, server,
    reason), so the table stays small."""

    def __init__(
        self, logger: logging.Logger, interval: float = 10.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.logger = logger
        self.interval = interval
        self.clock = clock
        self._seen: dict[Any, list[float]] = {}  # key -> [time of the last line, lines suppressed since]

    def log(self, level: int, key: Any, msg: str, *args: Any) -> bool:
        """Log ``msg % args`` unless a line for ``key`` went out less than ``interval`` seconds ago; True if
        logged."""
        if not self.logger.isEnabledFor(level):
            return False
        now = self.clock()
        seen = self._seen.get(key)
        if seen is not None and now - seen[0] < self.interval:
            seen[1] += 1
            return False
        suppressed = int(seen[1]) if seen is not None else 0
        self._seen[key] = [now, 0]
        if suppressed:
            msg += " suppressed=%d"
            args = (*args, suppressed)
        self.logger.log(level, msg, *args)
        return True

    def pending(self) -> Iterator[tuple[Any, int]]:
        """Keys with suppressed lines not reported yet (tests, shutdown)."""
        for key, (_, n) in self._seen.items():
            if n:
                yield key, int(n)


class _Switch:
    __slots__ = ("on",)

    def __init__(self) -> None:
        self.on = False


CONNECTIONS = _Switch()  # [log] connections: the per-connection line (set by the engine)
connection_log = logging.getLogger("convey.connections")


def log_connection(
    frontend: str, backend: str, server: str, client: str, duration: float, tx: int, rx: int, end: str
) -> None:
    """The line of one ended connection: ``tx`` client -> server bytes, ``rx`` server -> client, ``duration`` in
    seconds (-1: not known, the connection opened before ``[log] connections`` was turned on), ``end`` why."""
    connection_log.info(
        "event=connection frontend=%s backend=%s server=%s client=%s duration=%s bytes_tx=%d bytes_rx=%d end=%s",
        frontend, backend, server or "-", client, round(duration, 3), tx, rx, end,
    )  # fmt: skip


class ConnectionRecord(Counters):
    """One proxied connection's own counters: the relay adds it to the connection's stats scopes, so its bytes
    are counted by the loops that count every scope's (nothing more per chunk); ``refused``/``failed`` say why a
    connection never reached a server."""

    __slots__ = ("client", "end", "started")

    def __init__(self, client: Any) -> None:
        super().__init__()
        self.client = _text(client) if client is not None else "-"
        self.end = ""  # set on an abort or an error; "" at the end: closed normally
        self.started = time.monotonic()

    def close(self, frontend: str, backend: str, server: str | None) -> None:
        end = self.end or ("refused" if self.refused else "connect_failed" if self.failed else "closed")
        duration = time.monotonic() - self.started
        log_connection(
            frontend, backend, server or "-", self.client, duration, self.bytes_tx, self.bytes_rx, end
        )
