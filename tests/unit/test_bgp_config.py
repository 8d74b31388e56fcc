"""``[bgp]``: the config section, its errors (each naming the key), and the BIRD config rendered from it."""

from __future__ import annotations

import shutil
import subprocess

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convey.bgp.bird_config import STATIC_PROTOCOL, render
from convey.bgp.model import BgpConfig, BgpPeer, announced_vips, parse_bgp
from convey.config import ConfigError, parse_config

BASE = """
[frontends.web]
listen_addr = "198.18.50.1:80"
backend = "b"
[backends.b.servers.s0]
addr = "198.18.5.10:8080"
"""

GOOD = """
[bgp]
local_as = 65001
router_id = "198.18.5.2"
hold_time = 3
withdraw_grace = 1.5
  [bgp.peers.r1]
  address = "198.18.5.1"
  as = 65000
  [bgp.peers.r2]
  address = "198.18.6.1"
  as = 4200000000
"""


def test_a_full_section() -> None:
    bgp = parse_config(BASE + GOOD).bgp
    assert bgp == BgpConfig(
        local_as=65001,
        peers={"r1": BgpPeer("r1", "198.18.5.1", 65000), "r2": BgpPeer("r2", "198.18.6.1", 4200000000)},
        router_id="198.18.5.2",
        hold_time=3,
        withdraw_grace=1.5,
    )


def test_defaults_and_absence() -> None:
    assert parse_config(BASE).bgp is None
    bgp = parse_config(BASE + '[bgp]\nlocal_as = 1\n[bgp.peers.r]\naddress = "198.18.5.1"\nas = 2\n').bgp
    assert bgp is not None
    assert (bgp.router_id, bgp.hold_time, bgp.withdraw_grace) == (None, 9, 5.0)


@pytest.mark.parametrize(
    ("edit", "key", "problem"),
    [
        (("local_as = 65001\n", ""), "bgp.local_as", "missing"),
        (("local_as = 65001", "local_as = 0"), "bgp.local_as", "between 1 and 4294967295"),
        (("local_as = 65001", "local_as = 4294967296"), "bgp.local_as", "between"),
        (("local_as = 65001", 'local_as = "65001"'), "bgp.local_as", "integer"),
        (("as = 65000", "as = -1"), "bgp.peers.r1.as", "between"),
        (("as = 65000\n", ""), "bgp.peers.r1.as", "missing"),
        (('address = "198.18.5.1"\n', ""), "bgp.peers.r1.address", "missing"),
        (('address = "198.18.5.1"', 'address = "router"'), "bgp.peers.r1.address", "not an IPv4"),
        (('address = "198.18.6.1"', 'address = "198.18.5.1"'), "bgp.peers.r2.address", "already used"),
        (('router_id = "198.18.5.2"', 'router_id = "::1"'), "bgp.router_id", "not an IPv4"),
        (('router_id = "198.18.5.2"', "router_id = 7"), "bgp.router_id", "string"),
        (("hold_time = 3", "hold_time = 2"), "bgp.hold_time", "between 3 and 65535"),
        (("withdraw_grace = 1.5", "withdraw_grace = -1"), "bgp.withdraw_grace", "between 0"),
        (("hold_time = 3", "hold_timer = 3"), "bgp.hold_timer", "unknown key"),
        (("[bgp.peers.r1]", "[bgp.peers.r-1]"), "bgp.peers.r-1", "peer name"),
        (
            ("  as = 65000\n  [bgp.peers.r2]", "  as = 65000\n  port = 179\n  [bgp.peers.r2]"),
            "bgp.peers.r1.port",
            "unknown",
        ),
    ],
)
def test_bad_input_names_the_key(edit: tuple[str, str], key: str, problem: str) -> None:
    text = BASE + GOOD.replace(*edit, 1)
    with pytest.raises(ConfigError) as info:
        parse_config(text, "tier.toml")
    assert info.value.key == key, str(info.value)
    assert problem in info.value.problem
    assert str(info.value).startswith(f"tier.toml: {key}: ")


def test_no_peers_is_an_error() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[bgp]\nlocal_as = 65001\n")
    assert info.value.key == "bgp.peers"


def test_announced_vips_any_servable_frontend_on_the_address() -> None:
    frontends = {"a": ("198.18.50.1", False), "b": ("198.18.50.1", True), "c": ("198.18.50.2", False)}
    assert announced_vips(frontends) == {"198.18.50.1"}
    assert announced_vips({}) == frozenset()
    assert announced_vips({"any": ("0.0.0.0", True), "lo": ("127.0.0.2", True)}) == frozenset()


def test_render_peers_routes_and_no_graceful_restart() -> None:
    bgp = parse_config(BASE + GOOD).bgp
    assert bgp is not None
    text = render(bgp, "198.18.5.2", ["198.18.50.2", "198.18.50.1", "198.18.50.1"])
    assert "router id 198.18.5.2;" in text
    assert text.count("blackhole") == 2
    assert text.index("198.18.50.1/32") < text.index("198.18.50.2/32")
    assert "protocol bgp r1 {" in text and "protocol bgp r2 {" in text
    assert "neighbor 198.18.6.1 as 4200000000;" in text
    assert "local as 65001;" in text and "hold time 3;" in text and "keepalive time 1;" in text
    assert text.count("graceful restart off;") == 4  # both kinds, both peers
    assert f'export where proto = "{STATIC_PROTOCOL}";' in text
    assert "kernel" not in text  # the balancer's own routing table is never touched
    assert render(bgp, "198.18.5.2", []).count("blackhole") == 0


@pytest.mark.skipif(shutil.which("bird") is None, reason="BIRD 2 (Debian bird2) is not installed")
def test_bird_accepts_the_rendered_config(tmp_path: object) -> None:
    bgp = parse_config(BASE + GOOD).bgp
    assert bgp is not None
    for vips in ([], ["198.18.50.1", "198.18.50.2"]):
        conf = tmp_path / "bird.conf"  # type: ignore[operator]
        conf.write_text(render(bgp, "198.18.5.2", vips))
        check = subprocess.run(["bird", "-p", "-c", str(conf)], capture_output=True, text=True, timeout=10)
        assert check.returncode == 0, check.stderr


_VALUES = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.text(max_size=12),
    st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)


@settings(max_examples=300, deadline=None)
@given(
    st.dictionaries(
        st.sampled_from(["local_as", "router_id", "hold_time", "withdraw_grace", "peers", "x"]),
        _VALUES,
        max_size=5,
    ),
    st.dictionaries(
        st.text(max_size=8),
        st.one_of(_VALUES, st.dictionaries(st.sampled_from(["address", "as", "y"]), _VALUES, max_size=3)),
        max_size=3,
    ),
)
def test_any_bgp_section_is_a_config_or_a_config_error(
    section: dict[str, object], peers: dict[str, object]
) -> None:
    raw = {**section}
    if "peers" not in raw:
        raw["peers"] = peers
    from convey.config_parser import Parser

    try:
        result = parse_bgp(Parser("<fuzz>"), raw)
    except ConfigError:
        return
    assert result is not None and result.peers
