"""`pyroute routes [--admin URL]`: the live route table of a running pyroute, readable.

Reads the admin API's ``/v1/docker-flow-proxy/routes`` (the table the data planes serve,
in match order, with resolved addresses and their passive health) and prints one line
per route and address (admin address and credentials: commands/adminclient.py).
"""

from __future__ import annotations

import json
import sys
import urllib.parse

from pyroute.commands.adminclient import credentials, default_admin_url, get

PATH = "/v1/docker-flow-proxy/routes"
MATCH_PATH = "/v1/docker-flow-proxy/match"


def fetch(admin_url: str, auth: tuple[str, str] | None, timeout: float = 10.0) -> dict:
    """The routes document; raises RuntimeError with a message saying what to do."""
    body = get(admin_url, PATH, auth, timeout)
    try:
        return json.loads(body)
    except ValueError:
        raise RuntimeError(f"{admin_url}{PATH} did not answer JSON: is this pyroute's admin port?") from None


def rule(route: dict) -> tuple[str, str]:
    """(host rule, path rule) as a person reads them."""
    domains = route["Domains"]
    host = "*"
    if domains:
        algo = route.get("DomainAlgo", "")
        host = ",".join(domains) + ("" if algo in ("", "hdr_beg") else f" ({algo})")
    paths = ",".join(route["Paths"]) or "/"
    if route.get("PathType", "path_beg") not in ("", "path_beg"):
        paths += f" ({route['PathType']})"
    return host, paths


def render(document: dict) -> str:
    rows = [("#", "HOST", "PATH", "SERVICE", "PORT", "ADDRESS", "HEALTH")]
    for n, route in enumerate(document.get("Routes", []), 1):
        host, paths = rule(route)
        backend_port = route["Backend"].rsplit(":", 1)[-1]
        service = route["Service"] + (f"#{route['Index']}" if route["Index"] else "")
        addresses = route["Addresses"] or [{"Address": "(not resolved yet)", "Health": "-"}]
        for i, a in enumerate(addresses):
            first = i == 0
            rows.append((str(n) if first else "", host if first else "", paths if first else "",
                         service if first else "", backend_port if first else "", a["Address"], a["Health"]))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    served = document.get("Served", [])
    lines.append(f"revision {document.get('Revision')}"
                 + (f", served: {','.join(str(r) for r in served)}" if served else "")
                 + f", {len(document.get('Routes', []))} routes in match order (first match wins)")
    return "\n".join(lines)


def main(admin_url: str | None, user: str | None, password: str | None) -> int:
    url = admin_url or default_admin_url()
    try:
        document = fetch(url, credentials(user, password))
    except RuntimeError as exc:
        print(f"pyroute routes: {exc}", file=sys.stderr)
        return 1
    print(render(document))
    return 0


def match_query(url: str, headers: list[str], method: str) -> str:
    """The /match query for a URL as a person types it ("http://a.com:8080/x?y", "a.com/x", "/x")."""
    if "://" not in url:
        url = "http://" + url  # "/x" becomes "http:///x": no host
    parts = urllib.parse.urlsplit(url)
    query = {"host": parts.hostname or "", "path": parts.path or "/", "method": method.upper(),
             "tls": "true" if parts.scheme == "https" else "false"}
    if parts.port:
        query["port"] = str(parts.port)
    for header in headers:
        name, colon, value = header.partition(":")
        if not colon or not name.strip():
            raise ValueError(f"--header expects NAME:VALUE, got {header!r}")
        query[f"header.{name.strip()}"] = value.strip()
    return urllib.parse.urlencode(query)


def render_match(answer: dict) -> str:
    def named(route: dict) -> str:
        host, paths = rule(route)
        service = route["Service"] + (f"#{route['Index']}" if route["Index"] else "")
        return f"{service} (host {host}, path {paths})"

    won = answer.get("Match")
    lines = [f"{answer.get('Method', 'GET')} host {answer.get('Host') or '(none)'} path {answer.get('Path')}: "
             + (named(won) if won else "no route (503)"),
             f"  why: {answer.get('Why', '')}"]
    if answer.get("Answer"):
        lines.append(f"  answer: {answer['Answer']}")
    for candidate in answer.get("Candidates", []):
        lines.append(f"  {named(candidate)}: {candidate['Lost']}")
    return "\n".join(lines)


def match(admin_url: str | None, user: str | None, password: str | None, url: str, headers: list[str],
          method: str) -> int:
    """`pyroute routes --match URL`: the admin API's /match answer, readable."""
    admin = admin_url or default_admin_url()
    try:
        query = match_query(url, headers, method)
        answer = json.loads(get(admin, f"{MATCH_PATH}?{query}", credentials(user, password)))
    except (RuntimeError, ValueError) as exc:
        print(f"pyroute routes: {exc}", file=sys.stderr)
        return 1
    print(render_match(answer))
    return 0
