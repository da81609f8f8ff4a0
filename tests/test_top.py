"""`pyroute top` in a real terminal: tmux runs it against a real pyroute with known traffic,
and the test reads the screen (capture-pane) as a person would."""
import re
import shlex
import shutil
import subprocess
import sys
import threading

import pytest

from support.proxy import REPO, register
from support.upstream import wait_until

pytestmark = pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")


class Terminal:
    """A detached tmux session on a private server, 120x30, running one command."""

    def __init__(self, name: str, command: list[str]):
        self.tmux = ["tmux", "-L", f"pyroute-test-{name}"]
        # The shell says how the command ended and keeps the pane, so the screen can say it too.
        shell = f"{shlex.join(command)}; echo \"exited $?\"; exec sleep 600"
        subprocess.run([*self.tmux, "-f", "/dev/null", "new-session", "-d", "-x", "120", "-y", "30", "-s", "t",
                        "sh", "-c", shell], check=True, env={"PATH": "/usr/bin:/bin", "TERM": "xterm-256color", "PYTHONPATH": str(REPO)})

    def screen(self) -> str:
        return subprocess.run([*self.tmux, "capture-pane", "-p", "-t", "t"], capture_output=True, text=True,
                              check=True).stdout

    def wait(self, cond, what: str, timeout: float = 20.0):
        """cond(screen)'s first truthy answer; on time out, fail showing the last screen."""
        last = [""]

        def check():
            last[0] = self.screen()
            return cond(last[0])
        try:
            return wait_until(check, timeout=timeout, what=what)
        except AssertionError as exc:
            raise AssertionError(f"{exc}; the screen:\n{last[0]}") from None

    def keys(self, *keys: str) -> None:
        subprocess.run([*self.tmux, "send-keys", "-t", "t", *keys], check=True)

    def close(self) -> None:
        subprocess.run([*self.tmux, "kill-server"], capture_output=True)


def row(screen: str, first: str) -> list[str] | None:
    """The screen's table row whose first column is `first`: that, then the other columns' words."""
    return next(([first, *line[len(first):].split()] for line in screen.splitlines()
                 if line.startswith(first + " ")), None)


class Traffic(threading.Thread):
    """Requests to each path in turn until stopped, counting what was sent."""

    def __init__(self, proxy, paths: list[str]):
        super().__init__(daemon=True)
        self.proxy, self.paths = proxy, paths
        self.sent = dict.fromkeys(paths, 0)
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.wait(0.01):  # a steady trickle, not a benchmark
            for path in self.paths:
                self.proxy.get(path)
                self.sent[path] += 1

    def stop(self) -> dict[str, int]:
        self.stopping.set()
        self.join()
        return self.sent


def test_top_shows_routes_rates_p99_and_task_health(make_pyroute, dns, replicas):
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="pw")
    register(p, dns, replicas[0], serviceName="top-ok")
    dns.set_service("top-down", "127.0.0.99")  # nothing listens there: every request is a 503
    p.reconfigure(serviceName="top-down", servicePath="/top-down", port=replicas[0].port)
    term = Terminal("top", [sys.executable, "-m", "pyroute", "top", "--admin", f"http://127.0.0.1:{p.admin_port}",
                            "--user", "ops", "--password", "pw", "--interval", "0.5"])
    traffic = Traffic(p, ["/top-ok/hello", "/top-down/x"])
    try:
        screen = term.wait(lambda s: row(s, "/top-ok") and s, "the first screen")
        assert row(screen, "ROUTE") == ["ROUTE", "SERVICE", "REQ/S", "ERR/S", "ERR%", "P99", "REQUESTS", "TASKS"]
        assert f"pyroute top  http://127.0.0.1:{p.admin_port}" in screen

        traffic.start()

        def busy(s):
            ok, down = row(s, "/top-ok"), row(s, "/top-down")
            if not ok or not down or "-" in (ok[2], down[2]) or float(ok[2]) == 0 or float(down[2]) == 0:
                return None
            return s, ok, down
        screen, ok, down = term.wait(busy, "non-zero request rates on both routes")
        # ROUTE SERVICE REQ/S ERR/S ERR% P99 REQUESTS TASKS
        assert ok[1] == "top-ok" and float(ok[3]) == 0 and ok[4] == "0.0" and re.fullmatch(r"<=[\d.]+m?s", ok[5])
        assert ok[7:] == ["1:", "1", "up"]
        assert down[1] == "top-down" and down[3] == down[2] and down[4] == "100.0"
        assert down[7:] == ["1:", "1", "down"]
        order = [r["Paths"][0] for r in p.admin("routes")[1]["Routes"]]
        assert sorted(order, key=screen.index) == order  # as `pyroute routes`: match order

        sent = traffic.stop()
        for _ in range(3):
            assert p.get("/no-such-route")[0] == 503

        def settled(s):
            ok, down, unrouted = row(s, "/top-ok"), row(s, "/top-down"), row(s, "(no route)")
            if ok and down and unrouted and ok[2] == down[2] == unrouted[1] == "0.0":
                return ok, down, unrouted
            return None
        ok, down, unrouted = term.wait(settled, "rates back to 0 after the traffic stopped")
        assert int(ok[6]) == sent["/top-ok/hello"] and int(down[6]) == sent["/top-down/x"]
        assert unrouted[1:] == ["0.0", "0.0", "-", "-", "3"]
        assert ok[5] == "-" and ok[4] == "-"

        term.keys("q")
        term.wait(lambda s: "exited 0" in s, "q quits with status 0")
    finally:
        if traffic.is_alive():
            traffic.stop()
        term.close()


def test_top_says_what_to_do_without_a_terminal_or_pyroute(tmp_path):
    command = [sys.executable, "-m", "pyroute", "top", "--admin", "http://127.0.0.1:9"]
    result = subprocess.run(command, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=20, stdin=subprocess.DEVNULL)
    assert result.returncode == 1 and "needs a terminal" in result.stderr

    term = Terminal("top-unreachable", [*command, "--interval", "0.5"])
    try:
        screen = term.wait(lambda s: "exited" in s and s, "top exits")
        assert "cannot reach the admin API at http://127.0.0.1:9" in screen and "exited 1" in screen
    finally:
        term.close()
