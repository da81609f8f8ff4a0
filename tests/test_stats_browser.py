"""The stats page in a real headless Chromium: rendered DOM and a PNG screenshot checked
pixel by pixel (size, not blank, the health colours of an up and a down task); after
known traffic, the latency percentiles and the SVG charts as rendered, the live refresh
(an open page driven over the DevTools protocol shows requests made after it loaded),
and a screenshot kept in the artifacts directory (conftest.py `artifacts`:
build/test-artifacts/<test>/ unless PYROUTE_TEST_ARTIFACTS names another root).

Needs Debian's chromium (`apt-get install chromium`; .ci/run installs it). Skipped when
no Chromium binary is on PATH."""
import contextlib
import json
import re
import shutil
import subprocess
import tempfile
import urllib.request

import websockets.sync.client

import pytest

from support.png import colours, read_png
from support.upstream import wait_until

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")

WIDTH, HEIGHT = 1200, 900
HEADER_BLUE = (0x2B, 0x4A, 0x6F)  # table headers (statspage._STYLE)
UP_GREEN = (0x66, 0xCC, 0x66)
DOWN_RED = (0xEE, 0x55, 0x55)
RATE_BLUE, ERROR_RED, P99_ORANGE = (0x2B, 0x6F, 0xB0), (0xDD, 0x33, 0x33), (0xE0, 0x88, 0x00)  # statspage.CHART_COLOURS
SLOW = 0.05  # seconds the slow requests take upstream


def chromium(url: str, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="pyroute-chromium-") as profile:
        return subprocess.run(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             "--disable-dev-shm-usage", f"--user-data-dir={profile}", f"--window-size={WIDTH},{HEIGHT}", *args, url],
            capture_output=True, timeout=90, cwd=profile)


def test_stats_page_in_chromium(make_pyroute, dns, replicas, tmp_path):
    up = replicas[2]
    dns.set_service("br-live", up.ip)
    dns.set_service("br-dead", "127.0.0.99")
    p = make_pyroute(STATS_USER="none", STATS_PASS="none")
    p.reconfigure(serviceName="br-live", servicePath="/live", port=up.port)
    p.reconfigure(serviceName="br-dead", servicePath="/dead", port=up.port)
    for _ in range(3):
        assert p.get("/live/hello")[0] == 200
    assert p.get("/dead/x")[0] == 503
    url = p.url("/admin?stats")

    dom = chromium(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout.decode()
    assert "<h1>pyroute stats</h1>" in html and "br-live" in html and "br-dead" in html
    assert f"{up.ip}:{up.port}" in html and 'http-equiv="refresh"' in html

    shot = tmp_path / "stats.png"
    run = chromium(url, f"--screenshot={shot}")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    width, height, rows = read_png(shot.read_bytes())
    assert (width, height) == (WIDTH, HEIGHT)
    seen = colours(rows)
    assert len(seen) > 20, "the screenshot is (nearly) blank"
    assert seen.get(HEADER_BLUE, 0) > 1000, "no table header in the screenshot"
    assert seen.get(UP_GREEN, 0) > 100, "no 'up' task cell in the screenshot"
    assert seen.get(DOWN_RED, 0) > 100, "no 'down' task cell in the screenshot"


def _row(html: str, name: str) -> str:
    """The recent-traffic table's row for a service or task, as Chromium rendered it."""
    match = re.search(r'<tr class="(?:service|task)" data-name="' + re.escape(name) + r'">(.*?)</tr>', html, re.S)
    assert match, f"no row for {name} in the rendered page"
    return match.group(1)


def _rendered_ms(row: str, which: str) -> float:
    return float(re.search(rf'<td class="num {which}" data-ms="([\d.]+)">≤?[\d.]+ m?s</td>', row).group(1))


def test_latency_and_charts_after_known_traffic(make_pyroute, dns, replicas, artifacts):
    """24 fast requests (4 of them 503 from the upstream) and 6 that take SLOW seconds:
    p95 and p99 at least SLOW, the counts and rates as sent, three charts per service drawn."""
    up = replicas[0]
    dns.set_service("br-lat", up.ip)
    p = make_pyroute(STATS_USER="none", STATS_PASS="none")
    p.reconfigure(serviceName="br-lat", servicePath="/lat", port=up.port)
    for _ in range(20):
        assert p.get("/lat/hello")[0] == 200
    for _ in range(4):
        assert p.get("/lat/status/503")[0] == 503
    for _ in range(6):
        assert p.get(f"/lat/slow/{SLOW}")[0] == 200
    url = p.url("/admin?stats")

    st, _, body = p.get("/admin?stats;data")
    data = json.loads(body)["services"]["br-lat"]
    assert st == 200 and data["requests_minute"] == 30
    assert round(sum(data["request_rate"]) * data["slot_seconds"]) == 30
    assert round(sum(data["error_rate"]) * data["slot_seconds"]) == 4
    task = data["tasks"][f"{up.ip}:{up.port}"]
    assert task["requests_minute"] == 30 and task["health"] == "up"

    dom = chromium(url, "--dump-dom")
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = dom.stdout.decode()
    for name in ("br-lat", f"{up.ip}:{up.port}"):
        row = _row(html, name)
        p50, p95, p99 = (_rendered_ms(row, k) for k in ("p50", "p95", "p99"))
        assert 0 < p50 <= p95 <= p99 and p95 >= SLOW * 1000 * 0.95, (name, p50, p95, p99)  # (buckets: +-4.5%)
        assert '<td class="num minute">30</td>' in row
        peaks = dict(re.findall(r'<svg class="bars (\w+)" data-peak="([\d.]+)"', row))
        assert float(peaks["request_rate"]) == max(data["request_rate"]) > 0
        assert float(peaks["p99_ms_by_slot"]) >= SLOW * 1000 * 0.95
        assert float(peaks["error_rate"]) == max(data["error_rate"]) > 0  # (the service's 5xx all came from its one task)
        assert row.count("<rect ") >= 2

    shot = artifacts / "stats-latency.png"
    run = chromium(url, f"--screenshot={shot}")
    assert run.returncode == 0 and shot.exists(), run.stderr[-2000:]
    width, height, rows = read_png(shot.read_bytes())
    seen = colours(rows)
    assert seen.get(RATE_BLUE, 0) >= 20, "no request-rate bars in the screenshot"
    assert seen.get(ERROR_RED, 0) >= 10, "no error-rate bars in the screenshot"
    assert seen.get(P99_ORANGE, 0) >= 20, "no p99 bars in the screenshot"


class DevTools:
    """A headless Chromium showing `url`, driven over the DevTools protocol (websockets)."""

    def __init__(self, url: str):
        self.profile = tempfile.TemporaryDirectory(prefix="pyroute-chromium-")
        self.proc = subprocess.Popen(
            [BROWSER, "--headless", "--no-sandbox", "--disable-gpu", "--no-first-run", "--disable-sync",
             "--disable-background-networking", "--disable-component-update", "--disable-dev-shm-usage",
             "--remote-debugging-port=0", f"--user-data-dir={self.profile.name}", url],
            stderr=subprocess.PIPE, stdout=subprocess.DEVNULL)
        for line in self.proc.stderr:  # "DevTools listening on ws://127.0.0.1:PORT/devtools/browser/..."
            found = re.search(rb"ws://127\.0\.0\.1:(\d+)/", line)
            if found:
                break
        else:
            raise AssertionError("Chromium gave no DevTools address")
        port = int(found.group(1))
        pages = wait_until(lambda: [t for t in json.loads(urllib.request.urlopen(
            f"http://127.0.0.1:{port}/json/list", timeout=5).read()) if t["type"] == "page"], what="a page target")
        self.closing = contextlib.ExitStack()
        self.socket = self.closing.enter_context(
            websockets.sync.client.connect(pages[0]["webSocketDebuggerUrl"], max_size=None))
        self.calls = 0

    def evaluate(self, expression: str):
        self.calls += 1
        self.socket.send(json.dumps({"id": self.calls, "method": "Runtime.evaluate",
                                     "params": {"expression": expression, "returnByValue": True}}))
        while True:
            answer = json.loads(self.socket.recv(timeout=10))
            if answer.get("id") == self.calls:
                return answer["result"]["result"].get("value")

    def close(self) -> None:
        self.closing.close()
        self.proc.terminate()
        self.proc.wait(timeout=10)
        self.profile.cleanup()


def test_stats_page_refreshes_itself_with_new_traffic(make_pyroute, dns, replicas):
    """The open page (no reload: the inline script swaps its live part in) shows requests made
    after it was loaded."""
    up = replicas[1]
    dns.set_service("br-refresh", up.ip)
    p = make_pyroute(STATS_USER="none", STATS_PASS="none")
    p.reconfigure(serviceName="br-refresh", servicePath="/r", port=up.port)
    assert p.get("/r/hello")[0] == 200
    browser = DevTools(p.url("/admin?stats"))
    try:
        minute = """(document.querySelector('tr.service[data-name="br-refresh"] td.minute') || {}).textContent"""
        wait_until(lambda: browser.evaluate(minute) == "1", timeout=15, what="the page with the first request")
        browser.evaluate("window.loadedOnce = true")  # gone if the page were reloaded instead of updated
        for _ in range(5):
            assert p.get("/r/hello")[0] == 200
        wait_until(lambda: browser.evaluate(minute) == "6", timeout=20, what="the page showing the new requests")
        assert browser.evaluate("window.loadedOnce") is True
        assert int(browser.evaluate("document.body.dataset.refreshed")) >= 1
    finally:
        browser.close()
