"""The live page in a real browser: headless Chromium driven over the Chrome DevTools Protocol (a websocket, no
Selenium, no Playwright), against a real `convey` in proxy mode on loopback with real traffic.

It checks what an operator sees: the numbers change in place as traffic flows (no reload), rates appear, nothing is
raw JSON, a name with markup stays text, the page fits a 390-px phone, and a drain clicked on the page reaches the
runtime API and comes back as the server's state. Screenshots land in the test's tmp_path.
"""

from __future__ import annotations

import base64
import contextlib
import itertools
import json
import shutil
import subprocess
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from convey.page import render_page
from tests.e2e.conftest import Convey, HttpServer, free_port, http_get, stats, wait_for
from tests.unit.test_metrics import passthrough_doc

CHROMIUM = (
    shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("chromium-headless-shell")
)
pytestmark = [
    pytest.mark.skipif(CHROMIUM is None, reason="chromium is not installed (scripts/install-system-deps.sh)"),
    pytest.mark.timeout(120),
]
TOKEN = "page-test-token-0123456789"


class Browser:
    """One headless Chromium and a websocket to its one page target."""

    def __init__(self, profile: Path) -> None:
        import websocket  # websocket-client, a test dependency

        self.proc = subprocess.Popen(
            [
                str(CHROMIUM),
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-quic",
                "--no-first-run",
                "--disable-background-networking",
                "--disable-component-update",
                "--disable-sync",
                "--disable-dev-shm-usage",
                "--remote-debugging-port=0",
                f"--user-data-dir={profile}",
                "about:blank",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        port_file = profile / "DevToolsActivePort"
        port = wait_for(lambda: port_file.is_file() and port_file.read_text().split("\n")[0], 30, "chromium")
        targets = wait_for(lambda: self._pages(int(port)), 10, "chromium's page target")
        self.ws = websocket.create_connection(
            targets[0]["webSocketDebuggerUrl"], timeout=15, suppress_origin=True
        )
        self._ids = itertools.count(1)

    @staticmethod
    def _pages(port: int) -> list[dict[str, Any]]:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=5) as resp:
            return [t for t in json.load(resp) if t.get("type") == "page"]

    def send(self, method: str, **params: Any) -> dict[str, Any]:
        ident = next(self._ids)
        self.ws.send(json.dumps({"id": ident, "method": method, "params": params}))
        while True:  # events arrive in between; only our answer matters
            msg = json.loads(self.ws.recv())
            if msg.get("id") == ident:
                assert "error" not in msg, f"{method}: {msg['error']}"
                return dict(msg.get("result", {}))

    def eval(self, expression: str) -> Any:
        result = self.send("Runtime.evaluate", expression=expression, returnByValue=True, awaitPromise=True)
        assert "exceptionDetails" not in result, f"{expression}: {result['exceptionDetails']}"
        return result["result"].get("value")

    def open(self, url: str, width: int = 1280, height: int = 900) -> None:
        self.size(width, height)
        self.send("Page.navigate", url=url)
        wait_for(lambda: self.eval("document.readyState") == "complete", 10, f"{url} to load")

    def size(self, width: int, height: int) -> None:
        self.send(
            "Emulation.setDeviceMetricsOverride",
            width=width,
            height=height,
            deviceScaleFactor=1,
            mobile=width < 600,
        )

    def click(self, selector: str) -> None:
        """A real mouse click in the middle of the element (it must be visible, not covered)."""
        found = json.dumps(selector)
        box = self.eval(
            f"(() => {{ const e = document.querySelector({found}); if (!e) return null;"
            " e.scrollIntoView({block: 'center', inline: 'center'}); const r = e.getBoundingClientRect();"
            " const x = r.x + r.width / 2, y = r.y + r.height / 2;"
            " return document.elementFromPoint(x, y) === e && r.width > 0 ? [x, y] : null; })()"
        )
        assert box, f"{selector} is not visible to click"
        for kind in ("mousePressed", "mouseReleased"):
            self.send("Input.dispatchMouseEvent", type=kind, x=box[0], y=box[1], button="left", clickCount=1)

    def screenshot(self, path: Path) -> Path:
        data = self.send("Page.captureScreenshot", format="png", captureBeyondViewport=True)["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.ws.close()
        self.proc.kill()
        self.proc.wait(10)


@pytest.fixture
def browser(tmp_path: Path) -> Iterator[Browser]:
    profile = tmp_path / "chromium-profile"
    profile.mkdir()
    b = Browser(profile)
    try:
        yield b
    finally:
        b.close()


def write_config(
    path: Path, servers: dict[str, str], port: int, sport: int, token: str | None = TOKEN
) -> Path:
    lines = ["[frontends.web]", f'listen_addr = "127.0.0.1:{port}"', 'backend = "pool"', "[backends.pool]"]
    lines += ["health_check_interval = 0.2", "rise = 1", "fall = 2"]
    for name, addr in servers.items():
        lines += [f"[backends.pool.servers.{name}]", f'addr = "{addr}"', "weight = 1"]
    lines += ["[stats]", f'port = "{sport}"'] + ([f'api_token = "{token}"'] if token else [])
    path.write_text("\n".join(lines) + "\n")
    return path


def text(b: Browser, selector: str) -> str:
    return str(b.eval(f"(document.querySelector({json.dumps(selector)}) || {{}}).textContent || ''"))


def traffic(vip: str, count: int, seconds: float) -> threading.Thread:
    """``count`` requests spread over about ``seconds`` (bounded in both), in the background."""

    def run() -> None:
        deadline = time.monotonic() + seconds * 3
        for _ in range(count):
            if time.monotonic() > deadline:
                break
            http_get(vip)
            time.sleep(seconds / count)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def test_live_page_in_chromium(
    tmp_path: Path,
    servers: Callable[..., HttpServer],
    convey_proc: Callable[..., Convey],
    browser: Browser,
) -> None:
    a, b = servers("a"), servers("b")
    port, sport = free_port(), free_port()
    convey_proc(write_config(tmp_path / "c.toml", {"a": a.addr, "b": b.addr}, port, sport))
    wait_for(lambda: all(stats(sport)["backends"]["pool"]["servers"].values()), 10, "both servers up")
    browser.open(f"http://127.0.0.1:{sport}/")
    assert browser.eval("document.title") == "convey (proxy mode)"
    assert text(browser, "#card-total .v") == "0"
    assert text(browser, 'tr[data-key="pool/a"] .state') == "up"
    assert browser.eval("document.querySelector('.state-up') !== null")
    browser.eval("window.__marker = 42")  # survives only if the page never reloads

    # traffic: the numbers change in place, a rate shows while it flows
    requests = 40
    load = traffic(f"127.0.0.1:{port}", requests, 4.0)
    wait_for(
        lambda: text(browser, "#card-conn-rate .v") not in ("0", "\u2013", ""), 10, "a connections/s rate"
    )
    assert text(browser, "#card-rx-rate .v").endswith("bit/s")
    load.join(30)
    wait_for(
        lambda: text(browser, "#card-total .v") == str(requests), 10, f"{requests} connections on the page"
    )
    frontend_total = browser.eval(
        "document.querySelector('#frontends tr[data-key=\"web\"]').cells[4].textContent"
    )
    assert frontend_total == str(requests)
    assert browser.eval("window.__marker") == 42
    body = str(browser.eval("document.body.innerText"))
    assert '{"' not in body and "[object" not in body  # tables, never raw JSON
    assert "proxy.frontends" in body and "health" in body  # the other sections, as tables
    browser.screenshot(tmp_path / "page-desktop.png")

    # phone width: nothing cut off at 390 px (wide tables scroll inside their own box)
    browser.size(390, 844)
    wait_for(lambda: browser.eval("window.innerWidth") == 390, 5, "a 390-px viewport")
    widths = browser.eval("[document.documentElement.scrollWidth, document.body.scrollWidth]")
    assert max(widths) <= 390, widths
    browser.screenshot(tmp_path / "page-390.png")
    browser.size(1280, 900)

    # runtime actions: the token is asked for, kept in sessionStorage, and a drain click changes the state
    wait_for(lambda: browser.eval("!document.getElementById('token-form').hidden"), 10, "the token form")
    assert not browser.eval("document.body.classList.contains('api-on')")  # no actions before a token
    browser.eval(f"document.getElementById('token').value = {json.dumps(TOKEN)}")
    browser.click("#token-form button")
    wait_for(lambda: browser.eval("document.body.classList.contains('api-on')"), 10, "the actions")
    assert browser.eval("document.getElementById('token-form').offsetParent === null")  # the form is gone
    assert browser.eval("sessionStorage.getItem('convey-api-token')") == TOKEN
    browser.click('tr[data-key="pool/a"] button[data-action="drain"]')
    wait_for(
        lambda: text(browser, 'tr[data-key="pool/a"] .state') == "draining", 10, "a draining on the page"
    )
    assert stats(sport)["backends"]["pool"]["server_detail"]["a"]["state"] == "draining"
    assert 'convey_server_state{backend="pool",server="a",state="draining"} 1.0' in stats(sport, "/metrics")
    assert text(browser, 'tr[data-key="pool/b"] .state') == "up"
    browser.screenshot(tmp_path / "page-drained.png")
    browser.click('tr[data-key="pool/a"] button[data-action="ready"]')
    wait_for(lambda: text(browser, 'tr[data-key="pool/a"] .state') == "up", 10, "a up again on the page")
    browser.eval("document.querySelector('tr[data-key=\"pool/b\"] input').value = '5'")
    updated = text(browser, "#status-text")
    wait_for(lambda: text(browser, "#status-text") != updated, 10, "a refresh")  # rows are updated in place:
    assert browser.eval("document.querySelector('tr[data-key=\"pool/b\"] input').value") == "5"  # input kept
    browser.click('tr[data-key="pool/b"] button[data-action="weight"]')
    weight = 'tr[data-key="pool/b"] td:nth-child(5)'
    wait_for(lambda: text(browser, weight) == "5 (file 1)", 10, "b's weight on the page")
    assert stats(sport)["backends"]["pool"]["server_detail"]["b"]["weight"] == 5


def test_without_a_token_the_page_says_read_only(
    tmp_path: Path, servers: Callable[..., HttpServer], convey_proc: Callable[..., Convey], browser: Browser
) -> None:
    a = servers("a")
    port, sport = free_port(), free_port()
    lb = convey_proc(write_config(tmp_path / "c.toml", {"a": a.addr}, port, sport, token=None))
    wait_for(lambda: stats(sport), 10, "the stats service")
    browser.open(f"http://127.0.0.1:{sport}/")
    wait_for(lambda: "read-only" in text(browser, "#api-note"), 10, "the read-only note")
    assert browser.eval("document.getElementById('token-form').offsetParent === null")
    assert browser.eval("document.querySelector('button[data-action=\"drain\"]').offsetParent === null")
    lb.stop()  # the page says so when the stats service goes away
    wait_for(lambda: "unreachable" in text(browser, "#status-text"), 10, "the page to notice convey stopped")
    assert browser.eval("document.getElementById('live').className") == "dot stale"


def test_packet_sections_as_tables_and_names_as_text(tmp_path: Path, browser: Browser) -> None:
    """A passthrough document with two workers (built as tests/unit/test_metrics.py builds it), loaded from a
    file: every section is a table, and markup in a name (impossible in a valid config today) stays text."""
    evil = '<img src=x onerror="window.__pwned=1"></script><b>'
    doc = passthrough_doc(offload=True)
    doc["frontends"][evil] = doc["frontends"].pop("web")
    doc["offload"]["open_per_server"][evil] = 1
    page = tmp_path / "page.html"
    page.write_text(render_page(doc))
    browser.open(page.as_uri())
    assert browser.eval("document.querySelector('#frontends tbody td').textContent") == evil
    assert browser.eval("document.querySelectorAll('img, b').length") == 0
    assert browser.eval("window.__pwned === undefined")
    for table in (
        "sec-packet",
        "sec-packet-verdicts",
        "sec-packet-queue",
        "sec-offload-monitor",
        "sec-workers",
    ):
        assert browser.eval(f"document.getElementById('{table}').rows.length > 1"), table
    per_worker = '#sec-workers-sections tr[data-key="packet.verdicts.ingress_accepted"]'
    assert (
        text(browser, per_worker + " td:nth-child(2)")
        == text(browser, per_worker + " td:nth-child(3)")
        == "10"
    )
    no_server = browser.eval(
        "document.querySelector('#sec-packet-verdicts tr[data-key=\"no_server\"]').innerText"
    )
    assert no_server.split("\t")[:2] == ["no_server", "1"]
    body = str(browser.eval("document.body.innerText"))
    assert '{"' not in body and "[object" not in body
    browser.size(390, 844)
    wait_for(lambda: browser.eval("window.innerWidth") == 390, 5, "a 390-px viewport")
    assert max(browser.eval("[document.documentElement.scrollWidth, document.body.scrollWidth]")) <= 390
    browser.size(1280, 900)
    browser.screenshot(tmp_path / "page-passthrough.png")
