"""Config parsing and validation: the original convey's files load unchanged; every error names file, key, problem."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from convey.config import Address, ConfigError, load_config, parse_config, summary

ROOT = Path(__file__).resolve().parents[2]

ORIGINAL = """
[frontends.tcp_3000]
listen_addr = "192.168.1.136:3000"
backend = "tcp3000_out"

[backends.tcp3000_out]
  health_check_interval = 3
  [backends.tcp3000_out.servers]
    [backends.tcp3000_out.servers.server1]
    addr = "192.168.1.128:8080"
    weight = 10
    [backends.tcp3000_out.servers.server2]
    addr = "192.168.1.117:8080"
    weight = 1
    [backends.tcp3000_out.servers.server3]
    addr = "192.168.1.128:8084"

[backends.tcp3001_out]
  health_check_interval = 3
  [backends.tcp3001_out.servers]
    [backends.tcp3001_out.servers.server2]
    addr = "127.0.0.3:8083"
    weight = 1

[stats]
port = "7000"

[passthrough]
connection_tracker_capacity = 3
workers = 4
stats_update_frequency = 5
"""


def test_original_convey_file_loads_unchanged() -> None:
    config = parse_config(ORIGINAL, "sample.toml")
    front = config.frontends["tcp_3000"]
    assert front.listen_addr == Address("192.168.1.136", 3000)
    assert front.backend == "tcp3000_out"
    servers = {s.name: s for s in config.backends["tcp3000_out"].servers}
    assert servers["server1"].weight == 10
    assert servers["server3"].weight == 1  # default
    assert config.backends["tcp3000_out"].health_check_interval == 3.0
    assert config.stats.port == 7000
    assert config.stats.address == "127.0.0.1"
    assert config.passthrough.connection_tracker_capacity == 3
    assert config.passthrough.workers == 4
    assert config.backends["tcp3000_out"].scheduler_for("proxy") == "wrr"
    assert config.backends["tcp3000_out"].scheduler_for("dsr") == "maglev"


def test_stats_port_integer_and_extensions() -> None:
    config = parse_config(
        """
[frontends.a]
listen_addr = "0.0.0.0:80"
backend = "b"
[backends.b]
scheduler = "least_conn"
health_check_timeout = 0.5
rise = 1
fall = 5
[backends.b.servers.x]
addr = "127.0.0.1:1"
weight = 0
[stats]
port = 9000
address = "0.0.0.0"
[passthrough]
port_range = "40000-40100"
source_addrs = ["198.18.1.1", "198.18.1.3"]
[dsr]
rewrite = "mac"
""",
        "x.toml",
    )
    back = config.backends["b"]
    assert (back.scheduler, back.health_check_timeout, back.rise, back.fall) == ("least_conn", 0.5, 1, 5)
    assert back.servers[0].weight == 0
    assert config.stats.port == 9000 and config.stats.address == "0.0.0.0"
    assert config.passthrough.port_range == (40000, 40100)
    assert config.passthrough.source_addrs == ("198.18.1.1", "198.18.1.3")
    assert config.dsr.rewrite == "mac"
    assert "draining" in summary(config, "proxy")


BASE = """
[frontends.f]
listen_addr = "127.0.0.1:8080"
backend = "b"
[backends.b]
health_check_interval = 1
[backends.b.servers.s1]
addr = "127.0.0.1:9001"
"""


@pytest.mark.parametrize(
    ("extra_or_replace", "key", "words"),
    [
        (('backend = "b"', 'backend = "nope"'), "frontends.f.backend", "unknown backend 'nope'"),
        (("127.0.0.1:9001", "127.0.0.1"), "backends.b.servers.s1.addr", "IP:port"),
        (("127.0.0.1:9001", "127.0.0.1:99999"), "backends.b.servers.s1.addr", "port must be 1-65535"),
        (("127.0.0.1:9001", "example.com:80"), "backends.b.servers.s1.addr", "not an IPv4 address"),
        ("weight = -1\n", "backends.b.servers.s1.weight", "must not be negative"),
        ('weight = "3"\n', "backends.b.servers.s1.weight", "must be an integer"),
        ("colour = 1\n", "backends.b.servers.s1.colour", "unknown key"),
        (
            ("health_check_interval = 1", "health_check_interval = -2"),
            "backends.b.health_check_interval",
            "greater",
        ),
        (("health_check_interval = 1", 'scheduler = "random"'), "backends.b.scheduler", "must be one of"),
        (
            '\n[frontends.g]\nlisten_addr = "127.0.0.1:8080"\nbackend = "b"\n',
            "frontends.g.listen_addr",
            "already used by frontend 'f'",
        ),
        ('\n[stats]\nport = "http"\n', "stats.port", "port number"),
        ('\n[passthrough]\nport_range = "9-3"\n', "passthrough.port_range", "LOW <= HIGH"),
        ("\n[passthrough]\nworkers = 0\n", "passthrough.workers", "between 1 and 256"),
        ('\n[dsr]\nrewrite = "nat"\n', "dsr.rewrite", "must be one of"),
        (
            '\n[backends.b.servers.s2]\naddr = "127.0.0.1:9001"\n',
            "backends.b.servers.s2.addr",
            "already used",
        ),
        ("\n[surprise]\nx = 1\n", "surprise", "unknown key"),
    ],
)
def test_errors_name_file_key_and_problem(extra_or_replace: object, key: str, words: str) -> None:
    if isinstance(extra_or_replace, tuple):
        text = BASE.replace(*extra_or_replace)
    else:
        text = BASE + str(extra_or_replace)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "conf/x.toml")
    message = str(info.value)
    assert info.value.file == "conf/x.toml"
    assert info.value.key == key, message
    assert message.startswith(f"conf/x.toml: {key}: "), message
    assert words in message


def test_toml_syntax_error_has_line() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "\n[broken\n", "bad.toml")
    assert "bad.toml" in str(info.value) and "line" in str(info.value)


def test_dsr_port_mismatch_rejected_for_tc_egress_nat() -> None:
    text = BASE.replace("127.0.0.1:8080", "198.18.0.1:80") + '\n[dsr]\nrewrite = "ip"\negress_nat = "tc"\n'
    with pytest.raises(ConfigError) as info:
        parse_config(text, "d.toml")
    assert info.value.key == "backends.b.servers.s1.addr"
    assert "cannot restore ports" in str(info.value)
    # nft can restore the port, so the same file with "auto" or "nft" is fine
    parse_config(text.replace('"tc"', '"nft"'), "d.toml")


def test_missing_and_unreadable_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="file not found"):
        load_config(tmp_path / "absent.toml")
    binary = tmp_path / "bin.toml"
    binary.write_bytes(b"\xff\xfe\x00")
    with pytest.raises(ConfigError, match=r"bin\.toml"):
        load_config(binary)


@pytest.mark.parametrize("name", ["sample-proxy.toml", "sample-passthrough.toml", "sample-dsr.toml"])
def test_samples_are_valid(name: str) -> None:
    config = load_config(ROOT / "samples" / name)
    assert config.frontends and config.backends


@given(st.integers(min_value=0, max_value=1_000_000), st.integers(min_value=1, max_value=65535))
def test_any_valid_weight_and_port_round_trip(weight: int, port: int) -> None:
    text = BASE.replace("127.0.0.1:9001", f"127.0.0.1:{port}") + f"weight = {weight}\n"
    server = parse_config(text).backends["b"].servers[0]
    assert (server.weight, server.addr.port) == (weight, port)


@given(st.text(max_size=200))
def test_garbage_never_raises_anything_but_config_error(text: str) -> None:
    try:
        parse_config(text, "fuzz.toml")
    except ConfigError as exc:
        assert str(exc).startswith("fuzz.toml")


def test_offload_keys_default_off_and_parse() -> None:
    from convey.config import offloaded, with_offload

    config = parse_config(ORIGINAL, "orig.toml")
    assert not config.passthrough.offload and not config.dsr.offload
    assert not offloaded(config, "passthrough") and not offloaded(config, "dsr")
    base = ORIGINAL.split("[passthrough]")[0]
    on = parse_config(base + "\n[passthrough]\noffload = true\n[dsr]\noffload = true\n", "on.toml")
    assert offloaded(on, "passthrough") and offloaded(on, "dsr") and not offloaded(on, "proxy")
    forced = with_offload(config, "passthrough")
    assert offloaded(forced, "passthrough") and not offloaded(forced, "dsr")
    assert offloaded(with_offload(config, "dsr"), "dsr")
    with pytest.raises(ValueError, match="--passthrough or --dsr"):
        with_offload(config, "proxy")


@pytest.mark.parametrize("section", ["passthrough", "dsr"])
def test_offload_must_be_a_boolean(section: str) -> None:
    base = ORIGINAL.split("[passthrough]")[0]
    with pytest.raises(ConfigError) as info:
        parse_config(base + f'\n[{section}]\noffload = "yes"\n', "bad.toml")
    assert str(info.value) == f"bad.toml: {section}.offload: must be true or false, got a string"


def test_offload_flag_needs_a_packet_mode(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from convey.cli import main

    path = tmp_path / "c.toml"
    path.write_text(ORIGINAL)
    assert main(["check", f"--config={path}", "--offload"]) == 1
    assert "--offload needs a packet mode" in capsys.readouterr().err
