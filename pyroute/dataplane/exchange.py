"""One request/response pair on a client connection, as both sides of the proxy see it.

The request side (client.ClientConnection) creates the Exchange at the end of a request
head, routes it and binds what its response will need: the upstream head, and the
response transforms of its route. The upstream side (upstream.UpstreamConnection) is
bound to it while the response comes back. Every transform a response may go through is
a field here, applied in one place, the client's response path (response_head and
response_body): nothing is swapped in for the client's output or for its owner.

Its timestamps are seconds from clock.clock() (time.monotonic): a duration is the
difference of two, exact to the microsecond. A plain request's stamps come from the two
clock reads it costs: `started`, `head_done` and `sent_at` from the read of its head,
`response_at` from the read of its response head, and the end (the `now` that
ClientConnection._account passes to the counters and the access log) from the read that
completed it.
"""

from __future__ import annotations

UNLIMITED = 1 << 62  # "no body limit", as a number a chunk count never reaches


class Exchange:
    """One request/response pair on a client connection."""

    __slots__ = (
        "route", "head", "keep_alive", "http11", "is_head", "has_body", "chunked",
        "pending", "pending_size", "request_done", "upstream", "responded", "retries", "replay", "local",
        "close_after", "reply", "response_edit", "set_cookie", "body_transform", "stats", "method", "url",
        "slot", "started", "head_done", "sent_at", "response_at", "status", "address", "broken",
        "upgrade", "body_left", "chunk_mark", "client_ip", "request_id", "request_id_line", "log_headers",
    )

    def __init__(self, keep_alive: bool, http11: bool, method: bytes, url: bytes, chunked: bool, has_body: bool,
                 started: float = 0.0, head_done: float = 0.0, client_ip: bytes = b""):
        self.keep_alive = keep_alive
        self.http11 = http11
        self.method = method
        self.url = url
        self.is_head = method == b"HEAD"
        self.chunked = chunked
        self.has_body = has_body
        # Timestamps, clock.clock() seconds, for metrics, the access log and anything else that
        # reports durations: `started` (the first byte of the request head was read) and
        # `head_done` (the head was complete); the others stay 0.0 until they happen.
        self.started = started
        self.head_done = head_done
        self.client_ip = client_ip  # the client address every consumer reads (forwarded.py, TRUSTED_PROXIES)
        self.route = None
        self.head = b""  # the request head for the upstream (headers.request_head)
        self.pending: list[bytes] | None = None  # body chunks waiting for the upstream connection
        self.pending_size = 0
        self.request_done = False
        self.upstream = None  # the UpstreamConnection bound to it while the response is awaited
        self.responded = False
        self.retries = 0  # tries after the first (the service's retry policy)
        self.replay: bytearray | None = None  # body bytes sent on a reused connection, kept to retry
        self.local = 0  # status pyroute answers itself, 0 = forward
        self.close_after = False
        self.reply = None  # features.Reply when a route feature answers (401, 403, 30x)
        # The response transforms, bound when the request is routed:
        self.response_edit = None  # features.ResponseEdit: the route's header edits and compression
        self.set_cookie: bytes | None = None  # sticky-session cookie name to set on the response
        self.body_transform = None  # features.Compressor, started by a response head it compresses
        self.slot = None  # servicelimits.Slot: its place in a limited service, released when it ends
        self.sent_at = 0.0  # request head written upstream
        self.response_at = 0.0  # response head arrived
        self.status = 0  # the upstream's status
        self.address: tuple[str, int] | None = None  # the upstream address used
        self.broken = ""  # termination code when the exchange was cut short by pyroute's side
        self.upgrade: bytes | None = None  # an Upgrade request: client bytes sent ahead of the 101
        self.body_left = UNLIMITED  # chunked body bytes still allowed (MAX_REQUEST_BODY)
        self.chunk_mark = -1  # body_left at the last chunk-size line (unchanged since: trailers)
        self.request_id: bytes | None = None  # requestid.RequestIds: on the upstream request, response, log
        # (request_id_line, its "Name: ID\r\n" header line, is set with it)
        self.log_headers = None  # the request's headers, kept only for ACCESS_LOG_FORMAT=combined
