"""The names convey chooses between: the three modes and the two DSR rewrite flavours.

``StrEnum`` members compare equal to their strings, so config files, command lines and JSON keep plain strings
while the code names each choice once.
"""

from __future__ import annotations

from enum import StrEnum

__all__ = ["PACKET_MODES", "Mode", "Rewrite"]


class Mode(StrEnum):
    PROXY = "proxy"
    PASSTHROUGH = "passthrough"
    DSR = "dsr"


class Rewrite(StrEnum):
    """How a DSR balancer sends a client's packet to its server."""

    IP = "ip"  # the destination address (and port) become the server's; the server puts the VIP back
    MAC = "mac"  # the packet is unchanged; a fwmark and policy routing send the frame to the server's MAC


PACKET_MODES = (Mode.PASSTHROUGH, Mode.DSR)
