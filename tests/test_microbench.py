"""Micro benchmarks of the pure hot-path functions (pytest-benchmark).

The default run has --benchmark-disable (pyproject addopts): each body runs once as a
plain test, so these never rot. Measure with:
    python -m pytest tests/test_microbench.py --benchmark-enable
Each also asserts the result, so a regression in behaviour fails here too.
"""

import httptools
import pytest

from pyroute.dataplane.headers import AmbiguousResponse, inspect_response_head, request_head, rewrite_response_head
from pyroute.dataplane.routing import RouteTable
from pyroute.services import parse_service

WRK_REQUEST = b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n\r\n"
BROWSER_HEADERS = [
    (b"Host", b"example.com"),
    (b"User-Agent", b"Mozilla/5.0 (X11; Linux x86_64; rv:120.0) Gecko/20100101 Firefox/120.0"),
    (b"Accept", b"text/html,application/xhtml+xml,application/xml;q=0.9,*/*;q=0.8"),
    (b"Accept-Language", b"en-US,en;q=0.5"),
    (b"Accept-Encoding", b"gzip, deflate, br"),
    (b"Connection", b"keep-alive"),
    (b"Cookie", b"session=abc123; theme=dark"),
    (b"Upgrade-Insecure-Requests", b"1"),
]
RESPONSE_HEAD = b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: 14\r\nDate: Thu, 26 Nov 2026 17:00:00 GMT\r\n\r\n"
RESPONSE_HEAD_KEEPALIVE = RESPONSE_HEAD[:-2] + b"Connection: keep-alive\r\nKeep-Alive: timeout=5\r\n\r\n"


def _table(n: int) -> RouteTable:
    services = [parse_service({"serviceName": f"svc-{i}", "servicePath": f"/svc-{i}/", "port": "8080"}) for i in range(n)]
    services.append(parse_service({"serviceName": "go-demo", "servicePath": "/demo", "port": "8080"}))
    return RouteTable(services, lambda host, port, service, tls=False: (host, port))


def test_route_match_1000_services(benchmark):
    table = _table(1000)
    route = benchmark(table.match, b"127.0.0.1:8000", b"/svc-737/items/42")
    assert route.service.name == "svc-737"


def test_route_match_1_service(benchmark):
    table = _table(0)
    route = benchmark(table.match, b"127.0.0.1:8000", b"/demo/hello")
    assert route.service.name == "go-demo"


def test_route_match_1000_services_with_conditional_routes(benchmark):
    """Conditional routes (here: header and userAgent matches) only cost when they outrank the plain match."""
    services = [parse_service({"serviceName": f"svc-{i}", "servicePath": f"/svc-{i}/", "port": "8080"}) for i in range(1000)]
    services.append(parse_service({"serviceName": "zz-canary", "servicePath": "/svc-737/", "port": "8080",
                                   "serviceHeader": "X-Canary:1"}))
    services.append(parse_service({"serviceName": "aa-mobile", "servicePath": "/m/", "port": "8080",
                                   "userAgent": "iPhone"}))
    table = RouteTable(services, lambda host, port, service, tls=False: (host, port))
    route = benchmark(table.match, b"127.0.0.1:8000", b"/svc-737/items/42", BROWSER_HEADERS, None)
    assert route.service.name == "svc-737"


def test_route_match_longest_1000_services(benchmark):
    services = [parse_service({"serviceName": f"svc-{i}", "servicePath": f"/svc-{i}/", "port": "8080"}) for i in range(1000)]
    table = RouteTable(services, lambda host, port, service, tls=False: (host, port), longest_match=True)
    route = benchmark(table.match, b"127.0.0.1:8000", b"/svc-737/items/42")
    assert route.service.name == "svc-737"


def test_request_head_rewrite_small(benchmark):
    head = benchmark(request_head, b"GET", b"/demo/hello", [(b"Host", b"127.0.0.1:8000")], b"127.0.0.1", b"http")
    assert head == (
        b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1:8000\r\n"
        b"X-Forwarded-For: 127.0.0.1\r\nX-Forwarded-Proto: http\r\n\r\n"
    )


def test_request_head_rewrite_browser(benchmark):
    head = benchmark(request_head, b"GET", b"/", BROWSER_HEADERS, b"10.0.0.7", b"http")
    assert b"Connection" not in head and b"Cookie: session=abc123" in head


NGINX_HEAD = (
    b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Thu, 26 Nov 2026 17:00:00 GMT\r\n"
    b"Content-Type: text/plain\r\nContent-Length: 14\r\nConnection: keep-alive\r\n\r\n"
)


def test_response_head_inspect(benchmark):
    """The common response: a Content-Length, nothing to edit -> the same object back."""
    close_delimited, forwardable = benchmark(inspect_response_head, RESPONSE_HEAD)
    assert close_delimited is False and forwardable is RESPONSE_HEAD


def test_response_head_inspect_nginx(benchmark):
    """nginx's "Connection: keep-alive" is cut out without a full rewrite."""
    close_delimited, forwardable = benchmark(inspect_response_head, NGINX_HEAD)
    assert close_delimited is False
    assert forwardable == NGINX_HEAD.replace(b"Connection: keep-alive\r\n", b"")


def test_response_head_inspect_cases():
    assert inspect_response_head(RESPONSE_HEAD_KEEPALIVE) == (False, RESPONSE_HEAD)
    chunked = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n"
    assert inspect_response_head(chunked) == (False, chunked)
    for last_not_chunked in (b"gzip", b"xchunked", b"chunked, gzip"):  # F13: refused, not close-delimited
        with pytest.raises(AmbiguousResponse):
            inspect_response_head(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: " + last_not_chunked + b"\r\n\r\n")
    assert inspect_response_head(b"HTTP/1.0 200 OK\r\nServer: x\r\n\r\n") == (True, None)
    named = b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: X-Secret\r\nX-Secret: 1\r\n\r\n"
    assert inspect_response_head(named) == (False, None)


def test_response_head_rewrite(benchmark):
    head = benchmark(rewrite_response_head, RESPONSE_HEAD_KEEPALIVE, None)
    assert b"Keep-Alive" not in head and b"Connection" not in head and head.endswith(b"\r\n\r\n")


def test_request_parse_callbacks(benchmark):
    """httptools with the callbacks ClientConnection registers (url, header, head end)."""

    class Sink:
        def __init__(self):
            self.headers = []
            self.done = 0

        def on_url(self, url):
            self.url = url

        def on_header(self, name, value):
            self.headers.append((name, value))

        def on_headers_complete(self):
            self.done += 1
            self.headers = []

    sink = Sink()
    parser = httptools.HttpRequestParser(sink)
    benchmark(parser.feed_data, WRK_REQUEST)
    assert sink.done >= 1 and sink.url == b"/demo/hello"
