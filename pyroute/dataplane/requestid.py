"""Request IDs and W3C trace context on the requests pyroute forwards.

A request ID (REQUEST_ID, header named by REQUEST_ID_HEADER, X-Request-ID by default)
goes on the request to the upstream, on the response to the client and in the access
log line, so one request can be followed from the proxy's log into a service's. It is
made cheaply: a random prefix per process (workers and restarts differ) and a counter.
A client's own value is kept only from a peer in TRUSTED_PROXIES (a balancer in front
that made it); from anyone else it is dropped and replaced, not forwarded beside ours,
since nothing tells a proxy in front from a client making IDs up.

W3C `traceparent` is an ordinary header: passed through untouched. TRACEPARENT=generate
starts a trace where a request has none: version 00, a trace-id of the process's random
prefix and a counter, a parent-id of its own, and the sampled flag (parent-based
samplers, OpenTelemetry's default, would drop a trace whose start says unsampled).
"""

from __future__ import annotations

import os

TRACEPARENT = b"traceparent"
_SPAN_MASK = (1 << 64) - 1


class RequestIds:
    """What ProxyServer binds when either feature is on; `tag` runs once per routed request."""

    __slots__ = ("name", "lower", "prefix", "count", "trace_prefix", "span_base", "response_line", "line_start",
                 "id_start", "plain")

    def __init__(self, header: str | None, generate_traceparent: bool):
        self.name = header.encode("ascii") if header else None  # None: no request ID
        self.lower = self.name.lower() if self.name else None
        self.response_line = self.name + b": " if self.name else None
        self.prefix = os.urandom(6).hex().encode() + b"-"
        # A made ID's whole header line comes from one format; the ID is a slice of it.
        self.line_start = self.response_line + self.prefix if self.name else None
        self.id_start = len(self.response_line) if self.name else 0
        self.count = 0
        self.trace_prefix = os.urandom(8).hex().encode() if generate_traceparent else None
        self.span_base = int.from_bytes(os.urandom(8), "big")
        self.plain = self.name is not None and self.trace_prefix is None  # fresh() is all a request needs

    def fresh(self, ex) -> bytes:
        """A new ID for `ex` (the common case: the client sent none, no traceparent to start):
        the header line the upstream head and the response get."""
        self.count += 1
        line = ex.request_id_line = b"%b%x\r\n" % (self.line_start, self.count)
        ex.request_id = line[self.id_start : -2]
        return line

    def tag(self, ex, headers: list[tuple[bytes, bytes]], trusted: bool,
            seen: bool) -> tuple[list[tuple[bytes, bytes]], bytes]:
        """Set `ex.request_id` and `ex.request_id_line` (the header line the response gets);
        return the request's headers (a started traceparent added) and the line to add to the
        upstream head (b"" when the client's kept ID is among the headers already).

        `trusted`: the peer is in TRUSTED_PROXIES, so an ID it sent is kept as the request's.
        `seen`: the headers may hold the ID header (the client sent it, or a route feature may
        have added it); False spares the scan, the common case."""
        name = self.name
        line = b""
        if name is not None:
            request_id = None
            if seen:
                lower = self.lower
                for n, v in headers:  # (a plain loop: the cheapest scan in CPython for a handful of headers)
                    if n.lower() == lower:
                        if trusted and v:  # a trusted balancer's own ID: kept
                            request_id = v
                            break
                        headers = [(n, v) for n, v in headers if n.lower() != lower]  # anyone else's: dropped
                        break
            if request_id is None:
                line = self.fresh(ex)
            else:
                self.count += 1
                ex.request_id_line = b"%b%b\r\n" % (self.response_line, request_id)
                ex.request_id = request_id
        else:
            self.count += 1
        count = self.count
        if self.trace_prefix is not None:
            for n, _ in headers:
                if n.lower() == TRACEPARENT:
                    break
            else:
                span = (self.span_base + count) & _SPAN_MASK or 1  # an all-zero parent-id is invalid
                headers.append((TRACEPARENT, b"00-%s%016x-%016x-01" % (self.trace_prefix, count, span)))
        return headers, line

    def on_response(self, head: bytes, ex) -> bytes:
        """A client response head with the request ID added (unless the upstream echoed it)."""
        if head.find(ex.request_id) >= 0:  # (find: `in` on bytes first tries an int, at a TypeError's cost)
            return head
        return b"%b%b\r\n" % (head[:-2], ex.request_id_line)
