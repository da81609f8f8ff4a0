"""The compiled route table: which Destination serves a (Host, path).

A table is built once from the services and never changed afterwards; a reconfigure
builds a new one and the proxy swaps one reference, so a request in flight keeps the
table it started with and nothing is locked.

Matching follows Docker Flow Proxy (HAProxy's first matching ``use_backend``):
services whose paths start with ``/.well-known`` first, services with path ``/`` last,
the rest by aclName; within a service, destinations in index order. Paths match as
byte prefixes (``path_beg``); hosts as the service's ``serviceDomainAlgo``.

Speed: per distinct Host value the table keeps a small index of the routes that host
can reach, bucketed by the prefix's first bytes and length, so a match costs one dict
lookup for the path's first bytes, then one per prefix length that starts with them,
whatever the number of services.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Callable, Iterable
from dataclasses import replace
from typing import Any

from pyroute.dataplane.features import ResponsePlan, compile_request_steps
from pyroute.patterns import compile_pattern
from pyroute.dataplane.headers import normalize_host
from pyroute.services import Destination, Service, precedence_key

HOST_CACHE_LIMIT = 4096  # distinct Host values indexed per table; a flood of junk hosts only resets it
LONGEST_RANK = 1 << 48  # rank = (LONGEST_RANK - pattern length) * LONGEST_RANK + priority in longest-match order
NO_RANK = LONGEST_RANK * LONGEST_RANK * 2  # the rank of "no match", below every real one
PRIORITY_GAP = 1 << 16  # priorities between neighbouring services at a full build: room for later inserts
MAX_INCREMENTAL = 64  # services changed at once above which (and above 1/8 of all) a table is built whole
START = 2  # bytes of a path (its "/" and the next one) that pick the prefix lengths worth a lookup


class Route:
    """A destination made ready for the data plane, its features compiled into steps."""

    __slots__ = ("service", "destination", "backend", "priority", "request_steps", "response_plan", "features", "stats",
                 "sticky", "retry_503")

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
        protection = service.protection
        self.retry_503 = "503" in protection.retry_on and protection.retries > 0  # (client.ClientConnection.response_head)

    def moved(self, priority: int) -> Route:
        """This route at another priority, sharing everything compiled (a table relabelled
        its neighbourhood to make room for a new service)."""
        route = Route.__new__(Route)
        for name in Route.__slots__:
            setattr(route, name, getattr(self, name))
        route.priority = priority
        route.sticky = None  # the data plane binds a Sticky to each new route object
        return route

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


def _path_test(path_type: str, pattern: str, ignore_case: bool = False) -> Callable[[bytes], bool]:
    """HAProxy's path fetches: path (exact), path_beg, path_end, path_reg (search, RE2), path_dir,
    path_sub, path_dom, path_len; with -i (`ignore_case`) the pattern is lower-case already
    and the path is lowered for the test."""
    if path_type == "path_reg":
        return compile_pattern(pattern, ignore_case).search
    test = _case_sensitive_path_test(path_type, pattern)
    if ignore_case and path_type != "path_len":
        return lambda path: test(path.lower())
    return test


def _case_sensitive_path_test(path_type: str, pattern: str) -> Callable[[bytes], bool]:
    raw = pattern.encode()
    if path_type == "path":
        return raw.__eq__
    if path_type == "path_end":
        return lambda path: path.endswith(raw)
    if path_type == "path_dir":
        needle = b"/" + raw.strip(b"/") + b"/"
        return lambda path: needle in (path if path.endswith(b"/") else path + b"/")
    if path_type == "path_sub":
        return lambda path: raw in path
    if path_type == "path_dom":
        return lambda path: _delimited(path, raw)
    if path_type == "path_len":
        return _length_test(pattern)
    return lambda path: path.startswith(raw)


_DELIMITERS = b"/?.:"  # what bounds a pattern for HAProxy's -m dom


def _delimited(text: bytes, pattern: bytes) -> bool:
    """HAProxy's -m dom: `pattern` occurs in `text` with a delimiter (or the end) on each side."""
    start = text.find(pattern)
    while start >= 0:
        end = start + len(pattern)
        if (start == 0 or text[start - 1] in _DELIMITERS) and (end == len(text) or text[end] in _DELIMITERS):
            return True
        start = text.find(pattern, start + 1)
    return False


def _length_test(pattern: str) -> Callable[[bytes], bool]:
    """HAProxy's integer match on the path's length: N, N:M, :M, N:, or eq|ge|gt|le|lt N."""
    words = pattern.split()
    if len(words) == 2:
        operator, number = words[0], int(words[1])
        return {"eq": lambda path: len(path) == number, "ge": lambda path: len(path) >= number,
                "gt": lambda path: len(path) > number, "le": lambda path: len(path) <= number,
                "lt": lambda path: len(path) < number}[operator]
    low, colon, high = pattern.strip().partition(":")
    if not colon:
        number = int(low)
        return lambda path: len(path) == number
    least, most = int(low or 0), int(high) if high else None
    return lambda path: len(path) >= least and (most is None or len(path) <= most)


def _condition(d: Destination, path_type: str, pattern: str) -> Callable[[bytes, list, Any], bool]:
    """One conditional (route, path) entry: the path test plus every other ACL of the destination."""
    tests: list[Callable[[bytes, list, Any], bool]] = []
    path_ok = _path_test(path_type, pattern, d.path_ignore_case)
    tests.append(lambda path, headers, conn: bool(path_ok(path)))
    if d.path_excludes:  # DFP matches excludes with the destination's pathType too
        excluded = tuple(_path_test(path_type, x, d.path_ignore_case) for x in d.path_excludes)
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
    """Routes one set of routes can reach by path. Plain path_beg routes are bucketed by
    their first START bytes, then by prefix length (the first route by priority wins per
    prefix): a match looks up the path's first bytes once, then once per prefix length
    under them, plus once per prefix shorter than START; routes with other conditions
    (pathType, excludes, headers, userAgent, srcPort) are tested in rank order only when
    they outrank the best plain match; the default backend catches the rest. `updated()`
    derives the index of a changed route set, sharing every bucket the change does not touch."""

    __slots__ = ("groups", "by_start", "short", "claims", "conditional", "default", "longest", "match")

    def __init__(self, routes: Iterable[Route], longest: bool = False, default: Route | None = None):
        claims: dict[bytes, tuple[Route, ...]] = {}
        conditional = []
        for route in routes:  # in priority order
            d = route.destination
            for path in d.paths:
                if d.conditional:
                    conditional.append(_conditional_entry(route, path, longest))
                else:
                    prefix = path.encode()
                    claims[prefix] = (*claims.get(prefix, ()), route)
        groups: dict[bytes | None, dict[int, dict[bytes, Route]]] = {}
        for prefix, claimants in claims.items():
            groups.setdefault(_start(prefix), {}).setdefault(len(prefix), {})[prefix] = claimants[0]
        conditional.sort(key=_rank)
        self._finish(groups, claims, tuple(conditional), longest, default, groups)

    def _finish(self, groups: dict[bytes | None, dict[int, dict[bytes, Route]]], claims: dict[bytes, tuple[Route, ...]],
                conditional: tuple, longest: bool, default: Route | None, changed: Iterable[bytes | None],
                previous: PathIndex | None = None) -> None:
        """`changed`: the groups whose buckets differ from `previous`'s (every one without it)."""
        self.groups = groups  # first START bytes (None: shorter prefixes) -> length -> prefix -> route
        self.claims = claims  # prefix -> every plain route claiming it, by priority (for updates)
        self.conditional = conditional
        self.default = default
        self.longest = longest
        short = groups.get(None)
        self.short = tuple(sorted(short.items(), reverse=longest)) if short else ()
        if previous is not None and None not in changed:
            by_start = dict(previous.by_start)
        else:  # every group's candidates hold the short buckets
            by_start, changed = {}, groups.keys()
        for start in changed:
            if start is None:
                continue
            lengths = groups.get(start)
            if lengths:
                own = tuple(sorted(lengths.items(), reverse=longest))  # shorter prefixes: before, or after if longest
                by_start[start] = (*own, *self.short) if longest else (*self.short, *own)
            else:
                by_start.pop(start, None)
        self.by_start = by_start  # a path's first START bytes -> the (length, bucket) pairs to look up, in order
        if conditional or default is not None:
            self.match = self._match_conditions
        else:
            self.match = self._match_longest if longest else self._match_first

    def updated(self, removed: Iterable[Route], added: Iterable[Route], default: Route | None) -> PathIndex:
        """This index with `removed` routes gone and `added` ones in; self is left as it was."""
        claims = dict(self.claims)
        groups = dict(self.groups)
        copied: set[tuple[bytes | None, int]] = set()
        copied_groups: set[bytes | None] = set()
        conditional = self.conditional
        gone = {id(r) for r in removed if r.destination.conditional}
        if gone:
            conditional = tuple(entry for entry in conditional if id(entry[1]) not in gone)
        new_conditional = []
        touched: set[bytes] = set()
        for route in removed:
            if not route.destination.conditional:
                for path in route.destination.paths:
                    prefix = path.encode()
                    claims[prefix] = tuple(r for r in claims.get(prefix, ()) if r is not route)
                    touched.add(prefix)
        for route in added:
            d = route.destination
            for path in d.paths:
                if d.conditional:
                    new_conditional.append(_conditional_entry(route, path, self.longest))
                else:
                    prefix = path.encode()
                    claims[prefix] = tuple(sorted((*claims.get(prefix, ()), route), key=_priority))
                    touched.add(prefix)
        for prefix in touched:
            start, length = _start(prefix), len(prefix)
            if (start, length) not in copied:  # copy-on-write: the previous table keeps its buckets
                if start not in copied_groups:
                    copied_groups.add(start)
                    groups[start] = dict(groups.get(start, {}))
                copied.add((start, length))
                groups[start][length] = dict(groups[start].get(length, {}))
            bucket = groups[start][length]
            if claims[prefix]:
                bucket[prefix] = claims[prefix][0]
            else:
                del claims[prefix]
                bucket.pop(prefix, None)
        for start, length in copied:
            lengths = groups.get(start)
            if lengths is not None and not lengths[length]:
                del lengths[length]
                if not lengths:
                    del groups[start]
        if new_conditional:
            conditional = tuple(sorted((*conditional, *new_conditional), key=_rank))
        index = PathIndex.__new__(PathIndex)
        index._finish(groups, claims, conditional, self.longest, default, copied_groups, self)
        return index

    def _match_first(self, path: bytes, headers=None, conn=None) -> Route | None:
        best = None
        for length, prefixes in self.by_start.get(path[:START], self.short):  # a slice past the end misses
            route = prefixes.get(path[:length])
            if route is not None and (best is None or route.priority < best.priority):
                best = route
        return best

    def _match_longest(self, path: bytes, headers=None, conn=None) -> Route | None:
        return self._plain_longest(path)[1]

    def _plain_longest(self, path: bytes) -> tuple[int, Route | None]:
        for length, prefixes in self.by_start.get(path[:START], self.short):  # longest prefixes first
            route = prefixes.get(path[:length])
            if route is not None:
                return (LONGEST_RANK - length) * LONGEST_RANK + route.priority, route
        return NO_RANK, None

    def best(self, path: bytes, headers, conn) -> tuple[int, Route | None]:
        """(rank, route) of the best match without the default backend; lower rank wins."""
        if self.longest:
            best_rank, best = self._plain_longest(path)
        else:
            best = self._match_first(path)
            best_rank = best.priority if best is not None else NO_RANK
        for rank, route, test in self.conditional:
            if rank >= best_rank:
                break
            if test(path, headers, conn):
                return rank, route
        return best_rank, best

    def _match_conditions(self, path: bytes, headers, conn) -> Route | None:
        route = self.best(path, headers, conn)[1]
        return route if route is not None else self.default


def _start(prefix: bytes) -> bytes | None:
    """The group of a plain prefix: its first START bytes, or None when it is shorter."""
    return prefix[:START] if len(prefix) >= START else None


def _priority(route: Route) -> int:
    return route.priority


def _rank(entry: tuple) -> int:
    return entry[0]


def _conditional_entry(route: Route, path: str, longest: bool) -> tuple:
    d = route.destination
    rank = (LONGEST_RANK - len(path)) * LONGEST_RANK + route.priority if longest else route.priority
    return rank, route, _condition(d, d.path_type, path)


class _Compiled:
    """One service's routes in one table, reused by the next table while the service
    object stays the same: its priorities [base, end) keep their place in the order."""

    __slots__ = ("service", "key", "base", "end", "routes")

    def __init__(self, service: Service, key: tuple, base: int, routes: tuple[Route, ...]):
        self.service = service
        self.key = key
        self.base = base
        self.end = base + len(service.destinations)
        self.routes = routes


class RouteTable:
    """An immutable snapshot of every route, in DFP precedence order.

    Built from the previous table when one is given: only the services that changed are
    compiled (the others' Route objects, features and backends are the previous table's),
    and only the index entries they sit in are rebuilt, so a change costs the event loop
    in proportion to the change, not to the number of routes. Priorities are spaced
    PRIORITY_GAP apart so a new service fits between its neighbours without renumbering
    them; when it does not (or most services changed), the table is built whole.
    """

    def __init__(self, services: Iterable[Service], make_backend: Callable[..., Any], revision: int = 0,
                 longest_match: bool = False, make_stats: Callable[[str], Any] = lambda name: None,
                 first: Iterable[Service] = (), tls_listener: bool = False, previous: RouteTable | None = None):
        """`make_backend(host, port, service, tls=...)`; `first`: pyroute's own services (the
        stats page), matched before every other one; `tls_listener`: the table of the TLS
        ports, where a destination's httpsPort replaces its port; `previous`: the table this
        one replaces, whose compiled routes are reused."""
        self.revision = revision
        self.longest_match = longest_match
        self.tls_listener = tls_listener
        self.make_backend = make_backend
        self.make_stats = make_stats
        self.first = tuple(first)
        services = tuple(services)
        self.compiled: list[Route] = []  # the routes compiled for this table (the rest are reused)
        self.removed: list[Route] = []  # the previous table's routes this one no longer has
        self.gone: list[Service] = []  # the previous table's services this one does not have (replaced included)
        self.came: list[Service] = []  # this table's services the previous one did not have
        if previous is None or not self._compatible(previous) or not self._update(previous, services):
            self._build(services, previous)
        self._routes: tuple[Route, ...] | None = None

    # -- building ----------------------------------------------------------------------
    def _compatible(self, previous: RouteTable) -> bool:
        return (previous.longest_match == self.longest_match and previous.tls_listener == self.tls_listener
                and previous.make_backend == self.make_backend and previous.make_stats == self.make_stats
                and len(previous.first) == len(self.first)
                and all(a is b for a, b in zip(previous.first, self.first)))

    def _compile(self, service: Service, key: tuple, base: int) -> _Compiled:
        routes = []
        for number, destination in enumerate(service.destinations):  # priority: base + place in the service
            if destination.req_mode != "http":
                continue  # tcp/sni destinations have their own listeners (tcp.py)
            port = (destination.https_port or destination.port) if self.tls_listener else destination.port
            if self.tls_listener and destination.src_https_port:  # DFP: the https backend's own entry port
                destination = replace(destination, src_port=destination.src_https_port)
            if not port or (destination.verify_client_ssl and not self.tls_listener):
                continue  # only an httpsPort, or client certificates required: not over plain HTTP
            host = destination.outbound_hostname or service.name
            backend = self.make_backend(host, port, service, tls=destination.ssl_verify_none)
            routes.append(Route(service, destination, backend, base + number, self.make_stats(service.name)))
        self.compiled += routes
        return _Compiled(service, key, base, tuple(routes))

    def _build(self, services: tuple[Service, ...], previous: RouteTable | None) -> None:
        keyed = [((-1, f"{i:09d}", s.name), s) for i, s in enumerate(self.first)]
        keyed += sorted(((precedence_key(s), s) for s in services), key=_first)
        self._order = [self._compile(s, key, i * PRIORITY_GAP) for i, (key, s) in enumerate(keyed)]
        self._keys = [c.key for c in self._order]
        self._by_id = {id(c.service): c for c in self._order[len(self.first):]}
        if previous is not None:
            self.removed = list(previous.routes)
            self.gone = list(previous.services)
        self.came = list(services)
        routes = [r for c in self._order for r in c.routes]
        self.default = next((r for r in routes if r.service.is_default_backend), None)
        self._hostless = PathIndex((r for r in routes if not _host_names(r)), self.longest_match, self.default)
        self._hosted = tuple(r for r in routes if _host_names(r) or r.destination.redirect_from)
        self._by_host: dict[bytes | None, PathIndex | RedirectIndex | None] = {}

    def _update(self, previous: RouteTable, services: tuple[Service, ...]) -> bool:
        """Derive this table from `previous` by the services that changed; False when a full
        build is the better (or the only) way."""
        now = dict(zip(map(id, services), services))
        before = previous._by_id
        gone = [before[i] for i in before.keys() - now.keys()]
        came = [now[i] for i in now.keys() - before.keys()]
        if len(gone) + len(came) > max(MAX_INCREMENTAL, len(services) // 8):
            return False
        order, keys = list(previous._order), list(previous._keys)
        by_id = dict(before)
        for c in gone:
            at = bisect_left(keys, c.key)
            del order[at], keys[at]
            del by_id[id(c.service)]
        self.removed = [r for c in gone for r in c.routes]
        for service in sorted(came, key=precedence_key):
            key = precedence_key(service)
            at = bisect_left(keys, key)
            if at < len(keys) and keys[at] == key:
                return False  # two services with one name: cannot happen in a registry snapshot
            low = order[at - 1].end if at else 0
            high = order[at].base if at < len(order) else low + 2 * PRIORITY_GAP
            room = high - low - len(service.destinations)
            base = low + room // 2 if room >= 2 else self._spread(order, by_id, at, len(service.destinations))
            compiled = self._compile(service, key, base)
            order.insert(at, compiled)
            keys.insert(at, key)
            by_id[id(service)] = compiled
        self._order, self._keys, self._by_id = order, keys, by_id
        self.gone = [c.service for c in gone]
        self.came = came
        changed = [*self.removed, *self.compiled]
        if any(r.service.is_default_backend for r in changed):
            self.default = next((r for c in order for r in c.routes if r.service.is_default_backend), None)
        else:
            self.default = previous.default
        self._hostless = previous._hostless.updated(
            [r for r in self.removed if not _host_names(r)], [r for r in self.compiled if not _host_names(r)],
            self.default)
        hosted = [r for r in changed if _host_names(r) or r.destination.redirect_from]
        if hosted:
            self._hosted = tuple(sorted({*previous._hosted, *hosted} - set(self.removed), key=_priority))
            self._by_host = {}  # the Hosts whose indexes the change touches are not known: all rebuilt lazily
        else:
            self._hosted = previous._hosted
            self._by_host = dict(previous._by_host)  # every Host's own index is still right
        return True

    def _spread(self, order: list[_Compiled], by_id: dict[int, _Compiled], at: int, size: int) -> int:
        """No priority is free between the neighbours of a new service going in at `at`:
        spread a window of neighbours evenly over a range wide enough (doubling the window
        until it is at most half full), moving their routes (Route.moved), and return the
        base left free for the new service's `size` destinations."""
        width = 1
        while True:
            i, j = max(0, at - width), min(len(order), at + width)
            members = order[i:j]
            low = order[i - 1].end if i else 0
            high = order[j].base if j < len(order) else low + (len(members) + 2) * PRIORITY_GAP
            slot = max([size, *(len(c.service.destinations) for c in members)]) + 1
            spacing = (high - low) // (len(members) + 1)
            if spacing >= 2 * slot or (i == 0 and j == len(order)):
                break
            width *= 2
        if spacing < slot:
            spacing = slot  # the whole table is full: the range above the last service is unbounded
        for k, c in enumerate(members):
            base = low + (k + (k >= at - i)) * spacing
            moved = tuple(r.moved(base + r.priority - c.base) for r in c.routes)
            order[i + k] = relabelled = _Compiled(c.service, c.key, base, moved)
            if id(c.service) in by_id:
                by_id[id(c.service)] = relabelled
            self.removed += c.routes
            self.compiled += moved
        return low + (at - i) * spacing

    # -- what the table holds ---------------------------------------------------------------
    @property
    def services(self) -> tuple[Service, ...]:
        """The services (pyroute's own excluded), in precedence order."""
        return tuple(c.service for c in self._order[len(self.first):])

    @property
    def routes(self) -> tuple[Route, ...]:
        """Every route, in match order (built on first use: a swap does not pay for it)."""
        if self._routes is None:
            self._routes = tuple(r for c in self._order for r in c.routes)
        return self._routes

    # -- matching -----------------------------------------------------------------------------
    def match(self, host: bytes | None, path: bytes, headers: list | None = None, conn: Any = None) -> Route | None:
        """The route for a request; `host` is the raw Host header, `path` excludes the query;
        `headers` and `conn` (the client connection) only serve routes with conditions."""
        if not self._hosted:
            return self._hostless.match(path, headers, conn)
        own = self._by_host.get(host, _UNKNOWN)
        if own is _UNKNOWN:
            own = self._index_for(host)
        if own is None:  # no route names this Host: the routes without a domain decide
            return self._hostless.match(path, headers, conn)
        if own.__class__ is RedirectIndex:
            return own.route
        rank, route = own.best(path, headers, conn)
        other_rank, other = self._hostless.best(path, headers, conn)
        if other_rank < rank:
            route = other
        return route if route is not None else self.default

    def _index_for(self, raw_host: bytes | None) -> PathIndex | RedirectIndex | None:
        """The index of the routes whose domains match this Host (None: there are none)."""
        host = normalize_host(raw_host) if raw_host else ""
        redirecting = next((r for r in self._hosted if any(
            host.startswith(d) for d in r.destination.redirect_from)), None)  # DFP: hdr_beg(host) -i
        if redirecting is not None:
            # redirectFromDomain is a frontend rule in DFP: it answers for that Host whatever the path
            index = RedirectIndex(redirecting)
        else:
            own = [r for r in self._hosted if _host_names(r)
                   and any(_host_matches(r.service.domain_algo, d, host) for d in _host_names(r))]
            index = PathIndex(own, self.longest_match) if own else None
        if len(self._by_host) >= HOST_CACHE_LIMIT:
            self._by_host.clear()
        self._by_host[raw_host] = index
        return index


_UNKNOWN = object()  # a Host not looked at yet (None means: no route names it)


def _first(pair: tuple) -> tuple:
    return pair[0]


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
