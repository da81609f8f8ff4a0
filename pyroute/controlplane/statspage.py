"""The stats page (DFP's HAProxy stats page at STATS_URI, behind STATS_USER/STATS_PASS).

Served by the admin listener; the data plane routes STATS_URI on the public ports to it
with a route of its own, matched before every service, so other requests pay nothing.
The page shows the route table the data plane serves (its revision per process), each
service's task addresses with their passive health and connection counters, and the
request counters; it reloads itself every REFRESH seconds.
"""

from __future__ import annotations

import datetime
from html import escape

from pyroute.basicauth import Userlist
from pyroute.metrics import UNROUTED

REFRESH = 5  # seconds between automatic reloads of the page


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
td.num { text-align: right; font-family: monospace; }
p.meta { color: #555; font-size: .9em; }
"""


def render(snap: dict, registry_revision: int) -> bytes:
    services = snap["services"]
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    revisions = ", ".join(f"{escape(p['name'])} (pid {p['pid']}): revision {p.get('revision', '-')}"
                          for p in snap["processes"] if "revision" in p)
    conns = snap["connections"]
    out = [
        "<!DOCTYPE html><html><head><meta charset=\"utf-8\">",
        f"<meta http-equiv=\"refresh\" content=\"{REFRESH}\">",
        f"<title>pyroute stats</title><style>{_STYLE}</style></head><body>",
        "<h1>pyroute stats</h1>",
        f"<p class=\"meta\">{now} &middot; configuration revision {registry_revision} &middot; served: {revisions}"
        f" &middot; client connections open {conns['active']}, accepted {conns['total']}"
        f" &middot; DNS lookups {snap['dns']['lookups']}, failed {snap['dns']['failures']}"
        f" &middot; refreshes every {REFRESH} s</p>",
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
    out.append("</table></body></html>")
    return "\n".join(out).encode()
