"""Every input gives a Config or a ConfigError, never another exception (issue 10, defect 3).

Three sources of input: arbitrary TOML documents (Python values from recursive strategies, serialised by the small
writer below, since no TOML writer is installed), mutations of the sample configs (a value replaced by a random one,
a key deleted, a key added) and raw bytes written to a file. The same documents go through ``convey check`` in every
mode: it exits 0 or 1 with a one-line message, never a traceback.
"""

from __future__ import annotations

import copy
import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from convey.cli import main
from convey.config import Config, ConfigError, load_config, parse_config

ROOT = Path(__file__).resolve().parents[2]
SAMPLES = sorted((ROOT / "samples").glob("*.toml"))
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

# -- a tiny TOML writer -----------------------------------------------------------------------------------------


def _string(text: str) -> str:
    out = []
    for ch in text:
        if ch in '"\\':
            out.append("\\" + ch)
        elif ord(ch) < 0x20 or ord(ch) == 0x7F:
            out.append(f"\\u{ord(ch):04x}")
        else:
            out.append(ch)
    return '"' + "".join(out) + '"'


def _value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if math.isnan(value):
            return "nan"
        if math.isinf(value):
            return "inf" if value > 0 else "-inf"
        return repr(value)
    if isinstance(value, str):
        return _string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_value(v) for v in value) + "]"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{_string(k)} = {_value(v)}" for k, v in value.items()) + "}"
    raise TypeError(type(value))


def to_toml(doc: dict[str, Any], prefix: tuple[str, ...] = ()) -> str:
    """``doc`` as TOML: scalars and lists inline, non-empty tables under ``[header]`` lines."""
    lines = []
    tables = []
    for key, value in doc.items():
        if isinstance(value, dict) and value:
            tables.append((key, value))
        else:
            lines.append(f"{_string(key)} = {_value(value)}")
    text = "\n".join(lines) + "\n"
    for key, value in tables:
        path = (*prefix, key)
        text += "\n[" + ".".join(_string(k) for k in path) + "]\n" + to_toml(value, path)
    return text


# -- strategies -------------------------------------------------------------------------------------------------

KEYS = [
    "frontends", "backends", "stats", "passthrough", "dsr", "servers", "addr", "weight", "listen_addr",
    "backend", "port", "address", "health_check_interval", "health_check_timeout", "rise", "fall", "scheduler",
    "maglev_table_size", "connection_tracker_capacity", "workers", "stats_update_frequency", "port_range",
    "port_reuse_delay", "source_addrs", "queue_num", "idle_timeout", "syn_timeout", "fin_linger", "offload",
    "rewrite", "egress_nat", "fwmark_base", "route_table_base", "web", "b", "s1", "a/b", "",
]  # fmt: skip
keys = st.sampled_from(KEYS) | st.sampled_from(KEYS) | st.text(max_size=12)  # mostly known keys
ODD_STRINGS = [
    "8²", "127.0.0.1:8²", "127.0.0.1:٣٣", "127.0.0.1:" + "9" * 400, "127.0.0.1:" + "9" * 5000,
    "1²-3", "40000-" + "9" * 5000, " 7000 ", "\u09ed\u09e6\u09e6\u09e6", "0.0.0.0:80", "127.0.0.1:0", ":", "x" * 5000,
    "198.18.0.1:40000", "wrr", "maglev", "least_conn", "mac", "ip", "nft", "tc", "auto", "40000-40010",
]  # fmt: skip
scalars = (
    st.booleans()
    | st.integers()
    | st.sampled_from([10**400, -(10**400), 0, -1, 2**63, 65536, 65537, 1021, 253, 0x7FFF0000])
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.sampled_from([1e308, -1e-300, 0.0, -0.0, 0.5])
    | st.text(max_size=30)
    | st.sampled_from(ODD_STRINGS)
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(keys, inner, max_size=4),
    max_leaves=20,
)
# Digits of other scripts pass str.isdigit() but not int(), or int() but are no port; and numbers int() refuses.
port_texts = (
    st.text(alphabet="0123456789²³¹٣\u09ed\U0001d7d7", min_size=1, max_size=6)
    | st.text(alphabet="0123456789 -+_", min_size=1, max_size=6)
    | st.integers(-(10**6), 10**6).map(str)
    | st.sampled_from(["9" * 400, "9" * 5000, "0" * 400 + "80"])
)
hosts = st.sampled_from(["127.0.0.1", "198.18.0.1", "198.18.1.1", "0.0.0.0", "::1", "1.2.3", "", "x"])
addresses = st.builds(lambda h, p: f"{h}:{p}", hosts, port_texts) | values
port_ranges = st.builds(lambda a, b: f"{a}-{b}", port_texts, port_texts) | values


def _mostly(shape: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``shape`` three times in four, any value otherwise."""
    return st.one_of(shape, shape, shape, values)


def _servers() -> st.SearchStrategy[dict[str, Any]]:
    server = st.fixed_dictionaries({"addr": addresses}, optional={"weight": values})
    return st.dictionaries(keys, _mostly(server), max_size=3)


# Config-shaped documents: the right tables with random values, so the parser gets past its first checks.
shaped = st.fixed_dictionaries(
    {},
    optional={
        "frontends": st.dictionaries(
            keys, _mostly(st.fixed_dictionaries({"listen_addr": addresses, "backend": values})), max_size=3
        ),
        "backends": st.dictionaries(
            keys,
            _mostly(
                st.fixed_dictionaries(
                    {"servers": _servers()},
                    optional={
                        k: values for k in ("health_check_interval", "health_check_timeout", "scheduler")
                    },
                )
            ),
            max_size=3,
        ),
        "stats": _mostly(
            st.fixed_dictionaries({}, optional={"port": port_texts | values, "address": values})
        ),
        "passthrough": _mostly(
            st.fixed_dictionaries(
                {}, optional={"port_range": port_ranges, "source_addrs": st.lists(hosts) | values}
            ).flatmap(lambda d: st.dictionaries(keys, values, max_size=3).map(lambda e: {**e, **d}))
        ),
        "dsr": _mostly(st.dictionaries(keys, values, max_size=4)),
    },
)
documents = st.one_of(st.dictionaries(keys, values, max_size=5), shaped, shaped)


def _sample(path: Path) -> dict[str, Any]:
    return tomllib.loads(path.read_text())


def _tables(doc: Any, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    """Every table's path in ``doc`` (the root included)."""
    found = [path]
    for key, value in doc.items():
        if isinstance(value, dict):
            found += _tables(value, (*path, key))
    return found


@st.composite
def mutated_samples(draw: st.DrawFn) -> dict[str, Any]:
    """A sample config with one to three edits: a value replaced, a key deleted or a key added."""
    doc = copy.deepcopy(_sample(draw(st.sampled_from(SAMPLES))))
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(_tables(doc)))
        table = doc
        for key in where:
            table = table[key]
        action = draw(st.sampled_from(["replace", "perturb", "delete", "add"]))
        if action == "add" or not table:
            table[draw(keys)] = draw(values)
            continue
        key = draw(st.sampled_from(sorted(table)))
        if action == "delete":
            del table[key]
        elif action == "perturb":
            table[key] = draw(_perturbed(table[key]))
        else:
            table[key] = draw(values)
    return doc


def _perturbed(value: Any) -> st.SearchStrategy[Any]:
    """``value`` slightly changed: a character inserted into a string, a number scaled, negated or shifted."""
    if isinstance(value, str):
        return st.builds(
            lambda at, ch: value[:at] + ch + value[at:],
            st.integers(0, len(value)),
            st.sampled_from(["²", "٣", "9" * 400, "/", "\x00", " ", "-", ":"]) | st.characters(),
        )
    if isinstance(value, int | float) and not isinstance(value, bool):
        big = value * 10**400 if isinstance(value, int) else value * 1e308
        return st.sampled_from([-value, big, value - 1, 0, float("nan"), float("inf")])
    return values


# -- properties -------------------------------------------------------------------------------------------------


def _parse_or_config_error(text: str) -> Config | None:
    try:
        return parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert exc.file == "fuzz.toml"
        assert str(exc).startswith("fuzz.toml: ")
        return None


def test_the_writer_writes_toml() -> None:
    doc = {"a": 1, "b": {"c": 'x"\\\n', "d": [1.5, {"e": True}], "f": {"g": float("inf")}}, "h": {}}
    assert tomllib.loads(to_toml(doc)) == doc


@FUZZ
@given(documents)
def test_arbitrary_documents_give_config_or_config_error(doc: dict[str, Any]) -> None:
    text = to_toml(doc)
    tomllib.loads(text)  # the writer is right: any error below is the parser's
    _parse_or_config_error(text)


@FUZZ
@given(mutated_samples())
def test_mutated_samples_give_config_or_config_error(doc: dict[str, Any]) -> None:
    _parse_or_config_error(to_toml(doc))


def test_the_samples_pass_through_the_writer_unchanged() -> None:
    for path in SAMPLES:
        assert parse_config(to_toml(_sample(path)), str(path)) == load_config(path)


@settings(max_examples=60, deadline=None)
@given(st.binary(max_size=300) | st.text(max_size=100).map(lambda t: t.encode("utf-16")))
def test_any_bytes_in_the_file_give_config_or_config_error(tmp_path_factory: Any, data: bytes) -> None:
    path = tmp_path_factory.mktemp("bytes") / "c.toml"
    path.write_bytes(data)
    try:
        load_config(path)
    except ConfigError as exc:
        assert exc.file == str(path)


# Inputs that raised something else than ConfigError before issue 10's fix, each named for what it is.
CRASHERS = {
    "superscript digit in a port": ('addr = "127.0.0.1:9001"', 'addr = "127.0.0.1:8²"'),
    "arabic-indic digits in a port": ('addr = "127.0.0.1:9001"', 'addr = "127.0.0.1:٣٣"'),
    "a 5000-digit port": ('addr = "127.0.0.1:9001"', f'addr = "127.0.0.1:{"9" * 5000}"'),
    "a 5000-digit integer": ("weight = 1", f"weight = {'9' * 5000}"),
    "a 400-digit number of seconds": ("health_check_interval = 1", f"health_check_interval = {'9' * 400}"),
    "a superscript stats port": ("", '[stats]\nport = "7²"'),
    "a superscript port range": ("", '[passthrough]\nport_range = "4000²-50000"'),
    "a 5000-digit port range": ("", f'[passthrough]\nport_range = "40000-{"9" * 5000}"'),
    "arrays nested 100000 deep": ("", "[stats]\naddress = " + "[" * 100_000 + "]" * 100_000),
    "inline tables nested 5000 deep": ("", "[stats]\naddress = " + "{a=" * 5000 + "1" + "}" * 5000),
}
CRASH_BASE = """
[frontends.f]
listen_addr = "127.0.0.1:8080"
backend = "b"
[backends.b]
health_check_interval = 1
[backends.b.servers.s1]
addr = "127.0.0.1:9001"
weight = 1
"""


@pytest.mark.parametrize("name", sorted(CRASHERS))
def test_inputs_that_used_to_crash_give_config_error(name: str) -> None:
    old, new = CRASHERS[name]
    text = CRASH_BASE.replace(old, new) if old else CRASH_BASE + new + "\n"
    with pytest.raises(ConfigError) as info:
        parse_config(text, "fuzz.toml")
    assert len(str(info.value)) < 400, "the message quotes a bounded part of the value"


def test_a_huge_file_is_refused_without_reading_it_all(tmp_path: Path) -> None:
    path = tmp_path / "huge.toml"
    path.write_text(CRASH_BASE + "# " + "x" * (20 * 1024 * 1024) + "\n")
    with pytest.raises(ConfigError, match="too large"):
        load_config(path)


# -- convey check: exit 0 or 1, one message, never a traceback --------------------------------------------------


@pytest.fixture(scope="module")
def check_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("check") / "c.toml"


def _check(path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    capsys.readouterr()
    code = main(["check", f"--config={path}", *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    if code == 0:
        assert out.startswith(f"{path}: OK")
    else:
        assert code == 1, err
        assert err.startswith("convey: "), err
        assert err.count("\n") == 1, err


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    documents | mutated_samples(),
    st.sampled_from([[], ["-p"], ["-d"], ["-p", "--offload"], ["-d", "--offload"]]),
)
def test_convey_check_exits_cleanly(
    check_file: Path, capsys: pytest.CaptureFixture[str], doc: dict[str, Any], flags: list[str]
) -> None:
    check_file.write_text(to_toml(doc))
    _check(check_file, flags, capsys)


@pytest.mark.parametrize("name", sorted(CRASHERS))
@pytest.mark.parametrize("flags", [[], ["-p"], ["-d"]])
def test_convey_check_on_inputs_that_used_to_crash(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], name: str, flags: list[str]
) -> None:
    old, new = CRASHERS[name]
    path = tmp_path / "c.toml"
    path.write_text(CRASH_BASE.replace(old, new) if old else CRASH_BASE + new + "\n")
    _check(path, flags, capsys)
    assert main(["check", f"--config={path}", *flags]) == 1
