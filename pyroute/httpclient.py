"""pyroute's own small HTTP/1.1 client: calls to peer replicas and the Swarm Listener, the
Docker Engine API, and health probes of tasks.

All of them are short, rare exchanges with one party, so the client is plain: one request
per connection (``Connection: close``), over TCP or a unix socket, bounded by a timeout;
the answer is parsed by httptools (Content-Length, chunked, or delimited by the close) and
read whole with a size cap, or streamed (the Engine's ``/events``). It is not the proxy's
upstream side (dataplane/upstream.py), which pools connections and streams both ways.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Iterator, Mapping

import httptools

Endpoint = tuple[str, int] | str  # (host, port), or the path of a unix socket
MAX_ANSWER = 64 * 1024 * 1024  # a state document with many certificates stays far below
READ_SIZE = 65536
_WITH_BODY = frozenset({"POST", "PUT", "PATCH"})  # methods that say Content-Length even when it is 0


class HttpClientError(Exception):
    """No usable HTTP answer: refused, timed out, cut short, malformed or too large."""


@contextlib.contextmanager
def _failures(timeout: float | None) -> Iterator[None]:
    """OS, timeout and parser errors as HttpClientError, saying what went wrong."""
    try:
        yield
    except TimeoutError:  # before OSError, of which it is a kind
        raise HttpClientError(f"no answer within {timeout:g} s" if timeout is not None else "timed out") from None
    except (OSError, httptools.HttpParserError) as exc:
        raise HttpClientError(str(exc) or type(exc).__name__) from None


async def connect(endpoint: Endpoint, timeout: float) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to `endpoint` within `timeout` seconds; raises HttpClientError."""
    with _failures(timeout):
        async with asyncio.timeout(timeout):
            if isinstance(endpoint, str):
                return await asyncio.open_unix_connection(endpoint)
            return await asyncio.open_connection(*endpoint)


class Response:
    """An answer whose head has arrived: `status` and `headers` (lower-case names); the body
    follows through body() or chunks(). close() when done."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, limit: int):
        self.status = 0
        self.headers: dict[str, str] = {}
        self._reader = reader
        self._writer = writer
        self._limit = limit
        self._parser = httptools.HttpResponseParser(self)
        self._pieces: list[bytes] = []
        self._size = 0  # bytes of the answer so far
        self._head_done = False
        self._complete = False

    # -- httptools callbacks ------------------------------------------------------------
    def on_header(self, name: bytes, value: bytes) -> None:
        self.headers[name.decode("latin-1").lower()] = value.decode("latin-1")

    def on_headers_complete(self) -> None:
        status = self._parser.get_status_code()
        if status >= 200:
            self.status, self._head_done = status, True
        else:
            self.headers = {}  # an interim answer (100 Continue): the final one follows

    def on_body(self, body: bytes) -> None:
        self._pieces.append(body)

    def on_message_complete(self) -> None:
        self._complete = self._head_done

    # -- reading ------------------------------------------------------------------------
    async def _receive(self) -> None:
        """Parse what arrives next; raises HttpClientError when the connection ends first or
        the answer grows past the limit."""
        data = await self._reader.read(READ_SIZE)
        if not data:
            if self._head_done and "content-length" not in self.headers \
                    and "chunked" not in self.headers.get("transfer-encoding", "").lower():
                self._complete = True  # the body ends with the connection
                return
            raise HttpClientError("connection closed before the answer was complete")
        self._size += len(data)
        if self._size > self._limit:
            raise HttpClientError(f"answer larger than {self._limit} bytes")
        self._parser.feed_data(data)

    async def _read_head(self) -> None:
        while not self._head_done:
            await self._receive()

    async def body(self) -> bytes:
        """The whole body (at most the limit); raises HttpClientError."""
        with _failures(None):
            while not self._complete:
                await self._receive()
        return b"".join(self._pieces)

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, with no limit (a stream); raises HttpClientError when the
        connection breaks before the answer is complete."""
        while True:
            if self._pieces:
                data = b"".join(self._pieces)
                self._pieces.clear()
                yield data
            if self._complete:
                return
            self._size = 0  # a stream is bounded per read, not in total
            with _failures(None):
                await self._receive()

    def close(self) -> None:
        self._writer.close()


async def open_request(endpoint: Endpoint, method: str, target: str, *, host: str,
                       headers: Mapping[str, str] | None = None, body: bytes = b"", timeout: float,
                       limit: int = MAX_ANSWER) -> Response:
    """Send one request and wait for the answer's head, all within `timeout` seconds.
    `headers` come after Host; Content-Length and Connection: close are added. Raises
    HttpClientError."""
    reader, writer = await connect(endpoint, timeout)
    lines = [f"{method} {target} HTTP/1.1", f"Host: {host}", *(f"{n}: {v}" for n, v in (headers or {}).items())]
    if body or method in _WITH_BODY:
        lines.append(f"Content-Length: {len(body)}")
    lines += ["Connection: close", "", ""]
    response = Response(reader, writer, limit)
    try:
        with _failures(timeout):
            async with asyncio.timeout(timeout):
                writer.write("\r\n".join(lines).encode("latin-1") + body)
                await response._read_head()
    except BaseException:
        writer.close()
        raise
    return response


async def request(endpoint: Endpoint, method: str, target: str, *, host: str,
                  headers: Mapping[str, str] | None = None, body: bytes = b"", timeout: float,
                  limit: int = MAX_ANSWER) -> tuple[int, bytes]:
    """One whole exchange within `timeout` seconds -> (status, body); raises HttpClientError."""
    with _failures(timeout):
        async with asyncio.timeout(timeout):
            response = await open_request(endpoint, method, target, host=host, headers=headers, body=body,
                                          timeout=timeout, limit=limit)
            try:
                return response.status, await response.body()
            finally:
                response.close()
