"""The server side of DSR: the tool that runs on each DSR server (not on the balancer), as root, in the server's
network namespace, usually through ``scripts/setup-dsr-backend.sh``::

    python -m convey.backend install|remove --vip VIP --port PORT [--server-port PORT] [--rewrite ip|mac]
        [--dev IFACE] [--method auto|tc|nft] [--server-addr ADDR] [--balancer ADDR ...]
    python -m convey.backend show

``rewrite = "ip"`` needs an egress NAT that puts ``VIP:PORT`` back as the source of the replies, leaving the
replies to the balancer's health checks alone (``--balancer``, required); ``rewrite = "mac"`` needs the VIP on
``lo`` with ARP answers suppressed.

Modules: ``cli`` (arguments, messages, exit status), ``prepare`` (plan, install, remove, show), ``state`` (the
entries and their record in ``/run/convey/backend-nat/<netns name or "host">.json``, through
:mod:`convey.dataplane.kernel_state`), ``egress_nft`` (nftables), ``egress_tc`` (tc act_nat) with ``tc_nat`` (the
nat action and u32 filters encoded for pyroute2), ``vip_on_lo`` (``rewrite = "mac"``), ``links`` (interfaces).
"""
