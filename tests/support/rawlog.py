"""A backend that logs every raw byte it receives and parses it more strictly than h11.

The adversarial corpus runner (tests/test_adversarial.py) puts it behind pyroute: what a
connection delivers is kept byte for byte (`RawLogBackend.raw`), parsed with h11 plus the
RFC 9112 rules h11 is lenient about (a bare CR or LF, an obs-fold line, Content-Length
together with Transfer-Encoding), and each request parsed is recorded as an
`upstream.Received` and answered with a response that names it
(`X-Seen: <method> <target> #<n>`, the target as body), so a client handed someone else's
response can tell. A message the strict parse refuses lands in `protocol_errors` with the
connection's raw bytes. A target registered in `canned` is answered with those exact bytes
instead (the response-side cases), then the connection is closed if asked or else parsed
afresh, so bytes a proxy misframed on a reused connection show up as the next client's answer.
"""
from __future__ import annotations

import asyncio
import itertools
import re
import threading
from dataclasses import dataclass

import h11

from .upstream import Received, free_port

_BARE_CR_OR_LF = re.compile(rb"\r(?!\n)|(?<!\r)\n")
_FOLDED_LINE = re.compile(rb"\r\n[ \t]")


@dataclass
class ProtocolError:
    conn_id: int
    message: str
    raw: bytes  # everything that connection delivered up to the error


class RawLogBackend:
    """An HTTP/1.1 server on ip:<free port>, on a thread and loop of its own."""

    def __init__(self, ip: str = "127.0.0.51"):
        self.ip, self.port = ip, free_port(ip)
        self.received: list[Received] = []
        self.protocol_errors: list[ProtocolError] = []
        self.raw: dict[int, bytearray] = {}
        self.canned: dict[str, tuple[bytes, bool]] = {}  # target -> (response bytes, close after)
        self._conn_ids = itertools.count(1)
        self._seen = itertools.count(1)
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()

        def run():
            asyncio.set_event_loop(self.loop)
            self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, ip, self.port))
            ready.set()
            self.loop.run_forever()

        self.thread = threading.Thread(target=run, name="rawlog-backend", daemon=True)
        self.thread.start()
        ready.wait(10)

    @property
    def addr(self) -> str:
        return f"{self.ip}:{self.port}"

    def close(self):
        """Stop listening, end every connection's task, stop the loop."""
        async def shutdown():
            self.server.close()
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(shutdown(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)
        self.loop.close()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        conn_id = next(self._conn_ids)
        raw = self.raw[conn_id] = bytearray()
        conn = h11.Connection(h11.SERVER)
        head_start = 0  # offset in raw where the message being parsed began
        index = 0
        rec: Received | None = None
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    data = await reader.read(65536)
                    raw += data
                    conn.receive_data(data)
                    continue
                if isinstance(ev, h11.ConnectionClosed):
                    return
                if isinstance(ev, h11.Request):
                    head = bytes(raw[head_start:len(raw) - len(conn.trailing_data[0])])
                    rec = Received(upstream=self.addr, conn_id=conn_id, index_on_conn=index,
                                   method=ev.method.decode(), target=ev.target.decode("latin-1"),
                                   http_version=ev.http_version.decode(),
                                   headers=[(k.decode("latin-1"), v.decode("latin-1"))
                                            for k, v in ev.headers.raw_items()])
                    self.received.append(rec)
                    if problem := _stricter_than_h11(head, rec):
                        raise h11.RemoteProtocolError(problem)
                elif isinstance(ev, h11.Data):
                    rec.body_len += len(ev.data)
                elif isinstance(ev, h11.EndOfMessage):
                    rec.complete = True
                    index += 1
                    if rec.target in self.canned:
                        answer, close = self.canned[rec.target]
                        writer.write(answer)
                        await writer.drain()
                        if close:
                            return
                        leftover = conn.trailing_data[0]
                        conn = h11.Connection(h11.SERVER)
                        conn.receive_data(leftover)
                    else:
                        seen = f"{rec.method} {rec.target} #{next(self._seen)}"
                        body = rec.target.encode("latin-1")
                        writer.write(conn.send(h11.Response(status_code=200, headers=[
                            ("X-Seen", seen.encode("latin-1")), ("Content-Length", str(len(body)))])))
                        writer.write(conn.send(h11.Data(data=body)))
                        writer.write(conn.send(h11.EndOfMessage()))
                        await writer.drain()
                        if conn.our_state is h11.MUST_CLOSE:
                            return
                        conn.start_next_cycle()
                    head_start = len(raw) - len(conn.trailing_data[0])
        except h11.RemoteProtocolError as e:
            if "peer closed connection" not in str(e):  # a proxy giving up mid-body is not a framing error
                self.protocol_errors.append(ProtocolError(conn_id, str(e), bytes(raw)))
            writer.write(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
        except (ConnectionError, OSError):
            return
        finally:
            writer.close()


def _stricter_than_h11(head: bytes, rec: Received) -> str | None:
    """The RFC 9112 rules h11 lets through, for a head a proxy forwarded."""
    if _BARE_CR_OR_LF.search(head):
        return "bare CR or LF in a forwarded head"
    if _FOLDED_LINE.search(head):
        return "obs-fold line in a forwarded head"
    if rec.header("Content-Length") and rec.header("Transfer-Encoding"):
        return "Content-Length and Transfer-Encoding both forwarded"
    return None
