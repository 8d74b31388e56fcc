"""Configs that used to be accepted and then broke at run time are rejected with file, key and problem (issue 10,
defect 4): a passthrough VIP whose replies would be taken for client traffic, backend and server names that break
``backend/server`` ids, ``convey check -d`` skipping what ``convey rules show -d`` checks, an empty file, and numbers
outside a sane range (a negative ``port_reuse_delay`` among them)."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest

from convey.cli import main
from convey.config import ConfigError, parse_config, validate_for_mode
from convey.engine import Engine

BASE = """
[frontends.f]
listen_addr = "198.18.0.1:80"
backend = "b"
[backends.b]
health_check_interval = 1
[backends.b.servers.s1]
addr = "198.18.1.2:8080"
"""


def error(text: str) -> ConfigError:
    with pytest.raises(ConfigError) as info:
        parse_config(text, "v.toml")
    assert info.value.file == "v.toml"
    assert str(info.value).startswith(f"v.toml: {info.value.key}: " if info.value.key else "v.toml: ")
    return info.value


def run_check(path: Path, flags: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    capsys.readouterr()
    code = main(["check", f"--config={path}", *flags])
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    return code, err


# -- an empty file --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "\n\n", "# only a comment\n", "   \n# a\n\n"])
def test_an_empty_file_is_an_error(text: str) -> None:
    exc = error(text)
    assert exc.key == "" and "empty config" in exc.problem


def test_check_says_empty_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "empty.toml"
    path.write_text("")
    code, err = run_check(path, [], capsys)
    assert code == 1 and f"{path}: empty config" in err


# -- numbers in a sane range ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("section", "key", "value", "words"),
    [
        ("passthrough", "port_reuse_delay", "-1", "between 0 and 3600"),
        ("passthrough", "port_reuse_delay", "-0.5", "between 0 and 3600"),
        ("passthrough", "port_reuse_delay", "1e9", "between 0 and 3600"),
        ("passthrough", "idle_timeout", "0", "greater than 0"),
        ("passthrough", "idle_timeout", "1e300", "at most"),
        ("passthrough", "syn_timeout", "-3", "greater than 0"),
        ("passthrough", "syn_timeout", "86401", "at most"),
        ("passthrough", "fin_linger", "0", "greater than 0"),
        ("passthrough", "fin_linger", "inf", "a number of seconds"),
        ("passthrough", "stats_update_frequency", "-5", "greater than 0"),
        ("passthrough", "stats_update_frequency", "nan", "a number of seconds"),
        ("passthrough", "connection_tracker_capacity", "0", "between 1 and"),
        ("passthrough", "queue_num", "-1", "between 0 and 65535"),
        ("dsr", "idle_timeout", "-300", "greater than 0"),
        ("dsr", "idle_timeout", "1e20", "at most"),
        ("dsr", "fwmark_base", "0", "between 1 and"),
        ("dsr", "route_table_base", "-1", "between 1 and"),
    ],
)
def test_numbers_outside_their_range_are_errors(section: str, key: str, value: str, words: str) -> None:
    exc = error(BASE + f"[{section}]\n{key} = {value}\n")
    assert exc.key == f"{section}.{key}"
    assert words in exc.problem, exc.problem


@pytest.mark.parametrize(
    ("key", "value", "words"),
    [
        ("health_check_interval", "0", "greater than 0"),
        ("health_check_interval", "-1", "greater than 0"),
        ("health_check_interval", "1e308", "at most"),
        ("health_check_interval", "9" * 400, "at most"),
        ("health_check_timeout", "0", "greater than 0"),
        ("health_check_timeout", "1e9", "at most"),
        ("rise", "0", "between 1 and 1000"),
        ("fall", "-2", "between 1 and 1000"),
    ],
)
def test_backend_numbers_outside_their_range_are_errors(key: str, value: str, words: str) -> None:
    exc = error(BASE.replace("health_check_interval = 1", f"{key} = {value}"))
    assert exc.key == f"backends.b.{key}"
    assert words in exc.problem, exc.problem


def test_the_edges_of_the_ranges_are_accepted() -> None:
    config = parse_config(
        BASE + "[passthrough]\nport_reuse_delay = 0\nidle_timeout = 2592000\nsyn_timeout = 86400\n"
        "fin_linger = 0.01\n[dsr]\nidle_timeout = 2592000\n"
    )
    assert config.passthrough.port_reuse_delay == 0.0
    assert config.passthrough.idle_timeout == 2592000.0
    assert config.dsr.idle_timeout == 2592000.0


# -- names that break backend/server ids ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("old", "new", "key"),
    [
        ("[backends.b]", '[backends."b/x"]', 'backends."b/x"'),
        ("servers.s1]", 'servers."s/1"]', 'backends.b.servers."s/1"'),
        ("servers.s1]", 'servers."s 1"]', 'backends.b.servers."s 1"'),
        ("servers.s1]", 'servers."s\\n1"]', 'backends.b.servers."s\\n1"'),
        ("servers.s1]", 'servers.""]', 'backends.b.servers.""'),
        ("servers.s1]", 'servers."é"]', 'backends.b.servers."é"'),
        ("servers.s1]", f"servers.{'s' * 65}]", f"backends.b.servers.{'s' * 65}"),
    ],
)
def test_backend_and_server_names_are_checked(old: str, new: str, key: str) -> None:
    text = BASE.replace(old, new)
    if old == "[backends.b]":
        text = text.replace('backend = "b"', 'backend = "b/x"').replace(
            "backends.b.servers", 'backends."b/x".servers'
        )
    exc = error(text)
    assert exc.key == key, str(exc)
    assert "letters, digits" in exc.problem


@pytest.mark.parametrize("name", ["web-1", "web_1", "web.example.com", "1", "-a", "A" * 64])
def test_ordinary_names_are_accepted(name: str) -> None:
    text = BASE.replace("servers.s1]", f'servers."{name}"]').replace("[backends.b]", f'[backends."{name}"]')
    text = text.replace('backend = "b"', f'backend = "{name}"').replace(
        "backends.b.servers", f'backends."{name}".servers'
    )
    config = parse_config(text)
    assert config.backends[name].servers[0].name == name


# -- a passthrough VIP on a balancer address with its port inside port_range ----------------------------------


def test_a_vip_on_a_source_address_with_its_port_in_the_range_is_an_error() -> None:
    text = (
        BASE.replace("198.18.0.1:80", "198.18.1.1:40000") + '[passthrough]\nsource_addrs = ["198.18.1.1"]\n'
    )
    exc = error(text)
    assert exc.key == "frontends.f.listen_addr"
    assert "passthrough.port_range" in exc.problem and "198.18.1.1" in exc.problem
    # outside the range, or on an address that is no source, it is fine
    parse_config(text.replace("40000", "80"))
    parse_config(text.replace('["198.18.1.1"]', '["198.18.1.3"]'))
    parse_config(text + 'port_range = "50000-50100"\n')


def test_without_source_addrs_a_vip_port_in_the_range_is_refused_for_passthrough() -> None:
    """Without source_addrs the kernel picks the source towards each server, which can be the VIP's address:
    the config cannot rule the clash out, so passthrough refuses a VIP port inside the range (proxy and DSR
    allocate no ports and do not care)."""
    config = parse_config(BASE.replace("198.18.0.1:80", "198.18.0.1:40000"), "v.toml")
    with pytest.raises(ConfigError) as info:
        validate_for_mode(config, "passthrough")
    assert info.value.key == "frontends.f.listen_addr"
    assert "passthrough.port_range" in info.value.problem and "source_addrs" in info.value.problem
    validate_for_mode(config, "proxy")
    validate_for_mode(config, "dsr")
    validate_for_mode(parse_config(BASE, "v.toml"), "passthrough")


def test_check_and_start_refuse_the_clash_in_passthrough_only(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE.replace("198.18.0.1:80", "198.18.0.1:40000"))
    code, err = run_check(path, ["-p"], capsys)
    assert code == 1 and "frontends.f.listen_addr" in err and "port_range" in err
    assert run_check(path, [], capsys)[0] == 0
    assert run_check(path, ["-d"], capsys)[0] == 0
    capsys.readouterr()
    # the loader `convey -p` starts with refuses it too
    assert main(["rules", "show", "-p", f"--config={path}"]) == 1
    assert "frontends.f.listen_addr" in capsys.readouterr().err


def test_a_reload_bringing_the_clash_is_rejected(tmp_path: Path) -> None:
    pytest.importorskip("netfilterqueue")
    engine = Engine(parse_config(BASE, "v.toml"), "passthrough", watch=False)
    bad = parse_config(BASE.replace("198.18.0.1:80", "198.18.0.1:40000"), "v.toml")
    asyncio.run(engine._apply(bad))
    assert engine.stats.reload_failures == 1
    assert "port_range" in (engine.stats.last_reload_error or "")
    assert engine.config.frontends["f"].listen_addr.port == 80


# -- convey check -d runs what convey rules show -d runs ------------------------------------------------------


@pytest.mark.parametrize(
    ("extra", "flags", "words"),
    [
        ('[dsr]\nrewrite = "mac"\nroute_table_base = 253\n', ["-d"], "route table 253"),
        ('[dsr]\nrewrite = "mac"\nroute_table_base = 253\noffload = true\n', ["-d"], "route table 253"),
    ],
)
def test_check_runs_the_checks_rules_show_runs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: str, flags: list[str], words: str
) -> None:
    path = tmp_path / "c.toml"
    path.write_text(BASE + extra)
    capsys.readouterr()
    shown = main(["rules", "show", f"--config={path}", *flags])
    show_err = capsys.readouterr().err
    code, err = run_check(path, flags, capsys)
    assert shown != 0 and words in show_err, show_err
    assert code == 1 and words in err, err
