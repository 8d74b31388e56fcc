"""The direct server return data plane: ``convey.packet.dsr.Dsr`` bound to an NFQUEUE.

Only client -> VIP packets are queued; the servers answer the clients directly. ``Dsr.decide`` answers with the
rewritten bytes (``rewrite = "ip"``: accept with ``set_payload``), a fwmark (``rewrite = "mac"``: accept the packet
unchanged with ``set_mark``; policy routing sends the frame to that server), or None (drop). The marks are the
ones the rules route (``rules.server_marks``), renewed on reload. The /stats "dsr" section says what a DSR
balancer cannot know: the replies never pass it, so ``bytes_rx`` (server -> client) stays 0.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping
from typing import Any

from convey import stats as st
from convey.balancing.pool import Pool
from convey.config import Config
from convey.dataplane import rules
from convey.dataplane.nfqueue import Batch
from convey.dataplane.plane import PacketPlane
from convey.modes import Mode, Rewrite
from convey.packet.dsr import Dsr
from convey.packet.flows import FlowTable

__all__ = ["DsrPlane"]


class DsrPlane(PacketPlane[Dsr]):
    mode = Mode.DSR

    def __init__(self, pools: dict[str, Pool], stats: st.Stats, **options: bool) -> None:
        super().__init__(pools, stats, **options)
        self.marks: dict[str, int] = {}  # server id ("backend/server") -> fwmark, ``rewrite = "mac"``

    def _queue_num(self, config: Config) -> int:
        return config.dsr.queue_num

    def _new_decider(self, config: Config) -> Dsr:
        ds, pt = config.dsr, config.passthrough
        flows = FlowTable(pt.connection_tracker_capacity, ds.idle_timeout, ds.idle_timeout, pt.fin_linger)
        return Dsr(
            self.vips,
            flows,
            self._choose,
            ds.rewrite,
            self.marks,
            on_flow_open=self._flow_opened,
            on_flow_close=self.accounting.closed,
        )

    def _loaded(self, config: Config) -> None:
        if config.dsr.rewrite == Rewrite.MAC:
            self.marks = {f"{b}/{s}": m for (b, s), m in rules.server_marks(config).items()}
        if self.decider is not None:
            self.decider.marks = self.marks

    def _callback(self, decider: Dsr, batch: Batch) -> Callable[[Any], None]:
        decide = decider.decide
        rst_out = decider.rst_out
        send_resets = self._send_resets
        monotonic = time.monotonic
        plane = self

        def on_packet(pkt: Any) -> None:
            left = batch.left - 1
            batch.left = left
            if left <= 0:
                batch.end()
            try:
                out = decide(pkt.get_payload(), monotonic())
                if out is None:
                    pkt.drop()
                elif out.__class__ is int:  # accept unchanged, with the server's fwmark unless 0
                    if out:
                        pkt.set_mark(out)
                    pkt.accept()
                else:
                    pkt.set_payload(out)
                    pkt.accept()
            except Exception:  # the queue's I/O failed; the decision never raises
                plane.io_errors += 1
                with contextlib.suppress(Exception):
                    pkt.drop()
            if rst_out:
                send_resets(rst_out)

        return on_packet

    def _sections(self) -> dict[str, Callable[[], dict[str, Any]]]:
        return {"dsr": self.dsr_section}

    def dsr_section(self) -> dict[str, Any]:
        per_server: Mapping[str, int] = self.decider.flows.per_server() if self.decider is not None else {}
        return {
            "rewrite": self.config.dsr.rewrite if self.config is not None else None,
            "flows_per_server": dict(per_server),
            "unknown": ["bytes_rx", "server -> client packets"],
            "note": "in DSR mode replies go from the servers straight to the clients: the balancer sees only "
            "client -> server packets, so bytes_rx stays 0 and current_connections counts flows it tracks",
        }
