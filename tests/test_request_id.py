"""Request IDs and W3C traceparent (requestid.py) with curl through a real pyroute: the ID on
the upstream request, the response and the access log line; a client's own replaced; the
setting that names the header and the one that turns it off; traceparent passed through
untouched, or started where absent with TRACEPARENT=generate."""
import json
import re
import subprocess

from support.upstream import wait_until

TRACEPARENT = re.compile(r"^00-(?!0{32})[0-9a-f]{32}-(?!0{16})[0-9a-f]{16}-[0-9a-f]{2}$")  # W3C, version 00


def curl(p, path, *headers):
    """(status, response headers {lower name: [values]}, body) from a real curl.

    `headers` are "Name: value" lines, or curl options where one starts with "--"."""
    args = ["curl", "-s", "-i", "--max-time", "10"]
    rest = list(headers)
    while rest:
        h = rest.pop(0)
        args += [h, rest.pop(0)] if h.startswith("--") else ["-H", h]
    args.append(p.url(path))
    out = subprocess.run(args, capture_output=True, check=True).stdout
    head, _, body = out.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    got: dict[str, list[str]] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        got.setdefault(name.strip().lower(), []).append(value.strip())
    return int(lines[0].split()[1]), got, body


def upstream_headers(body: bytes, name: str) -> list[str]:
    return [v for n, v in json.loads(body)["headers"] if n.lower() == name.lower()]


def access_entries(p, path):
    entries = []

    def written():
        entries[:] = [json.loads(line) for line in open(p.stderr_path, errors="replace")
                      if line.startswith("{") and f'"path":"{path}"' in line]
        return entries
    wait_until(written, what=f"access log line of {path}")
    return entries


def test_request_id_on_request_response_and_log(make_pyroute, dns, replicas):
    up = replicas[0]
    dns.set_service("rid-a", up.ip)
    p = make_pyroute(DEBUG="true")
    p.reconfigure(serviceName="rid-a", servicePath="/rid", port=up.port)
    st, headers, body = curl(p, "/rid/echo")
    assert st == 200
    sent = upstream_headers(body, "X-Request-ID")
    assert len(sent) == 1 and headers["x-request-id"] == sent
    assert access_entries(p, "/rid/echo")[-1]["request_id"] == sent[0]
    # a client's own ID is not kept (no trusted peers): replaced, not forwarded beside pyroute's
    st, headers, body = curl(p, "/rid/echo", "X-Request-ID: forged-by-client")
    again = upstream_headers(body, "x-request-id")
    assert len(again) == 1 and again != sent and "forged-by-client" not in again and headers["x-request-id"] == again
    # no upstream reachable: pyroute's own 503 carries the ID too
    dns.set_service("rid-dead", "127.0.0.99")
    p.reconfigure(serviceName="rid-dead", servicePath="/dead", port=up.port)
    st, headers, _ = curl(p, "/dead/x")
    assert st == 503 and len(headers["x-request-id"]) == 1
    assert access_entries(p, "/dead/x")[-1]["request_id"] == headers["x-request-id"][0]
    # no traceparent unless asked for
    assert upstream_headers(curl(p, "/rid/echo")[2], "traceparent") == []


def test_request_id_header_named_and_off(make_pyroute, dns, replicas):
    up = replicas[1]
    dns.set_service("rid-b", up.ip)
    named = make_pyroute(REQUEST_ID_HEADER="X-Correlation-Id")
    named.reconfigure(serviceName="rid-b", servicePath="/rid", port=up.port)
    st, headers, body = curl(named, "/rid/echo")
    assert st == 200 and upstream_headers(body, "X-Correlation-Id") == headers["x-correlation-id"]
    assert "x-request-id" not in headers and upstream_headers(body, "X-Request-ID") == []
    off = make_pyroute(REQUEST_ID="false")
    off.reconfigure(serviceName="rid-b", servicePath="/rid", port=up.port)
    st, headers, body = curl(off, "/rid/echo", "X-Request-ID: from-client")
    assert st == 200 and "x-request-id" not in headers
    assert upstream_headers(body, "X-Request-ID") == ["from-client"]  # untouched when the feature is off


def test_traceparent_passed_untouched_or_started(make_pyroute, dns, replicas):
    up = replicas[2]
    dns.set_service("rid-t", up.ip)
    given = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"
    passing = make_pyroute()
    passing.reconfigure(serviceName="rid-t", servicePath="/t", port=up.port)
    assert upstream_headers(curl(passing, "/t/echo", f"traceparent: {given}")[2], "traceparent") == [given]
    generating = make_pyroute(TRACEPARENT="generate")
    generating.reconfigure(serviceName="rid-t", servicePath="/t", port=up.port)
    assert upstream_headers(curl(generating, "/t/echo", f"traceparent: {given}")[2], "traceparent") == [given]
    started = [upstream_headers(curl(generating, "/t/echo")[2], "traceparent") for _ in range(2)]
    assert all(len(t) == 1 and TRACEPARENT.match(t[0]) for t in started), started
    assert started[0][0].split("-")[1] != started[1][0].split("-")[1]  # a new trace-id per request


def test_bad_request_id_header_is_refused(make_pyroute):
    import pytest
    from support.proxy import PyrouteDied
    with pytest.raises(PyrouteDied) as exc:
        make_pyroute(REQUEST_ID_HEADER="X Request ID")
    assert "REQUEST_ID_HEADER" in str(exc.value)


def test_request_id_from_a_trusted_balancer_is_kept(make_pyroute, dns, replicas):
    """TRUSTED_PROXIES names the balancer in front (127.0.0.2 here): the ID it sends is the
    request's, on the upstream request, the response and the log; anyone else's is replaced."""
    up = replicas[0]
    dns.set_service("rid-t", up.ip)
    p = make_pyroute(TRUSTED_PROXIES="127.0.0.2/32", DEBUG="true")
    p.reconfigure(serviceName="rid-t", servicePath="/rid", port=up.port)
    st, headers, body = curl(p, "/rid/echo", "X-Request-ID: lb-4711", "--interface", "127.0.0.2")
    assert st == 200 and upstream_headers(body, "X-Request-ID") == ["lb-4711"] == headers["x-request-id"]
    assert access_entries(p, "/rid/echo")[-1]["request_id"] == "lb-4711"
    st, headers, body = curl(p, "/rid/echo", "X-Request-ID: lb-4711")  # from 127.0.0.1: not trusted
    assert st == 200 and upstream_headers(body, "X-Request-ID") == headers["x-request-id"] != ["lb-4711"]


def test_request_id_echoed_by_the_upstream_is_not_doubled(make_pyroute, dns, replicas):
    """A service that copies the request's X-Request-ID onto its response (a common middleware):
    the client sees the ID once, the upstream's line, not pyroute's beside it."""
    up = replicas[0]
    dns.set_service("rid-e", up.ip)
    p = make_pyroute(DEBUG="true")
    p.reconfigure(serviceName="rid-e", servicePath="/rid", port=up.port)
    st, headers, body = curl(p, "/rid/echo-id")
    assert st == 200 and body == b"id echoed" and len(headers["x-request-id"]) == 1
    assert access_entries(p, "/rid/echo-id")[-1]["request_id"] == headers["x-request-id"][0]


def test_request_id_added_by_a_header_edit_is_replaced(make_pyroute, dns, replicas):
    """addReqHeader may name the ID header: like a client's, that value is not the request's
    ID (no trusted peer) and is replaced, not forwarded beside pyroute's."""
    up = replicas[0]
    dns.set_service("rid-h", up.ip)
    p = make_pyroute(DEBUG="true")
    p.reconfigure(serviceName="rid-h", servicePath="/rid", port=up.port, addReqHeader="X-Request-ID from-edit")
    st, headers, body = curl(p, "/rid/echo")
    sent = upstream_headers(body, "X-Request-ID")
    assert st == 200 and len(sent) == 1 and sent != ["from-edit"] and headers["x-request-id"] == sent
