"""The access log: one JSON line per request on stdout (DEBUG / DEBUG_ERRORS_ONLY, as DFP).

Off by default, and then it costs nothing: the proxy holds no AccessLog and skips the
call. When on, lines are encoded with orjson, collected, and written in one go at the
end of the event loop iteration (one write per batch, not per request). The lines of
one batch share one timestamp; timings are whole milliseconds (as HAProxy's), which is
the resolution of the event loop's clock the hot path stamps requests with.

The ``termination`` field plays the part of HAProxy's termination flags:

====  =================================================================
--    complete
CD    the client went away before its response was complete
PR    refused by pyroute (malformed or unsupported request: 400/405/413/414/431)
cR    the client did not send a complete request in time (408)
NR    no route for the request (503)
SC    no connection to the upstream: name unresolvable, refused, connect timeout (503)
SH    the upstream failed before a complete response head (502)
sH    the upstream did not answer in time (504, TIMEOUT_SERVER)
SD    the upstream failed mid-body (the client connection is reset)
sD    the upstream stalled mid-body past TIMEOUT_SERVER (the client connection is reset)
====  =================================================================
"""

from __future__ import annotations

import asyncio
import os
import random
from datetime import datetime, timezone

import orjson

LOCAL_TERMINATION = {503: "SC", 502: "SH", 504: "sH"}




class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, errors_only: bool = False, sample: float = 1.0, fd: int = 1):
        self.loop = loop
        self.errors_only = errors_only
        self.sample = sample
        self.fd = fd
        self.lines: list[bytes] = []
        self.stamp = ""  # ISO 8601 time of the current batch

    def exchange(self, conn, ex, status: int, termination: str, now: float, received: int, sent: int) -> None:
        """Log one finished or abandoned exchange (see proxy.ClientConnection._account)."""
        if not termination:
            if not ex.local:
                termination = "--"
            elif ex.route is None:
                termination = "NR" if status == 503 else "PR"
            else:
                termination = LOCAL_TERMINATION.get(status, "PR")
        if self.errors_only and termination == "--" and status < 400:
            return
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        started = ex.started
        head_done = ex.head_done
        sent_at = ex.sent_at
        response_at = ex.response_at
        route = ex.route
        address = ex.address
        lines = self.lines
        if not lines:
            self._start_batch()
        lines.append(orjson.dumps({
            "time": self.stamp,
            "client": ex.client_ip.decode("latin-1"),
            "method": ex.method.decode("latin-1"),
            "path": ex.url.decode("latin-1"),
            "status": status,
            "bytes": sent,
            "bytes_in": received,
            "service": route.service.name if route is not None else "",
            "upstream": f"{address[0]}:{address[1]}" if address is not None else "",
            "request_ms": int((head_done - started) * 1000.0 + 0.5),
            "connect_ms": int((sent_at - head_done) * 1000.0 + 0.5) if sent_at else None,
            "response_ms": int((response_at - sent_at) * 1000.0 + 0.5) if response_at else None,
            "total_ms": int((now - started) * 1000.0 + 0.5),
            "termination": termination,
            "retried": ex.retried,
        }))

    def refused(self, conn, status: int) -> None:
        """A request refused before it was parsed whole (no route, method or path known)."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if not self.lines:
            self._start_batch()
        self.lines.append(orjson.dumps({
            "time": self.stamp, "client": conn.client_ip.decode("latin-1"), "method": "", "path": "",
            "status": status, "bytes": 0, "bytes_in": 0, "service": "", "upstream": "",
            "request_ms": None, "connect_ms": None, "response_ms": None, "total_ms": None,
            "termination": "cR" if status == 408 else "PR", "retried": False,
        }))

    def _start_batch(self) -> None:
        """First line of this loop iteration: schedule the write, take the timestamp."""
        self.loop.call_soon(self.flush)
        self.stamp = datetime.now(timezone.utc).isoformat(timespec="milliseconds")

    def flush(self) -> None:
        if not self.lines:
            return
        data = b"\n".join(self.lines) + b"\n"
        self.lines.clear()
        view = memoryview(data)
        while view:
            try:
                written = os.write(self.fd, view)
            except BlockingIOError:
                continue
            except OSError:
                return  # stdout is gone: nothing sensible to do with the line
            view = view[written:]
