"""The Announcer with a fake speaker: VIPs follow the pools' health and reloads, withdraw_all is final, a dead
speaker is started again, session changes are logged, the /stats section reads what the speaker says."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest

from convey.bgp import birdctl
from convey.bgp.announcer import Announcer, router_id_for
from convey.bgp.model import BgpConfig, BgpPeer
from convey.config import Address, FrontendConfig
from convey.errors import StartupError

CONFIG = BgpConfig(65001, {"r1": BgpPeer("r1", "198.18.5.1", 65000)}, router_id="198.18.5.2", hold_time=3)


class FakeProc:
    def __init__(self) -> None:
        self.returncode: int | None = None

    def poll(self) -> int | None:
        return self.returncode


class FakeSpeaker:
    """What Announcer uses of BirdSpeaker; the routes it exports are the ones in the last config."""

    def __init__(self) -> None:
        self.proc: FakeProc | None = None
        self.confs: list[str] = []
        self.starts = 0
        self.state = "Active"
        self.version = "BIRD 2.0.12"
        self.stopped = False

    @property
    def alive(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    @property
    def pid(self) -> int | None:
        return 4242 if self.proc else None

    def start(self, conf: str) -> None:
        self.starts += 1
        self.proc = FakeProc()
        self.confs.append(conf)

    async def wait_ready(self) -> None:
        pass

    async def configure(self, conf: str) -> None:
        self.confs.append(conf)

    def routes(self) -> list[str]:
        return re.findall(r"route (\S+) blackhole", self.confs[-1])

    async def query(self, text: str) -> birdctl.Reply:
        if text == "show protocols":
            return [(1002, f"r1 BGP --- up 21:00:00.000 {self.state}"), (0, "")]
        assert text == "show route export r1"
        return [(1007, "Table master4:"), *((1007, f"{r} blackhole [convey_vips]") for r in self.routes())]

    def reap(self) -> int | None:
        status = self.proc.returncode if self.proc else None
        self.proc = None
        return status

    async def stop(self) -> None:
        self.stopped = True
        self.proc = None


@dataclass
class FakePool:
    has_eligible: bool = True


def front(name: str, host: str, backend: str) -> FrontendConfig:
    return FrontendConfig(name, Address(host, 80), backend)


async def until(condition: Callable[[], bool], timeout: float = 3.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not condition():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


def scenario(body: Callable[[Announcer, FakeSpeaker], Awaitable[None]]) -> None:
    async def go() -> None:
        speaker = FakeSpeaker()
        announcer = Announcer(CONFIG, speaker=speaker, tick=0.02)  # type: ignore[arg-type]
        try:
            await body(announcer, speaker)
        finally:
            await announcer.stop()
        assert speaker.stopped

    asyncio.run(go())


def test_vips_follow_health_and_frontends() -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        pools = {"web": FakePool(), "api": FakePool(has_eligible=False)}
        fronts = [front("w", "198.18.50.1", "web"), front("a", "198.18.50.2", "api")]
        a.update(pools, fronts)
        await a.start()
        assert speaker.routes() == ["198.18.50.1/32"]  # announced from the first config on
        pools["api"].has_eligible = True
        a.update(pools, fronts)
        await until(lambda: speaker.routes() == ["198.18.50.1/32", "198.18.50.2/32"])
        pools["web"].has_eligible = False  # noticed on a tick without update(): a drained server
        await until(lambda: speaker.routes() == ["198.18.50.2/32"])
        a.update(pools, fronts[:1])  # reload: frontend "a" removed
        await until(lambda: speaker.routes() == [])
        a.update(pools, [front("w", "198.18.50.9", "web"), front("a", "198.18.50.2", "unknown")])
        await until(lambda: a.wanted == frozenset())
        pools["web"].has_eligible = True
        await until(lambda: speaker.routes() == ["198.18.50.9/32"])  # the address changed with a reload

    scenario(body)


def test_withdraw_all_is_final() -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        pools = {"web": FakePool()}
        a.update(pools, [front("w", "198.18.50.1", "web")])
        await a.start()
        await a.withdraw_all()
        assert speaker.routes() == []  # at once, not on the next tick
        a.update(pools, [front("w", "198.18.50.1", "web")])
        await asyncio.sleep(0.1)
        assert speaker.routes() == []
        assert a.section()["withdrawn"] is True

    scenario(body)


def test_reconfigure_peers_and_removal() -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        pools = {"web": FakePool()}
        a.update(pools, [front("w", "198.18.50.1", "web")])
        await a.start()
        two = BgpConfig(
            65001, {**CONFIG.peers, "r2": BgpPeer("r2", "198.18.6.1", 65002)}, router_id="198.18.5.2"
        )
        a.reconfigure(two)
        await until(lambda: "neighbor 198.18.6.1 as 65002;" in speaker.confs[-1])
        a.reconfigure(None)  # [bgp] removed: nothing announced, the sessions stay
        await until(lambda: speaker.routes() == [])
        assert "protocol bgp r2" in speaker.confs[-1]
        a.reconfigure(two)
        await until(lambda: speaker.routes() == ["198.18.50.1/32"])

    scenario(body)


def test_a_dead_speaker_is_started_again(caplog: pytest.LogCaptureFixture) -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        a.update({"web": FakePool()}, [front("w", "198.18.50.1", "web")])
        await a.start()
        assert speaker.proc is not None
        speaker.proc.returncode = -9
        await until(lambda: speaker.starts == 2, timeout=5)
        assert speaker.routes() == ["198.18.50.1/32"]
        assert a.section()["speaker"]["restarts"] == 1

    with caplog.at_level(logging.INFO, logger="convey.bgp"):
        scenario(body)
    assert "event=speaker_exited status=-9" in caplog.text


def test_sessions_logged_and_shown(caplog: pytest.LogCaptureFixture) -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        a.update({"web": FakePool()}, [front("w", "198.18.50.1", "web")])
        await a.start()
        await until(lambda: "r1" in a.sessions)
        section: dict[str, Any] = a.section()
        assert section["peers"]["r1"]["state"] == "Active"
        assert section["peers"]["r1"]["announced"] == []  # not established: nothing reaches the peer
        assert section["wanted"] == ["198.18.50.1"]
        speaker.state = "Established"
        await until(lambda: a.section()["peers"]["r1"]["announced"] == ["198.18.50.1/32"])
        section = a.section()
        assert section["peers"]["r1"]["established"] is True and section["local_as"] == "65001"
        assert section["router_id"] == "198.18.5.2" and section["speaker"]["running"] is True

    with caplog.at_level(logging.INFO, logger="convey.bgp"):
        scenario(body)
    assert "event=bgp_session peer=r1 state=Active was=-" in caplog.text
    assert "event=bgp_session peer=r1 state=Established was=Active" in caplog.text


def test_router_id_default_is_the_source_towards_the_first_peer() -> None:
    config = BgpConfig(65001, {"z": BgpPeer("z", "198.18.9.9", 1), "a": BgpPeer("a", "127.0.0.1", 1)})
    assert router_id_for(config) == "127.0.0.1"
    assert router_id_for(CONFIG) == "198.18.5.2"


def test_router_id_without_a_route_is_a_startup_error(monkeypatch: pytest.MonkeyPatch) -> None:
    import socket

    def refuse(self: socket.socket, address: object) -> None:
        raise OSError(101, "Network is unreachable")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    config = BgpConfig(65001, {"r": BgpPeer("r", "198.18.9.9", 1)})
    with pytest.raises(StartupError, match=r"set bgp\.router_id"):
        router_id_for(config)


def test_a_failed_withdrawal_stops_the_speaker_for_good() -> None:
    async def body(a: Announcer, speaker: FakeSpeaker) -> None:
        a.update({"web": FakePool()}, [front("w", "198.18.50.1", "web")])
        await a.start()

        async def refuse(conf: str) -> None:
            raise OSError("control socket gone")

        speaker.configure = refuse  # type: ignore[method-assign]
        await a.withdraw_all()
        assert speaker.stopped and not speaker.alive  # the sessions end with the speaker
        await asyncio.sleep(0.2)  # ten ticks: it is not started again
        assert speaker.starts == 1

    scenario(body)
