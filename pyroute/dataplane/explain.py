"""Routes that explain themselves: which route a request matches and why the earlier ones
lost (`explain`), and which routes can never match because an earlier one always catches
their requests first (`Shadows`). Both read a compiled RouteTable: the winner is what
`RouteTable.match` answers, and each test is built by the constructors the table's
conditions are built with (routing._path_test, routing._host_matches).

Shadowing is claimed only when it is certain (no false positives): a catcher counts only
when nothing but its path and Host decides whether it matches (no serviceHeader, userAgent,
servicePathExclude; srcPort only the same as the shadowed route's), and only for the pairs
of path and host rules whose inclusion can be decided exactly (prefix in prefix, the exact
path tested by the catcher's own test, a domain under a wider domain rule, ...).
"""

from __future__ import annotations

from bisect import bisect_left, insort
from collections.abc import Iterator
from typing import Any

from pyroute.dataplane.headers import normalize_host
from pyroute.dataplane.routing import LONGEST_RANK, Route, RouteTable, _host_matches, _path_test

MAX_SUBSTRINGS = 128  # longest path whose substrings are looked up for path_sub catchers
MAX_INSERTS = 64  # routes added at once above which the entry lists are sorted whole instead


# -- /match ---------------------------------------------------------------------------------
class _Socket:
    """What a srcPort condition reads off the client connection: the port it arrived on."""

    def __init__(self, port: int):
        self.port = port

    def get_extra_info(self, name: str, default=None):
        return ("0.0.0.0", self.port) if name == "sockname" else default


class _Connection:
    def __init__(self, port: int):
        self.transport = _Socket(port)


def explain(table: RouteTable, host: str, path: str, headers: list[tuple[bytes, bytes]], port: int = 0,
            method: str = "GET") -> dict:
    """The route `table` gives this request and, for every route tried before it (and every
    other route that would match), why it lost."""
    raw_host = host.encode() if host else None
    winner = table.match(raw_host, path.encode(), headers, _Connection(port))
    normalized = normalize_host(raw_host) if raw_host else ""
    redirect = winner is not None and any(normalized.startswith(d) for d in winner.destination.redirect_from)
    candidates = []
    for route in table.routes:
        if route is winner:
            continue
        reason = _why_not(route, normalized, path.encode(), headers, port)
        if reason is None and redirect:
            reason = f"matches too, but the Host is {_name(winner)}'s redirectFromDomain, which takes every path"
        elif reason is None:  # it matches too, and lost on precedence
            reason = (f"matches too, but {_name(winner)} is matched first ({_order(table, winner, route, path)})"
                      if winner is not None else "matches")
        elif winner is not None and _before(table, winner, route, path):
            continue  # tried after the winner and not matching: nothing to explain
        candidates.append({**_describe(route), "Lost": reason})
    answer: dict[str, Any] = {"Host": host, "Path": path, "Port": port, "Method": method,
                              "Match": _describe(winner) if winner is not None else None,
                              "Candidates": candidates}
    if winner is None:
        answer["Why"] = "no route matches: pyroute answers 503"
    elif redirect:
        answer["Why"] = (f"the Host starts with {winner.service.name}'s redirectFromDomain: every path is "
                         "redirected to its first serviceDomain")
    elif winner is table.default and _why_not(winner, normalized, path.encode(), headers, port) is not None:
        answer["Why"] = "no route matches: the default backend (isDefaultBackend) takes it"
    else:
        answer["Why"] = "the first route whose rules all match, in " + (
            "longest-path order (LONGEST_MATCH)" if table.longest_match else
            "DFP's order (/.well-known services, then by aclName, '/' services last; destinations by index)")
        d = winner.destination
        if d.allowed_methods and method.upper() not in d.allowed_methods:
            answer["Answer"] = f"403: {method} is not in allowedMethods"
        elif method.upper() in d.denied_methods:
            answer["Answer"] = f"403: {method} is in deniedMethods"
    return answer


def _name(route: Route) -> str:
    return f"{route.service.name}#{route.destination.index}" if route.destination.index else route.service.name


def _describe(route: Route) -> dict:
    d = route.destination
    return {"Service": route.service.name, "Index": d.index, "Paths": list(d.paths),
            "PathType": d.path_type + (" -i" if d.path_ignore_case else ""), "Domains": list(d.domains),
            "DomainAlgo": route.service.domain_algo, "AclName": route.service.acl_name}


def _matching_path(route: Route, path: bytes) -> str | None:
    d = route.destination
    return next((p for p in d.paths if _path_test(d.path_type, p, d.path_ignore_case)(path)), None)


def _before(table: RouteTable, winner: Route, other: Route, path: str) -> bool:
    """Is `winner` tried before `other` for this path?"""
    return _rank(table, winner, path) < _rank(table, other, path)


def _rank(table: RouteTable, route: Route, path: str) -> int:
    if not table.longest_match:
        return route.priority
    matched = _matching_path(route, path.encode())
    length = len(matched) if matched is not None else max(map(len, route.destination.paths), default=0)
    return (LONGEST_RANK - length) * LONGEST_RANK + route.priority


def _order(table: RouteTable, winner: Route, loser: Route, path: str) -> str:
    if table.longest_match:
        return "its matching path is longer" if _rank(table, winner, path) // LONGEST_RANK < \
            _rank(table, loser, path) // LONGEST_RANK else "same length, earlier in aclName order"
    if winner.service is loser.service:
        return "an earlier destination index of the same service"
    return f"precedence: aclName {winner.service.acl_name!r} before {loser.service.acl_name!r}" \
        if winner.service.acl_name != loser.service.acl_name else "precedence"


def _why_not(route: Route, host: str, path: bytes, headers, port: int) -> str | None:
    """Why `route` does not match this request, or None when it does."""
    d = route.destination
    algo = route.service.domain_algo
    if d.domains and not any(_host_matches(algo, domain, host) for domain in d.domains):
        return f"Host {host!r} does not match serviceDomain {','.join(d.domains)} ({algo})"
    if _matching_path(route, path) is None:
        kind = d.path_type + (" -i" if d.path_ignore_case else "")
        return f"path {path.decode('latin-1')!r} does not match servicePath {','.join(d.paths)} ({kind})"
    if d.path_excludes:
        excluded = next((x for x in d.path_excludes if _path_test(d.path_type, x, d.path_ignore_case)(path)), None)
        if excluded is not None:
            return f"servicePathExclude {excluded} excludes the path"
    for name, value in d.header_match:
        if not any(n.lower() == name.encode() and v == value.encode() for n, v in headers):
            return f"serviceHeader {name}:{value} is not in the request"
    if d.user_agents and not any(n.lower() == b"user-agent" and any(a.encode() in v.lower() for a in d.user_agents)
                                 for n, v in headers):
        return f"User-Agent does not contain any of userAgent {','.join(d.user_agents)}"
    if d.src_port and d.src_port != port:
        return f"srcPort {d.src_port}: the request came in on port {port or 'the default ports'}"
    return None


# -- shadowed routes --------------------------------------------------------------------------
_KINDS = {"path_beg": "beg", "path": "str", "path_end": "end", "path_sub": "sub"}  # catchers looked up by key


class Shadows:
    """The (route, servicePath) entries of one listener's table that can never match, each
    with the route that always catches its requests first, kept up to date table by table.

    A change costs in proportion to what it touches, not to the table: catchers are indexed
    by host and path key (so an entry finds the catchers that may cover it with a few dict
    lookups), every entry is kept in path order (so a new catcher finds the entries it may
    cover by bisection), and only the entries of changed routes, those whose catcher went,
    and those a new catcher may cover are judged again."""

    def __init__(self):
        self.table: RouteTable | None = None
        self.found: dict[tuple, dict] = {}  # (service, index, path) -> finding
        # host key (None: any Host) -> path key (kind, ignore case, pattern) -> [(route, pattern)]
        self._keyed: dict[str | None, dict[tuple, list[tuple[Route, str]]]] = {}
        self._other: list[tuple[Route, str]] = []  # path_reg/_dir/_dom/_len catchers: tested pairwise
        self._lengths: dict[tuple[str, bool], dict[int, int]] = {}  # (kind, ignore case) -> pattern length -> count
        self._entries: list[tuple[str, str, int]] = []  # (path, service, index) of every entry, sorted
        self._lowered: list[tuple[str, str, int]] = []  # the same with the path lower-case
        self._routes: dict[tuple[str, int], Route] = {}
        self._caught_by: dict[tuple[str, int], set[tuple]] = {}  # catcher (service, index) -> finding keys

    def update(self, table: RouteTable) -> list[dict]:
        """Follow `table`, built with the previous one as its `previous` (its removed and
        compiled routes are the change); -> the findings that are new."""
        removed, added = table.removed, table.compiled
        if self.table is None or len(removed) + len(added) > len(table.routes):  # most of it changed
            self.__init__()
            removed, added = (), table.routes
        self.table = table
        again: set[tuple] = set()
        for route in removed:
            self._remove(route, again)
        for route in added:
            self._add(route, sort=len(added) <= MAX_INSERTS)
        if len(added) > MAX_INSERTS:
            self._entries.sort()
            self._lowered.sort()
        for route in added:
            d = route.destination
            again.update((route.service.name, d.index, path) for path in d.paths)
            if _eligible(route):
                for pattern in d.paths:
                    again.update(self._coverable(route, pattern))
        new = []
        for key in again:
            before = self.found.pop(key, None)
            if before is not None:
                self._caught_by.get(_catcher_key(before), set()).discard(key)
            finding = self._judge(key)
            if finding is not None:
                self.found[key] = finding
                self._caught_by.setdefault(_catcher_key(finding), set()).add(key)
                if before is None or _catcher_key(before) != _catcher_key(finding):
                    new.append(finding)
        return new

    @property
    def findings(self) -> list[dict]:
        return [self.found[k] for k in sorted(self.found)]

    # -- the index ----------------------------------------------------------------------------
    def _add(self, route: Route, sort: bool) -> None:
        d = route.destination
        key = (route.service.name, d.index)
        self._routes[key] = route
        for path in d.paths:
            if sort:
                insort(self._entries, (path, *key))
                insort(self._lowered, (path.lower(), *key))
            else:  # many at once: sorted once afterwards
                self._entries.append((path, *key))
                self._lowered.append((path.lower(), *key))
        if not _eligible(route):
            return
        for pattern in d.paths:
            kind = _KINDS.get(d.path_type)
            if kind is None:
                self._other.append((route, pattern))
                continue
            lengths = self._lengths.setdefault((kind, d.path_ignore_case), {})
            lengths[len(pattern)] = lengths.get(len(pattern), 0) + 1
            for host in d.domains or (None,):
                self._keyed.setdefault(host, {}).setdefault((kind, d.path_ignore_case, pattern), []).append(
                    (route, pattern))

    def _remove(self, route: Route, again: set[tuple]) -> None:
        d = route.destination
        key = (route.service.name, d.index)
        if self._routes.get(key) is route:
            del self._routes[key]
        for path in d.paths:
            _discard(self._entries, (path, *key))
            _discard(self._lowered, (path.lower(), *key))
            finding = self.found.pop((*key, path), None)
            if finding is not None:
                self._caught_by.get(_catcher_key(finding), set()).discard((*key, path))
        again.update(self._caught_by.pop(key, ()))  # what it caught may be caught by another, or not at all
        if not _eligible(route):
            return
        for pattern in d.paths:
            kind = _KINDS.get(d.path_type)
            if kind is None:
                self._other = [(r, p) for r, p in self._other if r is not route]
                continue
            lengths = self._lengths[(kind, d.path_ignore_case)]
            lengths[len(pattern)] -= 1
            if not lengths[len(pattern)]:
                del lengths[len(pattern)]
            for host in d.domains or (None,):
                by_path = self._keyed[host]
                path_key = (kind, d.path_ignore_case, pattern)
                left = [(r, p) for r, p in by_path[path_key] if r is not route]
                if left:
                    by_path[path_key] = left
                else:
                    del by_path[path_key]
                    if not by_path:
                        del self._keyed[host]

    def _coverable(self, catcher: Route, pattern: str) -> Iterator[tuple]:
        """Keys of the entries `catcher`'s `pattern` may cover (a superset, judged afterwards)."""
        d = catcher.destination
        if _KINDS.get(d.path_type) not in ("beg", "str"):
            for path, name, index in self._entries:
                yield name, index, path
            return
        entries = self._lowered if d.path_ignore_case else self._entries
        at = bisect_left(entries, (pattern,))
        while at < len(entries) and entries[at][0].startswith(pattern):
            path, name, index = entries[at]
            if not d.path_ignore_case:
                yield name, index, path
            else:  # the lowered list names the entry by its lowered path: yield the entry's own
                route = self._routes.get((name, index))
                yield from ((name, index, p) for p in (route.destination.paths if route else ()) if p.lower() == path)
            at += 1

    # -- judging one entry --------------------------------------------------------------------
    def _judge(self, key: tuple) -> dict | None:
        name, index, path = key
        route = self._routes.get((name, index))
        if route is None or path not in route.destination.paths:
            return None
        d = route.destination
        if route.service.is_default_backend or d.redirect_from:
            return None  # reachable anyway: unmatched requests, or its redirect hosts
        best = None
        rank = _entry_rank(self.table, route, path)
        for catcher, pattern in self._candidates(route, path):
            if catcher is route and pattern == path:
                continue
            catcher_rank = _entry_rank(self.table, catcher, pattern)
            if catcher_rank < rank and (best is None or catcher_rank < best[0]) \
                    and _covers(catcher, pattern, route, path):
                best = (catcher_rank, catcher, pattern)
        if best is None:
            return None
        _, by, by_path = best
        return {"Service": name, "Index": index, "Path": path,
                "ShadowedBy": {"Service": by.service.name, "Index": by.destination.index, "Path": by_path},
                "Reason": _reason(self.table, route, path, by, by_path)}

    def _candidates(self, route: Route, path: str) -> Iterator[tuple[Route, str]]:
        yield from self._other
        keys = [*self._path_keys(path, False), *self._path_keys(path.lower(), True)]  # -i catchers: lower-case
        for host in (None, *_host_keys(route)):
            by_path = self._keyed.get(host)
            if by_path is not None:
                for key in keys:
                    yield from by_path.get(key, ())

    def _path_keys(self, path: str, ignore_case: bool) -> Iterator[tuple]:
        for length in self._lengths.get(("beg", ignore_case), ()):
            if length <= len(path):
                yield "beg", ignore_case, path[:length]
        if self._lengths.get(("str", ignore_case)):
            yield "str", ignore_case, path
        for length in self._lengths.get(("end", ignore_case), ()):
            if length <= len(path):
                yield "end", ignore_case, path[len(path) - length:]
        if self._lengths.get(("sub", ignore_case)) and len(path) <= MAX_SUBSTRINGS:
            for length in self._lengths[("sub", ignore_case)]:
                for start in range(len(path) - length + 1):
                    yield "sub", ignore_case, path[start:start + length]


def _catcher_key(finding: dict) -> tuple[str, int]:
    return finding["ShadowedBy"]["Service"], finding["ShadowedBy"]["Index"]


def _discard(entries: list, item: tuple) -> None:
    at = bisect_left(entries, item)
    if at < len(entries) and entries[at] == item:
        del entries[at]


def _reason(table: RouteTable, route: Route, path: str, by: Route, by_path: str) -> str:
    b = by.destination
    where = f" on {','.join(b.domains)}" if b.domains else " on every Host"
    order = "a longer or equal path" if table.longest_match else (
        "an earlier destination of the same service" if by.service is route.service
        else f"aclName {by.service.acl_name!r} comes before {route.service.acl_name!r}")
    return (f"{route.service.name} servicePath {path} can never match: {by.service.name} "
            f"({b.path_type}{' -i' if b.path_ignore_case else ''} {by_path}{where}) catches every such request "
            f"first ({order})")


def _eligible(route: Route) -> bool:
    """A route whose match depends on its path and Host alone (srcPort is compared per pair)."""
    d = route.destination
    return not (d.header_match or d.user_agents or d.path_excludes)


def _host_keys(route: Route) -> Iterator[str]:
    """Every domain a catcher could be listed under that might cover one of route's domains:
    the prefixes, suffixes and dot-delimited runs of each."""
    seen = set()
    for domain in route.destination.domains:
        for i in range(len(domain) + 1):
            for key in (domain[:i], domain[i:]):
                if key and key not in seen:
                    seen.add(key)
                    yield key
        labels = domain.strip(".").split(".")
        for i in range(len(labels)):
            for j in range(i + 1, len(labels) + 1):
                key = ".".join(labels[i:j])
                if key not in seen:
                    seen.add(key)
                    yield key


def _entry_rank(table: RouteTable, route: Route, pattern: str) -> int:
    if table.longest_match:
        return (LONGEST_RANK - len(pattern)) * LONGEST_RANK + route.priority
    return route.priority


def _covers(catcher: Route, pattern: str, route: Route, path: str) -> bool:
    """Does every request `route` matches by `path` also match `catcher` by `pattern`?"""
    a, b = catcher.destination, route.destination
    if a.src_port and a.src_port != b.src_port:
        return False
    if b.path_ignore_case and not a.path_ignore_case:
        return False  # the route takes case variants the catcher does not
    if not _covers_hosts(catcher, route):
        return False
    return _covers_paths(a.path_type, pattern, a.path_ignore_case, b.path_type, path)


def _covers_hosts(catcher: Route, route: Route) -> bool:
    a, b = catcher.destination, route.destination
    if not a.domains:
        return True
    if not b.domains:
        return False
    algo_a, algo_b = catcher.service.domain_algo, route.service.domain_algo
    return all(any(_domain_covers(algo_a, d_a, algo_b, d_b) for d_a in a.domains) for d_b in b.domains)


def _domain_covers(algo_a: str, d_a: str, algo_b: str, d_b: str) -> bool:
    if algo_b == "hdr":  # one host: the catcher's own test decides
        return _host_matches(algo_a, d_a, d_b)
    if algo_a == "hdr_beg":
        return algo_b == "hdr_beg" and d_b.startswith(d_a)
    if algo_a == "hdr_end":
        return algo_b == "hdr_end" and d_b.endswith(d_a)
    if algo_a == "hdr_dom":
        if algo_b == "hdr_dom":
            return f".{d_a}." in f".{d_b}."
        return algo_b == "hdr_end" and d_b.startswith(".") and f".{d_a}." in f"{d_b}."
    return False


def _covers_paths(type_a: str, p_a: str, ignore_case: bool, type_b: str, p_b: str) -> bool:
    """Is every path matching (type_b, p_b) matched by (type_a, p_a)?"""
    if ignore_case:
        p_b = p_b.lower()  # the catcher lowers the path before its (lower-case) pattern sees it
    if type_b == "path":  # one path: the catcher's own test decides
        return bool(_path_test(type_a, p_a, ignore_case)(p_b.encode()))
    if type_a == "path_sub":
        return type_b in ("path_beg", "path_end", "path_sub") and p_a in p_b
    if type_a == "path_beg":
        return type_b == "path_beg" and p_b.startswith(p_a)
    if type_a == "path_end":
        return type_b == "path_end" and p_b.endswith(p_a)
    if type_a == "path_dir":
        return type_b == "path_beg" and ("/" + p_a.strip("/") + "/") in p_b
    return False
