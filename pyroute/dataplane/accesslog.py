"""The access log: one line per request on stdout (DEBUG / DEBUG_ERRORS_ONLY, as DFP).

Off by default, and then it costs nothing: the proxy holds no AccessLog and skips the
call. When on, lines are collected and written in one go at the end of the event loop
iteration (one write per batch, not per request). The lines of one batch share one
timestamp (but HAProxy's, whose date is the request's start). Timings (request_ms,
connect_ms, response_ms, total_ms) are milliseconds as floats at microsecond resolution
(0.137 = 137 us), the differences of the exchange's clock.clock() stamps; None for a
phase that never happened. ACCESS_LOG_FORMAT picks the line:

- ``json`` (default): pyroute's fields, encoded with orjson (below);
- ``clf``: the Common Log Format (``%h %l %u %t "%r" %>s %b``), as Apache and nginx write it;
- ``combined``: CLF plus ``"%{Referer}i" "%{User-agent}i"`` (Apache's and nginx's default);
- ``haproxy``: HAProxy's HTTP log format (``option httplog``: ``%ci:%cp [%tr] %ft %b/%s
  %TR/%Tw/%Tc/%Tr/%Ta %ST %B %CC %CS %tsc %ac/%fc/%bc/%sc/%rc %sq/%bq {%hr} %{+Q}r``),
  what DFP's DEBUG=true printed, without the syslog header; the date is the request's
  start (HAProxy's accept date), the frontend ``services`` as DFP named it, the request
  ID (when on) the one captured request header; queue times and counts pyroute does not
  have are 0, and a request with no response logs -1.

In the text formats a client with no response (it went away) logs nginx's 499 where a
status is required, and `"` and control characters in the request line and headers are
written as \\xHH (as nginx does), so a client cannot forge a line or a field.

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
import re
import time
from datetime import datetime, timezone

import orjson

LOCAL_TERMINATION = {503: "SC", 502: "SH", 504: "sH"}
STAMPS = {  # each format's time of a batch (UTC)
    "json": lambda t: t.isoformat(timespec="milliseconds"),
    "clf": lambda t: t.strftime("%d/%b/%Y:%H:%M:%S +0000"),
    "combined": lambda t: t.strftime("%d/%b/%Y:%H:%M:%S +0000"),
    "haproxy": lambda t: t.strftime("%d/%b/%Y:%H:%M:%S.") + f"{t.microsecond // 1000:03d}",
}
_UNSAFE = re.compile(r'["\\\x00-\x1f\x7f-\xff]')
NO_RESPONSE = 499  # nginx's status for a client that closed before its response


def _safe(text: str) -> str:
    return _UNSAFE.sub(lambda m: f"\\x{ord(m.group()):02X}", text)


def _ms(start: float, end: float) -> int:
    return int((end - start) * 1000.0 + 0.5)


class AccessLog:
    def __init__(self, loop: asyncio.AbstractEventLoop, errors_only: bool = False, sample: float = 1.0, fd: int = 1,
                 log_format: str = "json"):
        self.loop = loop
        self.errors_only = errors_only
        self.sample = sample
        self.fd = fd
        self.format = log_format
        self.wants_headers = log_format == "combined"  # the request's headers are kept on its exchange
        self.lines: list[bytes] = []
        self.stamp = ""  # the time of the current batch, as the format writes it

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
        if self.format != "json":
            lines.append(self._text_line(conn, ex, status, termination, now, sent).encode())
            return
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
            "request_ms": round((head_done - started) * 1000.0, 3),
            "connect_ms": round((sent_at - head_done) * 1000.0, 3) if sent_at else None,
            "response_ms": round((response_at - sent_at) * 1000.0, 3) if response_at else None,
            "total_ms": round((now - started) * 1000.0, 3),
            "termination": termination,
            "retried": ex.retried,
            "request_id": ex.request_id.decode("latin-1") if ex.request_id is not None else None,
        }))

    def _text_line(self, conn, ex, status: int, termination: str, now: float, sent: int) -> str:
        request = f"{_safe(ex.method.decode('latin-1'))} {_safe(ex.url.decode('latin-1'))} " \
                  f"HTTP/1.{1 if ex.http11 else 0}"
        if self.format == "haproxy":
            route, address = ex.route, ex.address
            started, head_done, sent_at, response_at = ex.started, ex.head_done, ex.sent_at, ex.response_at
            active = len(conn.server.connections)
            captured = f" {{{ex.request_id.decode('latin-1')}}}" if ex.request_id is not None else ""
            accepted = STAMPS["haproxy"](datetime.fromtimestamp(time.time() - (now - started), timezone.utc))
            return (f"{self._client(conn)} [{accepted}] services "
                    f"{route.service.name if route is not None else 'services'}/"
                    f"{f'{address[0]}:{address[1]}' if address is not None else '<NOSRV>'} "
                    f"{_ms(started, head_done)}/0/{_ms(head_done, sent_at) if sent_at else -1}/"
                    f"{_ms(sent_at, response_at) if response_at else -1}/{_ms(started, now)} "
                    f"{status or -1} {sent} - - {termination}-- {active}/{active}/0/0/{1 if ex.retried else 0} 0/0"
                    f"{captured} \"{request}\"")
        line = f"{conn.client_ip.decode('latin-1')} - - [{self.stamp}] \"{request}\" {status or NO_RESPONSE} {sent or '-'}"
        if self.format == "combined":
            referer = agent = "-"
            for name, value in ex.log_headers or ():
                lower = name.lower()
                if lower == b"referer":
                    referer = _safe(value.decode("latin-1"))
                elif lower == b"user-agent":
                    agent = _safe(value.decode("latin-1"))
            line += f' "{referer}" "{agent}"'
        return line

    @staticmethod
    def _client(conn) -> str:
        """ip:port as HAProxy writes %ci:%cp (the port of the socket's peer)."""
        peer = conn.transport.get_extra_info("peername") if conn.transport is not None else None
        return f"{conn.client_ip.decode('latin-1')}:{peer[1] if peer else 0}"

    def refused(self, conn, status: int) -> None:
        """A request refused before it was parsed whole (no route, method or path known)."""
        if self.sample < 1.0 and random.random() >= self.sample:
            return
        if not self.lines:
            self._start_batch()
        if self.format == "haproxy":
            self.lines.append(f"{self._client(conn)} [{self.stamp}] services services/<NOSRV> -1/-1/-1/-1/0 "
                              f"{status} 0 - - {'cR' if status == 408 else 'PR'}-- 0/0/0/0/0 0/0 \"<BADREQ>\"".encode())
            return
        if self.format != "json":
            line = f'{conn.client_ip.decode("latin-1")} - - [{self.stamp}] "-" {status} -'
            self.lines.append((line + ' "-" "-"' if self.format == "combined" else line).encode())
            return
        self.lines.append(orjson.dumps({
            "time": self.stamp, "client": conn.client_ip.decode("latin-1"), "method": "", "path": "",
            "status": status, "bytes": 0, "bytes_in": 0, "service": "", "upstream": "",
            "request_ms": None, "connect_ms": None, "response_ms": None, "total_ms": None,
            "termination": "cR" if status == 408 else "PR", "retried": False, "request_id": None,
        }))

    def _start_batch(self) -> None:
        """First line of this loop iteration: schedule the write, take the timestamp."""
        self.loop.call_soon(self.flush)
        self.stamp = STAMPS[self.format](datetime.now(timezone.utc))

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
