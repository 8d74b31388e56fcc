"""`make demo-cluster`: a tier of two DSR balancers behind a router with ECMP, the VIP announced over BGP.

Builds testbed/cluster.py's namespaces (a router running BIRD 2, a client, balancers lb0 and lb1 running convey
with ``[bgp]``, two servers), shows the router's BGP sessions and its ECMP route for the VIP, spreads requests over
both balancers, SIGKILLs one balancer in the middle of a download, shows the router dropping it and the download
finishing intact through the other, then removes everything (also on failure or Ctrl-C). Root and bird2 needed.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from testbed.cluster import VIP, VIP_PORT, Cluster, Downloads, balancer_addr, cluster  # noqa: E402
from testbed.process import TestbedError, wait_until  # noqa: E402

SIZE = 6_000_000


def show(title: str, text: str) -> None:
    print(f"\n--- {title}")
    for line in text.strip().splitlines():
        print(f"    {line}")


def demo(tier: Cluster) -> None:
    for i in (0, 1):
        print(f"starting convey --dsr with [bgp] in lb{i} ({balancer_addr(i)}) ...", flush=True)
        tier.start_balancer(i)
    show("the router's BGP sessions (birdc show protocols)", tier.router_sessions())
    show(
        f"the router's kernel route for the VIP (ip route show {VIP}/32): ECMP over both", tier.router_route()
    )
    before = [int(tier.convey[i].stats()["frontends"]["web"]["total_connections"]) for i in (0, 1)]
    assert tier.client is not None
    answers: dict[str, int] = {}
    for _ in range(40):
        body = tier.client.curl(f"http://{VIP}:{VIP_PORT}/").decode().split()[0]
        answers[body] = answers.get(body, 0) + 1
    spread = [
        int(tier.convey[i].stats()["frontends"]["web"]["total_connections"]) - before[i] for i in (0, 1)
    ]
    print(
        f"\n40 requests: balancers lb0/lb1 took {spread[0]}/{spread[1]} (ECMP on the client's port); servers {answers}"
    )
    bgp = tier.convey[0].stats()["bgp"]
    print(
        f"lb0 /stats bgp: {json.dumps({k: bgp[k] for k in ('router_id', 'wanted', 'peers')}, sort_keys=True)}"
    )

    print(
        f"\n6 downloads of {SIZE / 1e6:.0f} MB (rate limited to 500 kB/s each) through the tier ...",
        flush=True,
    )
    downloads = Downloads(tier, 6, SIZE, rate="500k")
    wait_until(lambda: int(tier.convey[0].stats()["current_connections"]) > 0, 10.0, "a download through lb0")
    time.sleep(1.5)  # let the downloads get going: this is a demo, the tests poll
    killed = time.monotonic()
    print(
        f"{killed - downloads.started:.1f}s into the downloads, lb0 has "
        f"{tier.convey[0].stats()['current_connections']} open flows: SIGKILL convey in lb0 (its BIRD dies with it: "
        "PR_SET_PDEATHSIG) ...",
        flush=True,
    )
    tier.kill_balancer(0)
    wait_until(lambda: tier.next_hops() == [balancer_addr(1)], 10.0, "the router to drop lb0")
    print(f"the router dropped lb0 after {time.monotonic() - killed:.2f}s:")
    show("ip route show", tier.router_route())
    results = downloads.wait()
    for n, r in enumerate(results):
        state = (
            "intact (sha256 checked)"
            if r.returncode == 0 and r.intact
            else f"FAILED {r.returncode} {r.error}"
        )
        print(f"download {n + 1}: {state}, ended {r.ended - killed:+.1f}s after the kill")
    picked = int(tier.convey[1].stats()["packet"]["verdicts"]["rescheduled"])
    print(
        f"lb1 took over {picked} of lb0's connections mid-stream (flows it had not seen open), each sent to"
    )
    print("the same server by Maglev (same config on every balancer, no random seed)")
    if not all(r.returncode == 0 and r.intact for r in results):
        raise TestbedError("a download did not survive")


def main() -> int:
    print(
        "building the tier: router (BIRD 2, ECMP), client, balancers lb0 lb1, servers s0 s1 (198.18.0.0/15) ..."
    )
    try:
        with cluster(balancers=2, servers=2) as tier:
            demo(tier)
    except TestbedError as exc:
        print(f"demo failed: {exc}", file=sys.stderr)
        return 1
    print("\neverything removed (namespaces, processes, the servers' egress NAT)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
