"""The stats page in a real headless Chromium: rendered DOM and a PNG screenshot checked
pixel by pixel (size, not blank, the health colours of an up and a down task).

Needs Debian's chromium (`apt-get install chromium`; .ci/run installs it). Skipped when
no Chromium binary is on PATH."""
import shutil
import subprocess
import tempfile

import pytest

from support.png import colours, read_png

BROWSER = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")
pytestmark = pytest.mark.skipif(BROWSER is None, reason="no Chromium on PATH (apt-get install chromium)")

WIDTH, HEIGHT = 1200, 900
HEADER_BLUE = (0x2B, 0x4A, 0x6F)  # table headers (statspage._STYLE)
UP_GREEN = (0x66, 0xCC, 0x66)
DOWN_RED = (0xEE, 0x55, 0x55)


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
