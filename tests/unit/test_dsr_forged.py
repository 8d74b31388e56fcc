"""DSR and forged packets (issue 10, defect 5): a SYN|FIN on a closing flow does not replace it.

DSR sees one direction only, so there is no window to check a RST against (docs/dsr.md); a flow a forged RST
closes keeps its server through the flow hash. What must hold is what passthrough holds: only a plain SYN on a
closing flow starts a new connection.
"""

from __future__ import annotations

from convey.modes import Rewrite
from convey.packet.flows import FlowState
from tests.unit.test_packet_dsr import ACCEPT, Env, packet


def test_syn_fin_on_a_closing_dsr_flow_keeps_it() -> None:
    env = Env(Rewrite.IP)
    env.dsr.ingress(packet(40001, "S", 1000), 1.0)
    env.dsr.ingress(packet(40001, "A", 1001, 1), 1.0)
    flow = env.opened[0]
    assert env.dsr.ingress(packet(40001, "FA", 1001, 1), 2.0)[0] == ACCEPT
    assert flow.state == FlowState.CLOSING
    assert env.dsr.ingress(packet(40001, "SF", 77), 2.1)[0] == ACCEPT
    assert env.closed == [] and len(env.opened) == 1 and flow.in_table  # before: replaced by a new flow
    assert flow.state == FlowState.CLOSING
    assert env.dsr.ingress(packet(40001, "A", 1002, 2), 2.2)[0] == ACCEPT  # the final ACK
    assert env.dsr.ingress(packet(40001, "S", 9000), 2.5)[0] == ACCEPT  # a plain SYN: a new connection
    assert env.closed == [flow] and len(env.opened) == 2
