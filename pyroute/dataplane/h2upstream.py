"""HTTP/2 to the tasks, for routes with `upstreamProto=h2c` (cleartext) or `h2` (TLS):
what a gRPC server speaks. A client's HTTP/2 stream (http2.Stream) on such a route is
forwarded as a stream of its own (`Call`) on one of a few HTTP/2 connections per task
address (`UpstreamH2`, the `h2` library's client side), so trailers (`grpc-status`,
`grpc-message`) and `te: trailers` pass through; deadlines (`grpc-timeout`) are the
service's. Bodies flow under both sides' windows: the client's DATA is acknowledged
only as the upstream's window takes it, the upstream's only as the client's takes it.

A call whose upstream fails ends as a gRPC client understands: a trailers-only answer
with `grpc-status: 14` (UNAVAILABLE) before the response began, the same as trailers
after; a non-gRPC request gets 502/503 or RST_STREAM. Never a hang: TIMEOUT_SERVER (or
the route's timeoutServer) bounds the wait for each upstream byte.
"""

from __future__ import annotations

import asyncio
import logging
import time
import weakref
from collections import deque

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions

from pyroute.dataplane import features
from pyroute.dataplane.clock import clock
from pyroute.dataplane.exchange import Exchange
from pyroute.dataplane.http2 import CONNECTION_FIELDS, SEND_HIGH
from pyroute.dataplane.upstream import upstream_tls_context
from pyroute.resolver import ResolveError

log = logging.getLogger("pyroute.dataplane.h2upstream")

UNAVAILABLE = [(b"grpc-status", b"14"), (b"grpc-message", b"upstream unavailable")]


class Relay:
    """The HTTP/2 upstream side of one data plane: which tables have upstreamProto routes,
    the connections per task address, and the calls in flight (for TIMEOUT_SERVER)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, settings):
        self.loop = loop
        self.settings = settings
        self.connections: dict[tuple[str, int], list[UpstreamH2]] = {}
        self.connecting: dict[tuple[str, int], asyncio.Future] = {}
        self.calls: set[Call] = set()
        self._tables: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
        self.tls_context = None  # made on first use

    def active(self, table) -> bool:
        """Whether `table` routes anything over HTTP/2 (computed once per table)."""
        known = self._tables.get(table)
        if known is None:
            known = self._tables[table] = any(r.destination.upstream_proto != "http1" for r in table.routes)
        return known

    def call_for(self, client, stream, fields) -> Call | None:
        """A Call when the stream's route has upstreamProto=h2c|h2; None: the HTTP/1.1 path."""
        path = authority = host = None
        method = b""
        headers = []
        for name, value in fields:
            if name == b":path":
                path = value
            elif name == b":authority":
                authority = value
            elif name == b":method":
                method = value
            elif name == b"host":
                host = value
            elif name[:1] != b":":
                headers.append((name, value))
        if path is None or path[:1] != b"/":
            return None
        query = path.find(b"?")
        route = client.server.table.match(authority or host, path if query < 0 else path[:query], headers, client)
        if route is None or route.destination.upstream_proto == "http1":
            return None
        reply = None
        if route.features:  # the route's request steps, as for HTTP/1.1 (auth, IP rules, header edits, ...)
            ex = Exchange(True, True, method, path, False, False)
            req = features.run(client, ex, route, method, path, authority or host, headers)
            if req is None:
                reply = ex.reply
            else:
                fields = [(n, req.path + req.query if n == b":path" else v) for n, v in fields if n[:1] == b":"]
                fields += req.headers
        call = Call(self, client, stream, route, fields)
        if reply is not None:  # a step answered: its response, as the HTTP/1.1 path would give it
            call.ex.local = reply.status
            call._end(None, reply.status)
            stream.write(reply.encode(False, method == b"HEAD"))
            return call
        self.calls.add(call)
        self.loop.create_task(call.start())
        return call

    async def connection(self, address, proto: str, stats) -> UpstreamH2:
        """A connection to `address` with room for one more stream: pooled, or new."""
        while True:
            for conn in self.connections.get(address, ()):
                if conn.has_room():
                    return conn
            waiting = self.connecting.get(address)
            if waiting is None:
                break
            await asyncio.shield(waiting)
        future = self.connecting[address] = self.loop.create_future()
        try:
            tls = {}
            if proto == "h2":
                self.tls_context = self.tls_context or upstream_tls_context("h2")
                tls = {"ssl": self.tls_context, "server_hostname": address[0]}
            began = time.perf_counter()
            try:
                _, conn = await asyncio.wait_for(self.loop.create_connection(
                    lambda: UpstreamH2(self, address), address[0], address[1], **tls), self.settings.timeout_connect)
            except (OSError, asyncio.TimeoutError) as exc:
                stats.connect_failed(str(exc) or "connect timeout")
                raise
            stats.connected(time.perf_counter() - began)
            self.connections.setdefault(address, []).append(conn)
            return conn
        finally:
            del self.connecting[address]
            future.set_result(None)

    def forget(self, conn: UpstreamH2) -> None:
        conns = self.connections.get(conn.address)
        if conns and conn in conns:
            conns.remove(conn)
            if not conns:
                del self.connections[conn.address]

    def check_timeouts(self, now: float) -> None:
        """Called by the plane's tick: TIMEOUT_SERVER per call, idle connections closed."""
        default = self.settings.timeout_server
        for call in list(self.calls):
            if call.waiting and now - call.last_io > (call.route.destination.timeout_server or default):
                call.fail("upstream timeout", 504)
        idle = self.settings.upstream_idle_timeout
        for conns in list(self.connections.values()):
            for conn in list(conns):
                if not conn.calls and now - conn.last_io > idle:
                    conn.close()

    def close_all(self) -> None:
        for conns in list(self.connections.values()):
            for conn in list(conns):
                conn.close()


class Call:
    """One client stream forwarded as a stream on an upstream HTTP/2 connection. For the
    client side it stands where a ClientConnection would (http2.Stream.conn)."""

    queue = ()  # (the client side's window timeout marks no exchange of ours)

    def __init__(self, relay: Relay, client, stream, route, fields):
        self.relay = relay
        self.client = client  # http2.H2Connection
        self.stream = stream  # http2.Stream: its `out`, `fields` and `finished` carry the response
        self.route = route
        self.grpc = False
        scheme = b"https" if route.destination.upstream_proto == "h2" else b"http"
        method = path = b""
        headers = []
        for name, value in fields:
            if name[:1] == b":":
                if name == b":scheme":
                    value = scheme
                elif name == b":method":
                    method = value
                elif name == b":path":
                    path = value
            elif name == b"content-type":
                self.grpc = value.startswith(b"application/grpc")
            elif name in CONNECTION_FIELDS or name in (b"x-forwarded-for", b"x-forwarded-proto"):
                continue
            headers.append((name, value))
        headers.append((b"x-forwarded-for", client.client_ip))
        headers.append((b"x-forwarded-proto", client.server.proto))
        self.headers = headers
        # For the counters and the access log, as the HTTP/1.1 path keeps them:
        ex = self.ex = Exchange(True, True, method, path, False, False, client_ip=client.client_ip)
        ex.route = route
        self.upstream: UpstreamH2 | None = None
        self.sid = 0
        self.pending: deque = deque()  # request DATA (bytes), then None for its end, until upstream windows allow
        self.pending_size = 0
        self.unacked = 0  # response bytes received but not yet given back to the upstream's window
        self.paused = False  # the client's window is full: the upstream's is not reopened
        self.closed = False
        self.waiting = True  # an upstream byte is awaited (TIMEOUT_SERVER applies)
        ex.started = ex.head_done = self.last_io = clock()
        self.status = 0
        self.received = self.sent = 0

    async def start(self) -> None:
        route = self.route
        address = route.backend.address()
        try:
            if address is None:
                address = await route.backend.resolve()
            upstream = await self.relay.connection(address, route.destination.upstream_proto,
                                                   route.stats.address(address))
        except (ResolveError, OSError, asyncio.TimeoutError) as exc:
            log.info("%s: no HTTP/2 connection to the tasks: %s", route.service.name, str(exc) or "timeout")
            return self.fail("cannot connect", 503)
        if self.closed:
            return
        self.upstream = upstream
        self.ex.address = address
        self.ex.sent_at = self.last_io = clock()
        try:
            self.sid = upstream.open(self, self.headers)
        except h2.exceptions.ProtocolError as exc:
            return self.fail(f"upstream refused the stream: {exc}", 503)
        self.send_pending()

    # -- the client side's calls (as to a ClientConnection) -------------------------------
    def data_received(self, data: bytes | None) -> None:
        """Request DATA from the client; None: its end."""
        if self.closed:
            return
        if data is not None:
            self.received += len(data)
            self.pending_size += len(data)
        self.pending.append(data)
        if self.upstream is not None:
            self.send_pending()
        if self.pending_size > SEND_HIGH:
            self.stream.pause_reading()  # the client's window stays shut until the upstream takes these

    def pause_writing(self) -> None:
        self.paused = True

    def resume_writing(self) -> None:
        self.paused = False
        if self.unacked and self.upstream is not None and not self.closed:
            self.upstream.acknowledge(self.sid, self.unacked)
            self.unacked = 0

    def check_timeouts(self, now: float) -> None:
        pass  # (the Relay checks TIMEOUT_SERVER; the client's window timeout is the client side's)

    def connection_lost(self, exc) -> None:
        """The client cancelled the stream or went away: the upstream stream is cancelled too."""
        if not self.closed:
            self._end(h2.errors.ErrorCodes.CANCEL, self.status, "CD")

    # -- request body to the upstream -------------------------------------------------------
    def send_pending(self) -> None:
        upstream = self.upstream
        pending = self.pending
        while pending:
            data = pending[0]
            if data is None:
                pending.popleft()
                upstream.h2.end_stream(self.sid)
                break
            room = upstream.room(self.sid)
            if room <= 0:
                break
            if len(data) > room:
                pending[0] = data[room:]
                data = data[:room]
            else:
                pending.popleft()
            self.pending_size -= len(data)
            upstream.h2.send_data(self.sid, data)
        upstream.flush()
        if self.pending_size <= SEND_HIGH and self.stream.paused and not self.stream.closed:
            self.stream.resume_reading()

    # -- the upstream's response -------------------------------------------------------------
    def response_head(self, fields, ended: bool) -> None:
        status = 0
        out = []
        for name, value in fields:
            if name == b":status":
                status = int(value)
            if name not in CONNECTION_FIELDS:
                out.append((name, value))
        self.last_io = clock()
        stream = self.stream
        client = self.client
        if status < 200:
            client.h2.send_headers(stream.id, out)
        else:
            self.status = self.ex.status = status
            self.ex.response_at = self.last_io
            stream.in_body = True
            client.h2.send_headers(stream.id, out, end_stream=ended)
            if ended:
                self._end(None, status)
        client.schedule()

    def response_data(self, data: bytes, size: int) -> None:
        self.last_io = clock()
        self.sent += len(data)
        stream = self.stream
        if data:
            stream.out.append(data)
            stream.out_size += len(data)
        if self.paused:
            self.unacked += size
        elif size:
            self.upstream.acknowledge(self.sid, size)
        self.client.send(stream)
        self.client.schedule()

    def response_end(self, trailers) -> None:
        stream = self.stream
        stream.fields = [(n, v) for n, v in trailers or () if n not in CONNECTION_FIELDS]
        stream.finished = True
        self._end(None, self.status)
        self.client.send(stream)  # (trailers go after what the client's window still holds back)
        self.client.schedule()

    def fail(self, why: str, status: int) -> None:
        """The upstream cannot (or can no longer) answer: gRPC's UNAVAILABLE, else 5xx or a reset."""
        if self.closed:
            return
        log.info("%s: HTTP/2 upstream: %s", self.route.service.name, why)
        stream = self.stream
        client = self.client
        cut = "sD" if status == 504 else "SD"  # (the access log's termination, as HAProxy's)
        if stream.closed:
            return self._end(h2.errors.ErrorCodes.CANCEL, self.status, "CD")
        if stream.in_body:
            self._end(h2.errors.ErrorCodes.CANCEL, self.status, cut)
            if self.grpc:  # the response began: its trailers say UNAVAILABLE
                stream.fields = list(UNAVAILABLE)
                stream.finished = True
                client.send(stream)
            else:
                stream.reset(h2.errors.ErrorCodes.INTERNAL_ERROR)
        else:
            self.ex.local = status
            self._end(h2.errors.ErrorCodes.CANCEL, status)
            if self.grpc:  # a trailers-only answer
                client.h2.send_headers(stream.id, [(b":status", b"200"), (b"content-type", b"application/grpc"),
                                                   *UNAVAILABLE], end_stream=True)
            else:
                client.h2.send_headers(stream.id, [(b":status", b"%d" % status), (b"content-length", b"0")],
                                       end_stream=True)
            client.done(stream)
        client.schedule()

    def _end(self, reset: int | None, status: int, termination: str = "") -> None:
        """The call is over on the upstream side (`reset`: cancel the upstream stream); it is
        counted and logged with `status` and `termination`, as the HTTP/1.1 path does."""
        if self.closed:
            return
        self.closed = True
        self.waiting = False
        self.relay.calls.discard(self)
        upstream = self.upstream
        if upstream is not None:
            upstream.calls.pop(self.sid, None)
            if reset is not None and not upstream.closed:
                try:
                    upstream.h2.reset_stream(self.sid, reset)
                except h2.exceptions.StreamClosedError:
                    pass
                upstream.flush()
        now = clock()
        self.route.stats.count(self.ex, status, now, self.received, self.sent)
        access_log = self.client.server.access_log
        if access_log is not None:
            access_log.exchange(self.client, self.ex, status, termination, now, self.received, self.sent)


class UpstreamH2(asyncio.Protocol):
    """One HTTP/2 connection to a task, its streams each a Call."""

    def __init__(self, relay: Relay, address):
        self.relay = relay
        self.address = address
        self.transport = None
        self.h2 = h2.connection.H2Connection(h2.config.H2Configuration(client_side=True, header_encoding=None))
        self.calls: dict[int, Call] = {}
        self.closed = False
        self.goaway = False
        self.last_io = clock()

    def has_room(self) -> bool:
        return (not self.closed and not self.goaway
                and self.h2.open_outbound_streams < self.h2.remote_settings.max_concurrent_streams)

    def room(self, sid: int) -> int:
        return min(self.h2.local_flow_control_window(sid), self.h2.max_outbound_frame_size)

    def open(self, call: Call, headers) -> int:
        sid = self.h2.get_next_available_stream_id()
        self.h2.send_headers(sid, headers)
        self.calls[sid] = call
        self.flush()
        return sid

    def acknowledge(self, sid: int, size: int) -> None:
        self.h2.acknowledge_received_data(size, sid)
        self.flush()

    def flush(self) -> None:
        data = self.h2.data_to_send()
        if data and not self.closed:
            self.transport.write(data)

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.h2.initiate_connection()
        self.flush()

    def data_received(self, data: bytes) -> None:
        self.last_io = clock()
        try:
            events = self.h2.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            self.flush()
            return self._lost(f"HTTP/2 protocol error: {exc}")
        calls = self.calls
        for event in events:
            kind = type(event)
            call = calls.get(getattr(event, "stream_id", 0))
            if kind is h2.events.ResponseReceived or kind is h2.events.InformationalResponseReceived:
                if call is not None:
                    call.response_head(event.headers, event.stream_ended is not None)
            elif kind is h2.events.DataReceived:
                if call is not None:
                    call.response_data(event.data, event.flow_controlled_length)
                elif event.flow_controlled_length:
                    self.h2.acknowledge_received_data(event.flow_controlled_length, event.stream_id)
            elif kind is h2.events.TrailersReceived:
                if call is not None:
                    calls.pop(event.stream_id, None)
                    call.response_end(event.headers)
            elif kind is h2.events.StreamEnded:
                if call is not None:
                    calls.pop(event.stream_id, None)
                    call.response_end(())
            elif kind is h2.events.StreamReset:
                if call is not None:
                    call.fail(f"upstream reset the stream ({event.error_code!r})", 502)
            elif kind is h2.events.WindowUpdated or kind is h2.events.RemoteSettingsChanged:
                for waiting in list(calls.values()):
                    if waiting.pending:
                        waiting.send_pending()
            elif kind is h2.events.ConnectionTerminated:
                self.goaway = True
                last = event.last_stream_id or 0
                for sid, waiting in list(calls.items()):
                    if sid > last:
                        waiting.fail("upstream GOAWAY", 503)
        self.flush()

    def eof_received(self) -> bool:
        return False

    def connection_lost(self, exc) -> None:
        self._lost(f"upstream closed the connection{': ' + str(exc) if exc else ''}")

    def _lost(self, why: str) -> None:
        self.relay.forget(self)
        if not self.closed:
            self.closed = True
            self.transport.close()
        for call in list(self.calls.values()):
            call.fail(why, 502)
        self.calls.clear()

    def close(self) -> None:
        self.relay.forget(self)
        if not self.closed:
            self.closed = True
            self.transport.close()
