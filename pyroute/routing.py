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

from .features import ResponsePlan, compile_request_steps
from .patterns import compile_pattern
from .services import Destination, Service

HOST_CACHE_LIMIT = 4096  # distinct Host values indexed per table; a flood of junk hosts only resets it
LONGEST_RANK = 1 << 20  # rank = (LONGEST_RANK - pattern length) * LONGEST_RANK + priority in longest-match order


class Route:
    """A destination made ready for the data plane, its features compiled into steps."""

    __slots__ = ("service", "destination", "backend", "priority", "request_steps", "response_plan", "features", "stats",
                 "sticky")

    def __init__(self, service: Service, destination: Destination, backend: Any, priority: int, stats: Any = None):
        self.service = service
        self.destination = destination
        self.backend = backend
        self.priority = priority
        self.request_steps = compile_request_steps(service, destination)
        self.response_plan = ResponsePlan(service)
        self.features = bool(self.request_steps or self.response_plan)  # False: the proxy's plain path
        self.stats = stats  # metrics.ServiceStats, shared by every route of the service and kept across tables
        self.sticky = None  # balancer.Sticky for sessionType=sticky-server: picks the route variant per request

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


def _path_test(path_type: str, pattern: str) -> Callable[[bytes], bool]:
    """HAProxy's path fetches: path (exact), path_beg, path_end, path_reg (search, RE2), path_dir."""
    raw = pattern.encode()
    if path_type == "path":
        return raw.__eq__
    if path_type == "path_end":
        return lambda path: path.endswith(raw)
    if path_type == "path_reg":
        return compile_pattern(pattern).search
    if path_type == "path_dir":
        needle = b"/" + raw.strip(b"/") + b"/"
        return lambda path: needle in (path if path.endswith(b"/") else path + b"/")
    return lambda path: path.startswith(raw)


def _condition(d: Destination, path_type: str, pattern: str) -> Callable[[bytes, list, Any], bool]:
    """One conditional (route, path) entry: the path test plus every other ACL of the destination."""
    tests: list[Callable[[bytes, list, Any], bool]] = []
    path_ok = _path_test(path_type, pattern)
    tests.append(lambda path, headers, conn: bool(path_ok(path)))
    if d.path_excludes:  # DFP matches excludes with the destination's pathType too
        excluded = tuple(_path_test(path_type, x) for x in d.path_excludes)
        tests.append(lambda path, headers, conn: not any(t(path) for t in excluded))
    if d.header_match:
        wanted = tuple((n.encode(), v.encode()) for n, v in d.header_match)
        tests.append(lambda path, headers, conn: all(
            any(name.lower() == n and value == v for name, value in headers) for n, v in wanted))
    if d.user_agents:
        agents = tuple(a.encode() for a in d.user_agents)
        tests.append(lambda path, headers, conn: any(
            name.lower() == b"user-agent" and any(a in value.lower() for a in agents) for name, value in headers))
    if d.src_port:
        port = d.src_port
        tests.append(lambda path, headers, conn: (conn.transport.get_extra_info("sockname") or (0, 0))[1] == port)
    checks = tuple(tests)
    return lambda path, headers, conn: all(t(path, headers, conn) for t in checks)


class PathIndex:
    """Routes one host can reach. Plain path_beg routes are bucketed by prefix length (one
    dict lookup per distinct length, first route wins per prefix); routes with other
    conditions (pathType, excludes, headers, userAgent, srcPort) are tested in rank order
    only when they outrank the best plain match; the default backend catches the rest."""

    __slots__ = ("buckets", "conditional", "default", "longest", "match")

    def __init__(self, routes: Iterable[Route], longest: bool = False, default: Route | None = None):
        by_length: dict[int, dict[bytes, Route]] = {}
        conditional = []
        for route in routes:
            d = route.destination
            for path in d.paths:
                if d.conditional:
                    rank = (LONGEST_RANK - len(path)) * LONGEST_RANK + route.priority if longest else route.priority
                    conditional.append((rank, route, _condition(d, d.path_type, path)))
                else:
                    prefix = path.encode()
                    by_length.setdefault(len(prefix), {}).setdefault(prefix, route)
        self.buckets = tuple(sorted(by_length.items(), reverse=longest))
        self.conditional = tuple(sorted(conditional, key=lambda entry: entry[0]))
        self.default = default
        self.longest = longest
        if conditional or default is not None:
            self.match = self._match_conditions
        else:
            self.match = self._match_longest if longest else self._match_first

    def _match_first(self, path: bytes, headers=None, conn=None) -> Route | None:
        best = None
        size = len(path)
        for length, prefixes in self.buckets:
            if length > size:
                break
            route = prefixes.get(path[:length])
            if route is not None and (best is None or route.priority < best.priority):
                best = route
        return best

    def _match_longest(self, path: bytes, headers=None, conn=None) -> Route | None:
        return self._plain_longest(path)[1]

    def _plain_longest(self, path: bytes) -> tuple[int, Route | None]:
        size = len(path)
        for length, prefixes in self.buckets:  # longest prefixes first
            if length <= size:
                route = prefixes.get(path[:length])
                if route is not None:
                    return (LONGEST_RANK - length) * LONGEST_RANK + route.priority, route
        return LONGEST_RANK * LONGEST_RANK * 2, None

    def _match_conditions(self, path: bytes, headers, conn) -> Route | None:
        if self.longest:
            best_rank, best = self._plain_longest(path)
        else:
            best = self._match_first(path)
            best_rank = best.priority if best is not None else LONGEST_RANK * LONGEST_RANK * 2
        for rank, route, test in self.conditional:
            if rank >= best_rank:
                break
            if test(path, headers, conn):
                return route
        return best if best is not None else self.default


class RouteTable:
    """An immutable snapshot of every route, in DFP precedence order."""

    def __init__(self, services: Iterable[Service], make_backend: Callable[..., Any], revision: int = 0,
                 longest_match: bool = False, make_stats: Callable[[str], Any] = lambda name: None,
                 first: Iterable[Service] = (), tls_listener: bool = False):
        """`make_backend(host, port, service, tls=...)`; `first`: pyroute's own services (the
        stats page), matched before every other one; `tls_listener`: the table of the TLS
        ports, where a destination's httpsPort replaces its port."""
        self.revision = revision
        self.longest_match = longest_match
        self.services = tuple(sorted(services, key=precedence_key))
        routes = []
        for service in (*first, *self.services):
            for destination in service.destinations:
                if destination.req_mode != "http":
                    continue  # tcp/sni destinations have their own listeners (tcp.py)
                port = (destination.https_port or destination.port) if tls_listener else destination.port
                if not port or (destination.verify_client_ssl and not tls_listener):
                    continue  # only an httpsPort, or client certificates required: not over plain HTTP
                host = destination.outbound_hostname or service.name
                backend = make_backend(host, port, service, tls=destination.ssl_verify_none)
                routes.append(Route(service, destination, backend, len(routes), make_stats(service.name)))
        self.routes = tuple(routes)
        # DFP's default_backend: the first destination of the first isDefaultBackend service
        self.default = next((r for r in routes if r.service.is_default_backend), None)
        self._hostless = PathIndex((r for r in routes if not _host_names(r)), longest_match, self.default)
        self._has_domains = any(_host_names(r) or r.destination.redirect_from for r in routes)
        self._by_host: dict[bytes | None, PathIndex] = {}

    def match(self, host: bytes | None, path: bytes, headers: list | None = None, conn: Any = None) -> Route | None:
        """The route for a request; `host` is the raw Host header, `path` excludes the query;
        `headers` and `conn` (the client connection) only serve routes with conditions."""
        if not self._has_domains:
            return self._hostless.match(path, headers, conn)
        index = self._by_host.get(host)
        if index is None:
            index = self._index_for(host)
        return index.match(path, headers, conn)

    def _index_for(self, raw_host: bytes | None) -> PathIndex | RedirectIndex:
        host = normalize_host(raw_host) if raw_host else ""
        reachable = [
            r
            for r in self.routes
            if not _host_names(r) or any(_host_matches(r.service.domain_algo, d, host) for d in _host_names(r))
        ]
        redirecting = next((r for r in self.routes if any(
            host.startswith(d) for d in r.destination.redirect_from)), None)  # DFP: hdr_beg(host) -i
        # redirectFromDomain is a frontend rule in DFP: it answers for that Host whatever the path
        index = RedirectIndex(redirecting) if redirecting else PathIndex(reachable, self.longest_match, self.default)
        if len(self._by_host) >= HOST_CACHE_LIMIT:
            self._by_host.clear()
        self._by_host[raw_host] = index
        return index


def _host_names(route: Route) -> tuple[str, ...]:
    return route.destination.domains


class RedirectIndex:
    """A Host named in some route's redirectFromDomain: every path goes to that route's redirect."""

    __slots__ = ("route",)

    def __init__(self, route: Route):
        self.route = route

    def match(self, path: bytes, headers=None, conn=None) -> Route:
        return self.route


class CompileError(ValueError):
    """A service the data plane cannot turn into routes."""


def _no_backend(host: str, port: int, service: Service, tls: bool = False) -> None:
    return None


def check_compiles(service: Service) -> None:
    """Build every route `service` gives, on the plain and the TLS listeners' tables, with
    every condition compiled (per-Host indexes compile theirs lazily), as the data plane
    will. The control plane calls this before it stores a change, so nothing the data plane
    cannot serve is ever accepted. Raises CompileError naming the service and the failure."""
    try:
        for tls_listener in (False, True):
            table = RouteTable((service,), _no_backend, tls_listener=tls_listener)
            PathIndex(table.routes, False, table.default)
    except Exception as exc:  # whatever building raises would take the data plane down
        raise CompileError(f"service {service.name} cannot be compiled into routes: "
                           f"{type(exc).__name__}: {exc}") from None
