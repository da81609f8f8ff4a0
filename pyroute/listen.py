"""Listening sockets shared by both planes, with start-up errors people can act on."""

from __future__ import annotations

import asyncio
import errno

LISTEN_BACKLOG = 1024


class StartupError(Exception):
    """A problem that stops pyroute from starting, phrased as what to do about it."""


def listen_error(exc: OSError, host: str, port: int, what: str) -> StartupError:
    """An error binding a port, phrased as what to do about it."""
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{what} port {host}:{port} is already in use: stop what holds it or choose another port")
    if exc.errno == errno.EACCES:
        return StartupError(
            f"no permission to listen on {host}:{port} ({what}): use a port above 1023, "
            "or grant the capability (setcap cap_net_bind_service=+ep on the python binary, "
            "or run the container as root)"
        )
    return StartupError(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}")


async def listen(factory, host: str, port: int, what: str, reuse_port: bool = False) -> asyncio.AbstractServer:
    """create_server with errors people can act on."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(factory, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        raise listen_error(exc, host, port, what) from None


def addresses(servers: list[asyncio.AbstractServer]) -> str:
    out = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"{host}:{port}")
    return ", ".join(out) or "(none)"
