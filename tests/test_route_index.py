"""The route table's plain path index (routing.PathIndex, bucketed by the path's first bytes
and the prefix length) against a plain scan of its routes, table after incremental table
(pure, hypothesis): the index must choose what DFP's first-match and longest-match
precedence choose, whatever the prefixes' lengths and first bytes, and a table derived
from its previous one must answer as one built whole."""
from hypothesis import given, settings, strategies as st

from pyroute.dataplane.routing import RouteTable, _no_backend
from pyroute.services import parse_service

# short, long, sharing first bytes or not, one a prefix of another, "/" (DFP's catch-all last)
PREFIXES = ["/", "/a", "/ab", "/abc", "/a/b", "/b", "/s", "/sv", "/svc-1", "/svc-10", "/svc-100", "/x/y/z"]
REQUESTS = ["", "/", "a", "/a", "/ab", "/abc/d", "/a/b/c", "/b", "/bx", "/s", "/svc-1", "/svc-10x",
            "/svc-100/x", "/svc-2", "/x", "/x/y/z", "/z", "//", "*"]


def scan(routes, path: bytes, longest: bool):
    """What the index must find: the plain route whose path is a prefix of `path`; the first in
    precedence order, or with longest-match the longest prefix, then the first in order."""
    hits = [(-len(p) if longest else 0, n, r) for n, r in enumerate(routes)
            for p in r.destination.paths if path.startswith(p.encode())]
    return min(hits, key=lambda hit: hit[:2])[2] if hits else None


@st.composite
def service(draw, name):
    paths = draw(st.lists(st.sampled_from(PREFIXES), min_size=1, max_size=3, unique=True))
    params = {"serviceName": name, "port": "80", "servicePath": ",".join(paths)}
    if draw(st.booleans()):
        params["aclName"] = draw(st.sampled_from(["0", "5", "9"])) + name
    return parse_service(params)


# (service number, remove it?): mostly adds and replacements
changes = st.lists(st.tuples(st.integers(0, 14), st.integers(0, 4).map(lambda n: n == 0)), min_size=1, max_size=40)


@settings(max_examples=200, deadline=None)
@given(st.data(), changes, st.booleans())
def test_index_matches_a_scan_after_every_incremental_change(data, steps, longest):
    services, table = {}, None
    for revision, (number, remove) in enumerate(steps):
        name = f"s{number}"
        if remove:
            services.pop(name, None)
        else:
            services[name] = data.draw(service(name))
        before = table
        table = RouteTable(tuple(services.values()), _no_backend, revision, longest, previous=before)
        whole = RouteTable(tuple(services.values()), _no_backend, revision, longest)
        for request in REQUESTS:
            path = request.encode()
            expected = scan(table.routes, path, longest)
            assert table.match(b"any.test", path) is expected, (request, expected, table.match(b"any.test", path))
            found = whole.match(b"any.test", path)
            assert (found and (found.service, found.destination)) == \
                (expected and (expected.service, expected.destination)), request
        if before is not None:  # the previous table is left as it was (copy-on-write): it answers
            again = RouteTable(tuple(services.values()), _no_backend, revision, longest, previous=before)
            for request in REQUESTS:  # as before, and deriving the same change from it again gives the same
                path = request.encode()
                assert before.match(b"any.test", path) is scan(before.routes, path, longest)
                assert again.match(b"any.test", path) is scan(again.routes, path, longest)
