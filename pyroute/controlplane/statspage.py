"""The stats page (DFP's HAProxy stats page at STATS_URI, behind STATS_USER/STATS_PASS).

Served by the admin listener; the data plane routes STATS_URI on the public ports to it
with a route of its own, matched before every service, so other requests pay nothing.
The page shows the route table the data plane serves (its revision per process), each
service's task addresses with their passive health and connection counters, the request
counters, and recent traffic (latency.py): per service and task p50/p95/p99 over the last
minute, and request rate, error rate and p99 per 10 s slot over the last 15 minutes as
inline SVG bar charts. Everything is drawn here, in HTML and SVG: a few lines of inline
script fetch the page again every REFRESH seconds and swap its live part in (no reload,
no framework, nothing external); without script a meta refresh reloads it.
STATS_URI;data answers the recent-traffic figures as JSON (`recent`), for tools.
"""

from __future__ import annotations

import datetime
from html import escape

from pyroute import latency
from pyroute.basicauth import Userlist
from pyroute.metrics import UNROUTED

REFRESH = 5  # seconds between automatic refreshes of the page
DATA_SUFFIX = ";data"  # STATS_URI + this: the recent-traffic figures as JSON


def authorized(settings, authorization: bytes | None) -> bool:
    """Basic auth against STATS_USER/STATS_PASS; "none"/"none" means no authentication (DFP)."""
    if settings.stats_user == "none" and settings.stats_pass == "none":
        return True
    return Userlist([(settings.stats_user, settings.stats_pass)]).allows(authorization)


def _classes(responses) -> dict[str, int]:
    out = {"2xx": 0, "3xx": 0, "4xx": 0, "5xx": 0, "other": 0}
    for _, status, n in responses:
        key = f"{status // 100}xx" if 200 <= status < 600 else "other"
        out[key] += n
    return out


_STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; background: #fff; }
h1 { font-size: 1.4em; margin: 0 0 .3em; }
table { border-collapse: collapse; margin: .8em 0 1.5em; width: 100%; }
th, td { border: 1px solid #999; padding: .25em .5em; text-align: left; font-size: .9em; }
th { background: #2b4a6f; color: #fff; }
tr.service td { background: #dde6f0; font-weight: bold; }
td.up { background: #6c6; } td.down { background: #e55; color: #fff; } td.unknown, td.gone { background: #ccc; }
td.num { text-align: right; font-family: monospace; white-space: nowrap; }
p.meta { color: #555; font-size: .9em; }
td.chart { padding: 1px 4px; } svg.bars { display: block; }
svg.bars text { font: 10px monospace; fill: #333; }
"""
CHART_WIDTH, CHART_HEIGHT = 182, 30  # 2 px per slot (latency.HISTORY_SLOTS) plus a margin
CHART_COLOURS = {"request_rate": "#2b6fb0", "error_rate": "#dd3333", "p99_ms_by_slot": "#e08800"}
CHART_UNITS = {"request_rate": "/s", "error_rate": "/s", "p99_ms_by_slot": " ms"}
_SCRIPT = """(function () {
  function refresh() {
    fetch(location.href, {cache: "no-store", credentials: "same-origin"}).then(function (r) {
      if (!r.ok) { throw new Error("HTTP " + r.status); }
      return r.text();
    }).then(function (html) {
      var fresh = new DOMParser().parseFromString(html, "text/html").getElementById("live");
      document.getElementById("live").replaceWith(fresh);
      document.body.dataset.refreshed = String(Number(document.body.dataset.refreshed || 0) + 1);
    }).catch(function () {}).then(function () { setTimeout(refresh, %d); });
  }
  setTimeout(refresh, %d);
})();"""


def recent(snap: dict) -> dict:
    """Per service and per task: latency.summary of its merged slots, now (STATS_URI;data)."""
    now = latency.slot_now()
    out = {}
    for name, svc in snap["services"].items():
        view = latency.summary(svc["recent"], now)
        view["tasks"] = {address: {**latency.summary(a["recent"], now), "health": a["health"]}
                         for address, a in sorted(svc["addresses"].items())}
        out[name] = view
    return {"slot_seconds": latency.SLOT, "slots": latency.HISTORY_SLOTS, "services": out}


def _ms(value: float | None) -> str:
    if value is None:
        return "&ndash;"
    if value <= latency.BOUNDS[0] * 1000:
        return f"&le;{value:.3f} ms"  # the first bucket: as fast as the clock can tell
    if value < 10:
        return f"{value:.3f} ms"
    if value < 1000:
        return f"{value:.1f} ms"
    return f"{value / 1000:.2f} s"


def _bars(view: dict, key: str) -> str:
    """One series of the last 15 minutes as an SVG bar chart (2 px a slot), its peak written on it."""
    values = view[key]
    peak = max((v for v in values if v), default=0)
    colour = CHART_COLOURS[key]
    bars = []
    if peak:
        for i, v in enumerate(values):
            if v:
                h = max(1.0, v / peak * (CHART_HEIGHT - 12))
                bars.append(f'<rect x="{i * 2}" y="{CHART_HEIGHT - h:.1f}" width="2" height="{h:.1f}" fill="{colour}"/>')
    label = f"peak {peak:g}{CHART_UNITS[key]}" if peak else "none"
    return (f'<svg class="bars {key}" data-peak="{peak:g}" width="{CHART_WIDTH}" height="{CHART_HEIGHT}" '
            f'viewBox="0 0 {CHART_WIDTH} {CHART_HEIGHT}" xmlns="http://www.w3.org/2000/svg" role="img">'
            f'<title>{key} per {latency.SLOT} s, last {latency.HISTORY_SLOTS * latency.SLOT // 60} min</title>'
            f'<line x1="0" y1="{CHART_HEIGHT - 0.5}" x2="{CHART_WIDTH}" y2="{CHART_HEIGHT - 0.5}" stroke="#bbb"/>'
            f'{"".join(bars)}<text x="1" y="9">{label}</text></svg>')


def _recent_row(kind: str, label: str, view: dict) -> str:
    cells = "".join(f'<td class="num {name}" data-ms="{"" if view[key] is None else view[key]}">{_ms(view[key])}</td>'
                    for name, key in (("p50", "p50_ms"), ("p95", "p95_ms"), ("p99", "p99_ms")))
    charts = "".join(f'<td class="chart">{_bars(view, key)}</td>' for key in ("request_rate", "error_rate", "p99_ms_by_slot"))
    return (f'<tr class="{kind}" data-name="{escape(label)}"><td>{escape(label)}</td>{cells}'
            f'<td class="num minute">{view["requests_minute"]}</td>{charts}</tr>')


def _recent_table(views: dict) -> list[str]:
    out = ["<h2>Latency and traffic</h2><table id=\"recent\"><tr><th>service / task address</th>"
           "<th>p50</th><th>p95</th><th>p99</th><th>requests (last minute)</th>"
           f"<th>requests/s, {latency.SLOT} s slots, 15 min</th><th>errors/s (5xx)</th><th>p99 per slot</th></tr>"]
    for name, view in sorted(views.items()):
        out.append(_recent_row("service", name if name != UNROUTED else "(no route / refused)", view))
        for address, task in view["tasks"].items():
            out.append(_recent_row("task", address, task))
    out.append("</table>")
    return out



def render(snap: dict, registry_revision: int) -> bytes:
    services = snap["services"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    revisions = ", ".join(f"{escape(p['name'])} (pid {p['pid']}): revision {p.get('revision', '-')}"
                          for p in snap["processes"] if "revision" in p)
    conns = snap["connections"]
    out = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f"<noscript><meta http-equiv=\"refresh\" content=\"{REFRESH}\"></noscript>",
        f"<title>pyroute stats</title><style>{_STYLE}</style></head><body>",
        "<h1>pyroute stats</h1><div id=\"live\">",
        f"<p class=\"meta\">{now} &middot; configuration revision {registry_revision} &middot; served: {revisions}"
        f" &middot; client connections open {conns['active']}, accepted {conns['total']}"
        f" &middot; DNS lookups {snap['dns']['lookups']}, failed {snap['dns']['failures']}"
        f" &middot; refreshes every {REFRESH} s</p>",
        *_recent_table(recent(snap)["services"]),
        "<h2>Routes</h2><table id=\"routes\"><tr><th>service</th><th>#</th><th>paths</th><th>domains</th>"
        "<th>backend</th><th>task addresses (resolved)</th></tr>",
    ]
    for r in snap["routes"]:
        out.append(
            f"<tr><td>{escape(r['service'])}</td><td class=\"num\">{r['index']}</td>"
            f"<td>{escape(' '.join(r['paths']))}</td><td>{escape(' '.join(r['domains']))}</td>"
            f"<td>{escape(r['backend'])}</td><td>{escape(' '.join(r['addresses']))}</td></tr>")
    out.append("</table>")
    out.append(
        "<h2>Services and tasks</h2><table id=\"services\"><tr><th>service / task address</th><th>health</th>"
        "<th>requests</th><th>2xx</th><th>3xx</th><th>4xx</th><th>5xx</th><th>aborted</th><th>bytes in</th>"
        "<th>bytes out</th><th>connects</th><th>reuses</th><th>connect failures</th><th>retries</th>"
        "<th>timeouts</th></tr>")
    for name, svc in sorted(services.items()):
        counts = _classes(svc["responses"])
        total = sum(n for _, _, n in svc["responses"])
        label = escape(name) if name != UNROUTED else "(no route / refused)"
        out.append(
            f"<tr class=\"service\"><td>{label}</td><td></td><td class=\"num\">{total}</td>"
            + "".join(f"<td class=\"num\">{counts[k]}</td>" for k in ("2xx", "3xx", "4xx", "5xx", "other"))
            + f"<td class=\"num\">{svc['bytes_in']}</td><td class=\"num\">{svc['bytes_out']}</td>"
            + "<td></td>" * 5 + "</tr>")
        for address, a in sorted(svc["addresses"].items()):
            health = a["health"] if a.get("resolved", True) else "gone"  # no longer in DNS
            out.append(
                f"<tr><td>&nbsp;&nbsp;{escape(address)}</td><td class=\"{health}\">{health}</td>"
                + "<td></td>" * 8
                + "".join(f"<td class=\"num\">{a[k]}</td>"
                          for k in ("connects", "reuses", "failures", "retries", "timeouts"))
                + "</tr>")
    out.append("</table></div>")
    out.append(f"<script>{_SCRIPT % (REFRESH * 1000, REFRESH * 1000)}</script></body></html>")
    return "\n".join(out).encode()
