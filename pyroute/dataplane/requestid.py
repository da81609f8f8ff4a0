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

    __slots__ = ("name", "lower", "prefix", "count", "trace_prefix", "span_base", "response_line")

    def __init__(self, header: str | None, generate_traceparent: bool):
        self.name = header.encode("ascii") if header else None  # None: no request ID
        self.lower = self.name.lower() if self.name else None
        self.response_line = self.name + b": " if self.name else None
        self.prefix = os.urandom(6).hex().encode() + b"-"
        self.count = 0
        self.trace_prefix = os.urandom(8).hex().encode() if generate_traceparent else None
        self.span_base = int.from_bytes(os.urandom(8), "big")

    def tag(self, headers: list[tuple[bytes, bytes]],
            trusted: bool) -> tuple[bytes | None, list[tuple[bytes, bytes]]]:
        """(the request's ID or None, its headers with the ID and a started traceparent added).

        `trusted`: the peer is in TRUSTED_PROXIES, so an ID it sent is kept as the request's."""
        self.count += 1
        count = self.count
        name = self.name
        request_id = None
        if name is not None:
            lower = self.lower
            for n, v in headers:  # (a plain loop: the cheapest scan in CPython for a handful of headers)
                if n.lower() == lower:
                    if trusted and v:  # a trusted balancer's own ID: kept
                        request_id = v
                        break
                    headers = [(n, v) for n, v in headers if n.lower() != lower]  # anyone else's: dropped
                    break
            if request_id is None:
                request_id = b"%s%x" % (self.prefix, count)
                headers.append((name, request_id))
        if self.trace_prefix is not None:
            for n, _ in headers:
                if n.lower() == TRACEPARENT:
                    break
            else:
                span = (self.span_base + count) & _SPAN_MASK or 1  # an all-zero parent-id is invalid
                headers.append((TRACEPARENT, b"00-%s%016x-%016x-01" % (self.trace_prefix, count, span)))
        return request_id, headers

    def on_response(self, head: bytes, request_id: bytes) -> bytes:
        """A client response head with the request ID added (unless the upstream echoed it)."""
        if request_id in head:
            return head
        return b"%b%b%b\r\n\r\n" % (head[:-2], self.response_line, request_id)
