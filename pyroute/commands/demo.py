"""`pyroute demo`: the Docker Flow Proxy walkthrough on one machine, no Swarm needed.

Starts pyroute on unprivileged ports and a small go-demo-like service on 127.0.0.1,
registers the service through pyroute's own admin API exactly as a DFP user would
(``outboundHostname`` stands in for Swarm's DNS name), and prints the curl commands
that now work.
"""

from __future__ import annotations

import asyncio
import signal

from pyroute.config import ListenSpec, load_settings
from pyroute.process import Pyroute

HELLO = b"hello, world!\n"


class DemoService(asyncio.Protocol):
    """go-demo's /demo/hello, and a JSON echo of the request line for anything else."""

    def connection_made(self, transport) -> None:
        self.transport = transport
        self.buffer = b""

    def data_received(self, data: bytes) -> None:
        self.buffer += data
        while b"\r\n\r\n" in self.buffer:
            head, self.buffer = self.buffer.split(b"\r\n\r\n", 1)
            request_line = head.split(b"\r\n", 1)[0]
            path = request_line.split(b" ")[1] if request_line.count(b" ") >= 2 else b"/"
            if path.split(b"?")[0] == b"/demo/hello":
                body, ctype = HELLO, b"text/plain"
            else:
                body, ctype = b'{"service": "go-demo", "request": "%s"}\n' % request_line, b"application/json"
            self.transport.write(
                b"HTTP/1.1 200 OK\r\nContent-Type: %s\r\nContent-Length: %d\r\n\r\n%s" % (ctype, len(body), body)
            )


async def _admin_get(port: int, target: str) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {target} HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n".encode())
    response = await reader.read()
    writer.close()
    return response


async def run_demo(http_port: int, admin_port: int) -> None:
    loop = asyncio.get_running_loop()
    demo = await loop.create_server(DemoService, "127.0.0.1", 0)
    demo_port = demo.sockets[0].getsockname()[1]

    settings = load_settings(["--default-ports", str(http_port), "--port", str(admin_port), "--workers", "1"])
    assert settings.default_ports == (ListenSpec(http_port),)
    app = Pyroute(settings)
    await app.start()

    target = (f"/v1/docker-flow-proxy/reconfigure?serviceName=go-demo&servicePath=/demo"
              f"&port={demo_port}&outboundHostname=127.0.0.1")
    answer = await _admin_get(admin_port, target)
    status = answer.split(b"\r\n", 1)[0].decode()
    print(f"""
pyroute demo is running.
  demo service (go-demo stand-in): 127.0.0.1:{demo_port}
  registered through the admin API: {status}
    curl "localhost:{admin_port}{target}"

Try:
  curl -i localhost:{http_port}/demo/hello            # -> 200 hello, world! (through pyroute)
  curl -i localhost:{http_port}/nowhere               # -> 503, no route
  curl "localhost:{admin_port}/v1/docker-flow-proxy/config"
  curl "localhost:{admin_port}/v1/docker-flow-proxy/remove?serviceName=go-demo"

Ctrl-C stops it.""", flush=True)

    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await app.stop()
    demo.close()
