"""Wiring: one pyroute process with its listeners, admin API, resolver and pool.

The control plane (ServiceRegistry + admin API) publishes snapshots; this module turns
each into a compiled RouteTable and swaps it into the data plane (ProxyServer) by one
reference assignment.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal

from .admin import AdminApi, AdminConnection
from .config import Settings
from .proxy import ProxyServer
from .resolver import Resolver
from .routing import RouteTable
from .state import ServiceRegistry
from .upstream import Backend, UpstreamPool

log = logging.getLogger("pyroute")

LISTEN_BACKLOG = 1024


class StartupError(Exception):
    """A problem that stops pyroute from starting, phrased as what to do about it."""


class Pyroute:
    def __init__(self, settings: Settings):
        self.settings = settings
        self.registry = ServiceRegistry(settings.separator)
        self.resolver = Resolver(settings.dns_nameservers, settings.dns_ttl_cap, settings.dns_timeout)
        self.servers: list[asyncio.AbstractServer] = []
        self.proxy: ProxyServer | None = None
        self._tick_handle: asyncio.TimerHandle | None = None

    # -- lifecycle -----------------------------------------------------------------------
    async def start(self) -> None:
        s = self.settings
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, s.upstream_max_idle, s.upstream_idle_timeout, s.timeout_connect)
        self.proxy = ProxyServer(s, loop, pool, RouteTable((), self._backend))
        self.registry.subscribe(self._apply)
        api = AdminApi(self.registry)
        self.servers.append(await self._listen(lambda: AdminConnection(api), s.ip, s.port, "admin API"))
        for spec in s.default_ports + s.bind_ports:
            if spec.ssl:
                log.warning("port %d is marked :ssl; TLS termination is not available yet, so it is not opened", spec.port)
                continue
            self.servers.append(await self._listen(self.proxy.factory, s.bind_address, spec.port, "HTTP", reuse_port=True))
        self._tick_handle = loop.call_later(self._tick_interval(), self._tick)
        log.info(
            "pyroute ready: http on %s, admin API on %s, DNS %s",
            ", ".join(self._addresses(self.servers[1:])) or "(none)",
            ", ".join(self._addresses(self.servers[:1])),
            ",".join(s.dns_nameservers),
        )

    async def _listen(self, factory, host: str, port: int, what: str, reuse_port: bool = False):
        loop = asyncio.get_running_loop()
        try:
            return await loop.create_server(factory, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
        except OSError as exc:
            if exc.errno == errno.EADDRINUSE:
                raise StartupError(f"{what} port {host}:{port} is already in use: stop what holds it or choose another port") from None
            if exc.errno == errno.EACCES:
                raise StartupError(
                    f"no permission to listen on {host}:{port} ({what}): use a port above 1023, "
                    "or grant the capability (setcap cap_net_bind_service=+ep on the python binary, "
                    "or run the container as root)"
                ) from None
            raise StartupError(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}") from None

    async def stop(self, grace: float = 5.0) -> None:
        """Stop accepting, let requests in flight finish (up to `grace` s), then close."""
        for server in self.servers:
            server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        proxy = self.proxy
        if proxy is not None:
            loop = asyncio.get_running_loop()
            deadline = loop.time() + grace
            for conn in list(proxy.connections):
                if not conn.queue and not conn.in_head:
                    conn.transport.close()
            while any(c.queue for c in proxy.connections) and loop.time() < deadline:
                await asyncio.sleep(0.05)
            for conn in list(proxy.connections):
                conn.transport.close()
            proxy.pool.close_all()

    # -- control plane -> data plane ---------------------------------------------------------
    def _backend(self, host: str, port: int) -> Backend:
        return Backend(host, port, self.resolver)

    def _apply(self, snapshot) -> None:
        revision, services = snapshot
        table = RouteTable(services, self._backend, revision)
        self.proxy.table = table  # the swap: requests in flight keep the table they matched on
        self.resolver.forget({route.backend.host for route in table.routes})

    # -- periodic housekeeping --------------------------------------------------------------
    def _tick_interval(self) -> float:
        s = self.settings
        shortest = min(s.timeout_client, s.timeout_server, s.timeout_http_request, s.timeout_http_keep_alive)
        return max(0.05, min(0.5, shortest / 4))

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            self.proxy.check_timeouts(loop.time())
        finally:
            self._tick_handle = loop.call_later(self._tick_interval(), self._tick)

    @staticmethod
    def _addresses(servers) -> list[str]:
        out = []
        for server in servers:
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                out.append(f"{host}:{port}")
        return out


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    app = Pyroute(settings)
    await app.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    log.info("stopping: draining connections")
    await app.stop()
