"""Wiring: the data plane (public listeners) and the control plane (admin API, registry).

With WORKERS=1 both run in one process. With more, the control plane runs in the main
process and supervises that many worker processes, each a DataPlane on the same ports
(SO_REUSEPORT); see workers.py. Either way the control plane publishes each snapshot to
every data plane and answers a change only once all of them serve it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import errno
import logging
import signal
import socket
from collections.abc import Callable

from .admin import AdminApi, AdminConnection
from . import errors
from .adminauth import admin_credentials
from .config import Settings, SettingsError
from .proxy import ProxyServer
from .resolver import Resolver
from .routing import RouteTable
from .services import Service
from .state import ServiceRegistry, Snapshot
from .upstream import Backend, UpstreamPool

log = logging.getLogger("pyroute")

LISTEN_BACKLOG = 1024
DRAIN_POLL = 0.05  # seconds between checks while draining in-flight requests
MAXCONN_LOG_EVERY = 60.0  # seconds between "MAXCONN reached" log lines
# Settings a SIGHUP cannot change in a running process (sockets, processes, resolver).
RESTART_ONLY = ("port", "ip", "bind_address", "default_ports", "bind_ports", "workers", "dns_nameservers",
                "dns_timeout", "separator", "service_name")


class StartupError(Exception):
    """A problem that stops pyroute from starting, phrased as what to do about it."""


def _startup_error(exc: OSError, host: str, port: int, what: str) -> StartupError:
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


class Listener:
    """A public listening socket whose accepting stops and resumes (MAXCONN).

    pyroute holds the socket itself and serves a dup of it: closing the asyncio server
    closes only the dup, so the socket keeps listening and new connections wait in the
    kernel's backlog until accepting resumes. Nothing already accepted is touched.
    """

    def __init__(self, factory, host: str, port: int):
        try:
            self.sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=True)
        except OSError as exc:
            raise _startup_error(exc, host, port, "HTTP") from None
        self.sock.setblocking(False)
        self.factory = factory
        self.server: asyncio.AbstractServer | None = None
        self.starting: asyncio.Task | None = None
        self.paused = False
        self.closed = False

    @property
    def sockets(self) -> list[socket.socket]:
        return [self.sock]

    async def serve(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            server = await loop.create_server(self.factory, sock=self.sock.dup(), backlog=LISTEN_BACKLOG)
        finally:
            self.starting = None
        if self.paused or self.closed:
            server.close()
        else:
            self.server = server

    def pause(self) -> None:
        self.paused = True
        if self.server is not None:
            self.server.close()
            self.server = None

    def resume(self) -> None:
        self.paused = False
        if self.server is None and self.starting is None and not self.closed:
            self.starting = asyncio.get_running_loop().create_task(self.serve())

    def close(self) -> None:
        self.closed = True
        self.pause()
        self.sock.close()


async def listen(factory, host: str, port: int, what: str, reuse_port: bool = False) -> asyncio.AbstractServer:
    """create_server with errors people can act on."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(factory, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        raise _startup_error(exc, host, port, what) from None


def addresses(servers: list[asyncio.AbstractServer]) -> str:
    out = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"{host}:{port}")
    return ", ".join(out) or "(none)"


class DataPlane:
    """The public side of one process: listeners, proxy, resolver, pool, housekeeping tick."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.resolver = Resolver(settings.dns_nameservers, settings.dns_ttl_cap, settings.dns_timeout)
        self.proxy: ProxyServer | None = None
        self.servers: list[Listener] = []
        self.revision = 0
        self._tick_handle: asyncio.TimerHandle | None = None
        self._maxconn_logged = -MAXCONN_LOG_EVERY

    def _backend(self, host: str, port: int) -> Backend:
        return Backend(host, port, self.resolver)

    def prepare(self) -> None:
        """Create the proxy (without listening yet) so a snapshot can be applied first."""
        s = self.settings
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, s.upstream_max_idle, s.upstream_idle_timeout, s.timeout_connect)
        self.proxy = ProxyServer(s, loop, pool, RouteTable((), self._backend))
        self.proxy.on_full = self._stop_accepting
        self.proxy.on_room = self._resume_accepting
        errors.use_directory(s.error_pages_dir)

    def reconfigure(self, settings: Settings) -> None:
        """Apply re-read settings (SIGHUP) at once; RESTART_ONLY ones keep their values."""
        self.settings = settings
        self.proxy.configure(settings)
        pool = self.proxy.pool
        pool.max_idle, pool.idle_timeout = settings.upstream_max_idle, settings.upstream_idle_timeout
        self.resolver.ttl_cap = settings.dns_ttl_cap
        errors.use_directory(settings.error_pages_dir)
        full = self.proxy.clients >= settings.maxconn  # MAXCONN may have moved either way
        if full != self.proxy.full:
            self.proxy.full = full
            self._stop_accepting() if full else self._resume_accepting()

    def _stop_accepting(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._maxconn_logged + MAXCONN_LOG_EVERY:  # at the limit this can happen many times a second
            self._maxconn_logged = now
            log.warning("MAXCONN %d reached: not accepting new connections until one closes", self.settings.maxconn)
        for listener in self.servers:
            listener.pause()

    def _resume_accepting(self) -> None:
        for listener in self.servers:
            listener.resume()

    async def start(self) -> None:
        if self.proxy is None:
            self.prepare()
        s = self.settings
        for spec in s.default_ports + s.bind_ports:
            if spec.ssl:
                log.warning("port %d is marked :ssl; TLS termination is not available yet, so it is not opened", spec.port)
                continue
            listener = Listener(self.proxy.factory, s.bind_address, spec.port)
            self.servers.append(listener)
            await listener.serve()
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_interval(), self._tick)

    def apply(self, revision: int, services: tuple[Service, ...]) -> None:
        """Compile and swap in a new route table: requests in flight keep the one they matched on."""
        table = RouteTable(services, self._backend, revision)
        self.proxy.table = table
        self.revision = revision
        self.resolver.forget({route.backend.host for route in table.routes})

    async def drain(self, grace: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to `grace` s)."""
        for server in self.servers:
            server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        proxy = self.proxy
        if proxy is None:
            return
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        while True:
            for conn in list(proxy.connections):
                if not conn.queue and not conn.in_head:
                    conn.transport.close()
            if not (proxy.connections or proxy.tunnels) or loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL)
        for conn in list(proxy.connections):
            conn.transport.abort()
        for tunnel in list(proxy.tunnels):
            tunnel.close(abort=True)
        proxy.pool.close_all()

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


class LocalPlanes:
    """The data plane in this very process (WORKERS=1): applying is immediate."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    def publish(self, snapshot: Snapshot) -> None:
        self.plane.apply(*snapshot)

    async def wait_applied(self, revision: int) -> list[str]:
        return []


class ControlPlane:
    """Registry and admin API; hands every snapshot to the data planes."""

    def __init__(self, settings: Settings, planes):
        self.settings = settings
        self.planes = planes
        self.registry = ServiceRegistry(settings.separator)
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        self.registry.subscribe(self.planes.publish)
        s = self.settings
        self.api = api = AdminApi(self.registry, self.planes.wait_applied, credentials=admin_credentials(s))
        if api.credentials is None:
            log.warning("the admin API on %s:%d is unauthenticated: anyone who reaches it can change routes "
                        "(set ADMIN_USER and ADMIN_PASS, or the secrets dfp_admin_user / dfp_admin_pass)", s.ip, s.port)
        self.servers.append(await listen(lambda: AdminConnection(api, s.timeout_admin), s.ip, s.port, "admin API"))

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.api.credentials = admin_credentials(settings)

    def close(self) -> None:
        for server in self.servers:
            server.close()


class Pyroute:
    """Both planes in one process (WORKERS=1; also what the demo and tests embed)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.data = DataPlane(settings)
        self.control = ControlPlane(settings, LocalPlanes(self.data))

    @property
    def registry(self) -> ServiceRegistry:
        return self.control.registry

    async def start(self) -> None:
        self.data.prepare()
        await self.control.start()
        await self.data.start()
        log.info(
            "pyroute ready: http on %s, admin API on %s, DNS %s",
            addresses(self.data.servers), addresses(self.control.servers), ",".join(self.settings.dns_nameservers),
        )

    async def stop(self, grace: float = 5.0) -> None:
        self.control.close()
        await self.data.drain(grace)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.control.reconfigure(settings)
        self.data.reconfigure(settings)


def reread(current: Settings, load: Callable[[], Settings]) -> Settings | None:
    """The settings a SIGHUP asks for, or None (logged) when the file is bad.

    RESTART_ONLY settings keep their running values, with a warning if they changed.
    """
    try:
        new = load()
    except SettingsError as exc:
        log.error("SIGHUP: settings not reloaded, keeping the current ones: %s", exc)
        return None
    kept = {name: getattr(current, name) for name in RESTART_ONLY if getattr(new, name) != getattr(current, name)}
    if kept:
        log.warning("SIGHUP: %s only change on restart; keeping the running values", ", ".join(sorted(kept)))
    log.info("SIGHUP: settings reloaded from %s", new.config_file or "the environment")
    logging.getLogger().setLevel(new.log_level.upper())
    return dataclasses.replace(new, **kept)


async def wait_for_signal(on_hup: Callable[[], None] | None = None) -> None:
    """Return on SIGTERM or SIGINT; call `on_hup` on each SIGHUP."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()


async def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain. `load` re-reads the settings on SIGHUP."""
    if settings.workers > 1:
        from .workers import serve_with_workers

        return await serve_with_workers(settings, load)
    app = Pyroute(settings)
    await app.start()

    def on_hup() -> None:
        new = reread(app.settings, load) if load is not None else None
        if new is not None:
            app.reconfigure(new)

    await wait_for_signal(on_hup)
    log.info("stopping: draining connections (up to %g s)", app.settings.drain_grace)
    await app.stop(app.settings.drain_grace)
