"""The tc nat action and u32 filters of convey.backend.tc_nat, byte for byte against what tc itself sends.

How the expected bytes were obtained: iproute2 6.1.0's tc (Debian 12), in a scratch network namespace holding a
veth ``d0`` (ifindex 3) with ``tc qdisc add dev d0 root handle 10: htb``, run under strace so that every byte it
writes to its netlink socket is dumped::

    strace -e trace=sendmsg -e write=3 -o out.txt tc filter add dev d0 parent 10: protocol ip prio 10 u32 \\
        match ip src 198.18.1.2 match ip sport 8080 0xffff action nat egress 198.18.1.2 198.18.0.1

The kernel there has no act_nat (nor act_gact), so it refused each request ("Failed to load TC action module",
ENOENT) -- but the request had been sent in full, and that is what the hex below is (copied from strace's dump;
only the sequence number, tc's time(NULL), is set to the captured value in the test). The captures agree with
iproute2's sources: m_nat.c fills ``struct tc_nat`` (tc_gen zeros but ``action``, the default control ``ok`` = 0;
old_addr, new_addr in network order; mask = htonl(~0 << (32 - prefix)); flags = TCA_NAT_FLAG_EGRESS for
``egress``) inside TCA_NAT_PARMS inside TCA_ACT_OPTIONS, which m_action.c nests with NLA_F_NESTED; f_u32.c puts
TCA_U32_ACT before TCA_U32_SEL (the action is parsed while the arguments are read, the selector is added at the
end), sets TC_U32_TERMINAL in the selector's flags because there is an action, and packs ``match ip sport`` as a
16-bit match in the upper half of the 32-bit key at offset 20, merging matches at the same offset into one key.
"""

from __future__ import annotations

import socket

import pytest
from pyroute2.netlink.rtnl.tcmsg import tcmsg

from convey.backend import tc_nat
from convey.backend.tc_nat import U32Key

SEQ = 0x6B084582  # the captured nlmsg_seq
IFINDEX = 3
PARENT = tc_nat.handle("10:")

# tc filter add dev d0 parent 10: protocol ip prio 10 u32 match ip src 198.18.1.2 match ip sport 8080 0xffff
#     action nat egress 198.18.1.2 198.18.0.1
TC_NAT_FILTER = bytes.fromhex(
    "a0000000"
    "2c00"
    "0506"
    "8245086b"
    "00000000"  # nlmsghdr: len 160, RTM_NEWTFILTER, REQ|ACK|EXCL|CREATE
    "00000000"
    "03000000"
    "00000000"
    "00001000"
    "08000a00"  # tcmsg: AF_UNSPEC, ifindex 3, handle 0, 10:, prio 10 ip
    "08000100"
    "75333200"  # TCA_KIND "u32"
    "74000200"  # TCA_OPTIONS (116)
    "3c000700"  # TCA_U32_ACT (60)
    "38000100"  # action prio 1 (56)
    "08000100"
    "6e617400"  # TCA_ACT_KIND "nat"
    "2c000280"  # TCA_ACT_OPTIONS | NLA_F_NESTED (44)
    "28000100"  # TCA_NAT_PARMS (40): struct tc_nat
    "00000000"
    "00000000"
    "00000000"
    "00000000"
    "00000000"  # index capab action=ok refcnt bindcnt
    "c6120102"
    "c6120001"
    "ffffffff"
    "01000000"  # old 198.18.1.2, new 198.18.0.1, mask /32, flags EGRESS
    "34000500"  # TCA_U32_SEL (52)
    "01"
    "00"
    "02"
    "00"
    "0000"
    "0000"
    "0000"
    "0000"
    "00000000"  # flags TERMINAL, offshift, nkeys 2, ..., hmask
    "ffffffff"
    "c6120102"
    "0c000000"
    "00000000"  # key: mask, val 198.18.1.2, off 12, offmask
    "ffff0000"
    "1f900000"
    "14000000"
    "00000000"  # key: mask, val 8080 << 16, off 20, offmask
)

# tc filter add dev d0 parent 10: protocol ip prio 1 u32 match ip src 198.18.1.2 match ip sport 8080 0xffff
#     match ip dst 198.18.0.1 action ok
TC_SKIP_FILTER = bytes.fromhex(
    "a40000002c0005068245086b000000000000000003000000000000000000100008000100"
    "080001007533320078000200300007002c0001000900010067616374000000001c000280"
    "1800020000000000000000000000000000000000000000004400050001000300000000000000000000000000"
    "ffffffffc61201020c00000000000000ffff00001f9000001400000000000000ffffffffc61200011000000000000000"
)

# tc filter add dev d0 parent 10: protocol ip prio 20 u32 match ip dst 198.18.0.0/24 match ip sport 8080 0xffff
#     match ip dport 80 0xffff action nat ingress 198.18.0.0/24 198.18.1.0 pipe        (captured with seq 0x6b0847e2)
TC_NAT_INGRESS_FILTER = bytes.fromhex(
    "a00000002c000506e247086b0000000000000000030000000000000000001000080014000800010075333200740002003c000700"
    "38000100080001006e6174002c000280280001000000000000000000030000000000000000000000c6120000c6120100ffffff00"
    "000000003400050001000200000000000000000000000000ffffff00c61200001000000000000000ffffffff1f90005014000000"
    "00000000"
)

# tc filter del dev d0 parent 10: protocol ip prio 10
TC_DELETE = bytes.fromhex("240000002d0005008245086b000000000000000003000000000000000000100008000a00")


def nat_filter_keys() -> tuple[U32Key, ...]:
    return tc_nat.match_ip_sport(tc_nat.match_ip_src((), "198.18.1.2"), 8080)


def test_the_nat_filter_is_byte_for_byte_what_tc_sends() -> None:
    msg = tc_nat.u32_filter(
        IFINDEX, PARENT, 10, nat_filter_keys(), [tc_nat.nat_action("198.18.1.2", "198.18.0.1")]
    )
    assert tc_nat.encode(msg, tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL, seq=SEQ) == TC_NAT_FILTER


def test_the_skip_filter_is_byte_for_byte_what_tc_sends() -> None:
    keys = tc_nat.match_ip_dst(nat_filter_keys(), "198.18.0.1")
    msg = tc_nat.u32_filter(IFINDEX, PARENT, 1, keys, [tc_nat.gact_action("ok")])
    assert tc_nat.encode(msg, tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL, seq=SEQ) == TC_SKIP_FILTER


def test_ingress_prefix_control_and_merged_ports_are_byte_for_byte_what_tc_sends() -> None:
    keys = tc_nat.match_ip_dst((), "198.18.0.0", 24)
    keys = tc_nat.match_ip_dport(tc_nat.match_ip_sport(keys, 8080), 80)
    assert keys[1] == U32Key(0x1F900050, 0xFFFFFFFF, 20)  # sport and dport share the word at offset 20
    action = tc_nat.nat_action("198.18.0.0", "198.18.1.0", prefixlen=24, egress=False, control="pipe")
    msg = tc_nat.u32_filter(IFINDEX, PARENT, 20, keys, [action])
    assert (
        tc_nat.encode(msg, tc_nat.MSG_NEW, tc_nat.NLM_F_CREATE_EXCL, seq=0x6B0847E2) == TC_NAT_INGRESS_FILTER
    )


def test_the_delete_is_byte_for_byte_what_tc_sends() -> None:
    msg = tc_nat.delete_filter(IFINDEX, PARENT, 10)
    assert tc_nat.encode(msg, tc_nat.MSG_DEL, tc_nat.NLM_F_REQ_ACK, seq=SEQ) == TC_DELETE


def test_pyroute2_decodes_the_nat_action_once_registered() -> None:
    """A filter dump from a kernel with act_nat comes back in this layout; pyroute2 then shows the parameters."""
    msg = tcmsg(TC_NAT_FILTER)
    msg.decode()
    assert msg["index"] == IFINDEX and msg["parent"] == PARENT and msg["info"] >> 16 == 10
    action = msg.get_attr("TCA_OPTIONS").get_attr("TCA_U32_ACT").get_attr("TCA_ACT_PRIO_1")
    assert action.get_attr("TCA_ACT_KIND") == "nat"
    parms = action.get_attr("TCA_ACT_OPTIONS").get_attr("TCA_NAT_PARMS")
    assert socket.inet_ntoa(parms["old_addr"]) == "198.18.1.2"
    assert socket.inet_ntoa(parms["new_addr"]) == "198.18.0.1"
    assert parms["mask"] == b"\xff\xff\xff\xff"
    assert parms["flags"] == tc_nat.TCA_NAT_FLAG_EGRESS
    assert parms["action"] == 0


def test_key_packing_follows_f_u32() -> None:
    assert tc_nat.match_ip_src((), "10.1.2.3", 16) == (U32Key(0x0A010000, 0xFFFF0000, 12),)
    assert tc_nat.match_ip_sport((), 443, 0xFF00) == (U32Key(0x01000000, 0xFF000000, 20),)
    with pytest.raises(ValueError, match="contradicts"):
        tc_nat.match_ip_sport(tc_nat.match_ip_sport((), 80), 81)
    with pytest.raises(ValueError):
        tc_nat.match_ip_sport((), 70000)
    with pytest.raises(ValueError):
        tc_nat.match_ip_src((), "10.0.0.1", 33)


def test_handles_and_prios() -> None:
    assert tc_nat.handle("10:") == 0x100000
    assert tc_nat.handle("ffff:1") == 0xFFFF0001
    assert tc_nat.handle("1:10") == 0x10010
    with pytest.raises(ValueError):
        tc_nat.u32_filter(1, PARENT, 0, (), [])
