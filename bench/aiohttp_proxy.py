"""A naive aiohttp reverse proxy: what a Python developer writes in an afternoon.

It is the baseline pyroute must clearly beat to justify its hand-written protocol
code. Deliberately untuned: one ClientSession with aiohttp's default keep-alive pool,
request body and response body streamed (never buffered whole), hop-by-hop headers
dropped. Runs on uvloop when installed, so the comparison is about the proxy code,
not the event loop; AIOHTTP_PROXY_LOOP=asyncio runs it on asyncio's own loop instead
(the bench target `aiohttp-asyncio`, what an untuned deployment runs).

    python bench/aiohttp_proxy.py LISTEN_PORT UPSTREAM_PORT
"""

import os
import sys

import aiohttp
from aiohttp import web

try:
    import uvloop
except ImportError:
    uvloop = None

HOP_BY_HOP = frozenset({
    "connection", "keep-alive", "proxy-authenticate", "proxy-authorization",
    "te", "trailer", "transfer-encoding", "upgrade", "host",
})
STREAM_CHUNK = 64 * 1024


def end_to_end(headers) -> dict:
    return {k: v for k, v in headers.items() if k.lower() not in HOP_BY_HOP}


async def forward(request: web.Request) -> web.StreamResponse:
    session: aiohttp.ClientSession = request.app["session"]
    url = request.app["upstream"] + str(request.rel_url)
    headers = end_to_end(request.headers)
    headers["X-Forwarded-For"] = request.remote or ""
    body = request.content if request.body_exists else None
    async with session.request(request.method, url, headers=headers, data=body,
                               allow_redirects=False) as upstream:
        response = web.StreamResponse(status=upstream.status, headers=end_to_end(upstream.headers))
        await response.prepare(request)
        async for chunk in upstream.content.iter_chunked(STREAM_CHUNK):
            await response.write(chunk)
        await response.write_eof()
        return response


async def make_app(upstream_port: int) -> web.Application:
    app = web.Application(client_max_size=0)
    app["upstream"] = f"http://127.0.0.1:{upstream_port}"

    async def session_ctx(app):
        app["session"] = aiohttp.ClientSession(auto_decompress=False)
        yield
        await app["session"].close()

    app.cleanup_ctx.append(session_ctx)
    app.router.add_route("*", "/{tail:.*}", forward)
    return app


def main():
    listen_port, upstream_port = int(sys.argv[1]), int(sys.argv[2])
    if uvloop is not None and os.environ.get("AIOHTTP_PROXY_LOOP", "uvloop") == "uvloop":
        uvloop.install()
    web.run_app(make_app(upstream_port), host="127.0.0.1", port=listen_port,
                access_log=None, print=None)


if __name__ == "__main__":
    main()
