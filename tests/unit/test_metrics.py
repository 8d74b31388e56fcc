"""/metrics: the exposition of every mode's /stats document parses, and its names follow Prometheus' rules.

The documents are built the way the engine builds them (``convey.stats.snapshot`` over real pools), with the
sections each mode adds shaped as their code makes them (the counters from the real counter classes).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from collections import Counter
from typing import Any

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from convey.balancing.pool import Pool
from convey.config import parse_config
from convey.metrics import SERVER_STATES, Collector
from convey.packet.counters import DsrCounters, PassthroughCounters
from convey.stats import Stats, snapshot

CONFIG = """
[frontends.web]
listen_addr = "127.0.0.1:8080"
backend = "pool"
[backends.pool]
[backends.pool.servers.a]
addr = "127.0.0.1:9001"
weight = 3
[backends.pool.servers.b]
addr = "127.0.0.1:9002"
weight = 0
"""


def base_doc(mode: str) -> dict[str, Any]:
    config = parse_config(CONFIG)
    pools = {name: Pool(b, mode) for name, b in config.backends.items()}
    pools["pool"].servers["a"].health.checks_ok = 7
    stats = Stats(mode=mode, started=0.0)
    scopes = stats.scopes("web", "pool", "a")
    for c in scopes:
        c.total_connections, c.current_connections, c.bytes_tx, c.bytes_rx = 5, 1, 500, 70_000
    stats.reloads, stats.reload_failures = 2, 1
    stats.sections["health"] = lambda: {"local_errors": 0}
    return snapshot(stats, pools, {"web": "pool"}, now=12.5)


def queue(num: int) -> dict[str, Any]:
    """plane.packet_section's "queue": the kernel's counters and the netlink binding's."""
    return {
        "num": num,
        "queue_waiting": 0,
        "queue_dropped": 1,
        "queue_user_dropped": 0,
        "verdict_errors": 0,
        "verdict_send_errors": 0,
        "no_verdict": 0,
        "gso_packets": 4,
        "full_checksums": 4,
        "kernel_checksums": 0,
        "cut_packets": 0,
        "drains": 2,
        "packets": 5,
    }


def passthrough_doc(offload: bool = False) -> dict[str, Any]:
    doc = base_doc("passthrough")
    verdicts = PassthroughCounters(ingress_accepted=10, ingress_dropped=2, no_server=1, not_vip=1).as_dict()
    packet: dict[str, Any] = {
        "io_errors": 0,
        "ports_in_use": 3,
        "port_pools": 1,
        "port_pools_freed": 0,
        "port_range": "20000-29999",
        "source_addrs": ["198.18.0.1"],
        "resets_sent": 1,
        "resets_failed": 0,
        "queue": queue(3),
        "verdicts": verdicts,
        "parse_errors": {"fragment": 2},
    }
    if offload:
        packet |= {"connections": 2, "connection_capacity": 65536}
        doc["offload"] = {
            "connections_open": 2,
            "opened": 9,
            "closed": 7,
            "lost": 0,
            "unknown_mark": 0,
            "open_per_server": {"pool/a": 2},
            "mark_mask": "0xff00",
            "marks": {"pool/a": "0x100", "pool/b": "0x200"},
            "rules_updates_pending": 0,
            "verdicts": {"verdicts_sent": 9, "sends": 5, "send_errors": {"enobufs": 1}},
            "monitor": {
                "events": 20,
                "overflows": 0,
                "resyncs": 1,
                "resync_errors": 0,
                "last_resync": {"entries": 0, "opened": 0, "closed": 0, "lost": 0},
                "open": 2,
                "fetches": 7,
                "fetch_misses": 0,
            },
        }
    else:
        packet |= {"flows": 3, "flow_capacity": 65536}
    doc["packet"] = packet
    doc["runtime"] = {"overlay": {"pool/b": {"weight": 0, "admin": "drain"}}}
    # two workers: their numbers summed above, identifiers that differ listed per worker, and each worker's own
    doc["packet"]["queue"]["num"] = [3, 4]
    doc["workers"] = [
        {"index": i, "alive": True, "pid": 100 + i, "restarts": 0, "queue": 3 + i, "port_range": "1-2"}
        | {"total_connections": 1, "packet": {"queue": queue(3 + i), "verdicts": dict(verdicts)}}
        for i in range(2)
    ]
    return doc


def dsr_doc(offload: bool = False) -> dict[str, Any]:
    doc = base_doc("dsr")
    doc["packet"] = {
        "io_errors": 0,
        "resets_sent": 0,
        "resets_failed": 0,
        "queue": queue(5),
        "verdicts": DsrCounters(accepted=40, dropped=1, no_mark=1).as_dict(),
        "parse_errors": {},
        "flows": 2,
        "flow_capacity": 1000,
    }
    doc["dsr"] = {
        "rewrite": "mac",
        "flows_per_server": {"pool/a": 2},
        "unknown": ["bytes_rx", "server -> client packets"],
        "note": "in DSR mode replies go from the servers straight to the clients",
    }
    if offload:
        doc["dsr"]["offload"] = {
            "entries_written": 3,
            "write_errors": {"eexist": 1},
            "pickups": 0,
            "unmarked": 0,
        }
    return doc


def proxy_doc() -> dict[str, Any]:
    doc = base_doc("proxy")
    doc["proxy"] = {
        "frontends": {
            "web": {
                "active": 1,
                "max_connections": 10000,
                "idle_timeout": 300.0,
                "refused_max_connections": 0,
                "idle_closed": 2,
                "local_errors": 0,
                "accept_pauses": 0,
                "accept_paused": False,
            }
        }
    }
    # issue 9's worker processes: the per-worker list (convey.workers.supervisor.section)
    doc["workers"] = [
        {"index": 0, "alive": True, "pid": 4242, "restarts": 0, "total_connections": 3, "bytes_tx": 10},
        {"index": 1, "alive": True, "pid": 4243, "restarts": 1, "total_connections": 2, "bytes_tx": 20},
    ]
    for worker in doc["workers"]:
        worker["current_connections"] = 1
        worker["proxy"] = {"frontends": {"web": {"active": 1, "idle_closed": 1}}}
    return doc


DOCS = {
    "proxy": proxy_doc,
    "passthrough": passthrough_doc,
    "passthrough-offload": lambda: passthrough_doc(offload=True),
    "dsr": dsr_doc,
    "dsr-offload": lambda: dsr_doc(offload=True),
}


def exposition(doc: dict[str, Any]) -> str:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(Collector(lambda: doc))
    return generate_latest(registry).decode()


def samples(text: str) -> dict[tuple[str, frozenset[tuple[str, str]]], float]:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for fam in text_string_to_metric_families(text)
        for s in fam.samples
    }


NAME = re.compile(r"convey_[a-z][a-z0-9_]*[a-z0-9]")


@pytest.mark.parametrize("mode", DOCS)
def test_every_family_follows_the_naming_rules(mode: str, caplog: pytest.LogCaptureFixture) -> None:
    text = exposition(DOCS[mode]())
    families = list(text_string_to_metric_families(text))
    assert families
    names = Counter(f.name for f in families)
    assert [n for n, k in names.items() if k > 1] == []  # no duplicate families
    typed = Counter(f.name + ("_total" if f.type == "counter" else "") for f in families)
    assert Counter(re.findall(r"^# TYPE (\S+)", text, re.M)) == typed  # one TYPE line each
    for fam in families:
        assert NAME.fullmatch(fam.name), fam.name
        assert fam.type in ("counter", "gauge"), fam.name
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name == f"{fam.name}_total", s.name  # counters end in _total (no _created either)
                assert "bytes" not in s.name or s.name.endswith("_bytes_total"), s.name
            else:
                assert not s.name.endswith("_total"), s.name
                assert s.name == fam.name
            assert not re.search(r"_(num|pid|port|id)$", s.name), f"an identifier as a value: {s.name}"
            assert s.value == s.value and s.value >= 0, s  # no NaN, nothing negative in these documents
        label_sets = {frozenset(s.labels) for s in fam.samples}
        assert len(label_sets) == 1, f"{fam.name}: one set of label names per family, got {label_sets}"
    assert "metric_clash" not in caplog.text


def test_connection_counters_of_every_scope() -> None:
    got = samples(exposition(proxy_doc()))
    web, pool = frozenset({("frontend", "web")}), frozenset({("backend", "pool")})
    a = frozenset({("backend", "pool"), ("server", "a")})
    assert got[("convey_connections_total", frozenset())] == 5
    assert got[("convey_current_connections", frozenset())] == 1
    assert got[("convey_tx_bytes_total", frozenset())] == 500
    assert got[("convey_rx_bytes_total", frozenset())] == 70_000
    assert got[("convey_frontend_connections_total", web)] == 5
    assert got[("convey_frontend_refused_total", web)] == 0
    assert got[("convey_backend_rx_bytes_total", pool)] == 70_000
    assert got[("convey_server_current_connections", a)] == 1
    assert got[("convey_server_failed_total", a)] == 0
    assert got[("convey_info", frozenset({("mode", "proxy")}))] == 1
    assert got[("convey_uptime_seconds", frozenset())] == 12.5
    reloads = {dict(k[1])["result"]: v for k, v in got.items() if k[0] == "convey_reloads_total"}
    assert reloads == {"applied": 2, "rejected": 1, "error": 0}


def test_server_health_state_and_address() -> None:
    doc = proxy_doc()
    doc["backends"]["pool"]["server_detail"]["a"]["healthy"] = False
    doc["backends"]["pool"]["server_detail"]["a"]["state"] = "down"
    got = samples(exposition(doc))
    a = {("backend", "pool"), ("server", "a")}
    b = {("backend", "pool"), ("server", "b")}
    assert got[("convey_server_up", frozenset(a))] == 0
    assert got[("convey_server_up", frozenset(b))] == 1
    for state in SERVER_STATES:
        assert got[("convey_server_state", frozenset({*a, ("state", state)}))] == (state == "down")
        assert got[("convey_server_state", frozenset({*b, ("state", state)}))] == (state == "draining")
    assert got[("convey_server_info", frozenset({*a, ("addr", "127.0.0.1:9001")}))] == 1
    assert got[("convey_server_weight", frozenset(a))] == 3
    assert got[("convey_server_health_checks_total", frozenset({*a, ("result", "ok")}))] == 7
    assert got[("convey_server_health_checks_total", frozenset({*a, ("result", "failed")}))] == 0
    assert not any(k[0] == "convey_server_up" and "addr" in dict(k[1]) for k in got)  # the address: info only


def test_packet_verdicts_and_drop_reasons_are_labels() -> None:
    got = samples(exposition(passthrough_doc()))
    verdicts = {dict(k[1])["verdict"]: v for k, v in got.items() if k[0] == "convey_packet_verdicts_total"}
    drops = {dict(k[1])["reason"]: v for k, v in got.items() if k[0] == "convey_packet_drops_total"}
    assert verdicts["ingress_accepted"] == 10 and verdicts["ingress_dropped"] == 2
    assert set(verdicts) >= {"return_accepted", "return_dropped", "icmp_translated"}
    assert drops["no_server"] == 1 and drops["not_vip"] == 1
    assert set(drops) == set(PassthroughCounters.DROP_REASONS)
    assert sum(drops.values()) == verdicts["ingress_dropped"] + verdicts["return_dropped"]
    assert got[("convey_packet_flows_opened_total", frozenset())] == 0
    assert got[("convey_packet_rewrites_total", frozenset())] == 10
    assert got[("convey_packet_tx_bytes_total", frozenset())] == 0
    assert got[("convey_packet_parse_errors_total", frozenset({("kind", "fragment")}))] == 2
    # gauges for current values, counters for events; the queue number a label, not a value
    assert got[("convey_packet_queue_waiting", frozenset())] == 0
    assert got[("convey_packet_flows", frozenset())] == 3
    assert got[("convey_packet_flow_capacity", frozenset())] == 65536
    assert got[("convey_packet_ports_in_use", frozenset())] == 3
    assert got[("convey_packet_port_pools_freed_total", frozenset())] == 0
    assert got[("convey_runtime_weight", frozenset({("backend", "pool"), ("server", "b")}))] == 0


def test_dsr_and_offload_sections() -> None:
    got = samples(exposition(dsr_doc(offload=True)))
    verdicts = {dict(k[1])["verdict"]: v for k, v in got.items() if k[0] == "convey_packet_verdicts_total"}
    assert verdicts == {"accepted": 40, "dropped": 1}
    q = frozenset({("queue", "5")})  # one process: its queue number a label, never a value
    assert got[("convey_packet_queue_dropped_total", q)] == 1
    assert got[("convey_packet_queue_waiting", q)] == 0
    assert got[("convey_packet_drops_total", frozenset({("reason", "no_mark")}))] == 1
    assert got[("convey_dsr_flows_per_server", frozenset({("backend", "pool"), ("server", "a")}))] == 2
    assert got[("convey_dsr_offload_write_errors_total", frozenset({("error", "eexist")}))] == 1
    got = samples(exposition(passthrough_doc(offload=True)))
    assert got[("convey_offload_open_per_server", frozenset({("backend", "pool"), ("server", "a")}))] == 2
    assert got[("convey_offload_monitor_events_total", frozenset())] == 20
    assert got[("convey_offload_monitor_last_resync_entries", frozenset())] == 0
    assert got[("convey_offload_send_errors_total", frozenset({("error", "enobufs")}))] == 1
    assert got[("convey_packet_connection_capacity", frozenset())] == 65536
    assert not any("mark" in name and "unknown" not in name for name, _ in got)  # marks are IDs: left out


def test_proxy_limits_and_workers() -> None:
    got = samples(exposition(proxy_doc()))
    web = frozenset({("frontend", "web")})
    assert got[("convey_proxy_active", web)] == 1
    assert got[("convey_proxy_max_connections", web)] == 10000
    assert got[("convey_proxy_idle_timeout_seconds", web)] == 300
    assert got[("convey_proxy_idle_closed_total", web)] == 2
    assert got[("convey_proxy_accept_paused", web)] == 0
    assert got[("convey_health_local_errors_total", frozenset())] == 0
    assert got[("convey_worker_connections_total", frozenset({("worker", "1")}))] == 2
    assert got[("convey_worker_tx_bytes_total", frozenset({("worker", "0")}))] == 10
    assert got[("convey_worker_alive", frozenset({("worker", "0")}))] == 1
    assert not any("pid" in name or "4242" in str(labels) for name, labels in got)
    assert got[("convey_worker_current_connections", frozenset({("worker", "0")}))] == 1
    assert (
        got[("convey_worker_proxy_idle_closed_total", frozenset({("worker", "1"), ("frontend", "web")}))] == 1
    )


def test_packet_workers() -> None:
    got = samples(exposition(passthrough_doc()))
    one = frozenset({("worker", "1"), ("queue", "4")})
    assert got[("convey_worker_packet_queue_dropped_total", one)] == 1
    assert got[("convey_worker_packet_verdicts_total", one | {("verdict", "ingress_accepted")})] == 10
    assert got[("convey_packet_queue_dropped_total", frozenset())] == 1  # the sum: queues listed, not a label


def test_label_values_are_escaped() -> None:
    odd = 'we"ird\\name\nx'
    doc = proxy_doc()
    doc["frontends"][odd] = doc["frontends"].pop("web")
    text = exposition(doc)
    assert '\\"' in text and "\\n" in text and "\\\\" in text
    got = samples(text)
    assert got[("convey_frontend_connections_total", frozenset({("frontend", odd)}))] == 5


def test_a_new_section_is_exported_by_the_rules_and_never_breaks_the_exposition() -> None:
    doc = proxy_doc()
    doc["future"] = {
        "things_done": 4,
        "in_flight_open": 2,
        "by_name": {"odd key!": 1, "web/one": 2},  # keys that cannot be in a metric name: labels
        "label": "text",
        "none": None,
    }
    doc["clash"] = {
        "a": {"b": 1},
        "a_b": True,
    }  # a counter convey_clash_a_b_total and a gauge convey_clash_a_b
    got = samples(exposition(doc))
    assert got[("convey_future_things_done_total", frozenset())] == 4
    assert got[("convey_future_in_flight_open", frozenset())] == 2
    assert got[("convey_future_by_name_total", frozenset({("name", "odd key!")}))] == 1
    assert got[("convey_future_by_name_total", frozenset({("name", "web/one")}))] == 2
    assert [name for name, _ in got if name.startswith("convey_clash")] == ["convey_clash_a_b_total"]


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool is not installed (Debian: prometheus)")
def test_promtool_accepts_the_exposition() -> None:
    for mode, make in DOCS.items():
        result = subprocess.run(
            ["promtool", "check", "metrics"], input=exposition(make()), capture_output=True, text=True
        )
        assert result.returncode == 0 and not result.stdout.strip(), (mode, result.stdout + result.stderr)
