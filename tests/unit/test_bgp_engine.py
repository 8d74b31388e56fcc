"""The engine with ``[bgp]``: a missing speaker is a start error naming the package; the /stats section is there."""

from __future__ import annotations

import pytest

from convey.bgp import speaker
from convey.config import parse_config
from convey.engine import Engine
from convey.errors import StartupError

CONFIG = """
[frontends.web]
listen_addr = "127.0.0.1:18080"
backend = "b"
[backends.b.servers.s0]
addr = "127.0.0.1:18081"
[bgp]
local_as = 65001
router_id = "198.18.5.2"
[bgp.peers.r1]
address = "198.18.5.1"
as = 65000
"""


def test_missing_bird_is_a_start_error_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speaker.shutil, "which", lambda name: None)
    with pytest.raises(StartupError, match=r"bird2"):
        Engine(parse_config(CONFIG), "proxy", watch=False)


def test_the_bgp_section_is_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(speaker.shutil, "which", lambda name: "/usr/sbin/bird")
    engine = Engine(parse_config(CONFIG), "proxy", watch=False)
    assert engine.bgp is not None
    section = engine.stats.sections["bgp"]()
    assert section["peers"]["r1"]["state"] == "Down" and section["speaker"]["running"] is False
    assert Engine(parse_config(CONFIG.split("[bgp]")[0]), "proxy", watch=False).bgp is None
