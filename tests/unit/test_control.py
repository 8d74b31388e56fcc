"""The runtime API as plain functions: overlay changes, auth, bad input (400 naming the field, no change), the
overlay across reloads, /stats, and the token settings."""

from __future__ import annotations

import copy
import json
import logging
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from convey.balancing.pool import Pool
from convey.config import Config, ConfigError, parse_config
from convey.control.api import Control, Request, Sources
from convey.control.overlay import overlay_section
from convey.control.token import authorized
from convey.stats import Stats, snapshot

TOKEN = "s3cret-token-0123456789"
AUTH = f"Bearer {TOKEN}"


def conf(weights: dict[str, int] | None = None, token: str | None = TOKEN, scheduler: str = "wrr") -> Config:
    weights = weights or {"one": 1, "two": 1, "three": 2}
    lines = [
        '[frontends.web]\nlisten_addr = "127.0.0.1:8080"\nbackend = "web"',
        f'[backends.web]\nscheduler = "{scheduler}"',
    ]
    for i, (name, weight) in enumerate(weights.items(), 1):
        lines.append(f'[backends.web.servers.{name}]\naddr = "10.0.0.{i}:80"\nweight = {weight}')
    lines.append("[stats]\nport = 9000")
    if token is not None:
        lines.append(f'api_token = "{token}"')
    return parse_config("\n".join(lines))


class Box:
    """What an engine holds, for Sources."""

    def __init__(self, config: Config) -> None:
        self.config = config
        self.pools = {name: Pool(b, "proxy") for name, b in config.backends.items()}

    def control(self) -> Control:
        return Control(Sources("proxy", lambda: self.pools, lambda: self.config, lambda query: ([], 0)))

    def reload(self, config: Config) -> None:
        self.config = config
        for name, b in config.backends.items():
            self.pools[name].update(b)


def call(
    control: Control, method: str, path: str, body: Any = None, auth: str | None = AUTH
) -> tuple[int, Any]:
    raw = body if isinstance(body, bytes) else b"" if body is None else json.dumps(body).encode()
    status, doc = control.handle(Request(method, path, {}, auth, raw, "127.0.0.1"))
    json.dumps(doc)  # always JSON-able
    return status, doc


def state(box: Box) -> Any:
    return copy.deepcopy(call(box.control(), "GET", "/api/backends")[1])


def picks(pool: Pool, n: int = 40) -> Counter[str]:
    return Counter(s.name if s else "-" for s in (pool.pick(i) for i in range(n)))


def test_backends_document_has_the_contract_shape() -> None:
    box = Box(conf())
    status, doc = call(box.control(), "GET", "/api/backends", auth=None)
    assert status == 200 and doc["read_only"] is False
    one = doc["backends"]["web"]["servers"]["one"]
    assert doc["backends"]["web"]["scheduler"] == "wrr"
    assert {k: one[k] for k in ("address", "weight", "configured_weight", "state", "healthy", "overlay")} == {
        "address": "10.0.0.1:80",
        "weight": 1,
        "configured_weight": 1,
        "state": "up",
        "healthy": True,
        "overlay": None,
    }


def test_weight_drain_maintenance_ready() -> None:
    box = Box(conf())
    control = box.control()
    pool = box.pools["web"]
    status, entry = call(control, "PUT", "/api/servers/web/one/weight", {"weight": 5})
    assert status == 200 and entry["weight"] == 5 and entry["configured_weight"] == 1
    assert entry["overlay"] == {"weight": 5, "admin": None}
    assert picks(pool, 80) == Counter({"one": 50, "two": 10, "three": 20})
    status, entry = call(control, "POST", "/api/servers/web/two/drain")
    assert status == 200 and entry["state"] == "draining" and entry["overlay"]["admin"] == "drain"
    assert "two" not in picks(pool)
    status, entry = call(control, "POST", "/api/servers/web/three/maintenance")
    assert entry["state"] == "maintenance" and set(picks(pool)) == {"one"}
    status, entry = call(control, "POST", "/api/servers/web/three/ready")
    assert status == 200 and entry["state"] == "up" and entry["overlay"] is None
    status, entry = call(control, "POST", "/api/servers/web/two/ready")
    assert entry["overlay"] is None and set(picks(pool)) == {"one", "two", "three"}
    assert (
        call(control, "GET", "/api/backends")[1]["backends"]["web"]["servers"]["one"]["overlay"]["weight"]
        == 5
    )
    status, entry = call(control, "PUT", "/api/servers/web/one/weight", {"weight": 1})
    assert entry["weight"] == 1


def test_no_token_configured_is_read_only() -> None:
    box = Box(conf(token=None))
    before = state(box)
    assert before["read_only"] is True
    status, doc = call(box.control(), "POST", "/api/servers/web/one/drain")
    assert (status, doc) == (403, {"error": "read-only: no [stats] api_token configured"})
    assert state(box) == before


@pytest.mark.parametrize(
    "auth", [None, "", "Bearer wrong-token-0123456789", TOKEN, f"Basic {TOKEN}", "Bearer"]
)
def test_a_wrong_or_missing_token_is_401_and_logged_without_the_token(
    auth: str | None, caplog: pytest.LogCaptureFixture
) -> None:
    box = Box(conf())
    before = state(box)
    with caplog.at_level(logging.WARNING, logger="convey.control"):
        status, doc = call(box.control(), "PUT", "/api/servers/web/one/weight", {"weight": 3}, auth=auth)
    assert status == 401 and "unauthorized" in doc["error"]
    assert state(box) == before
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "event=api_unauthorized" in warnings[0].getMessage()
    assert TOKEN not in caplog.text and "wrong-token" not in caplog.text


@pytest.mark.parametrize(
    ("path", "body", "field"),
    [
        ("/api/servers/web/one/weight", b"{not json", "body"),
        ("/api/servers/web/one/weight", b"\xff\xfe", "body"),
        ("/api/servers/web/one/weight", [], "body"),
        ("/api/servers/web/one/weight", {}, "weight"),
        ("/api/servers/web/one/weight", {"weight": "3"}, "weight"),
        ("/api/servers/web/one/weight", {"weight": True}, "weight"),
        ("/api/servers/web/one/weight", {"weight": 2.5}, "weight"),
        ("/api/servers/web/one/weight", {"weight": -1}, "weight"),
        ("/api/servers/web/one/weight", {"weight": 1_000_001}, "weight"),
        ("/api/servers/web/one/weight", {"weight": 2, "extra": 1}, "extra"),
        ("/api/servers/nope/one/weight", {"weight": 2}, "backend"),
        ("/api/servers/web/nope/weight", {"weight": 2}, "server"),
        ("/api/servers/web/nope/drain", None, "server"),
        ("/api/servers/<b>/one/drain", None, "backend"),
    ],
)
def test_bad_input_is_400_naming_the_field_and_changes_nothing(path: str, body: Any, field: str) -> None:
    box = Box(conf())
    before = state(box)
    method = "PUT" if path.endswith("weight") else "POST"
    status, doc = call(box.control(), method, path, body)
    assert status == 400 and doc["field"] == field and doc["error"]
    assert state(box) == before


def test_unknown_routes_and_methods() -> None:
    control = Box(conf()).control()
    assert call(control, "GET", "/api/nothing")[0] == 404
    assert call(control, "POST", "/api/servers/web/one/explode")[0] == 404
    assert call(control, "POST", "/api/servers/web/one/weight", {"weight": 1})[0] == 405
    assert call(control, "GET", "/api/servers/web/one/drain")[0] == 405
    assert call(control, "DELETE", "/api/backends")[0] == 405


REQUESTS = st.tuples(
    st.sampled_from(["GET", "PUT", "POST", "DELETE"]),
    st.sampled_from(["web", "nope", "", "w%2feb"]),
    st.sampled_from(["one", "two", "nope", ""]),
    st.sampled_from(["weight", "drain", "maintenance", "ready", "bogus"]),
    st.one_of(
        st.none(),
        st.binary(max_size=20),
        st.fixed_dictionaries(
            {"weight": st.one_of(st.integers(-5, 2_000_000), st.text(max_size=3), st.booleans())}
        ),
    ),
    st.sampled_from([AUTH, None, "Bearer nope"]),
)


@settings(max_examples=300, deadline=None)
@given(st.lists(REQUESTS, max_size=12))
def test_a_failed_request_never_changes_state(requests: list[tuple[Any, ...]]) -> None:
    box = Box(conf())
    control = box.control()
    for method, backend, server, action, body, auth in requests:
        before = state(box)
        status, doc = call(control, method, f"/api/servers/{backend}/{server}/{action}", body, auth)
        if status != 200:
            assert state(box) == before and "error" in doc
        else:
            assert doc == state(box)["backends"][backend]["servers"][server]


def test_reload_keeps_the_overlay_and_a_changed_file_weight_clears_the_weight_overlay() -> None:
    box = Box(conf())
    control = box.control()
    call(control, "PUT", "/api/servers/web/one/weight", {"weight": 7})
    call(control, "PUT", "/api/servers/web/two/weight", {"weight": 9})
    call(control, "POST", "/api/servers/web/two/drain")
    call(control, "POST", "/api/servers/web/three/maintenance")
    box.reload(conf({"one": 1, "two": 4, "three": 2}))  # two's file weight changes; one's and three's do not
    servers = state(box)["backends"]["web"]["servers"]
    assert servers["one"]["weight"] == 7 and servers["one"]["overlay"] == {"weight": 7, "admin": None}
    assert servers["two"]["weight"] == 4 and servers["two"]["overlay"] == {"weight": None, "admin": "drain"}
    assert servers["three"]["state"] == "maintenance"
    box.reload(conf({"one": 1, "two": 4}))  # three leaves the config: its overlay goes with it
    box.reload(conf({"one": 1, "two": 4, "three": 2}))
    assert state(box)["backends"]["web"]["servers"]["three"] == {
        "address": "10.0.0.3:80",
        "weight": 2,
        "configured_weight": 2,
        "state": "up",
        "healthy": True,
        "active": 0,
        "overlay": None,
    }


def test_the_overlay_shows_in_stats() -> None:
    box = Box(conf())
    call(box.control(), "PUT", "/api/servers/web/one/weight", {"weight": 3})
    call(box.control(), "POST", "/api/servers/web/two/drain")
    stats = Stats(mode="proxy", started=0.0)
    stats.sections["runtime"] = lambda: overlay_section(box.pools)
    doc = snapshot(stats, box.pools, {"web": "web"}, 1.0)
    assert doc["runtime"]["overlay"] == {
        "web/one": {"weight": 3, "admin": None},
        "web/two": {"weight": None, "admin": "drain"},
    }
    detail = doc["backends"]["web"]["server_detail"]
    assert (detail["one"]["weight"], detail["two"]["state"]) == (3, "draining")


def test_config_doc_is_served() -> None:
    status, doc = call(Box(conf()).control(), "GET", "/api/config", auth=None)
    assert status == 200 and doc["backends"]["web"]["servers"]["three"] == {
        "addr": "10.0.0.3:80",
        "weight": 2,
    }
    assert doc["frontends"]["web"] == {"listen_addr": "127.0.0.1:8080", "backend": "web"}


def test_authorized_header_forms() -> None:
    assert authorized(f"Bearer {TOKEN}", TOKEN) and authorized(f"bearer  {TOKEN} ", TOKEN)
    assert not authorized(None, TOKEN) and not authorized(TOKEN, TOKEN) and not authorized("Bearer é", TOKEN)


BASE = '[frontends.f]\nlisten_addr = "127.0.0.1:80"\nbackend = "b"\n[backends.b.servers.a]\naddr = "10.0.0.1:80"\n'


def test_token_settings(tmp_path: Path) -> None:
    path = tmp_path / "token"
    path.write_text(TOKEN + "\n")
    config = parse_config(BASE + f'[stats]\napi_token_file = "{path}"')
    assert config.stats.api_token == TOKEN and config.stats.api_token_file == str(path)
    assert TOKEN not in repr(config)
    assert parse_config(BASE + f'[stats]\napi_token = "{TOKEN}"').stats.api_token == TOKEN
    assert parse_config(BASE).stats.api_token is None


@pytest.mark.parametrize(
    ("stats", "key"),
    [
        ('api_token = "short"', "stats.api_token"),
        ("api_token = 12345678901234567890", "stats.api_token"),
        ('api_token = "has a space in the token"', "stats.api_token"),
        ('api_token_file = "/nonexistent/token"', "stats.api_token_file"),
        (f'api_token = "{TOKEN}"\napi_token_file = "/x"', "stats.api_token_file"),
    ],
)
def test_bad_token_settings_name_the_key(stats: str, key: str) -> None:
    with pytest.raises(ConfigError) as info:
        parse_config(BASE + "[stats]\n" + stats)
    assert info.value.key == key and TOKEN not in str(info.value)


def test_the_routes_on_the_stats_service() -> None:
    """Through HTTP on loopback: status codes, JSON answers, the body limit; /stats and /metrics still there."""
    import urllib.error
    import urllib.request

    from convey.web import StatsServer

    box = Box(conf())
    server = StatsServer(
        "127.0.0.1", 0, lambda: snapshot(Stats("proxy", 0.0), box.pools, {}, 1.0), box.control()
    )
    server.start()
    base = f"http://127.0.0.1:{server.port}"

    def http(method: str, path: str, body: bytes | None = None, auth: str | None = AUTH) -> tuple[int, Any]:
        req = urllib.request.Request(base + path, data=body, method=method)
        if auth:
            req.add_header("Authorization", auth)
        try:
            with urllib.request.urlopen(req, timeout=5) as answer:
                assert answer.headers["Content-Type"].startswith("application/json")
                return answer.status, json.loads(answer.read())
        except urllib.error.HTTPError as exc:
            assert exc.headers["Content-Type"].startswith("application/json")
            return exc.code, json.loads(exc.read())

    try:
        assert http("GET", "/api/backends")[1]["backends"]["web"]["servers"]["one"]["state"] == "up"
        status, entry = http("PUT", "/api/servers/web/one/weight", b'{"weight": 4}')
        assert (status, entry["weight"]) == (200, 4)
        assert http("POST", "/api/servers/web/one/drain", b"")[1]["state"] == "draining"
        assert http("POST", "/api/servers/web/one/drain", b"", auth="Bearer x" * 3)[0] == 401
        assert http("PUT", "/api/servers/web/one/weight", b" " * 70_000)[1]["field"] == "body"
        assert http("GET", "/api/servers/web/one/weight")[0] == 405
        assert http("GET", "/api/nothing")[0] == 404
        assert http("GET", "/flows?limit=5") == (200, {"flows": [], "total": 0, "shown": 0})
        assert http("GET", "/flows?limit=none")[0] == 400
        assert http("GET", "/stats")[1]["backends"]["web"]["server_detail"]["one"]["weight"] == 4
    finally:
        server.stop()
