"""tc's stateless ``nat`` action for pyroute2, and the u32 filters of the DSR backend egress NAT, encoded as tc does.

pyroute2 0.9.7 ships no ``nat`` action. This module adds one: :class:`options` is the action's
``TCA_ACT_OPTIONS`` (one ``TCA_NAT_PARMS`` attribute holding the kernel's ``struct tc_nat``), and importing the
module registers it under the kind ``"nat"`` in pyroute2's action plugins, so pyroute2 also decodes nat actions
in filter dumps. The kernel side is ``net/sched/act_nat.c`` (``CONFIG_NET_ACT_NAT``)::

    struct tc_nat {
        tc_gen;              /* __u32 index; __u32 capab; int action; int refcnt; int bindcnt; */
        __be32 old_addr;
        __be32 new_addr;
        __be32 mask;
        __u32 flags;         /* TCA_NAT_FLAG_EGRESS = 1: rewrite the source (egress), else the destination */
    };

:func:`u32_filter` builds the whole ``RTM_NEWTFILTER`` request for a u32 filter with actions the way iproute2's
``tc filter add dev X parent 10: protocol ip prio P u32 match ... action ...`` builds it (f_u32.c, m_action.c,
m_nat.c, m_gact.c): attribute order, nesting flags and the selector's key packing are the same, so the bytes
are the same (``tests/unit/test_tc_nat.py`` compares them with bytes captured from tc). pyroute2's own u32
plugin cannot be used for that: it always adds ``TCA_U32_CLASSID`` and packs keys per byte, not per 32-bit word.

Pure encoding, no I/O; sending the message is :mod:`convey.backend.egress_tc`'s job.
"""

from __future__ import annotations

import socket
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pyroute2.netlink import NLA_F_NESTED, NLM_F_ACK, NLM_F_CREATE, NLM_F_EXCL, NLM_F_REQUEST, nla, nlmsg
from pyroute2.netlink.rtnl import RTM_DELTFILTER, RTM_NEWTFILTER
from pyroute2.netlink.rtnl.tcmsg import common_act, tcmsg
from pyroute2.netlink.rtnl.tcmsg.common import tc_actions
from pyroute2.netlink.rtnl.tcmsg.common_act import tca_act_prio

__all__ = [
    "ETH_P_IP",
    "TCA_NAT_FLAG_EGRESS",
    "TCA_NAT_PARMS",
    "U32Key",
    "delete_filter",
    "gact_action",
    "handle",
    "match_ip_dport",
    "match_ip_dst",
    "match_ip_sport",
    "match_ip_src",
    "nat_action",
    "options",
    "u32_filter",
]

TCA_NAT_UNSPEC = 0
TCA_NAT_PARMS = 1
TCA_NAT_TM = 2
TCA_NAT_PAD = 3
TCA_NAT_FLAG_EGRESS = 1

TC_U32_TERMINAL = 1  # selector flag tc sets when the filter has a classid or an action
ETH_P_IP = 0x0800
NLM_F_CREATE_EXCL = NLM_F_REQUEST | NLM_F_ACK | NLM_F_EXCL | NLM_F_CREATE
NLM_F_REQ_ACK = NLM_F_REQUEST | NLM_F_ACK

# The fields of a tc_gen header, shared by every action's parameters.
_TC_GEN = (("index", "I"), ("capab", "I"), ("action", "i"), ("refcnt", "i"), ("bindcnt", "i"))


class options(nla):  # type: ignore[misc]  # pyroute2 is untyped
    """``TCA_ACT_OPTIONS`` of a ``nat`` action (nested, as iproute2 sends it)."""

    nla_flags = NLA_F_NESTED
    nla_map = (
        ("TCA_NAT_UNSPEC", "none"),
        ("TCA_NAT_PARMS", "tc_nat"),
        ("TCA_NAT_TM", "tcf_t"),
        ("TCA_NAT_PAD", "hex"),
    )

    class tc_nat(nla):  # type: ignore[misc]
        fields = (*_TC_GEN, ("old_addr", "4s"), ("new_addr", "4s"), ("mask", "4s"), ("flags", "I"))

    class tcf_t(nla):  # type: ignore[misc]
        fields = (("install", "Q"), ("lastuse", "Q"), ("expires", "Q"), ("firstuse", "Q"))


def _prefix_mask(prefixlen: int) -> int:
    if not 0 <= prefixlen <= 32:
        raise ValueError(f"prefix length must be 0..32, got {prefixlen}")
    return (0xFFFFFFFF << (32 - prefixlen)) & 0xFFFFFFFF


def get_parameters(kwarg: dict[str, Any]) -> dict[str, Any]:
    """The nat action's options from pyroute2-style keywords: ``old_addr``, ``new_addr`` (dotted quads),
    ``prefixlen`` (of old_addr, default 32), ``egress`` (default True), ``action`` (default ``"ok"``), ``index``.

    As ``tc action nat egress OLD[/LEN] NEW [CONTROL] [index I]`` (iproute2 m_nat.c): the mask comes from
    OLD's prefix length, the default control is ``ok`` (TC_ACT_OK)."""
    parms = {
        "index": int(kwarg.get("index", 0)),
        "capab": 0,
        "action": tc_actions[kwarg.get("action", "ok")],
        "refcnt": 0,
        "bindcnt": 0,
        "old_addr": socket.inet_aton(kwarg["old_addr"]),
        "new_addr": socket.inet_aton(kwarg["new_addr"]),
        "mask": _prefix_mask(int(kwarg.get("prefixlen", 32))).to_bytes(4, "big"),
        "flags": TCA_NAT_FLAG_EGRESS if kwarg.get("egress", True) else 0,
    }
    return {"attrs": [["TCA_NAT_PARMS", parms]]}


def register() -> None:
    """Make pyroute2 know the ``nat`` action kind (encoding via get_tca_action, decoding in dumps)."""
    common_act.plugins.setdefault("nat", sys.modules[__name__])


register()


# -- u32 selectors, as iproute2's f_u32.c packs them -----------------------------------------------------------


@dataclass(frozen=True, slots=True)
class U32Key:
    """One ``struct tc_u32_key``: ``val``/``mask`` as big-endian 32-bit words at byte ``off`` of the IP header."""

    val: int
    mask: int
    off: int
    offmask: int = 0


def pack_key(keys: Sequence[U32Key], val: int, mask: int, off: int, offmask: int = 0) -> tuple[U32Key, ...]:
    """Add a 32-bit match to ``keys``, merged into an existing key at the same offset (f_u32.c ``pack_key``)."""
    val &= mask
    out = list(keys)
    for i, key in enumerate(out):
        if key.off == off and key.offmask == offmask:
            if (val ^ key.val) & mask & key.mask:
                raise ValueError(f"u32 match at offset {off} contradicts an earlier match")
            out[i] = U32Key(key.val | val, key.mask | mask, off, offmask)
            return tuple(out)
    if len(out) >= 128:
        raise ValueError("too many u32 keys")
    return (*out, U32Key(val, mask, off, offmask))


def _pack_key16(keys: Sequence[U32Key], val: int, mask: int, off: int) -> tuple[U32Key, ...]:
    if val > 0xFFFF or mask > 0xFFFF:
        raise ValueError("16-bit match out of range")
    if off & 3 == 0:
        val <<= 16
        mask <<= 16
    return pack_key(keys, val, mask, off & ~3)


def match_ip_src(keys: Sequence[U32Key], addr: str, prefixlen: int = 32) -> tuple[U32Key, ...]:
    """``match ip src ADDR[/LEN]``."""
    return pack_key(keys, int.from_bytes(socket.inet_aton(addr), "big"), _prefix_mask(prefixlen), 12)


def match_ip_dst(keys: Sequence[U32Key], addr: str, prefixlen: int = 32) -> tuple[U32Key, ...]:
    """``match ip dst ADDR[/LEN]``."""
    return pack_key(keys, int.from_bytes(socket.inet_aton(addr), "big"), _prefix_mask(prefixlen), 16)


def match_ip_sport(keys: Sequence[U32Key], port: int, mask: int = 0xFFFF) -> tuple[U32Key, ...]:
    """``match ip sport PORT MASK``: the 16 bits at offset 20, i.e. the TCP/UDP source port when the IP header
    has no options (tc's own shortcut makes the same assumption)."""
    return _pack_key16(keys, port, mask, 20)


def match_ip_dport(keys: Sequence[U32Key], port: int, mask: int = 0xFFFF) -> tuple[U32Key, ...]:
    """``match ip dport PORT MASK``: the 16 bits at offset 22 (same assumption); shares a key with sport."""
    return _pack_key16(keys, port, mask, 22)


# -- the filter message --------------------------------------------------------------------------------------


class u32_filter_msg(nlmsg):  # type: ignore[misc]
    """A tcmsg whose TCA_OPTIONS are u32 options with an explicit, tc-packed selector.

    Not a subclass of pyroute2's tcmsg: pyroute2 compiles an attribute map once per class and a subclass would
    inherit tcmsg's compiled map (with pyroute2's own u32 options) instead of this one."""

    prefix = "TCA_"
    fields = tcmsg.fields
    nla_map = (
        ("TCA_UNSPEC", "none"),
        ("TCA_KIND", "asciiz"),
        ("TCA_OPTIONS", "u32_options"),
        ("TCA_STATS", "hex"),
        ("TCA_XSTATS", "hex"),
        ("TCA_RATE", "hex"),
        ("TCA_FCNT", "hex"),
        ("TCA_STATS2", "hex"),
        ("TCA_STAB", "hex"),
    )

    class u32_options(nla):  # type: ignore[misc]
        nla_map = (
            ("TCA_U32_UNSPEC", "none"),
            ("TCA_U32_CLASSID", "uint32"),
            ("TCA_U32_HASH", "uint32"),
            ("TCA_U32_LINK", "hex"),
            ("TCA_U32_DIVISOR", "uint32"),
            ("TCA_U32_SEL", "u32_sel"),
            ("TCA_U32_POLICE", "hex"),
            ("TCA_U32_ACT", "tca_act_prio"),
        )

        tca_act_prio = tca_act_prio

        class u32_sel(nla):  # type: ignore[misc]
            """``struct tc_u32_sel`` followed by its keys (``keys``: a sequence of :class:`U32Key`)."""

            fields = (
                ("flags", "B"),
                ("offshift", "B"),
                ("nkeys", "B"),
                ("__align", "x"),
                ("offmask", ">H"),
                ("off", "H"),
                ("offoff", "h"),
                ("hoff", "h"),
                ("hmask", ">I"),
            )

            def encode(self) -> None:
                keys: Sequence[U32Key] = self.get("keys") or ()
                self["nkeys"] = len(keys)
                nla.encode(self)
                body = b"".join(
                    k.mask.to_bytes(4, "big")
                    + k.val.to_bytes(4, "big")
                    + k.off.to_bytes(4, sys.byteorder, signed=True)
                    + k.offmask.to_bytes(4, sys.byteorder, signed=True)
                    for k in keys
                )
                self.data.extend(body)
                self.length += len(body)
                self.data[self.offset : self.offset + 2] = self.length.to_bytes(2, sys.byteorder)


def handle(text: str) -> int:
    """A tc handle from its ``MAJOR:MINOR`` notation (hex, as tc reads it): ``"10:"`` -> 0x100000."""
    major, _, minor = text.partition(":")
    return (int(major or "0", 16) << 16) | int(minor or "0", 16)


def gact_action(control: str = "ok") -> dict[str, Any]:
    """A generic action (``action ok`` / ``drop`` / ``pipe`` ...), as pyroute2 encodes it (as tc does)."""
    return {"kind": "gact", "action": control}


def nat_action(
    old_addr: str, new_addr: str, prefixlen: int = 32, egress: bool = True, control: str = "ok"
) -> dict[str, Any]:
    """``action nat egress|ingress OLD[/LEN] NEW [CONTROL]``."""
    return {
        "kind": "nat",
        "old_addr": old_addr,
        "new_addr": new_addr,
        "prefixlen": prefixlen,
        "egress": egress,
        "action": control,
    }


def u32_filter(
    ifindex: int,
    parent: int,
    prio: int,
    keys: Sequence[U32Key],
    actions: Sequence[dict[str, Any]],
    protocol: int = ETH_P_IP,
) -> Any:
    """The RTM_NEWTFILTER message (not yet encoded) for
    ``tc filter add dev IFINDEX parent PARENT protocol PROTOCOL prio PRIO u32 <keys> action <actions...>``.

    Send it with ``ipr.nlm_request(msg, RTM_NEWTFILTER, NLM_F_CREATE_EXCL)``, or encode it with
    :func:`encode` to look at the bytes."""
    if not 1 <= prio <= 0xFFFF:
        raise ValueError(f"prio must be 1..65535, got {prio}")
    msg = u32_filter_msg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = ifindex
    msg["handle"] = 0
    msg["parent"] = parent
    msg["info"] = (prio << 16) | socket.htons(protocol)
    act = common_act.get_tca_action({"action": list(actions)})
    sel = {"flags": TC_U32_TERMINAL if actions else 0, "keys": tuple(keys)}
    msg["attrs"] = [
        ["TCA_KIND", "u32"],
        ["TCA_OPTIONS", {"attrs": [["TCA_U32_ACT", act], ["TCA_U32_SEL", sel]]}],
    ]
    return msg


def delete_filter(ifindex: int, parent: int, prio: int, protocol: int = ETH_P_IP) -> Any:
    """The RTM_DELTFILTER message for ``tc filter del dev IFINDEX parent PARENT protocol PROTOCOL prio PRIO``
    (deletes every filter at that priority)."""
    msg = tcmsg()
    msg["family"] = socket.AF_UNSPEC
    msg["index"] = ifindex
    msg["handle"] = 0
    msg["parent"] = parent
    msg["info"] = (prio << 16) | socket.htons(protocol)
    msg["attrs"] = []
    return msg


def encode(msg: Any, msg_type: int, flags: int, seq: int = 0, pid: int = 0) -> bytes:
    """The netlink bytes of ``msg`` with the given header (what would go to the kernel)."""
    msg["header"] = {"type": msg_type, "flags": flags, "sequence_number": seq, "pid": pid}
    msg.encode()
    return bytes(msg.data)


MSG_NEW = RTM_NEWTFILTER
MSG_DEL = RTM_DELTFILTER
