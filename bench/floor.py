"""The floor: the least Python any HTTP/1.1 proxy on uvloop + httptools runs per request.

Calibration only, never shipped: bench/run.py's `floor` target, so every run shows how
far pyroute is from what Python on this stack allows. Each client connection gets one
upstream connection to a fixed address. Client bytes go through an
httptools.HttpRequestParser with no callbacks (the framing check) and on to the upstream
unchanged; upstream bytes go back unchanged while the end of each response is found
with one search for the blank line and its Content-Length. No routing, no header edits,
no limits, no counters. (Heads split across reads and chunked responses are not
handled: the bench's upstream answers neither.)

    python bench/floor.py LISTEN_PORT UPSTREAM_PORT
"""

import asyncio
import sys

import httptools
import uvloop

UPSTREAM_HOST = "127.0.0.1"


class Upstream(asyncio.Protocol):
    def __init__(self, client: "Client"):
        self.client = client
        self.transport = None
        self.body_left = 0  # bytes of the current response's body still to pass

    def connection_made(self, transport) -> None:
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self.client.transport.write(data)
        at, size = 0, len(data)
        while at < size:
            if self.body_left:
                step = min(self.body_left, size - at)
                self.body_left -= step
                at += step
                continue
            end = data.find(b"\r\n\r\n", at)
            if end < 0:
                return
            length = data.find(b"Content-Length: ", at, end)
            self.body_left = int(data[length + 16:data.find(b"\r\n", length)]) if length >= 0 else 0
            at = end + 4

    def connection_lost(self, exc) -> None:
        self.client.transport.close()


class Client(asyncio.Protocol):
    def __init__(self, upstream_port: int):
        self.upstream_port = upstream_port
        self.parser = httptools.HttpRequestParser(object())  # no callbacks: framing only
        self.transport = None
        self.upstream: Upstream | None = None
        self.waiting: list[bytes] = []  # client bytes read before the upstream connection is up

    def connection_made(self, transport) -> None:
        self.transport = transport
        asyncio.get_running_loop().create_task(self.connect())

    async def connect(self) -> None:
        _, upstream = await asyncio.get_running_loop().create_connection(
            lambda: Upstream(self), UPSTREAM_HOST, self.upstream_port)
        self.upstream = upstream
        if self.waiting:
            upstream.transport.writelines(self.waiting)
            self.waiting = []

    def data_received(self, data: bytes) -> None:
        self.parser.feed_data(data)
        if self.upstream is not None:
            self.upstream.transport.write(data)
        else:
            self.waiting.append(data)

    def connection_lost(self, exc) -> None:
        self.parser = None
        if self.upstream is not None:
            self.upstream.transport.close()


async def main(port: int, upstream_port: int) -> None:
    server = await asyncio.get_running_loop().create_server(lambda: Client(upstream_port), "127.0.0.1", port,
                                                            backlog=1024)
    await server.serve_forever()


if __name__ == "__main__":
    uvloop.run(main(int(sys.argv[1]), int(sys.argv[2])))
