"""pyroute/httpclient.py against real local servers (TCP and a unix socket) that answer with
exact bytes: what goes on the wire, Content-Length / chunked / close-delimited bodies, a
stream read as it arrives, interim 100 answers, and the failures (refused, silent, cut short,
too large, garbage) as HttpClientError saying why."""
from __future__ import annotations

import asyncio

import h11
import pytest

from pyroute.httpclient import HttpClientError, open_request, request
from support.upstream import free_port


async def serve(answer, unix_path=None):
    """A server that reads one request head (and its body) and hands it with the writer to
    `answer(head, body, writer)`; -> (server, endpoint)."""

    async def handle(reader, writer):
        head = await reader.readuntil(b"\r\n\r\n")
        length = next((int(line.split(b":")[1]) for line in head.split(b"\r\n")
                       if line.lower().startswith(b"content-length:")), 0)
        body = await reader.readexactly(length)
        try:
            await answer(head, body, writer)
        finally:
            writer.close()

    if unix_path is not None:
        return await asyncio.start_unix_server(handle, unix_path), unix_path
    port = free_port()
    return await asyncio.start_server(handle, "127.0.0.1", port), ("127.0.0.1", port)


def fixed(data: bytes):
    async def answer(head, body, writer):
        writer.write(data)
        await writer.drain()
    return answer


def exchange(answer, unix_path=None, **kwargs):
    """request() against a server answering with `answer`; -> (status, body) or the error."""
    async def main():
        server, endpoint = await serve(answer, unix_path)
        try:
            return await request(endpoint, kwargs.pop("method", "GET"), "/x", host="test", timeout=2, **kwargs)
        except HttpClientError as exc:
            return exc
        finally:
            server.close()
    return asyncio.run(main())


def test_the_request_on_the_wire_is_well_formed_http11():
    seen = []

    async def answer(head, body, writer):
        seen.append((head, body))
        writer.write(b"HTTP/1.1 204 No Content\r\n\r\n")

    assert exchange(answer, method="PUT", headers={"User-Agent": "pyroute-test", "Authorization": "Basic eDp5"},
                    body=b"payload") == (204, b"")
    head, body = seen[0]
    conn = h11.Connection(h11.SERVER)
    conn.receive_data(head + body)
    event = conn.next_event()
    assert isinstance(event, h11.Request) and event.method == b"PUT" and event.target == b"/x"
    assert dict(event.headers) == {b"host": b"test", b"user-agent": b"pyroute-test", b"authorization": b"Basic eDp5",
                                   b"content-length": b"7", b"connection": b"close"}
    assert conn.next_event() == h11.Data(data=b"payload")


def test_a_get_without_a_body_says_no_content_length():
    seen = []

    async def answer(head, body, writer):
        seen.append(head)
        writer.write(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")

    assert exchange(answer) == (200, b"ok")
    assert b"content-length" not in seen[0].lower()


@pytest.mark.parametrize("answer,body", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nhel\r\n2;ext=1\r\nlo\r\n0\r\nX-T: 1\r\n\r\n", b"hello"),
    (b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\n\r\nhello until the close", b"hello until the close"),
    (b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nContent-Length: 5\r\n\r\nhello", b"hello"),
])
def test_bodies_framed_every_way_are_read_whole(answer, body):
    assert exchange(fixed(answer)) == (200, body)


def test_over_a_unix_socket(tmp_path):
    answer = b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nunix!\r\n0\r\n\r\n"
    assert exchange(fixed(answer), unix_path=str(tmp_path / "api.sock")) == (200, b"unix!")


@pytest.mark.parametrize("answer,why", [
    (b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc", "before the answer was complete"),
    (b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n", "before the answer was complete"),
    (b"HTTP/1.1 200 OK\r\nContent-Le", "before the answer was complete"),
    (b"NOT HTTP\r\n\r\n", ""),
])
def test_an_answer_cut_short_or_garbled_is_an_error(answer, why):
    error = exchange(fixed(answer))
    assert isinstance(error, HttpClientError) and why in str(error) and str(error)


def test_an_answer_over_the_limit_is_an_error():
    error = exchange(fixed(b"HTTP/1.1 200 OK\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000), limit=1000)
    assert isinstance(error, HttpClientError) and "larger than 1000 bytes" in str(error)


def test_a_silent_server_times_out():
    async def main():
        never = asyncio.Event()

        async def silent(head, body, writer):
            await never.wait()

        server, endpoint = await serve(silent)
        try:
            await request(endpoint, "GET", "/", host="test", timeout=0.3)
        except HttpClientError as exc:
            return exc
        finally:
            never.set()
            server.close()

    assert "no answer within 0.3 s" in str(asyncio.run(main()))


def test_a_refused_connection_is_an_error():
    async def main():
        try:
            await request(("127.0.0.1", free_port()), "GET", "/", host="test", timeout=2)
        except HttpClientError as exc:
            return exc

    error = asyncio.run(main())
    assert isinstance(error, HttpClientError) and "Connect call failed" in str(error)


def test_a_stream_is_read_as_it_arrives_and_ends_with_an_error_when_cut(tmp_path):
    """The Engine's /events: each chunk reaches the reader before the server sends the next."""
    async def main():
        proceed = asyncio.Queue()

        async def stream(head, body, writer):
            writer.write(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
            for part in (b"one\n", b"two\n"):
                writer.write(b"%x\r\n%s\r\n" % (len(part), part))
                await writer.drain()
                await proceed.get()  # the next part only after the client has seen this one

        server, endpoint = await serve(stream, str(tmp_path / "events.sock"))
        response = await open_request(endpoint, "GET", "/events", host="docker", timeout=2)
        seen = []
        try:
            async for data in response.chunks():
                seen.append(data)
                proceed.put_nowait(None)
        except HttpClientError as exc:
            seen.append(str(exc))
        finally:
            response.close()
            server.close()
        return response.status, seen

    status, seen = asyncio.run(main())
    assert status == 200
    assert seen == [b"one\n", b"two\n", "connection closed before the answer was complete"]
