"""Upgrade: a real websockets server behind pyroute, a real websockets client in front.
The 101 turns both sockets into a byte tunnel: messages both ways, a large message
(backpressure), a close from either side, the tunnel timeout (global and per service)."""
import asyncio
import socket
import threading

import pytest
import websockets
from websockets.asyncio.client import connect
from websockets.asyncio.server import serve

from support.upstream import free_port, wait_until

PYROUTE_ENV = {"TIMEOUT_TUNNEL": "30"}
WS_IP = "127.0.0.21"


class EchoServer:
    """A websockets echo server in its own thread; '/close' makes the server close first."""

    def __init__(self):
        self.port = free_port(WS_IP)
        self.loop = asyncio.new_event_loop()
        self.closed_by_client = 0
        self.open = 0
        ready = threading.Event()
        threading.Thread(target=self._run, args=(ready,), daemon=True).start()
        ready.wait(5)

    def _run(self, ready):
        asyncio.set_event_loop(self.loop)

        async def handler(ws):
            self.open += 1
            try:
                if ws.request.path.endswith("/close"):
                    await ws.close(1000, "server says bye")
                    return
                async for message in ws:
                    await ws.send(message)
            except websockets.ConnectionClosed:
                pass
            finally:
                self.open -= 1
                if ws.close_code == 1000 and ws.request.path.endswith("/chat"):
                    self.closed_by_client += 1

        async def main():
            self.server = await serve(handler, WS_IP, self.port, max_size=None)
            ready.set()
            await self.server.serve_forever()

        try:
            self.loop.run_until_complete(main())
        except asyncio.CancelledError:
            pass

    def stop(self):
        self.loop.call_soon_threadsafe(self.server.close)


@pytest.fixture(scope="module")
def echo():
    server = EchoServer()
    yield server
    server.stop()


@pytest.fixture
def ws_route(proxy, dns, echo):
    dns.set_service("ws-echo", WS_IP)
    proxy.reconfigure(serviceName="ws-echo", servicePath="/ws", port=echo.port)
    return f"ws://127.0.0.1:{proxy.http_port}/ws"


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


def test_messages_both_ways_and_client_close(proxy, ws_route, echo):
    before = echo.closed_by_client

    async def go():
        async with connect(ws_route + "/chat") as ws:
            for text in ["hello", "ünïcödé", ""]:
                await ws.send(text)
                assert await ws.recv() == text
            await ws.send(b"\x00\x01binary")
            assert await ws.recv() == b"\x00\x01binary"
        return ws.close_code

    assert run(go()) == 1000
    wait_until(lambda: echo.closed_by_client == before + 1, what="the server to see the client's close")
    assert proxy.get("/ws/plain")[0] in (400, 426)   # a plain request to the same server still works as HTTP


def test_large_message_with_backpressure(proxy, ws_route):
    big = bytes(range(256)) * (32 * 1024)   # 8 MiB

    async def go():
        async with connect(ws_route + "/big", max_size=None) as ws:
            await ws.send(big)
            echoed = await ws.recv()
        return echoed

    assert run(go()) == big


def test_server_close_reaches_the_client(proxy, ws_route):
    async def go():
        async with connect(ws_route + "/close") as ws:
            with pytest.raises(websockets.ConnectionClosedOK):
                await ws.recv()
        return ws.close_code, ws.close_reason

    assert run(go()) == (1000, "server says bye")


def test_idle_tunnel_is_closed_after_timeout_tunnel(proxy, dns, echo):
    dns.set_service("ws-short", WS_IP)
    proxy.reconfigure(serviceName="ws-short", servicePath="/short", port=echo.port, timeoutTunnel="0.5")

    async def go():
        async with connect(f"ws://127.0.0.1:{proxy.http_port}/short/idle", ping_interval=None) as ws:
            await ws.send("one")
            assert await ws.recv() == "one"
            with pytest.raises(websockets.ConnectionClosedError):
                await ws.recv()   # nothing is said: pyroute cuts the tunnel (timeoutTunnel=0.5)

    run(go())


def test_upgrade_refused_by_upstream_is_a_plain_response(proxy, dns, replicas):
    up = replicas[0]
    dns.set_service("ws-plain", up.ip)
    proxy.reconfigure(serviceName="ws-plain", servicePath="/noup", port=up.port)
    with proxy.raw() as c:
        c.send_raw(b"GET /noup/hello HTTP/1.1\r\nHost: a\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n\r\n")
        c.expect("GET", "/", [("Host", "a")])
        resp, body = c.read_response()
        assert (resp.status_code, body) == (200, b"hello, world!")
        assert c.peer_closed()   # HTTP may have ended on that connection: it is closed after
    rec = up.requests("/noup/hello")[-1]
    assert rec.header("Upgrade") == ["websocket"] and rec.header("Connection") == ["upgrade"]


def test_tunnel_counts_for_global_timeout(make_pyroute, dns, echo):
    p = make_pyroute(TIMEOUT_TUNNEL="0.5")
    dns.set_service("ws-global", WS_IP)
    p.reconfigure(serviceName="ws-global", servicePath="/g", port=echo.port)

    async def go():
        async with connect(f"ws://127.0.0.1:{p.http_port}/g/x", ping_interval=None) as ws:
            await ws.send("x")
            assert await ws.recv() == "x"
            with pytest.raises(websockets.ConnectionClosedError):
                await ws.recv()

    run(go())
    s = socket.create_connection(("127.0.0.1", p.http_port))   # the proxy itself is fine
    s.close()
