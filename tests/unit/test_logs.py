"""convey.logs: the key=value and JSON formats, the rate limiter, the per-connection line."""

from __future__ import annotations

import io
import json
import logging
import re
import time
from collections.abc import Iterator

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convey import logs
from convey.logs import JsonFormatter, KvFormatter, LogLimiter, parse_kv, quote

TS = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")


def record(msg: str, *args: object, level: int = logging.INFO, exc: bool = False) -> logging.LogRecord:
    exc_info = None
    if exc:
        try:
            raise ValueError("bad\nthing")
        except ValueError:
            import sys

            exc_info = sys.exc_info()
    return logging.LogRecord("convey.test", level, __file__, 1, msg, args, exc_info)


def kv(msg: str, *args: object, **kw: object) -> str:
    return KvFormatter().format(record(msg, *args, **kw))  # type: ignore[arg-type]


def js(msg: str, *args: object) -> dict[str, object]:
    doc = json.loads(JsonFormatter().format(record(msg, *args)))
    assert isinstance(doc, dict)
    return doc


def test_the_head_and_the_order_of_the_fields() -> None:
    line = kv("frontend=%s event=listening addr=%s", "web", "127.0.0.1:80")
    keys = [k for k, _ in (tok.split("=", 1) for tok in line.split(" "))]
    assert keys == ["ts", "level", "logger", "event", "frontend", "addr"]
    fields = parse_kv(line)
    assert TS.fullmatch(fields["ts"]) and fields["level"] == "info" and fields["logger"] == "convey.test"
    assert fields["event"] == "listening" and fields["frontend"] == "web"


def test_no_python_reprs() -> None:
    line = kv(
        "event=x error=%r name=%r addr=%s exc=%r", "a b", "plain", ("10.0.0.1", 80), OSError(111, "refused")
    )
    assert "'" not in line
    assert 'error="a b"' in line and "name=plain " in line and "addr=10.0.0.1:80" in line
    assert 'exc_="[Errno 111] refused"' in line  # a message key named like a reserved one gets a "_"


@pytest.mark.parametrize(
    ("value", "written"),
    [
        ("", '""'),
        ("a b", '"a b"'),
        ('say "hi"', '"say \\"hi\\""'),
        ("k=v", '"k=v"'),
        ("two\nlines", '"two\\nlines"'),
        ("tab\there", '"tab\\there"'),
        ("back\\slash", "back\\slash"),  # no space, quote or "=": as it is
        ("é", "é"),
        ("\u2028", '"\\u2028"'),
    ],
)
def test_quoted_only_when_needed(value: str, written: str) -> None:
    assert quote(value) == written


@given(st.text(), st.text(), st.text(min_size=1, alphabet=st.characters(blacklist_categories=("Cs",))))
def test_what_is_formatted_parses_back(a: str, b: str, c: str) -> None:
    line = kv("event=probe a=%s b=%r c=%s", a, b, c)
    assert "\n" not in line and "\r" not in line
    fields = parse_kv(line)
    assert (fields["a"], fields["b"], fields["c"]) == (a, b, c)
    assert fields["event"] == "probe"


def test_free_text_and_other_libraries() -> None:
    assert parse_kv(kv("rules install: %s", "-A X -j NFQUEUE"))["msg"] == "rules install: -A X -j NFQUEUE"
    assert parse_kv(kv("rules install: %s", "x"))["event"] == "message"
    fields = parse_kv(kv("event=reload_rejected error=%r (running config kept)", "bad: key"))
    assert fields["error"] == "bad: key" and fields["msg"] == "(running config kept)"
    # arguments that do not match the message: the whole message as text, never an exception
    assert parse_kv(kv("event=x a=%s b=%s", "only one"))["event"] == "message"


def test_a_traceback_is_one_escaped_field() -> None:
    line = kv("event=boom", exc=True)
    assert "\n" not in line
    assert "ValueError: bad\nthing" in parse_kv(line)["exc"]


def test_json_lines_have_the_same_keys_and_numbers() -> None:
    msg, args = "frontend=%s event=stopping open=%d ratio=%s port=%s name=%s wait=%gs literal=7 quoted=%s", (
        "web", 3, 0.5, "8080", "007", 5.0, "a b",
    )  # fmt: skip
    doc = js(msg, *args)
    assert list(doc) == list(parse_kv(kv(msg, *args)))
    assert doc["event"] == "stopping" and doc["open"] == 3 and doc["ratio"] == 0.5 and doc["literal"] == 7
    assert doc["port"] == 8080 and doc["name"] == "007" and doc["wait"] == "5s" and doc["quoted"] == "a b"
    doc = js("event=x flag=%s big=%s minus=%s", True, 10**30, "-0.25")
    assert doc["flag"] is True and doc["big"] == 10**30 and doc["minus"] == -0.25


@pytest.fixture
def stream() -> Iterator[io.StringIO]:
    root = logging.getLogger()
    saved = (list(root.handlers), root.level)
    out = io.StringIO()
    yield out
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])


@pytest.mark.parametrize("fmt", ["kv", "json"])
def test_setup_logging(stream: io.StringIO, fmt: str) -> None:
    logs.setup_logging("INFO", fmt, stream)
    logging.getLogger("convey.x").info("event=hello n=%d", 1)
    logging.getLogger("convey.x").debug("event=hidden")
    lines = stream.getvalue().splitlines()
    assert len(lines) == 1
    fields = json.loads(lines[0]) if fmt == "json" else parse_kv(lines[0])
    assert fields["event"] == "hello" and str(fields["n"]) == "1"
    with pytest.raises(ValueError, match="log format"):
        logs.setup_logging("INFO", "xml", stream)


def test_the_limiter_keeps_one_line_per_key_per_interval(caplog: pytest.LogCaptureFixture) -> None:
    now = [100.0]
    limiter = LogLimiter(logging.getLogger("convey.limit"), 10.0, clock=lambda: now[0])
    caplog.set_level(logging.INFO, "convey.limit")
    assert limiter.log(logging.WARNING, "a", "event=refused n=%d", 1)
    assert not limiter.log(logging.WARNING, "a", "event=refused n=%d", 2)
    assert not limiter.log(logging.WARNING, "a", "event=refused n=%d", 3)
    assert limiter.log(logging.WARNING, "b", "event=refused n=%d", 4)  # another key: its own budget
    assert dict(limiter.pending()) == {"a": 2}
    now[0] += 10.0
    assert limiter.log(logging.WARNING, "a", "event=refused n=%d", 5)
    messages = [r.getMessage() for r in caplog.records]
    assert messages == ["event=refused n=1", "event=refused n=4", "event=refused n=5 suppressed=2"]
    assert all(r.levelno == logging.WARNING for r in caplog.records)


def test_the_connection_record_line(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, "convey.connections")
    rec = logs.ConnectionRecord(("198.18.0.1", 40312))
    rec.bytes_tx, rec.bytes_rx = 78, 4321
    rec.close("web", "app", "one")
    refused = logs.ConnectionRecord(None)
    refused.refused = 1
    refused.close("web", "app", None)
    lines = [parse_kv(KvFormatter().format(r)) for r in caplog.records]
    assert lines[0]["event"] == "connection" and lines[0]["client"] == "198.18.0.1:40312"
    assert (lines[0]["server"], lines[0]["bytes_tx"], lines[0]["bytes_rx"]) == ("one", "78", "4321")
    assert lines[0]["end"] == "closed" and float(lines[0]["duration"]) >= 0
    assert (lines[1]["server"], lines[1]["client"], lines[1]["end"]) == ("-", "-", "refused")


# -- [log] connections ---------------------------------------------------------------------------------------------

CONFIG = """
[frontends.web]
listen_addr = "198.18.0.1:80"
backend = "app"
[backends.app.servers.one]
addr = "198.18.1.2:8080"
"""


def test_the_log_section() -> None:
    from convey.config import ConfigError, parse_config

    assert parse_config(CONFIG).log.connections is False
    assert parse_config(CONFIG + "[log]\nconnections = true\n").log.connections is True
    with pytest.raises(ConfigError, match=r"log\.connections: must be true or false"):
        parse_config(CONFIG + '[log]\nconnections = "yes"\n')
    with pytest.raises(ConfigError, match=r"log\.connection: unknown key"):
        parse_config(CONFIG + "[log]\nconnection = true\n")


@pytest.mark.parametrize("on", [True, False])
def test_a_flow_close_line(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch, on: bool
) -> None:
    import socket

    from convey.balancing.pool import Pool
    from convey.config import parse_config
    from convey.dataplane.flow_accounting import FlowAccounting
    from convey.modes import Mode
    from convey.packet.flow import FWD_PACKET, RET_SHIFT, FlowState, new_passthrough_flow
    from convey.stats import Stats

    monkeypatch.setattr(logs.CONNECTIONS, "on", on)
    caplog.set_level(logging.INFO, "convey.connections")
    config = parse_config(CONFIG)
    accounting = FlowAccounting(
        {"app": Pool(config.backends["app"], Mode.PASSTHROUGH)}, Stats("passthrough", 0)
    )
    ip = socket.inet_aton

    def flow(port: int) -> object:
        f = new_passthrough_flow(
            "web", ip("198.18.9.9"), port, ip("198.18.0.1"), 80, "app/one", ip("198.18.1.2"), 8080,
            ip("198.18.0.1"), 50000 + port % 1000, time.monotonic(),
        )  # fmt: skip
        accounting.opened(f)
        return f

    fin, idle, last = flow(40001), flow(40002), flow(40003)
    fin.count = 100 + FWD_PACKET + ((200 + FWD_PACKET) << RET_SHIFT)  # type: ignore[attr-defined]
    fin.state = FlowState.CLOSING  # type: ignore[attr-defined]
    fin.last_seen += 1.5  # type: ignore[attr-defined]  # its last packet, 1.5 s after the first
    accounting.closed(fin)  # type: ignore[arg-type]
    accounting.closed(idle)  # type: ignore[arg-type]
    accounting.close_all()
    lines = [parse_kv(KvFormatter().format(r)) for r in caplog.records]
    if not on:
        assert lines == []
        return
    assert [(x["client"], x["end"]) for x in lines] == [
        ("198.18.9.9:40001", "fin"), ("198.18.9.9:40002", "timeout"), ("198.18.9.9:40003", "shutdown"),
    ]  # fmt: skip
    assert (lines[0]["frontend"], lines[0]["backend"], lines[0]["server"]) == ("web", "app", "one")
    assert (lines[0]["bytes_tx"], lines[0]["bytes_rx"]) == ("100", "200")
    assert 1.4 < float(lines[0]["duration"]) <= 1.5 and float(lines[2]["duration"]) == 0 and last is not None


def test_packet_refusals_are_reported_at_most_every_10_s(caplog: pytest.LogCaptureFixture) -> None:
    from convey.dataplane.flow_accounting import FlowAccounting
    from convey.stats import Stats

    caplog.set_level(logging.INFO, "convey.packet")
    accounting = FlowAccounting({}, Stats("passthrough", 0))
    accounting.report_refused({"web": 0}, 100.0)  # nothing refused: nothing said
    accounting.report_refused({"web": 3}, 100.25)
    accounting.report_refused({"web": 5}, 105.0)  # within 10 s of the last line
    accounting.report_refused({"web": 9, "db": 1}, 110.25)
    accounting.report_refused({"web": 9, "db": 1}, 130.0)  # nothing new
    lines = [(r.levelno, r.getMessage()) for r in caplog.records]
    assert lines == [
        (logging.WARNING, "event=refused frontend=web clients=3 total=3"),
        (logging.WARNING, "event=refused frontend=web clients=6 total=9"),
        (logging.WARNING, "event=refused frontend=db clients=1 total=1"),
    ]
