"""SIGTERM drains (in-flight requests finish, idle keep-alive connections close, exit 0,
DRAIN_GRACE bounds the wait); SIGHUP re-reads the settings file atomically (a bad file is
refused with a log line and the old settings stay), with one process or with workers;
ERROR_PAGES_DIR replaces pyroute's own pages."""
import signal
import socket
import subprocess
import threading
from pathlib import Path

import pytest

from support.upstream import wait_until


def route(p, dns, up, name="lc"):
    dns.set_service(name, up.ip)
    p.reconfigure(serviceName=name, servicePath=f"/{name}", port=up.port)


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sigterm_finishes_in_flight_closes_idle_exits_0(make_pyroute, dns, replicas, workers):
    p = make_pyroute(WORKERS=workers)
    route(p, dns, replicas[0])
    idle = p.raw()
    idle.request("GET", "/lc/hello", [("Host", "a")])
    assert idle.read_response()[0].status_code == 200
    slow: list = []
    t = threading.Thread(target=lambda: slow.append(p.get("/lc/slow/1.5")))
    t.start()
    wait_until(lambda: replicas[0].requests("/lc/slow"), what="the slow request to reach the upstream")
    p.proc.send_signal(signal.SIGTERM)
    assert idle.peer_closed(timeout=5)          # the idle keep-alive connection is closed at once
    t.join(10)
    assert slow and slow[0][0] == 200 and slow[0][2] == b"slow done"   # in flight: finished
    assert p.proc.wait(10) == 0
    with pytest.raises(OSError):
        socket.create_connection(("127.0.0.1", p.http_port), timeout=2)


def test_sigterm_grace_period_bounds_the_wait(make_pyroute, dns, replicas):
    p = make_pyroute(DRAIN_GRACE="0.5")
    route(p, dns, replicas[0])
    got: list = []

    def slow():
        try:
            got.append(p.get("/lc/slow/20", timeout=30)[0])
        except (OSError, ConnectionError) as exc:   # http.client: RemoteDisconnected etc.
            got.append(type(exc).__name__)

    t = threading.Thread(target=slow)
    t.start()
    wait_until(lambda: replicas[0].requests("/lc/slow/20"), what="the slow request to reach the upstream")
    p.proc.send_signal(signal.SIGTERM)
    assert p.proc.wait(10) == 0       # long before the upstream would answer
    t.join(10)
    assert got and got[0] != 200


def reloadable(make_pyroute, dns, replicas, tmp_path, text: str, workers: str):
    """A routed pyroute whose settings file starts as `text`; reload(new_text) rewrites it and sends SIGHUP."""
    conf = tmp_path / "pyroute.toml"
    conf.write_text(text)
    p = make_pyroute(PYROUTE_CONFIG=str(conf), WORKERS=workers)
    route(p, dns, replicas[0])

    def reload(new_text: str) -> None:
        conf.write_text(new_text)
        p.proc.send_signal(signal.SIGHUP)
    return p, reload


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_reloads_settings_and_keeps_them_on_a_bad_file(make_pyroute, dns, replicas, tmp_path, workers):
    p, reload = reloadable(make_pyroute, dns, replicas, tmp_path, "max_request_body = 0\n", workers)
    body = b"x" * 100
    assert p.get("/lc/upload", method="POST", body=body)[0] == 200

    reload("max_request_body = 50\n")
    wait_until(lambda: all(p.get("/lc/upload", method="POST", body=body)[0] == 413 for _ in range(4)),
               what="the new limit in every process")
    assert p.get("/lc/upload", method="POST", body=b"x" * 50)[0] == 200

    reload("max_request_body = \"lots\"\n")
    wait_until(lambda: "SIGHUP: settings not reloaded" in p.log(), what="the rejection log line")
    assert "max_request_body" in p.log().split("SIGHUP: settings not reloaded")[-1].splitlines()[0]
    for _ in range(4):
        assert p.get("/lc/upload", method="POST", body=body)[0] == 413   # the old settings stay
    assert p.alive()


@pytest.mark.parametrize("workers", ["1", "2"])
def test_sighup_turns_the_access_log_on(make_pyroute, dns, replicas, tmp_path, workers):
    p, reload = reloadable(make_pyroute, dns, replicas, tmp_path, "debug = false\n", workers)
    assert p.get("/lc/before")[0] == 200
    reload("debug = true\n")
    wait_until(lambda: "SIGHUP: settings reloaded" in p.log(), what="the reload log line")
    sent = []

    def every_process_logs() -> bool:  # fresh connections reach every worker
        sent.append(f"/lc/logged-{len(sent)}")
        assert p.get(sent[-1])[0] == 200
        return sum(f'"path":"{path}"' in p.log() for path in sent[-4:]) == 4

    wait_until(every_process_logs, what="an access log line for each request")
    assert '"path":"/lc/before"' not in p.log()


def test_error_pages_directory(make_pyroute, dns, replicas, tmp_path):
    (tmp_path / "503.http").write_bytes(
        b"HTTP/1.0 503 Service Unavailable\r\nCache-Control: no-cache\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\n\r\nDocker Flow Proxy: 503 Service Unavailable\n")
    (tmp_path / "404.html").write_text("not a page pyroute answers: ignored")
    (tmp_path / "502.html").write_text("<p>custom 502</p>")
    p = make_pyroute(ERROR_PAGES_DIR=str(tmp_path))
    st, h, body = p.get("/nothing/here")
    assert (st, body, h["Content-Type"]) == (503, b"Docker Flow Proxy: 503 Service Unavailable\n", "text/plain")
    route(p, dns, replicas[0])
    st, h, body = p.get("/lc/garbage")
    assert (st, body, h["Content-Type"]) == (502, b"<p>custom 502</p>", "text/html")
    st, _, body = p.get("/lc/x", method="CONNECT")
    assert st == 405 and b"Method Not Allowed" in body   # not replaced: the built-in page


def _can_mount_namespaces() -> bool:
    try:
        return subprocess.run(["unshare", "--mount", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


@pytest.mark.skipif(not _can_mount_namespaces(), reason="needs root for a private mount namespace (unshare --mount)")
def test_errorfiles_directory_is_used_without_setting_anything(make_pyroute, tmp_path):
    """DFP loads /errorfiles/<code>.http unconditionally: a stack that mounts its pages there keeps
    them after the swap with no ERROR_PAGES_DIR set. pyroute runs with `tmp_path` at /errorfiles
    (a private mount namespace, so this machine gets no /errorfiles); ERROR_PAGES_DIR="" opts out."""
    (tmp_path / "503.http").write_bytes(
        b"HTTP/1.0 503 Service Unavailable\r\nCache-Control: no-cache\r\nConnection: close\r\n"
        b"Content-Type: text/plain\r\n\r\nfrom /errorfiles\n")
    wrapper = ("unshare", "--mount", "--propagation", "private", "sh",
               str(Path(__file__).parent / "support" / "mounted_at.sh"), str(tmp_path), "/errorfiles")
    p = make_pyroute(wrapper=wrapper)
    st, h, body = p.get("/nothing/here")
    assert (st, body, h["Content-Type"]) == (503, b"from /errorfiles\n", "text/plain")
    off = make_pyroute(wrapper=wrapper, ERROR_PAGES_DIR="")
    st, _, body = off.get("/nothing/here")
    assert st == 503 and b"Docker Flow Proxy: 503 Service Unavailable" in body


def test_builtin_error_pages_are_dfp_style(proxy):
    st, h, body = proxy.get("/no/route/here")
    assert st == 503 and b"Docker Flow Proxy: 503 Service Unavailable" in body
    assert h["Content-Type"] == "text/html" and h["Cache-Control"] == "no-cache"


def test_every_error_page_is_a_complete_response():
    import h11
    from pyroute.dataplane.pages import PAGES, error_head_only, error_response
    assert {400, 403, 405, 408, 413, 414, 429, 431, 500, 502, 503, 504} <= set(PAGES)
    for status in PAGES:
        for close in (False, True):
            client = h11.Connection(h11.CLIENT)
            client.send(h11.Request(method="GET", target="/", headers=[("Host", "a")]))
            client.receive_data(error_response(status, close))
            resp = client.next_event()
            assert resp.status_code == status and (b"close" in dict(resp.headers).get(b"connection", b"")) == close
            body = client.next_event()
            assert f"Docker Flow Proxy: {status} ".encode() in body.data
            assert isinstance(client.next_event(), h11.EndOfMessage)
            assert error_head_only(status, close) == error_response(status, close)[: len(error_head_only(status, close))]
