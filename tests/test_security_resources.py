"""Issue 14, resource findings: F9 (reconfigure cost on the request loop), F12 (a blackholed
DNS server stalls requests when a cached name expires), F16 (per-address connection cap,
minimum request body rate, cross-site admin calls)."""
from __future__ import annotations

import base64
import http.client
import json
import os
import re
import select
import signal
import socket
import threading
import time

import pytest

from support.upstream import wait_until


# -- F12: stale DNS answers are served at once, refreshed in the background -------------------

F12_DNS_TIMEOUT = 3.0  # the resolver waits this long per try, 2 tries: a stalled request waits >= 6 s
F12_CLIENT_TIMEOUT = 1.5  # well below one resolver try: an answer in time never waited on DNS


def test_F12_expired_name_on_blackholed_dns_is_served_stale_at_once(make_pyroute, dns, replicas):
    a, b = replicas[0], replicas[1]
    p = make_pyroute(DNS_TTL_CAP="0.5", DNS_TIMEOUT=str(F12_DNS_TIMEOUT))
    dns.set_service("f12-stale", a.ip)
    p.reconfigure(serviceName="f12-stale", servicePath="/f12", port=a.port)
    status, headers, _ = p.get("/f12/x")
    assert (status, headers.get("X-Upstream")) == (200, a.addr)
    answered = max(q[0] for q in dns.queries_for("f12-stale", rcode="NOERROR"))
    dns.blackhole_service("f12-stale")
    # the cached answer (life DNS_TTL_CAP = 0.5 s from `answered`) is now expired
    wait_until(lambda: time.monotonic() > answered + 1.0, timeout=3, what="the cached answer to expire")
    for _ in range(3):  # each answered from the stale entry, long before one DNS try could time out
        status, headers, _ = p.get("/f12/x", timeout=F12_CLIENT_TIMEOUT)
        assert (status, headers.get("X-Upstream")) == (200, a.addr)
    # the refresh went out in the background (and got no answer)
    wait_until(lambda: dns.queries_for("f12-stale", since=answered, rcode="DROPPED"), timeout=5,
               what="a background refresh to reach the blackholed server")
    # the DNS server comes back with a new address: a later refresh (backoff <= DNS_TTL_CAP) sees it
    dns.set_service("f12-stale", b.ip)
    dns.blackhole_service("f12-stale", on=False)
    wait_until(lambda: p.get("/f12/x", timeout=F12_CLIENT_TIMEOUT)[1].get("X-Upstream") == b.addr,
               timeout=2 * 2 * F12_DNS_TIMEOUT + 5, interval=0.1, what="the new address once DNS answers again")


def test_F12_first_lookup_of_a_blackholed_name_waits_bounded_then_503(make_pyroute, dns, replicas):
    p = make_pyroute(DNS_TTL_CAP="0.5", DNS_TIMEOUT="0.5")
    dns.set_service("f12-never", replicas[0].ip)
    dns.blackhole_service("f12-never")
    p.reconfigure(serviceName="f12-never", servicePath="/f12never", port=replicas[0].port)
    status, _, _ = p.get("/f12never/x", timeout=10)  # no answer ever cached: the lookup's timeout bounds it
    assert status == 503
    assert dns.queries_for("f12-never", rcode="DROPPED")


# -- F16: one client address cannot hold what every client shares --------------------------------

def _get(sock: socket.socket, path: str) -> bytes:
    """One GET on `sock`; -> the whole response (Content-Length framed), or b"" when closed."""
    sock.sendall(f"GET {path} HTTP/1.1\r\nHost: f16\r\n\r\n".encode())
    data = b""
    try:
        while b"\r\n\r\n" not in data:
            chunk = sock.recv(65536)
            if not chunk:
                return data
            data += chunk
        head, _, body = data.partition(b"\r\n\r\n")
        length = int(re.search(rb"(?i)\r\ncontent-length: *(\d+)", head).group(1))
        while len(body) < length:
            chunk = sock.recv(65536)
            if not chunk:
                break
            body += chunk
        return head + b"\r\n\r\n" + body
    except ConnectionResetError:
        return data


def _connect(p, source: str = "127.0.0.1") -> socket.socket:
    return socket.create_connection(("127.0.0.1", p.http_port), timeout=10, source_address=(source, 0))


def test_F16_maxconn_per_ip_closes_the_connection_over_the_cap(make_pyroute, dns, replicas):
    up = replicas[0]
    p = make_pyroute(MAXCONN_PER_IP="2")
    dns.set_service("f16-cap", up.ip)
    p.reconfigure(serviceName="f16-cap", servicePath="/f16cap", port=up.port)
    first, second = _connect(p), _connect(p)
    for s in (first, second):
        assert _get(s, "/f16cap/hello").startswith(b"HTTP/1.1 200")
    third = _connect(p)  # the kernel completes the handshake; pyroute closes it at once
    assert _get(third, "/f16cap/third") == b""
    assert not up.requests("/f16cap/third")
    other = _connect(p, "127.0.0.2")  # another client address is not affected
    assert _get(other, "/f16cap/other").startswith(b"HTTP/1.1 200")
    assert _get(first, "/f16cap/again").startswith(b"HTTP/1.1 200")  # nor are the admitted ones
    second.close()  # room again for 127.0.0.1 once pyroute saw the close
    wait_until(lambda: _get(_connect(p), "/f16cap/later").startswith(b"HTTP/1.1 200"), timeout=5,
               what="a new connection from 127.0.0.1 once one of its two closed")
    for s in (first, third, other):
        s.close()


class _RawUpstream:
    """An upstream that reads whatever comes and never answers; `closed` is set when
    pyroute closes (or resets) the connection it opened."""

    def __init__(self, ip: str):
        self.listener = socket.create_server((ip, 0))
        self.ip, self.port = ip, self.listener.getsockname()[1]
        self.accepted = threading.Event()
        self.closed = threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        self.accepted.set()
        with conn:
            try:
                while conn.recv(65536):
                    pass
            except OSError:
                pass
        self.closed.set()

    def close(self) -> None:
        self.listener.close()


def test_F16_body_slower_than_min_body_rate_gets_408_and_frees_the_upstream(make_pyroute, dns):
    upstream = _RawUpstream("127.0.0.21")
    p = make_pyroute(TIMEOUT_CLIENT="1", MIN_BODY_RATE="20")
    dns.set_service("f16-slow", upstream.ip)
    p.reconfigure(serviceName="f16-slow", servicePath="/f16slow", port=upstream.port)
    with _connect(p) as s:
        s.sendall(b"POST /f16slow/upload HTTP/1.1\r\nHost: f16\r\nContent-Length: 1000\r\n\r\n")
        upstream.accepted.wait(5)
        answer, sent = b"", 0
        deadline = time.monotonic() + 30  # the head's 60 bytes buy 3 s: a 408 comes after about 4 s
        while not answer and sent < 1000 and time.monotonic() < deadline:
            s.sendall(b"x")  # 5 bytes/s, each well inside TIMEOUT_CLIENT: only the rate can stop it
            sent += 1
            if select.select([s], [], [], 0.2)[0]:
                answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 408"), (sent, answer)
    assert sent < 1000
    assert upstream.closed.wait(5), "the upstream connection of the cut request was not closed"
    upstream.close()


def _admin_call(p, method: str, query: str, headers: dict[str, str]) -> tuple[int, dict]:
    c = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
    try:
        c.request(method, f"/v1/docker-flow-proxy/{query}", headers=headers)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_F16_cross_site_admin_change_with_credentials_is_refused(make_pyroute, dns, replicas):
    up = replicas[0]
    dns.set_service("f16-csrf", up.ip)
    p = make_pyroute(ADMIN_USER="admin", ADMIN_PASS="s3cret")
    auth = {"Authorization": "Basic " + base64.b64encode(b"admin:s3cret").decode()}
    query = f"reconfigure?serviceName=f16-csrf&servicePath=/f16csrf&port={up.port}"
    # what a browser holding the admin credentials sends for <img src=...> on another site
    for browser in ({"Sec-Fetch-Site": "cross-site", "Referer": "https://evil.example/page"},
                    {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"},
                    {"Referer": "https://evil.example/page"},
                    {"Origin": "null"},
                    {"Sec-Fetch-Site": "same-site", "Origin": "https://other.example.com"}):
        for method in ("GET", "POST"):
            status, body = _admin_call(p, method, query, {**auth, **browser})
            assert (status, body["Status"]) == (403, "NOK"), (method, browser, status, body)
    assert p.get("/f16csrf/hello")[0] == 503  # nothing changed
    status, body = _admin_call(p, "GET", "remove?serviceName=nothing", {**auth, "Sec-Fetch-Site": "cross-site"})
    assert status == 403
    # reading is not a change: a cross-site GET of /config is not refused (the browser cannot read it)
    assert _admin_call(p, "GET", "config?type=json", {**auth, "Sec-Fetch-Site": "cross-site"})[0] == 200
    # curl, DFSL and scripts send none of those headers: GET works, and so does POST
    status, body = _admin_call(p, "GET", query, auth)
    assert (status, body["Status"]) == (200, "OK"), body
    assert p.get("/f16csrf/hello")[0] == 200
    status, body = _admin_call(p, "POST", "remove?serviceName=f16-csrf", auth)
    assert (status, body["Status"]) == (200, "OK"), body
    # the operator's own browser on the admin API itself: same origin
    host = f"{p.admin_host}:{p.admin_port}"
    status, _ = _admin_call(p, "GET", query, {**auth, "Origin": f"http://{host}", "Sec-Fetch-Site": "same-origin",
                                              "Referer": f"http://{host}/v1/docker-flow-proxy/config"})
    assert status == 200


def test_F16_without_admin_credentials_cross_site_get_still_works_as_in_dfp(make_pyroute, dns, replicas):
    up = replicas[0]
    dns.set_service("f16-open", up.ip)
    p = make_pyroute()
    status, body = _admin_call(p, "GET", f"reconfigure?serviceName=f16-open&servicePath=/f16open&port={up.port}",
                               {"Sec-Fetch-Site": "cross-site", "Origin": "https://evil.example"})
    assert (status, body["Status"]) == (200, "OK")


# -- F9: a change compiles only what changed --------------------------------------------------

def _backend(host, port, service, tls=False):
    return host, port


def _table(services, previous=None, longest=False):
    from pyroute.dataplane.routing import RouteTable
    return RouteTable(services, _backend, longest_match=longest, previous=previous)


def _service(name: str, path: str, **extra: str):
    from pyroute.services import parse_service
    return parse_service({"serviceName": name, "servicePath": path, "port": "80", **extra})


def test_F9_a_change_to_one_service_reuses_every_other_services_compiled_routes():
    services = [_service(f"f9-{i}", f"/f9-{i}/", **({"serviceDomain": "a.test"} if i % 3 == 0 else {}))
                for i in range(200)]
    before = _table(services)
    changed = _service("f9-7", "/moved", addReqHeader="X-F9 1")
    added = _service("f9-new", "/new")
    after = _table([*services[:7], changed, *services[8:150], *services[151:], added], previous=before)
    old = {(r.service.name, r.destination.index): r for r in before.routes}
    new = {(r.service.name, r.destination.index): r for r in after.routes}
    for key, route in new.items():
        if key[0] in ("f9-7", "f9-new"):
            assert key not in old or route is not old[key]
        else:
            assert route is old[key], key  # the very same object: features, backend and stats not rebuilt
            assert route.request_steps is old[key].request_steps
    assert {r.service.name for r in after.compiled} == {"f9-7", "f9-new"}
    assert ("f9-150", 0) not in new
    assert after.match(None, b"/moved/x").service is changed
    assert after.match(None, b"/f9-7/x") is None
    assert after.match(b"a.test", b"/f9-150/x") is None and after.match(b"a.test", b"/new/x").service is added
    assert before.match(None, b"/f9-7/x").service is services[7]  # the previous table is untouched


def test_F9_many_adds_in_one_gap_move_only_neighbours():
    services = [_service(f"f9gap-{i:03d}", f"/g{i}") for i in range(100)]
    table = _table(services)
    for n in range(100):  # each lands right after the previous one: the gap runs out, neighbours move
        services.append(_service(f"f9gap-050-{n:03d}", f"/g50/{n}"))
        table = _table(services, previous=table)
        assert len(table.compiled) < 40  # the new service and a window of neighbours, not the table
    full = _table(services)
    for s in services:
        path = s.destinations[0].paths[0].encode() + b"/x"
        assert table.match(None, path).service.name == full.match(None, path).service.name


_F9_NAMES = [f"f9h-{c}" for c in "abcdefgh"]
_F9_PATHS = ["/", "/a", "/a/b", "/b", "/.well-known/acme", "/ab"]


def _f9_service(draw):
    import hypothesis.strategies as st
    params = {"serviceName": draw(st.sampled_from(_F9_NAMES)), "port": "80",
              "servicePath": draw(st.sampled_from(_F9_PATHS))}
    if draw(st.booleans()):
        params["aclName"] = draw(st.sampled_from(["01", "50", "99"]))
    kind = draw(st.sampled_from(["plain", "domain", "pathtype", "default", "redirect", "exclude", "indexed"]))
    if kind == "domain":
        params["serviceDomain"] = draw(st.sampled_from(["a.test", "b.test", "*.test"]))
    elif kind == "pathtype":
        params["pathType"] = draw(st.sampled_from(["path", "path_end", "path_dir"]))
    elif kind == "default":
        params["isDefaultBackend"] = "true"
    elif kind == "redirect":
        params["serviceDomain"] = "a.test"
        params["redirectFromDomain"] = "old.test"
    elif kind == "exclude":
        params["servicePathExclude"] = "/a/b"
    elif kind == "indexed":
        params["servicePath.1"] = draw(st.sampled_from(_F9_PATHS))
        params["port.1"] = "81"
    from pyroute.services import parse_service
    return parse_service(params)


@pytest.mark.parametrize("gap", [None, 4], ids=["default-gap", "gap-4-relabels-often"])
def test_F9_incremental_tables_route_as_a_full_build_does(gap, monkeypatch):
    import pyroute.dataplane.routing
    from hypothesis import HealthCheck, given, settings, strategies as st

    if gap is not None:  # so few free priorities that inserts keep relabelling their neighbours
        monkeypatch.setattr(pyroute.dataplane.routing, "PRIORITY_GAP", gap)
    probes = [(host, path) for host in (None, b"a.test", b"b.test:8080", b"c.test", b"old.test", b"other")
              for path in (b"/", b"/a", b"/a/b/c", b"/ab", b"/b/x", b"/.well-known/acme/t", b"/zzz", b"/a/")]

    @st.composite
    def changes(draw):
        return [(draw(st.sampled_from(["put", "remove"])), _f9_service(draw)) for _ in range(draw(st.integers(1, 25)))]

    @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
    @given(changes(), st.booleans())
    def check(steps, longest):
        current: dict[str, object] = {}
        table = _table((), longest=longest)
        for action, service in steps:
            if action == "put":
                current[service.name] = service
            else:
                current.pop(service.name, None)
            table = _table(tuple(current.values()), previous=table, longest=longest)
            full = _table(tuple(current.values()), longest=longest)
            for host, path in probes:
                got, want = table.match(host, path, [], None), full.match(host, path, [], None)
                assert (got and (got.service.name, got.destination.index)) == \
                       (want and (want.service.name, want.destination.index)), (host, path, steps)
    check()


def test_F9_requests_keep_being_answered_while_changes_stream_with_10k_routes(make_pyroute, dns, replicas, tmp_path):
    from pyroute.controlplane.registry import ServiceRegistry

    up = replicas[0]
    dns.set_service("f9-live", up.ip)
    registry = ServiceRegistry()
    registry.upsert_many([{"serviceName": f"f9-bulk-{i}", "servicePath": f"/f9-bulk-{i}", "port": "80"}
                          for i in range(10000)])
    (tmp_path / "state.json").write_bytes(json.dumps(registry.export()).encode())
    p = make_pyroute(STATE_DIR=str(tmp_path), TIMEOUT_CLIENT="30")
    p.reconfigure(serviceName="f9-live", servicePath="/f9live", port=up.port)
    results = []
    c = p.conn(timeout=30)  # one keep-alive client across every change
    for n in range(30):
        p.reconfigure(serviceName=f"f9-bulk-{n * 37}", servicePath=f"/f9-moved-{n}", port="80")
        c.request("GET", f"/f9live/{n}")
        r = c.getresponse()
        r.read()
        results.append((r.status, r.headers.get("X-Upstream")))
        c.request("GET", f"/f9-moved-{n}/x")  # the moved route is served at once (no upstream: 503)
        r = c.getresponse()
        r.read()
        results.append((r.status, None))
    c.close()
    assert results == [(200, up.addr), (503, None)] * 30
    status, body = p.admin("config", type="json")
    assert status == 200 and len(body) == 10001


# -- F9: the control plane's share of a change (state hash, state file, workers) --------------

def test_F9_incremental_state_hash_equals_a_from_scratch_hash():
    import orjson
    from hypothesis import HealthCheck, given, settings, strategies as st
    from pyroute.controlplane.registry import STATE_FORMAT, ServiceRegistry, content_hash, read_document

    names = ["f9s-a", "f9s-b", "f9s-c", "f9s-d"]
    step = st.tuples(st.sampled_from(["put", "remove", "cert", "uncert", "merge"]), st.sampled_from(names),
                     st.sampled_from(["/p", "/q", "/r"]))

    @settings(max_examples=200, deadline=None, suppress_health_check=list(HealthCheck))
    @given(st.lists(step, min_size=1, max_size=30))
    def check(steps):
        registry, peer = ServiceRegistry(), ServiceRegistry()
        for action, name, path in steps:
            if action == "put":  # an add or a replace
                registry.reconfigure({"serviceName": name, "servicePath": path, "port": "80"})
            elif action == "remove":
                registry.remove(name)
            elif action == "cert":
                registry.put_cert(name, f"PEM {path}")
            elif action == "uncert":
                registry.remove_cert(name)
            else:  # entries adopted from a peer, several at once
                peer.reconfigure({"serviceName": name, "servicePath": path, "port": "81"})
                peer.remove(names[(names.index(name) + 1) % len(names)])
                registry.merge(peer.export(), "peer")
            document = orjson.loads(registry.export_json())
            assert document["format"] == STATE_FORMAT == 2
            entries = read_document(document)  # checks the document's hash against its content too
            assert registry.hash == document["hash"] == content_hash(entries)
            reordered = {kind: dict(reversed(entries[kind].items())) for kind in entries}
            assert content_hash(reordered) == registry.hash  # the sum does not depend on entry order
    check()


def _format_1_state_file(services: dict[str, dict[str, str] | None], revision: int) -> bytes:
    """A state file as the previous release wrote it: format 1, sha256 over the whole content."""
    import hashlib
    entries = {name: {"stamp": [i + 1, f"oldrelease.{i:010d}"],
                      "value": None if params is None else [[k, v] for k, v in params.items()]}
               for i, (name, params) in enumerate(services.items())}
    canonical = {"services": {n: [e["stamp"], e["value"]] for n, e in entries.items()}, "certs": {}}
    digest = hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
    return json.dumps({"format": 1, "revision": revision, "hash": digest, "services": entries,
                       "certs": {}}).encode()


def test_F9_a_format_1_state_file_from_the_previous_release_loads(make_pyroute, dns, replicas, tmp_path):
    from pyroute.controlplane.registry import read_document

    up = replicas[0]
    dns.set_service("f9-old", up.ip)
    dns.set_service("f9-new", up.ip)
    (tmp_path / "state.json").write_bytes(_format_1_state_file(
        {"f9-old": {"serviceName": "f9-old", "servicePath": "/f9old", "port": str(up.port)},
         "f9-gone": None}, revision=7))  # a removal's tombstone
    p = make_pyroute(STATE_DIR=str(tmp_path))
    status, headers, _ = p.get("/f9old/x")
    assert (status, headers.get("X-Upstream")) == (200, up.addr)
    assert p.admin("ping")[1]["Revision"] == 7
    assert not list(tmp_path.glob("*.corrupt-*"))  # read as a good copy, not kept aside
    p.reconfigure(serviceName="f9-new", servicePath="/f9new", port=up.port)
    saved = json.loads((tmp_path / "state.json").read_bytes())
    assert saved["format"] == 2 and saved["hash"] == p.admin("ping")[1]["Hash"]
    entries = read_document(saved)  # the new hash matches its content
    assert set(entries["services"]) == {"f9-old", "f9-gone", "f9-new"} and entries["services"]["f9-gone"][1] is None
    p.stop()
    p.start()
    for path in ("/f9old/x", "/f9new/x"):
        status, headers, _ = p.get(path)
        assert (status, headers.get("X-Upstream")) == (200, up.addr), path


F9_CONNECTIONS = 16  # fresh connections per check: the kernel spreads them over both workers


def test_F9_workers_2_serve_every_add_replace_and_remove_as_it_is_answered(make_pyroute, dns, replicas):
    from support.proxy import children

    a, b = replicas[0], replicas[1]
    dns.set_service("f9w-a", a.ip)
    dns.set_service("f9w-b", b.ip)
    p = make_pyroute(WORKERS="2")
    for i in range(40):  # services no step touches: every worker must keep routing them
        p.reconfigure(serviceName=f"f9w-fill-{i}", servicePath=f"/f9fill{i:02d}", port=a.port, outboundHostname="f9w-a")
    expected: dict[str, str | None] = {"/f9fill00/x": a.addr, "/f9fill39/x": a.addr}

    def check(step: str) -> None:
        for path, upstream in expected.items():
            answers = [p.get(path) for _ in range(F9_CONNECTIONS)]
            got = [(s, h.get("X-Upstream")) if upstream else s for s, h, _ in answers]
            assert got == [(200, upstream) if upstream else 503] * F9_CONNECTIONS, (step, path)

    def put(name: str, path: str, host: str) -> None:
        p.reconfigure(serviceName=name, servicePath=path, port=a.port, outboundHostname=host)

    put("f9w-1", "/f9one", "f9w-a")
    expected["/f9one/x"] = a.addr
    check("add f9w-1")
    put("f9w-2", "/f9two", "f9w-b")
    expected["/f9two/x"] = b.addr
    check("add f9w-2")
    put("f9w-1", "/f9one", "f9w-b")
    expected["/f9one/x"] = b.addr
    check("replace f9w-1: another upstream")
    put("f9w-2", "/f9moved", "f9w-b")
    expected.update({"/f9two/x": None, "/f9moved/x": b.addr})
    check("replace f9w-2: another path")
    p.remove("f9w-1")
    expected["/f9one/x"] = None
    check("remove f9w-1")
    assert p.admin("reload", recreate="true")[0] == 200  # a revision with no change
    check("reload?recreate=true")
    victim = min(children(p.proc.pid))  # its replacement starts from the whole snapshot
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: len(children(p.proc.pid)) == 2 and victim not in children(p.proc.pid)
               and p.admin("successfulinitreload")[0] == 200, timeout=10, what="a replacement worker serving")
    put("f9w-1", "/f9one", "f9w-a")
    expected["/f9one/x"] = a.addr
    check("add f9w-1 again, after a worker restart")
    p.remove("f9w-fill-39")
    expected["/f9fill39/x"] = None
    check("remove a service loaded before the restart")
