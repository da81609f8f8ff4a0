"""`pyroute top [--admin URL]`: what a running pyroute is doing now, refreshed in place.

One row per route in match order (as `pyroute routes`): its service's request rate, error
rate (5xx and requests that got no response) and p99 latency over the last interval, its
request count so far, and the health of its tasks. Read from the admin API: the counters
and the request-duration histogram from ``/metrics``, routes and task health from
``/v1/docker-flow-proxy/routes``. Rates are differences between two readings, so the first
screen shows them as "-". curses (stdlib) draws it; q quits.
"""

from __future__ import annotations

import curses
import re
import sys
import time
from dataclasses import dataclass, field

from pyroute.commands.adminclient import credentials, default_admin_url, get
from pyroute.commands.routes import fetch as fetch_routes
from pyroute.commands.routes import rule
from pyroute.metrics import UNROUTED

METRICS_PATH = "/metrics"
DURATION_BUCKETS = "pyroute_request_duration_seconds_bucket"
SAMPLE = re.compile(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)")
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')
UNESCAPE = {"\\\\": "\\", '\\"': '"', "\\n": "\n"}
COLUMNS = ("ROUTE", "SERVICE", "REQ/S", "ERR/S", "ERR%", "P99", "REQUESTS", "TASKS")


@dataclass
class ServiceCounts:
    """One service's counters at one reading."""
    requests: int = 0
    errors: int = 0  # 5xx, and requests that got no response (status 0)
    durations: dict[float, int] = field(default_factory=dict)  # histogram: upper bound -> cumulative count


@dataclass
class Reading:
    """One reading of the admin API: when, every service's counters, the routes document."""
    at: float
    services: dict[str, ServiceCounts]
    routes: dict


def parse_metrics(text: str) -> dict[str, ServiceCounts]:
    """The per-service request counters and duration histogram from pyroute's /metrics text."""
    services: dict[str, ServiceCounts] = {}
    for line in text.splitlines():
        match = SAMPLE.match(line)
        if match is None:
            continue
        name, labels_text, value = match.groups()
        if name not in ("pyroute_requests_total", DURATION_BUCKETS):
            continue
        labels = {k: re.sub(r"\\[\\\"n]", lambda m: UNESCAPE[m.group(0)], v)
                  for k, v in LABEL.findall(labels_text or "")}
        counts = services.setdefault(labels.get("service", UNROUTED), ServiceCounts())
        if name == DURATION_BUCKETS:
            counts.durations[float(labels["le"])] = int(float(value))
            continue
        n = int(float(value))
        counts.requests += n
        code = int(labels.get("code", "0"))
        if code == 0 or code >= 500:
            counts.errors += n
    return services


def read(admin_url: str, auth: tuple[str, str] | None) -> Reading:
    metrics = get(admin_url, METRICS_PATH, auth).decode("utf-8", "replace")
    return Reading(time.monotonic(), parse_metrics(metrics), fetch_routes(admin_url, auth))


def p99(before: ServiceCounts | None, now: ServiceCounts) -> str:
    """The 99th percentile of request durations between two readings, as shown.

    From the request-duration histogram: the upper bound of the bucket it falls in (so
    "<=1ms" reads "at most 1 ms"). The one place latency is read: switch it here when
    the admin API serves exact percentiles."""
    if before is None:
        return "-"
    bounds = sorted(now.durations)
    counts = [now.durations[b] - before.durations.get(b, 0) for b in bounds]
    if not counts or counts[-1] <= 0:
        return "-"
    rank = 0.99 * counts[-1]
    for bound, count in zip(bounds, counts):
        if count >= rank:
            if bound == float("inf"):
                return f">{seconds(bounds[-2])}" if len(bounds) > 1 else "-"
            return f"<={seconds(bound)}"
    return "-"


def seconds(value: float) -> str:
    return f"{value * 1000:g}ms" if value < 1 else f"{value:g}s"


def rate(before: int, now: int, elapsed: float) -> str:
    return f"{(now - before) / elapsed:.1f}"


def tasks(route: dict) -> str:
    """How many tasks the route has and their passive health."""
    health = [a["Health"] for a in route["Addresses"]]
    if not health:
        return "none resolved"
    parts = [f"{health.count(h)} {h}" for h in ("up", "down", "unknown") if health.count(h)]
    return f"{len(health)}: " + ", ".join(parts)


def rows(before: Reading | None, now: Reading) -> list[tuple[str, ...]]:
    """The table: a header, one row per route (a service's numbers on its first route), and
    a row for requests no route matched once there are any."""
    elapsed = now.at - before.at if before is not None else 0.0
    empty = ServiceCounts()

    def numbers(service: str) -> tuple[str, ...]:
        counts = now.services.get(service, empty)
        was = before.services.get(service, empty) if before is not None else None
        if was is None or elapsed <= 0:
            return "-", "-", "-", p99(None, counts), str(counts.requests)
        requests = counts.requests - was.requests
        errors = counts.errors - was.errors
        share = f"{100 * errors / requests:.1f}" if requests > 0 else "-"
        return (rate(was.requests, counts.requests, elapsed), rate(was.errors, counts.errors, elapsed), share,
                p99(was, counts), str(counts.requests))

    table = [COLUMNS]
    shown: set[str] = set()
    for route in now.routes.get("Routes", []):
        host, paths = rule(route)
        service = route["Service"]
        first = service not in shown
        shown.add(service)
        stats = numbers(service) if first else ("",) * 5
        name = service + (f"#{route['Index']}" if route["Index"] else "")
        table.append((paths if host == "*" else f"{host} {paths}", name, *stats, tasks(route)))
    if now.services.get(UNROUTED, empty).requests:
        table.append(("(no route)", "", *numbers(UNROUTED), ""))
    return table


def render(table: list[tuple[str, ...]]) -> list[str]:
    """Columns aligned: text to the left, numbers to the right."""
    widths = [max(len(row[i]) for row in table) for i in range(len(COLUMNS))]
    numeric = {2, 3, 4, 6}
    return ["  ".join(cell.rjust(w) if i in numeric else cell.ljust(w)
                      for i, (cell, w) in enumerate(zip(row, widths))).rstrip() for row in table]


def draw(screen, admin_url: str, interval: float, lines: list[str], status: str) -> None:
    screen.erase()
    height, width = screen.getmaxyx()
    title = f"pyroute top  {admin_url}  every {interval:g}s  {time.strftime('%H:%M:%S')}  {status}"
    for y, text in enumerate([title, "", *lines, "", "q: quit"][: height]):
        screen.addnstr(y, 0, text, width - 1, curses.A_BOLD if y in (0, 2) else curses.A_NORMAL)
    screen.refresh()


def run(screen, admin_url: str, auth: tuple[str, str] | None, interval: float, first: Reading) -> None:
    try:
        curses.curs_set(0)
    except curses.error:
        pass  # a terminal that cannot hide its cursor shows it
    before, now = None, first
    status = f"revision {first.routes.get('Revision')}"
    while True:
        draw(screen, admin_url, interval, render(rows(before, now)), status)
        deadline = time.monotonic() + interval
        while (left := deadline - time.monotonic()) > 0:
            screen.timeout(max(1, int(left * 1000)))
            key = screen.getch()
            if key in (ord("q"), ord("Q")):
                return
            if key == curses.KEY_RESIZE:
                draw(screen, admin_url, interval, render(rows(before, now)), status)
        try:
            reading = read(admin_url, auth)
        except RuntimeError as exc:
            status = f"{exc} (retrying)"
            continue
        before, now = now, reading
        status = f"revision {now.routes.get('Revision')}"


def main(admin_url: str | None, user: str | None, password: str | None, interval: float) -> int:
    url = admin_url or default_admin_url()
    auth = credentials(user, password)
    if not sys.stdout.isatty():
        print("pyroute top: needs a terminal (for one reading: pyroute routes, or GET /metrics)", file=sys.stderr)
        return 1
    try:
        first = read(url, auth)
    except RuntimeError as exc:
        print(f"pyroute top: {exc}", file=sys.stderr)
        return 1
    try:
        curses.wrapper(run, url, auth, interval, first)
    except KeyboardInterrupt:
        pass
    return 0
