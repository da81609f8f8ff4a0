"""Admin API access: with ADMIN_USER/ADMIN_PASS (or the Docker secrets dfp_admin_user /
dfp_admin_pass) every endpoint needs basic auth (401 otherwise, nothing changes); without
them pyroute says once at start that the port is open. Admin connections have their own
limits and timeout, and a flood of admin calls does not stall the data plane."""
import base64
import http.client
import socket
import threading

from support.proxy import API


def call(p, path, auth=None, method="GET"):
    c = http.client.HTTPConnection("127.0.0.1", p.admin_port, timeout=10)
    headers = {}
    if auth is not None:
        headers["Authorization"] = "Basic " + base64.b64encode(auth.encode()).decode()
    try:
        c.request(method, API + path, headers=headers)
        r = c.getresponse()
        return r.status, r.getheader("WWW-Authenticate"), r.read()
    finally:
        c.close()


def test_credentials_from_env_guard_every_endpoint(make_pyroute, dns, replicas):
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="s3cret")
    assert "unauthenticated" not in p.log()
    up = replicas[0]
    dns.set_service("auth-a", up.ip)
    for path in ("/ping", "/config", "/reconfigure?serviceName=auth-a&servicePath=/auth&port=%d" % up.port,
                 "/remove?serviceName=auth-a", "/reload", "/routes", "/latency", "/rejected", "/shadowed",
                 "/match?host=a&path=/", "/certs", "/nope"):
        for auth in (None, "ops:wrong", "other:s3cret", "ops"):
            status, challenge, body = call(p, path, auth)
            assert status == 401 and challenge.startswith("Basic "), (path, auth, status)
            assert b'"Status":"NOK"' in body
    assert p.get("/auth/hello")[0] == 503          # the unauthorised reconfigure changed nothing
    status, _, _ = call(p, "/reconfigure?serviceName=auth-a&servicePath=/auth&port=%d" % up.port, "ops:s3cret")
    assert status == 200
    assert p.get("/auth/hello")[0] == 200
    assert call(p, "/remove?serviceName=auth-a", "ops:s3cret")[0] == 200


def test_docker_secrets_win_over_env(make_pyroute, tmp_path):
    (tmp_path / "dfp_admin_user").write_text("secret-user\n")
    (tmp_path / "dfp_admin_pass").write_text("secret-pass\n")
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="s3cret", SECRETS_DIR=str(tmp_path))
    assert call(p, "/ping", "ops:s3cret")[0] == 401
    assert call(p, "/ping", "secret-user:secret-pass")[0] == 200


def test_open_admin_port_is_logged_once(proxy):
    assert proxy.log().count("is unauthenticated") == 1


def test_idle_or_slow_admin_connection_is_closed(make_pyroute):
    p = make_pyroute(TIMEOUT_ADMIN="0.5")
    s = socket.create_connection(("127.0.0.1", p.admin_port), timeout=10)
    s.sendall(b"GET /v1/docker-flow-proxy/ping HTTP/1.1\r\n")   # ... and the rest never comes
    assert s.recv(100) == b""
    s.close()


def test_oversized_admin_head_is_refused(proxy):
    s = socket.create_connection(("127.0.0.1", proxy.admin_port), timeout=10)
    s.sendall(b"GET /v1/docker-flow-proxy/ping HTTP/1.1\r\nHost: a\r\n" + b"X-Big: " + b"v" * 70000 + b"\r\n\r\n")
    got = b""
    while chunk := s.recv(65536):
        got += chunk
    s.close()
    assert got.startswith(b"HTTP/1.1 400 ")


def test_admin_flood_does_not_stall_the_data_plane(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("auth-flood", up.ip)
    proxy.reconfigure(serviceName="auth-flood", servicePath="/flood", port=up.port)
    stop = threading.Event()
    admin_calls = []

    def flood():
        while not stop.is_set():
            try:
                admin_calls.append(call(proxy, "/config")[0])
            except OSError:
                admin_calls.append("error")

    threads = [threading.Thread(target=flood) for _ in range(4)]
    for t in threads:
        t.start()
    try:
        with proxy.raw() as c:
            for _ in range(200):
                c.request("GET", "/flood/hello", [("Host", "a")])
                assert c.read_response()[0].status_code == 200
    finally:
        stop.set()
        for t in threads:
            t.join(10)
    assert len(admin_calls) > 20 and set(admin_calls) == {200}


def test_sighup_rereads_the_secrets(make_pyroute, tmp_path):
    import signal
    from support.upstream import wait_until
    (tmp_path / "dfp_admin_user").write_text("first")
    (tmp_path / "dfp_admin_pass").write_text("one")
    p = make_pyroute(SECRETS_DIR=str(tmp_path))
    assert call(p, "/ping", "first:one")[0] == 200
    (tmp_path / "dfp_admin_pass").write_text("two")
    p.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: call(p, "/ping", "first:one")[0] == 401, what="the old password to stop working")
    assert call(p, "/ping", "first:two")[0] == 200
