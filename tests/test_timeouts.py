"""Each of DFP's timeouts, with short values: TIMEOUT_HTTP_REQUEST (slowloris -> 408),
TIMEOUT_HTTP_KEEP_ALIVE (idle close), TIMEOUT_CLIENT (stalled body -> 408),
TIMEOUT_CONNECT (-> 503), TIMEOUT_SERVER and per-service timeoutServer (-> 504).
TIMEOUT_TUNNEL / timeoutTunnel are in test_websocket.py."""
import socket

import pytest

PYROUTE_ENV = {"TIMEOUT_HTTP_REQUEST": "1", "TIMEOUT_HTTP_KEEP_ALIVE": "1", "TIMEOUT_CLIENT": "1",
               "TIMEOUT_CONNECT": "1", "TIMEOUT_SERVER": "30"}


@pytest.fixture
def tmo(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("tmo", up.ip)
    proxy.reconfigure(serviceName="tmo", servicePath="/tmo", port=up.port)
    return up


def read_all(s: socket.socket) -> bytes:
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    return got


def test_slowloris_head_gets_408_and_close(proxy, tmo):
    """A head that keeps trickling in never completes: the whole head must arrive in time."""
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    s.sendall(b"GET /tmo/hello HTTP/1.1\r\nHost: a\r\n")
    s.settimeout(0.2)
    got = b""
    for i in range(100):   # one header byte every 0.2 s (the attack), until pyroute answers
        try:
            s.sendall(b"X")
        except (BrokenPipeError, ConnectionResetError):
            break
        try:
            got = s.recv(65536)
            break
        except (socket.timeout, TimeoutError):
            continue
    s.settimeout(5)
    got += read_all(s)
    s.close()
    assert got.startswith(b"HTTP/1.1 408 "), got
    assert not tmo.requests("/tmo/")


def test_idle_keep_alive_connection_is_closed(proxy, tmo):
    with proxy.raw() as c:
        c.request("GET", "/tmo/hello", [("Host", "a")])
        assert c.read_response()[0].status_code == 200
        assert c.peer_closed(timeout=10)   # TIMEOUT_HTTP_KEEP_ALIVE=1, silently


def test_connection_that_never_sends_is_closed(proxy, tmo):
    with proxy.raw() as c:
        assert c.peer_closed(timeout=10)   # TIMEOUT_HTTP_REQUEST applies before the first request


def test_stalled_body_gets_408(proxy, tmo):
    s = socket.create_connection(("127.0.0.1", proxy.http_port), timeout=10)
    s.sendall(b"POST /tmo/upload HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n" + b"x" * 10)
    got = read_all(s)   # the rest of the body never comes
    s.close()
    assert got.startswith(b"HTTP/1.1 408 "), got


def test_upstream_connect_timeout_is_503(proxy, dns):
    # A listener whose accept queue is full: the kernel drops further SYNs, so a connect hangs.
    blackhole = socket.socket()
    blackhole.bind(("127.0.0.31", 0))
    blackhole.listen(0)
    port = blackhole.getsockname()[1]
    fillers = []
    for _ in range(4):
        f = socket.socket()
        f.setblocking(False)
        f.connect_ex(("127.0.0.31", port))
        fillers.append(f)
    try:
        dns.set_service("tmo-hole", "127.0.0.31")
        proxy.reconfigure(serviceName="tmo-hole", servicePath="/hole", port=port)
        st, _, body = proxy.get("/hole/x")
        assert st == 503, body
        assert f"cannot connect to 127.0.0.31:{port}: timeout" in proxy.log()
    finally:
        for f in fillers:
            f.close()
        blackhole.close()


def test_per_service_timeout_server_is_504(proxy, dns, replicas):
    up = replicas[1]
    dns.set_service("tmo-srv", up.ip)
    proxy.reconfigure(serviceName="tmo-srv", servicePath="/srv", port=up.port, timeoutServer="0.5")
    st, _, body = proxy.get("/srv/slow/5")
    assert st == 504, body
    # the global TIMEOUT_SERVER (30) still applies elsewhere: a 1.5 s answer is fine there
    dns.set_service("tmo", up.ip)
    proxy.reconfigure(serviceName="tmo", servicePath="/tmo", port=up.port)
    assert proxy.get("/tmo/slow/1.5")[0] == 200
