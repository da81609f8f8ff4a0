"""HTTP/2 from clients: ALPN `h2` on the TLS listeners, prior knowledge (h2c) on plain ones.

The `h2` library does the framing, HPACK and the stream state machine. Each stream is
served by a ClientConnection of its own (`StreamSide` mixed into the listener's class),
for which the `Stream` is the transport: the stream's request is handed to it as the
HTTP/1.1 bytes it stands for, and the HTTP/1.1 response it writes back is parsed
(httptools) into HEADERS, DATA and trailers. So an HTTP/2 request meets the very code an
HTTP/1.1 request meets: the request parser and its limits (414, 431, 413), the route
table, every feature, the response transforms, the pooled upstream connections, the
timeouts, metrics and the access log. Nothing of the HTTP/1.1 path is copied here.

Flow control is tied to the upstream's both ways: request DATA is acknowledged (the
client's window reopened) only while the stream's ClientConnection reads, which it stops
doing when its upstream's socket is full; response bytes wait for the client's window,
and past a few frames of them the upstream is no longer read. Memory per stream is
therefore about one window each way.

A stream whose route has `upstreamProto=h2c|h2` skips the HTTP/1.1 form and goes to its
tasks over HTTP/2 (h2upstream.py), trailers and all, as gRPC needs.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import re
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import httptools
from hyperframe.frame import GoAwayFrame

from pyroute.dataplane.clock import clock

log = logging.getLogger("pyroute.dataplane.http2")

WINDOW = 65535  # each stream's receive window: the request body bytes buffered per stream at most
SEND_HIGH = 4 * 16384  # response bytes waiting for the client's window before the upstream is paused
# Fields that mean something to one HTTP/1.1 connection only (RFC 9113 §8.2.2).
CONNECTION_FIELDS = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding", b"upgrade"})
# Budgets against floods (token buckets: burst, then per second), nghttp2's figures for resets.
RESET_BURST, RESET_RATE = 1000, 33.0  # streams the client cancels before their response (CVE-2023-44487)
CONTROL_BURST, CONTROL_RATE = 1000, 100.0  # PING, SETTINGS, PRIORITY and empty DATA frames

_TOKEN = re.compile(rb"[!#$%&'*+\-.^_`|~0-9a-z]+\Z")  # a lowercase field name (RFC 9110 §5.1)
_BAD_VALUE = re.compile(rb"[\x00\r\n]")  # what would end an HTTP/1.1 line early (RFC 9113 §8.2.1)
_BAD_TARGET = re.compile(rb"[\x00-\x20\x7f]")


class Budget:
    """A token bucket: `spend()` is False once more than `burst` were spent faster than `rate`/s."""

    __slots__ = ("tokens", "burst", "rate", "at")

    def __init__(self, burst: int, rate: float, now: float):
        self.tokens = self.burst = float(burst)
        self.rate = rate
        self.at = now

    def spend(self, now: float) -> bool:
        self.tokens = min(self.burst, self.tokens + (now - self.at) * self.rate) - 1
        self.at = now
        return self.tokens >= 0


class StreamSide:
    """Mixed into a ClientConnection class to serve one HTTP/2 stream: the H2Connection,
    not the stream, is the socket MAXCONN counts, and its bytes are counted there."""

    __slots__ = ()

    def _register(self) -> bool:
        return True

    def _unregister(self) -> None:
        pass


@functools.cache
def stream_class(base: type) -> type:
    """The ClientConnection class (`base`: the listener's, e.g. ClientCertConnection) for streams."""
    return type("Stream" + base.__name__, (StreamSide, base), {"__slots__": ()})


class Stream:
    """One HTTP/2 stream: the transport of the ClientConnection serving it (`conn`).

    Request side: the head and body bytes it is fed, held back while it pauses reading
    (and the client's window with them). Response side: what `conn` writes is parsed as
    an HTTP/1.1 response and sent as HEADERS/DATA/trailers as the client's window allows.
    """

    __slots__ = (
        "owner", "id", "conn", "parser", "chunked", "is_head", "paused", "held", "unacked", "out",
        "out_size", "fields", "status", "in_body", "until_eof", "finished", "request_ended", "closed",
        "blocked_since", "upstream_paused",
    )

    def __init__(self, owner: H2Connection, stream_id: int, chunked: bool, is_head: bool):
        self.owner = owner
        self.id = stream_id
        self.conn = None  # the ClientConnection (StreamSide) serving it
        self.parser = httptools.HttpResponseParser(self)
        self.chunked = chunked  # the request body is re-framed as chunks (no content-length given)
        self.is_head = is_head
        self.paused = False  # conn stopped reading: DATA is held, the window stays shut
        self.held: list[bytes] = []
        self.unacked = 0  # flow-controlled bytes received but not yet given back to the client
        self.out: deque[bytes] = deque()  # response body bytes waiting for the client's window
        self.out_size = 0
        self.fields: list[tuple[bytes, bytes]] = []  # response header (then trailer) fields being parsed
        self.status = 0
        self.in_body = False  # the final response head was sent
        self.until_eof = False  # the response body has no length: it ends when conn closes
        self.finished = False  # the whole response is in (out may still hold some of it)
        self.request_ended = False
        self.closed = False
        self.blocked_since = 0.0  # when response bytes started waiting for a window (0: none wait)
        self.upstream_paused = False

    # -- the transport conn writes to -----------------------------------------------------
    def write(self, data: bytes) -> None:
        parser = self.parser
        if parser is None:
            return
        try:
            parser.feed_data(data)
        except httptools.HttpParserError as exc:  # (conn only writes what it validated: a bug if seen)
            log.warning("stream %d: unparsable response from the HTTP/1.1 side: %s", self.id, exc)
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        self.owner.schedule()

    def writelines(self, chunks) -> None:
        for chunk in chunks:
            self.write(chunk)

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        """conn is done: a body without length ends here; anything else unfinished is cut."""
        if self.closed:
            return
        if self.in_body and self.until_eof:
            self.finished = True
            self.owner.send(self)
            self.owner.schedule()
        else:
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def abort(self) -> None:
        """conn cuts the response short (its upstream broke mid-body): the client sees a reset."""
        if not self.closed:
            self.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)

    def pause_reading(self) -> None:
        self.paused = True

    def resume_reading(self) -> None:
        self.paused = False
        held, self.held = self.held, []
        for data in held:
            if self.closed or self.paused:
                self.held.append(data)
            else:
                self.conn.data_received(data)
        if not self.paused and self.unacked and not self.closed:
            self.owner.acknowledge(self.id, self.unacked)
            self.unacked = 0

    def get_extra_info(self, name: str, default=None):
        if name == "socket":  # no socket of its own: a reset is a RST_STREAM (abort)
            return default
        return self.owner.transport.get_extra_info(name, default)

    # -- request bytes for conn ------------------------------------------------------------
    def feed(self, data: bytes) -> None:
        if self.paused:
            self.held.append(data)
        else:
            self.conn.data_received(data)

    # -- httptools response callbacks -------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.fields.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        fields, self.fields = self.fields, []
        if status < 200:
            if status != 101:  # (no upgrade is ever asked for on a stream)
                self.owner.h2.send_headers(self.id, [(b":status", b"%d" % status), *response_fields(fields)])
            return
        self.status = status
        self.in_body = True
        names = {name for name, _ in fields}
        no_body = self.is_head or status in (204, 304)
        self.until_eof = not no_body and b"content-length" not in names and b"transfer-encoding" not in names
        self.owner.h2.send_headers(self.id, [(b":status", b"%d" % status), *response_fields(fields)],
                                   end_stream=no_body)
        if no_body:
            self.owner.done(self)

    def on_body(self, body: bytes) -> None:
        if not self.closed:
            self.out.append(body)
            self.out_size += len(body)
            self.owner.send(self)

    def on_message_complete(self) -> None:
        if self.in_body and not self.closed:
            self.finished = True
            self.owner.send(self)

    # -- ending ------------------------------------------------------------------------------
    def reset(self, code: int) -> None:
        owner = self.owner
        if not self.closed:
            try:
                owner.h2.reset_stream(self.id, code)
            except h2.exceptions.StreamClosedError:
                pass
        conn = owner.forget(self)
        if conn is not None and not conn.closed:
            owner.loop.call_soon(conn.connection_lost, None)


def response_fields(fields: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    """An HTTP/1.1 response's fields as HTTP/2 ones: connection-specific fields (and those a
    Connection field names) dropped."""
    named = ()
    for name, value in fields:
        if name == b"connection":
            named = {token.strip().lower() for token in value.split(b",")}
            break
    return [(name, value) for name, value in fields if name not in CONNECTION_FIELDS and name not in named]


class H2Connection(asyncio.Protocol):
    """One HTTP/2 client connection: the h2 state machine, its streams, its flood budgets.

    For the drain and the metrics it looks like a ClientConnection (`queue`, `in_head`,
    `received`, `sent`, `check_timeouts`).
    """

    in_head = False  # (the drain closes a connection with no stream and no head coming)

    def __init__(self, server, stream_class: type, relay=None):
        self.server = server
        self.loop = server.loop
        self.stream_class = stream_class
        self.relay = relay  # h2upstream.Relay: the streams of upstreamProto=h2c|h2 routes
        self.transport = None
        self.client_ip = b""  # set before connection_made when a PROXY header gave it
        settings = server.settings
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(
            client_side=False, header_encoding=None, validate_outbound_headers=False,
            normalize_outbound_headers=False))  # (outbound fields are filtered by response_fields)
        head_room = settings.max_uri_size + settings.max_header_size + 64 * settings.max_headers
        self.h2.local_settings = h2.settings.Settings(client=False, initial_values={
            h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: settings.h2_max_concurrent_streams,
            h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: WINDOW,
            h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: head_room,  # HPACK bombs stop here
            h2.settings.SettingCodes.ENABLE_PUSH: 0,
        })
        self.h2.decoder.max_header_list_size = head_room  # (h2 applies it only once the client acknowledged)
        self.streams: dict[int, Stream] = {}
        self.received = 0
        self.sent = 0
        self.last_io = 0.0
        self.closed = False
        self.writing_paused = False
        self.write_scheduled = False
        self.goaway_sent = 0  # the last stream id served after a graceful GOAWAY (0: none sent)
        self.cancelled_now = ()  # streams the client resets in the read being handled
        self.resets = self.control = None  # Budgets, from connection_made

    @property
    def queue(self) -> dict[int, Stream]:
        """The streams in flight (what the drain waits for)."""
        return self.streams

    # -- asyncio.Protocol --------------------------------------------------------------------
    def connection_made(self, transport) -> None:
        self.transport = transport
        if not self.client_ip:
            peer = transport.get_extra_info("peername")
            self.client_ip = peer[0].encode() if peer else b"unknown"
        self.last_io = now = clock()
        self.resets = Budget(RESET_BURST, RESET_RATE, now)
        self.control = Budget(CONTROL_BURST, CONTROL_RATE, now)
        server = self.server
        if not server.limit.opened(self.client_ip):
            self.closed = True
            log.info("refusing a connection from %s: MAXCONN_PER_IP reached", self.client_ip.decode())
            transport.abort()
            return
        server.connections.add(self)
        server.accepted += 1
        self.h2.initiate_connection()
        # The connection's window grows with the streams' (each is bounded by its own).
        self.h2.increment_flow_control_window(WINDOW * min(server.settings.h2_max_concurrent_streams, 256))
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_io = clock()
        self.received += len(data)
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:  # h2 has queued the GOAWAY saying why
            log.info("HTTP/2 client %s: %s", self.client_ip.decode(), exc)
            self.flush()
            self._close()
            return
        handlers = _HANDLERS
        if len(events) > 1:  # a stream opened and cancelled in one read is never started (rapid reset)
            self.cancelled_now = {e.stream_id for e in events if type(e) is h2.events.StreamReset}
        for event in events:
            handler = handlers.get(type(event))
            if handler is not None:
                handler(self, event)
            if self.closed:
                return
        self.cancelled_now = ()
        self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        if self.transport is None or self.server is None:
            return
        server = self.server
        if self.resets is not None and self in server.connections:
            server.connections.discard(self)
            server.limit.closed(self.client_ip)
            server.closed_received += self.received
            server.closed_sent += self.sent
        self.closed = True
        for stream in list(self.streams.values()):
            conn = self.forget(stream)
            if conn is not None and not conn.closed:
                conn.connection_lost(None)  # the exchange is accounted as cut short by the client
        self.streams.clear()

    def pause_writing(self) -> None:
        self.writing_paused = True
        for stream in self.streams.values():
            if not stream.upstream_paused and stream.conn is not None:
                stream.conn.pause_writing()

    def resume_writing(self) -> None:
        self.writing_paused = False
        for stream in self.streams.values():
            if not stream.upstream_paused and stream.conn is not None:
                stream.conn.resume_writing()

    # -- output ------------------------------------------------------------------------------
    def schedule(self) -> None:
        """Write what h2 has queued at the end of this turn of the loop: the responses of
        every stream that moved in it leave in one write (one TLS record, one syscall)."""
        if not self.write_scheduled:
            self.write_scheduled = True
            self.loop.call_soon(self._scheduled_flush)

    def _scheduled_flush(self) -> None:
        self.write_scheduled = False
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.sent += len(data)
            self.transport.write(data)

    def acknowledge(self, stream_id: int, size: int) -> None:
        self.h2.acknowledge_received_data(size, stream_id)

    def send(self, stream: Stream) -> None:
        """Send what the client's window allows of the stream's response; end it when all is out."""
        h2conn = self.h2
        out = stream.out
        sid = stream.id
        while out:
            room = min(h2conn.local_flow_control_window(sid), h2conn.max_outbound_frame_size)
            if room <= 0:
                break
            chunk = out[0]
            if len(chunk) <= room:
                out.popleft()
            else:
                out[0] = chunk[room:]
                chunk = chunk[:room]
            stream.out_size -= len(chunk)
            h2conn.send_data(sid, chunk)
        if out:
            if not stream.blocked_since:
                stream.blocked_since = clock()
            if stream.out_size > SEND_HIGH and not stream.upstream_paused:
                stream.upstream_paused = True
                stream.conn.pause_writing()  # its upstream is not read until the client makes room
            return
        stream.blocked_since = 0.0
        if stream.upstream_paused:
            stream.upstream_paused = False
            if not self.writing_paused:
                stream.conn.resume_writing()
        if stream.finished:
            trailers = response_fields(stream.fields)
            if trailers:
                h2conn.send_headers(sid, trailers, end_stream=True)
            else:
                h2conn.end_stream(sid)
            self.done(stream)

    def done(self, stream: Stream) -> None:
        """The stream's response is all out: the stream ends here (a request body still
        coming is refused with RST_STREAM NO_ERROR, RFC 9113 §8.1)."""
        if not stream.request_ended:
            try:
                self.h2.reset_stream(stream.id, h2.errors.ErrorCodes.NO_ERROR)
            except h2.exceptions.StreamClosedError:
                pass
        conn = self.forget(stream)
        if conn is not None:  # (its parser is still on the stack: it lets go in a moment)
            self.loop.call_soon(conn.connection_lost, None)

    def forget(self, stream: Stream):
        """The stream is over here: returns what served it (its ClientConnection or Call), let go
        of so that nothing on the path forms a cycle."""
        stream.closed = True
        stream.parser = None  # it holds the stream's bound callbacks
        conn, stream.conn = stream.conn, None
        if self.streams.pop(stream.id, None) is not None and stream.unacked:
            self.h2.acknowledge_received_data(stream.unacked, stream.id)  # (the connection's window)
            stream.unacked = 0
        if not self.streams and self.goaway_sent and not self.closed:
            self.flush()
            self._close()
        return conn

    # -- h2 events ---------------------------------------------------------------------------
    def _request(self, event: h2.events.RequestReceived) -> None:
        sid = event.stream_id
        if self.goaway_sent and sid > self.goaway_sent:
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.REFUSED_STREAM)  # after our GOAWAY: try elsewhere
            return
        if sid in self.cancelled_now:
            return  # (its reset, in the same read, is counted against the client)
        head = request_bytes(event.headers, event.stream_ended is None)
        if head is None:  # a field HTTP/1.1 could not carry: malformed (RFC 9113 §8.1.1)
            self.h2.reset_stream(sid, h2.errors.ErrorCodes.PROTOCOL_ERROR)
            return
        data, chunked, method = head
        stream = Stream(self, sid, chunked, method == b"HEAD")
        self.streams[sid] = stream
        relay = self.relay
        call = None
        if relay is not None and relay.active(self.server.table):
            call = relay.call_for(self, stream, event.headers)
        if call is None:
            conn = stream.conn = self.stream_class(self.server)
            conn.client_ip = self.client_ip
            conn.connection_made(stream)
            if self.writing_paused:
                conn.pause_writing()
            conn.data_received(data)
        elif not stream.closed:  # (unless a route feature answered it at once)
            stream.conn = call  # upstreamProto=h2c|h2: the stream goes on as HTTP/2 (h2upstream.py)
            stream.chunked = False
        if event.stream_ended is not None and not stream.closed:
            self._request_ended(event.stream_ended)

    def _data(self, event: h2.events.DataReceived) -> None:
        sid = event.stream_id
        size = event.flow_controlled_length
        data = event.data
        if not data and event.stream_ended is None and not self.control.spend(self.last_io):
            return self._calm("empty DATA frames")
        stream = self.streams.get(sid)
        if stream is None:
            if size:
                self.h2.acknowledge_received_data(size, sid)  # (a stream already answered)
            return
        if data:
            stream.feed(b"%x\r\n%b\r\n" % (len(data), data) if stream.chunked else data)
        if stream.paused or stream.closed:
            stream.unacked += size
        elif size:
            self.h2.acknowledge_received_data(size, sid)

    def _request_ended(self, event: h2.events.StreamEnded) -> None:
        stream = self.streams.get(event.stream_id)
        if stream is None or stream.request_ended:
            return
        stream.request_ended = True
        if stream.chunked:
            stream.feed(b"0\r\n\r\n")
        elif type(stream.conn) is not self.stream_class:
            stream.feed(None)  # an HTTP/2 upstream call ends its request itself (h2upstream.Call)

    def _cancelled(self, event: h2.events.StreamReset) -> None:
        sid = event.stream_id
        stream = self.streams.get(sid)
        if stream is None and sid not in self.cancelled_now:
            return  # (a stream already answered)
        if not self.resets.spend(self.last_io):  # rapid reset: opening and cancelling costs the client
            return self._calm("too many streams cancelled")
        if stream is None:
            return
        conn = self.forget(stream)
        if conn is not None and not conn.closed:
            conn.connection_lost(None)  # accounted as cut short by the client, its upstream dropped

    def _window_updated(self, event: h2.events.WindowUpdated) -> None:
        if event.stream_id:
            stream = self.streams.get(event.stream_id)
            if stream is not None and stream.out:
                self.send(stream)
            return
        self._send_all()

    def _settings_changed(self, event: h2.events.RemoteSettingsChanged) -> None:
        if not self.control.spend(self.last_io):
            return self._calm("SETTINGS flood")
        if h2.settings.SettingCodes.INITIAL_WINDOW_SIZE in event.changed_settings:
            self._send_all()

    def _send_all(self) -> None:
        for stream in list(self.streams.values()):
            if stream.out and not stream.closed:
                self.send(stream)

    def _control_frame(self, event) -> None:
        if not self.control.spend(self.last_io):
            self._calm(f"{type(event).__name__} flood")

    def _terminated(self, event: h2.events.ConnectionTerminated) -> None:
        """The client's GOAWAY: nothing new comes; close once the streams in flight are done."""
        self.goaway_sent = self.goaway_sent or max(self.streams, default=0) or -1
        if not self.streams:
            self._close()

    # -- ending ------------------------------------------------------------------------------
    def _calm(self, why: str) -> None:
        """A flood: GOAWAY ENHANCE_YOUR_CALM, and the connection closes."""
        log.info("HTTP/2 client %s: %s, closing", self.client_ip.decode(), why)
        self.h2.close_connection(h2.errors.ErrorCodes.ENHANCE_YOUR_CALM)
        self.flush()
        self._close()

    def goaway(self) -> None:
        """SIGTERM: a GOAWAY naming the last stream served; streams in flight finish (the
        drain's DRAIN_GRACE), new ones are refused, and the connection closes after the last."""
        if self.closed or self.goaway_sent:
            return
        last = self.h2.highest_inbound_stream_id
        self.goaway_sent = last or -1
        self.flush()
        # (not h2's close_connection: that would end the streams in flight too)
        frame = GoAwayFrame(stream_id=0, last_stream_id=last, error_code=h2.errors.ErrorCodes.NO_ERROR)
        data = frame.serialize()
        self.sent += len(data)
        self.transport.write(data)
        if not self.streams:
            self._close()

    def _close(self) -> None:
        if not self.closed:
            self.closed = True
            self.transport.close()

    def check_timeouts(self, now: float) -> None:
        """Per stream: the request side's timeouts (its ClientConnection's), and TIMEOUT_CLIENT
        for a response the client's window holds back. The connection: idle and keep-alive."""
        if self.closed:
            return
        settings = self.server.settings
        for stream in list(self.streams.values()):
            if stream.blocked_since and now - stream.blocked_since > settings.timeout_client:
                log.info("HTTP/2 client %s: stream %d: window shut for TIMEOUT_CLIENT", self.client_ip.decode(),
                         stream.id)
                conn = stream.conn
                stream.reset(h2.errors.ErrorCodes.CANCEL)
                if getattr(conn, "queue", None):
                    conn.queue[0].broken = "cD"  # (accounted when it is let go, just after)
            elif stream.conn is not None:
                stream.conn.check_timeouts(now)
        self.flush()
        if not self.streams:
            idle = settings.timeout_http_keep_alive if self.h2.highest_inbound_stream_id else settings.timeout_http_request
            if now - self.last_io > idle:
                self.h2.close_connection(h2.errors.ErrorCodes.NO_ERROR)
                self.flush()
                self._close()


# h2 event -> H2Connection method (functions, not bound methods: no cycle through the connection)
_HANDLERS = {
    h2.events.RequestReceived: H2Connection._request,
    h2.events.DataReceived: H2Connection._data,
    h2.events.StreamEnded: H2Connection._request_ended,
    h2.events.StreamReset: H2Connection._cancelled,
    h2.events.WindowUpdated: H2Connection._window_updated,
    h2.events.RemoteSettingsChanged: H2Connection._settings_changed,
    h2.events.PingReceived: H2Connection._control_frame,
    h2.events.PriorityUpdated: H2Connection._control_frame,
    h2.events.ConnectionTerminated: H2Connection._terminated,
}


def request_bytes(fields, has_body: bool) -> tuple[bytes, bool, bytes] | None:
    """A request's HTTP/2 fields as the HTTP/1.1 head they stand for: (head, chunked, method).

    :authority becomes Host (h2 has refused a Host that differs), cookie crumbs are joined
    (h2 did it), `te: trailers` is dropped as any hop-by-hop field; a body without
    content-length is sent chunked. None when a field cannot be written as HTTP/1.1.
    """
    method = path = authority = host = None
    lines = []
    length = False
    for name, value in fields:
        if name[:1] == b":":
            if name == b":method":
                method = value
            elif name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            continue
        if not _TOKEN.match(name) or _BAD_VALUE.search(value):
            return None
        if name == b"host":
            host = value
        elif name != b"te":
            if name == b"content-length":
                length = True
            lines.append(b"%b: %b\r\n" % (name, value))
    authority = authority if authority is not None else host
    if method is None or not _TOKEN.match(method.lower()):
        return None
    if path is None:
        path = authority  # CONNECT (refused with 405 on the HTTP/1.1 side)
    if not path or _BAD_TARGET.search(path) or (authority is not None and _BAD_TARGET.search(authority)):
        return None
    chunked = has_body and not length
    head = b"%b %b HTTP/1.1\r\n%b%b%b\r\n" % (
        method, path, b"host: %b\r\n" % authority if authority is not None else b"", b"".join(lines),
        b"transfer-encoding: chunked\r\n" if chunked else b"")
    return head, chunked, method


def announce_drain(proxies) -> None:
    """SIGTERM: every HTTP/2 connection sends its graceful GOAWAY."""
    for proxy in proxies:
        for conn in list(proxy.connections):
            if type(conn) is H2Connection:
                conn.goaway()
