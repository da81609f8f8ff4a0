"""The compiled route table: which Destination serves a (Host, path).

A table is built once from the services and never changed afterwards; a reconfigure
builds a new one and the proxy swaps one reference, so a request in flight keeps the
table it started with and nothing is locked.

Matching follows Docker Flow Proxy (HAProxy's first matching ``use_backend``):
services whose paths start with ``/.well-known`` first, services with path ``/`` last,
the rest by aclName; within a service, destinations in index order. Paths match as
byte prefixes (``path_beg``); hosts as the service's ``serviceDomainAlgo``.

Speed: per distinct Host value the table keeps a small index of the routes that host
can reach, bucketed by prefix length, so a match costs one dict lookup per distinct
prefix length whatever the number of services.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

from .services import Destination, Service

HOST_CACHE_LIMIT = 4096  # distinct Host values indexed per table; a flood of junk hosts only resets it


class Route:
    """A destination made ready for the data plane."""

    __slots__ = ("service", "destination", "backend", "priority")

    def __init__(self, service: Service, destination: Destination, backend: Any, priority: int):
        self.service = service
        self.destination = destination
        self.backend = backend
        self.priority = priority

    def __repr__(self) -> str:
        return f"Route({self.service.name}#{self.destination.index} -> {self.backend!r})"


def _host_matches(algo: str, pattern: str, host: str) -> bool:
    if algo == "hdr_beg":
        return host.startswith(pattern)
    if algo == "hdr_end":
        return host.endswith(pattern)
    if algo == "hdr":
        return host == pattern
    # hdr_dom: a dot-delimited run of the host equals the pattern (HAProxy's -m dom)
    return f".{pattern}." in f".{host}."


def normalize_host(raw: bytes) -> str:
    """Host header value -> lower-case name without the port ("[::1]:80" -> "[::1]")."""
    host = raw.decode("latin-1").strip().lower()
    if host.startswith("["):
        end = host.find("]")
        return host[: end + 1] if end != -1 else host
    return host.rsplit(":", 1)[0] if ":" in host else host


def precedence_key(service: Service) -> tuple[int, str]:
    paths = [p for d in service.destinations for p in d.paths]
    if any(p.startswith("/.well-known") for p in paths):
        group = 0
    elif "/" in paths:
        group = 2
    else:
        group = 1
    return group, service.acl_name


class PathIndex:
    """Routes one host can reach, bucketed by prefix length; first route wins per prefix."""

    __slots__ = ("buckets",)

    def __init__(self, routes: Iterable[Route]):
        by_length: dict[int, dict[bytes, Route]] = {}
        for route in routes:
            for path in route.destination.paths:
                prefix = path.encode()
                by_length.setdefault(len(prefix), {}).setdefault(prefix, route)
        self.buckets = tuple(sorted(by_length.items()))

    def match(self, path: bytes) -> Route | None:
        best = None
        size = len(path)
        for length, prefixes in self.buckets:
            if length > size:
                break
            route = prefixes.get(path[:length])
            if route is not None and (best is None or route.priority < best.priority):
                best = route
        return best


class RouteTable:
    """An immutable snapshot of every route, in DFP precedence order."""

    def __init__(self, services: Iterable[Service], make_backend: Callable[..., Any], revision: int = 0,
                 tls_listener: bool = False):
        """`tls_listener`: the table of the TLS ports, where a destination's httpsPort replaces its port."""
        self.revision = revision
        self.services = tuple(sorted(services, key=precedence_key))
        routes = []
        for service in self.services:
            for destination in service.destinations:
                if destination.req_mode != "http":
                    continue  # tcp/sni destinations have their own listeners (tcp.py)
                port = (destination.https_port or destination.port) if tls_listener else destination.port
                if not port or (destination.verify_client_ssl and not tls_listener):
                    continue  # only an httpsPort, or client certificates required: not over plain HTTP
                host = destination.outbound_hostname or service.name
                if destination.ssl_verify_none:
                    backend = make_backend(host, port, tls=True)
                else:
                    backend = make_backend(host, port)
                routes.append(Route(service, destination, backend, len(routes)))
        self.routes = tuple(routes)
        self._hostless = PathIndex(r for r in routes if not r.destination.domains)
        self._has_domains = any(r.destination.domains for r in routes)
        self._by_host: dict[bytes | None, PathIndex] = {}

    def match(self, host: bytes | None, path: bytes) -> Route | None:
        """The route for a request; `host` is the raw Host header, `path` excludes the query."""
        if not self._has_domains:
            return self._hostless.match(path)
        index = self._by_host.get(host)
        if index is None:
            index = self._index_for(host)
        return index.match(path)

    def _index_for(self, raw_host: bytes | None) -> PathIndex:
        host = normalize_host(raw_host) if raw_host else ""
        reachable = [
            r
            for r in self.routes
            if not r.destination.domains
            or any(_host_matches(r.service.domain_algo, d, host) for d in r.destination.domains)
        ]
        index = PathIndex(reachable)
        if len(self._by_host) >= HOST_CACHE_LIMIT:
            self._by_host.clear()
        self._by_host[raw_host] = index
        return index
