"""The rules of a supervisor's packet mode: all N workers' queues in one rule set, kept in line with the config.

``WorkerRules`` checks them at start (or installs them with ``--install-rules``, removing them at exit), renders
them again on reload and when the set of draining servers changes, and owns passthrough offload's mark plan
(``rules.offload_plan``): the supervisor sends it to every worker, so every worker gives the same marks. A server
removed from the config keeps its return rules (per packet) or its mark (offload) while a worker still has
connections to it; the workers say so in every poll (``retired``, ``in_use``).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import replace
from typing import Any

from convey.config import Address, Config, ServerConfig, offloaded
from convey.modes import Mode

log = logging.getLogger("convey.workers")

Retired = tuple[str, str, str, int]  # (backend, server name, host, port)


class WorkerRules:
    def __init__(self, mode: Mode, install_rules: bool, count: int) -> None:
        self.mode = mode
        self.install_rules = install_rules
        self.count = count
        self.installed = False
        self.plan: Any = None  # passthrough offload: the OffloadPlan every worker uses
        self.retired: set[Retired] = set()  # per packet: removed servers still carrying flows
        self.in_use: set[str] = set()  # offload: servers conntrack holds connections to

    def start(self, config: Config) -> None:
        """At start (in a thread): the plan, then the rules checked or installed."""
        if offloaded(config, self.mode):
            from convey.dataplane.rules import offload_plan

            self.plan = offload_plan(config, self.mode)
        self.ensure(config, at_start=True)

    def new_plan(self, config: Config) -> bool:
        """Passthrough offload: the plan for ``config``, keeping the marks of removed servers that some worker's
        connections still use; True when it changed."""
        if self.plan is None:
            return False
        from convey.dataplane.rules import offload_plan

        configured = {f"{b.name}/{s.name}" for b in config.backends.values() for s in b.servers}
        plan = offload_plan(config, self.mode, previous=self.plan, keep=sorted(self.in_use - configured))
        changed = plan != self.plan
        self.plan = plan
        return bool(changed)

    def options(self) -> dict[str, Any]:
        return {"plan": self.plan} if self.plan is not None else {}

    def with_retired(self, config: Config) -> Config:
        """``config`` plus the servers removed from it that still carry some worker's flows."""
        backends = dict(config.backends)
        for backend, name, host, port in sorted(self.retired):
            current = backends.get(backend)
            if current is None or any(s.addr.host == host and s.addr.port == port for s in current.servers):
                continue
            extra = ServerConfig(name, Address(host, port), 0)
            backends[backend] = replace(current, servers=(*current.servers, extra))
        return replace(config, backends=backends) if backends != dict(config.backends) else config

    def ensure(self, config: Config, at_start: bool) -> None:
        from convey.dataplane import rules

        if rules.ensure(config, self.mode, self.install_rules, at_start, **self.options()):
            self.installed = True

    async def update(self, config: Config, reason: str) -> bool:
        """Bring the rules in line with ``config`` (and the draining servers); True when they changed."""
        from convey.dataplane import rules

        config = self.with_retired(config)
        options = self.options()
        try:
            if not await asyncio.to_thread(lambda: rules.problems(config, self.mode, **options)):
                return False
            await asyncio.to_thread(self.ensure, config, False)
        except Exception as exc:  # keep serving with the old rules; the error is in the log
            log.error("event=rules_update_failed reason=%s error=%r", reason, str(exc))
            return False
        log.info("event=rules_updated reason=%s", reason)
        return True

    async def remove(self, config: Config) -> None:
        """At exit: the rules this supervisor installed (``--install-rules``), exactly those."""
        if not self.installed:
            return
        from convey.dataplane import rules

        try:
            for line in await asyncio.to_thread(rules.remove, config):
                log.info("event=rules_removed change=%r", line)
        except Exception as exc:
            log.error("event=rules_remove_failed error=%r", str(exc))
        self.installed = False
