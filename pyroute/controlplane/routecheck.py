"""The control plane's own compiled route tables, kept in step with the registry, so that
routes can explain themselves: shadowed routes found on every change (logged once each,
listed by /shadowed, named in the reconfigure answer) and /match answered by the same
RouteTable code the data planes run (built without backends: nothing is dialled).
"""

from __future__ import annotations

import logging

from pyroute.dataplane.explain import Shadows, explain
from pyroute.dataplane.routing import RouteTable, _no_backend
from pyroute.eventlog import event

log = logging.getLogger("pyroute.controlplane.routecheck")


class RouteCheck:
    def __init__(self, longest_match: bool = False):
        self.longest_match = longest_match
        self.plain: RouteTable | None = None  # the table of the HTTP ports
        self.tls: RouteTable | None = None  # the TLS ports' own table, while some service needs one
        self.plain_shadows = Shadows()
        self.tls_shadows = Shadows()
        self.findings: list[dict] = []  # shadowed (route, path) entries of the current tables

    def published(self, snapshot) -> None:
        """A registry subscriber: derive the tables from the previous ones, follow what is
        shadowed, log each finding that is new."""
        revision, services = snapshot
        self.plain = RouteTable(services, _no_backend, revision, self.longest_match, previous=self.plain)
        new = self.plain_shadows.update(self.plain)
        if any(d.https_port or d.verify_client_ssl for s in services for d in s.destinations):
            # As the data plane: the TLS ports get a table of their own only when some route differs there.
            self.tls = RouteTable(services, _no_backend, revision, self.longest_match, tls_listener=True,
                                  previous=self.tls)
            new += self.tls_shadows.update(self.tls)
            self.findings = self._on_both()
        else:
            self.tls, self.tls_shadows = None, Shadows()
            self.findings = self.plain_shadows.findings
        found = {_key(f) for f in self.findings}
        logged = set()
        for finding in new:
            if _key(finding) in found and _key(finding) not in logged:
                logged.add(_key(finding))
                event(log, "shadowed", service=finding["Service"], path=finding["Path"],
                      by=finding["ShadowedBy"]["Service"], reason=finding["Reason"])

    def _on_both(self) -> list[dict]:
        """Shadowed on every listener the route is served on (a route the TLS table alone has,
        or one that is caught on one listener only, is judged by where it is reachable)."""
        plain, tls = self.plain_shadows.found, self.tls_shadows.found
        on_plain = {(r.service.name, r.destination.index) for r in self.plain.routes}
        on_tls = {(r.service.name, r.destination.index) for r in self.tls.routes}
        found = []
        for key in sorted({*plain, *tls}):
            route = key[:2]
            if (route not in on_plain or key in plain) and (route not in on_tls or key in tls):
                found.append(plain.get(key) or tls[key])
        return found

    def involving(self, name: str) -> list[dict]:
        """The findings where `name` is shadowed or shadows another route."""
        return [f for f in self.findings if name in (f["Service"], f["ShadowedBy"]["Service"])]

    def match(self, host: str, path: str, headers: list[tuple[bytes, bytes]], port: int, method: str,
              tls: bool) -> dict:
        table = (self.tls or self.plain) if tls else self.plain
        if table is None:
            table = RouteTable((), _no_backend, 0, self.longest_match, tls_listener=tls)
        return explain(table, host, path, headers, port, method)


def _key(finding: dict) -> tuple:
    return finding["Service"], finding["Index"], finding["Path"]
