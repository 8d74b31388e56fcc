"""The Announcer: which VIPs this balancer announces, kept true in its BGP speaker, and what ``/stats`` shows.

The engine (or a supervisor process) calls :meth:`Announcer.update` with the pools and frontends whenever health
or the config changes; it remembers them and re-reads them on every tick (once a second), so a change made any
other way (a drained server) is announced within a second too. A VIP (/32) is announced while at least one
frontend on that address has a backend with an eligible server. :meth:`withdraw_all` (first thing on SIGTERM)
withdraws everything for good; :meth:`reconfigure` follows a reload's ``[bgp]`` (peers, AS, timers).

A tick also supervises the speaker (an unexpected exit is logged and BIRD is started again, with a backoff) and
reads the sessions and exported routes from it for :meth:`section`. A peer that never comes up changes nothing
else: convey serves on, the section says so, and every session state change is logged.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import time
from collections.abc import Iterable, Mapping
from typing import Any, Protocol

from convey.bgp import birdctl
from convey.bgp.bird_config import render
from convey.bgp.model import BgpConfig, announced_vips
from convey.bgp.speaker import BirdSpeaker
from convey.config import FrontendConfig
from convey.errors import ConveyError, StartupError

log = logging.getLogger("convey.bgp")

TICK = 1.0  # seconds between two looks at the pools and the speaker
MAX_BACKOFF = 30.0


class _Pool(Protocol):
    @property
    def has_eligible(self) -> bool: ...


def router_id_for(config: BgpConfig) -> str:
    """``router_id``, else the address this host sends from towards the first peer (by name)."""
    if config.router_id is not None:
        return config.router_id
    peer = min(config.peers.values(), key=lambda p: p.name)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        try:
            probe.connect((peer.address, 179))  # UDP: no packet is sent, the kernel only picks the route
        except OSError as exc:
            raise StartupError(
                f"[bgp] no route to peer {peer.name} ({peer.address}) to take the router id from: "
                f"{exc.strerror or exc}; set bgp.router_id"
            ) from None
        return str(probe.getsockname()[0])


class Announcer:
    def __init__(self, config: BgpConfig, speaker: BirdSpeaker | None = None, tick: float = TICK) -> None:
        self.config = config
        self.removed = False  # a reload removed [bgp]: the speaker stays (same peers), nothing is announced
        self.speaker = speaker if speaker is not None else BirdSpeaker()  # StartupError: BIRD missing
        self.tick = tick
        self.router_id = ""
        self.wanted: frozenset[str] = frozenset()
        self.withdrawn = False  # withdraw_all() was called: nothing is announced any more
        self._pools: Mapping[str, _Pool] = {}
        self._frontends: list[FrontendConfig] = []
        self._conf = ""  # the config text BIRD runs with
        self._lock = asyncio.Lock()
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._restart_at = 0.0  # the speaker's next restart, when it exits (time.monotonic)
        self._backoff = 1.0
        self._started_at = 0.0
        self.sessions: dict[str, birdctl.Protocol] = {}
        self.exported: dict[str, list[str]] = {}
        self.counters = {"restarts": 0, "configures": 0, "errors": 0}
        self.last_error: str | None = None

    # -- what the engine calls ------------------------------------------------------------------------------------

    async def start(self) -> None:
        self.router_id = router_id_for(self.config)
        self._conf = self._render()
        self.speaker.start(self._conf)
        await self.speaker.wait_ready()
        log.info(
            "event=bgp_started router_id=%s local_as=%d peers=%s announced=%s",
            self.router_id,
            self.config.local_as,
            ",".join(f"{p.name}={p.address}/AS{p.asn}" for p in self.config.peers.values()),
            ",".join(sorted(self._target())) or "-",
        )
        self._started_at = time.monotonic()
        self._task = asyncio.get_running_loop().create_task(self._run(), name="bgp")

    def update(self, pools: Mapping[str, _Pool], frontends: Iterable[FrontendConfig]) -> None:
        """The live pools and frontends: announce what they can serve (applied at once, in the background)."""
        self._pools = pools
        self._frontends = list(frontends)
        self._evaluate()

    def reconfigure(self, config: BgpConfig | None) -> None:
        """A reload's ``[bgp]``; None (the section removed) withdraws everything, the speaker stays."""
        if config is None or config == self.config:
            if self.removed != (config is None):
                self.removed = config is None
                log.info("event=bgp_reconfigure removed=%d", self.removed)
                self._wake.set()
            return
        if config.router_id is None:
            with contextlib.suppress(StartupError):
                self.router_id = router_id_for(config)
        self.config, self.removed = config, False
        log.info("event=bgp_reconfigure peers=%s", ",".join(config.peers))
        self._wake.set()

    async def withdraw_all(self) -> None:
        """Withdraw every VIP now (SIGTERM); nothing is announced again."""
        self.withdrawn = True
        log.info("event=bgp_withdraw_all vips=%s", ",".join(sorted(self.wanted)) or "-")
        try:
            await self._push()
        except (OSError, TimeoutError, ConveyError) as exc:
            log.warning(
                "event=bgp_withdraw_failed error=%r (stopping the speaker ends the sessions)", str(exc)
            )
            await self.speaker.stop()

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.speaker.stop()

    def section(self) -> dict[str, Any]:
        """/stats ``bgp``: the sessions and what each peer is sent, as the speaker last said (once a second).
        Shaped for /metrics' rules: flags are booleans (0/1 gauges), the numbers are counters, AS numbers and the
        hold time are text (configuration, not measurements)."""
        config = self.config
        peers: dict[str, Any] = {}
        for peer in config.peers.values():
            session = self.sessions.get(peer.name)
            state = session.bgp_state if session and self.speaker.alive else "Down"
            peers[peer.name] = {
                "address": peer.address,
                "as": str(peer.asn),
                "state": state,
                "info": session.info if session else "",
                "since": session.since if session else "",
                "established": state == "Established",
                "announced": self.exported.get(peer.name, []) if state == "Established" else [],
            }
        return {
            "speaker": {
                "version": self.speaker.version or "bird",
                "pid": self.speaker.pid,
                "running": self.speaker.alive,
                **self.counters,
                "last_error": self.last_error,
            },
            "router_id": self.router_id,
            "local_as": str(config.local_as),
            "hold_time": f"{config.hold_time}s",
            "wanted": sorted(self._target()),
            "withdrawn": self.withdrawn or self.removed,
            "peers": peers,
        }

    # -- the loop -------------------------------------------------------------------------------------------------

    def _target(self) -> frozenset[str]:
        return frozenset() if self.withdrawn or self.removed else self.wanted

    def _render(self) -> str:
        return render(self.config, self.router_id, self._target())

    def _evaluate(self) -> None:
        servable = {}
        for front in self._frontends:
            pool = self._pools.get(front.backend)
            servable[front.name] = (front.listen_addr.host, pool is not None and pool.has_eligible)
        wanted = announced_vips(servable)
        if wanted != self.wanted:
            for vip in sorted(wanted - self.wanted):
                log.warning("event=bgp_announce vip=%s/32", vip)
            for vip in sorted(self.wanted - wanted):
                log.warning("event=bgp_withdraw vip=%s/32 reason=no_eligible_server_or_frontend_removed", vip)
            self.wanted = wanted
            self._wake.set()

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.tick)
            self._wake.clear()
            try:
                self._evaluate()
                if not self.speaker.alive:
                    if not self.withdrawn:  # after withdraw_all, a stopped speaker stays stopped
                        await self._revive()
                    continue
                if time.monotonic() - self._started_at > MAX_BACKOFF:
                    self._backoff = 1.0  # up long enough: the next exit is restarted at once again
                if self._render() != self._conf:
                    await self._push()
                await self._observe()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the loop must survive anything the speaker answers
                self.counters["errors"] += 1
                self.last_error = str(exc) or type(exc).__name__
                log.warning("event=bgp_speaker_error error=%r", self.last_error)

    async def _push(self) -> None:
        async with self._lock:
            conf = self._render()
            if conf == self._conf or not self.speaker.alive:
                return
            await self.speaker.configure(conf)
            self._conf = conf
            self.counters["configures"] += 1
            log.info("event=bgp_configured announced=%s", ",".join(sorted(self._target())) or "-")

    async def _revive(self) -> None:
        """Start the speaker again after an exit: at once the first time, then after 1, 2, 4 ... 30 s."""
        now = time.monotonic()
        if self.speaker.proc is not None:
            status = self.speaker.reap()
            self.sessions.clear()
            log.error(
                "event=speaker_exited status=%s restart_in=%.0fs", status, max(0.0, self._restart_at - now)
            )
        if now < self._restart_at:
            return
        self._restart_at = now + self._backoff
        self._backoff = min(MAX_BACKOFF, self._backoff * 2)
        async with self._lock:
            self._conf = self._render()
            self._started_at = now
            self.counters["restarts"] += 1
            self.speaker.start(self._conf)
            await self.speaker.wait_ready()

    async def _observe(self) -> None:
        sessions = birdctl.parse_protocols(await self.speaker.query("show protocols"))
        names = set(self.config.peers)
        for name in names:
            new, old = sessions.get(name), self.sessions.get(name)
            # Logged: the first state seen and every change into or out of Established (a peer that is down
            # cycles between Active and Connect on every retry: that is in /stats, not in the log).
            if new is not None and (
                old is None or (old.bgp_state == "Established") != (new.bgp_state == "Established")
            ):
                log.warning(
                    "event=bgp_session peer=%s state=%s was=%s info=%r",
                    name,
                    new.bgp_state,
                    old.bgp_state if old else "-",
                    new.info,
                )
        self.sessions = {name: s for name, s in sessions.items() if name in names}
        exported = {}
        for name, session in self.sessions.items():
            if session.bgp_state == "Established":
                exported[name] = birdctl.parse_prefixes(await self.speaker.query(f"show route export {name}"))
        self.exported = exported
