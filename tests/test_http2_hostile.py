"""Hostile HTTP/2 clients (issue 18, item 4), each with the h2 library (or hyperframe for
frames h2 will not send) as a raw client on the h2c port: rapid reset, CONTINUATION
flood, HPACK bomb, SETTINGS/PING/empty-DATA floods, more streams than
SETTINGS_MAX_CONCURRENT_STREAMS, a window that never opens (TIMEOUT_CLIENT), HTTP/1.1's
limits per stream; then a hypothesis frame-sequence fuzzer (FUZZ_EXAMPLES)."""
from __future__ import annotations

import os
import socket
import struct
import time

import h2.errors
import h2.events
import h2.settings
import hpack
import pytest
from hyperframe.frame import ContinuationFrame, DataFrame, HeadersFrame, PingFrame, RstStreamFrame, SettingsFrame
from hypothesis import HealthCheck, given, settings, strategies as st

from support.proxy import register
from support.upstream import wait_until
from test_http2 import H2Client

PYROUTE_ENV = {"H2C": "true", "TIMEOUT_CLIENT": "1", "H2_MAX_CONCURRENT_STREAMS": "10",
               "MAX_REQUEST_BODY": "1000", "TIMEOUT_HTTP_REQUEST": "1"}
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))


def h2c(proxy, **kw) -> H2Client:
    c = H2Client(proxy.http_port, tls=False, host="a", **kw)
    c.pump()  # the server's SETTINGS
    return c


def read_until_closed(c: H2Client, limit: float = 10.0) -> None:
    c.sock.settimeout(limit)
    while c.pump():
        pass


def head_block(path: str = "/hh/hello", extra=()) -> bytes:
    return hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"), (":path", path),
                                   *extra])


def assert_calm(c: H2Client, code=h2.errors.ErrorCodes.ENHANCE_YOUR_CALM):
    read_until_closed(c)
    goaway = c.goaway()
    assert goaway is not None and goaway.error_code == code, goaway


def still_serves(proxy, dns, replicas):
    c = h2c(proxy)
    r = c.response(c.request("/hh/hello"))
    assert (r["status"], r["body"]) == (200, b"hello, world!")
    c.close()


@pytest.fixture
def hh(proxy, dns, replicas):
    register(proxy, dns, replicas[0], serviceName="hh")
    return proxy


def test_settings_advertise_the_stream_limit(hh):
    c = h2c(hh)
    assert c.h2.remote_settings.max_concurrent_streams == 10
    assert c.h2.remote_settings.enable_push == 0
    c.close()


def test_rapid_reset_costs_the_client_its_connection(hh, dns, replicas):
    c = h2c(hh)
    sent = 0
    try:
        for _ in range(3000):
            sid = c.h2.get_next_available_stream_id()
            c.h2.send_headers(sid, [(b":method", b"GET"), (b":scheme", b"http"), (b":authority", b"a"),
                                    (b":path", b"/hh/slow/5")])
            c.h2.reset_stream(sid, h2.errors.ErrorCodes.CANCEL)
            c.flush()
            sent += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert_calm(c)
    assert sent < 3000 or c.closed
    still_serves(hh, dns, replicas)


def test_continuation_flood_is_capped(hh, dns, replicas):
    c = h2c(hh)
    first = HeadersFrame(1, data=head_block()[:5])  # no END_HEADERS: CONTINUATION must follow
    c.sock.sendall(first.serialize())
    frames = 0
    filler = ContinuationFrame(1, data=b"\x00" * 16000)  # (never END_HEADERS)
    try:
        for _ in range(1000):
            c.sock.sendall(filler.serialize())
            frames += 1
    except (BrokenPipeError, ConnectionResetError):
        pass
    read_until_closed(c)
    assert c.closed
    assert frames < 1000 or c.goaway() is not None  # the header block never grew without bound
    still_serves(hh, dns, replicas)


def test_hpack_bomb_is_refused(hh, dns, replicas):
    c = h2c(hh)
    big = "x" * 4000
    # one 4 KB field in the dynamic table, then referenced again and again: tiny on the wire, huge decoded
    block = hpack.Encoder().encode([(":method", "GET"), (":scheme", "http"), (":authority", "a"),
                                    (":path", "/hh/hello"), *[("x-bomb", big)] * 100])
    assert len(block) < 5000
    c.sock.sendall(HeadersFrame(1, data=block, flags=["END_HEADERS", "END_STREAM"]).serialize())
    assert_calm(c)
    still_serves(hh, dns, replicas)


@pytest.mark.parametrize("frame", [PingFrame(0, opaque_data=b"12345678"), SettingsFrame(0)], ids=["ping", "settings"])
def test_control_frame_floods_are_refused(hh, dns, replicas, frame):
    c = h2c(hh)
    data = frame.serialize() * 2000
    try:
        c.sock.sendall(data)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert_calm(c)
    still_serves(hh, dns, replicas)


def test_empty_data_flood_is_refused(hh, dns, replicas):
    c = h2c(hh)
    sid = c.request("/hh/upload", "POST", end=False)
    try:
        c.sock.sendall(DataFrame(sid, data=b"").serialize() * 2000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    assert_calm(c)
    still_serves(hh, dns, replicas)


def test_more_streams_than_the_limit(hh, dns, replicas):
    c = h2c(hh)
    sids = list(range(1, 23, 2))  # 11 streams (raw frames: the h2 library would not break the limit)
    c.sock.sendall(b"".join(HeadersFrame(sid, data=head_block("/hh/slow/3"), flags=["END_HEADERS", "END_STREAM"])
                            .serialize() for sid in sids))
    read_until_closed(c)
    goaway = c.goaway()
    assert goaway is not None and goaway.error_code == h2.errors.ErrorCodes.PROTOCOL_ERROR
    still_serves(hh, dns, replicas)


def test_a_window_that_never_opens_times_out(hh, dns, replicas):
    c = h2c(hh, settings={h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: 0})
    rss = hh.rss_kib()
    sid = c.request("/hh/bytes/200000000")  # 200 MB the client never makes room for
    c.sock.settimeout(10)
    started = time.monotonic()
    while c.collected(sid)["reset"] is None and time.monotonic() - started < 10:
        if not c.pump():
            break
    r = c.collected(sid)
    assert r["status"] == 200 and r["body"] == b""  # the head went out, no byte of the body could
    assert r["reset"] == h2.errors.ErrorCodes.CANCEL  # TIMEOUT_CLIENT (1 s here)
    assert hh.rss_kib() - rss < 32 * 1024  # the upstream was not read meanwhile: memory stayed bounded
    still_serves(hh, dns, replicas)


def test_http11_limits_apply_per_stream(hh):
    c = h2c(hh)
    assert c.response(c.request("/hh/" + "a" * 9000))["status"] == 414
    assert c.response(c.request("/hh/hello", headers=[("x-big", "v" * 70000)]))["status"] == 431
    r = c.response(c.request("/hh/upload", "POST", body=b"x" * 2000))  # MAX_REQUEST_BODY=1000
    assert r["status"] == 413
    r = c.response(c.request("/hh/upload", "POST", body=b"x" * 500))
    assert r["status"] == 200
    c.close()


def test_a_stalled_request_body_times_out(hh):
    c = h2c(hh)
    sid = c.request("/hh/upload", "POST", end=False)
    c.send_body(sid, b"x" * 10, end=False)
    r = c.response(sid)
    assert r["status"] == 408  # TIMEOUT_CLIENT while the body is being read, as over HTTP/1.1
    c.close()


# -- the frame-sequence fuzzer -----------------------------------------------------------
stream_ids = st.sampled_from([1, 3, 5, 2, 2**31 - 1])
frames = st.one_of(
    st.builds(lambda s, d, f: HeadersFrame(s, data=d, flags=f).serialize(), stream_ids,
              st.one_of(st.just(head_block()), st.binary(max_size=40)),
              st.sets(st.sampled_from(["END_HEADERS", "END_STREAM"]))),
    st.builds(lambda s, d, f: DataFrame(s, data=d, flags=f).serialize(), stream_ids, st.binary(max_size=60),
              st.sets(st.sampled_from(["END_STREAM"]))),
    st.builds(lambda s, d: ContinuationFrame(s, data=d).serialize(), stream_ids, st.binary(max_size=40)),
    st.builds(lambda s, c: RstStreamFrame(s, error_code=c).serialize(), stream_ids, st.integers(0, 20)),
    st.builds(lambda d: PingFrame(0, opaque_data=d).serialize(), st.binary(min_size=8, max_size=8)),
    st.builds(lambda k, v: SettingsFrame(0, settings={k: v}).serialize(), st.integers(1, 8), st.integers(0, 2**31)),
    st.builds(lambda t, f, s, p: struct.pack(">I", len(p))[1:] + bytes([t, f]) + struct.pack(">I", s) + p,
              st.integers(0, 20), st.integers(0, 255), st.integers(0, 2**31 - 1), st.binary(max_size=30)),  # any type
)


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_fuzz_frame_sequences(hh, dns, replicas):
    pid = hh.proc.pid
    baseline = fd_count(pid)

    @settings(max_examples=EXAMPLES, deadline=None, suppress_health_check=list(HealthCheck), database=None)
    @given(st.lists(frames, min_size=1, max_size=12))
    def run(sequence):
        sock = socket.create_connection(("127.0.0.1", hh.http_port), timeout=3)
        try:
            sock.sendall(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n" + SettingsFrame(0).serialize() + b"".join(sequence))
            sock.settimeout(2)
            while sock.recv(65536):
                pass
        except (socket.timeout, ConnectionResetError, BrokenPipeError):
            pass
        finally:
            sock.close()
        assert hh.alive()
    run()
    still_serves(hh, dns, replicas)
    wait_until(lambda: fd_count(pid) <= baseline + 2, timeout=10, what=f"pyroute back to {baseline} fds")
    assert "Traceback" not in hh.log()
