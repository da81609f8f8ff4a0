"""Wiring: the data plane (public listeners) and the control plane (admin API, registry).

With WORKERS=1 both run in one process. With more, the control plane runs in the main
process and supervises that many worker processes, each a DataPlane on the same ports
(SO_REUSEPORT); see workers.py. Either way the control plane publishes each snapshot to
every data plane and answers a change only once all of them serve it.
"""

from __future__ import annotations

import asyncio
import errno
import logging
import signal
import socket

from .admin import AdminApi, AdminConnection
from .config import Settings
from .acceptor import PeekingListener, listen_socket
from .connections import ClientCertConnection, ProxiedClientCertConnection, ProxiedClientConnection
from .proxy import ProxyServer
from .resolver import Resolver
from .routing import RouteTable
from .services import Service
from .state import ServiceRegistry, Snapshot
from .tcp import Port, TcpListeners, Tunnel
from .tls import CertStore
from .upstream import Backend, UpstreamPool

log = logging.getLogger("pyroute")

LISTEN_BACKLOG = 1024
TLS_HANDSHAKE_TIMEOUT = 10.0
DRAIN_POLL = 0.05  # seconds between checks while draining in-flight requests


class StartupError(Exception):
    """A problem that stops pyroute from starting, phrased as what to do about it."""


def cert_store(settings: Settings, persist: bool = True) -> CertStore:
    return CertStore(settings.certs_dir, settings.secrets_dir, settings.preferred_certificate, settings.ca_file,
                     persist=persist)


async def listen(factory, host: str, port: int, what: str, reuse_port: bool = False) -> asyncio.AbstractServer:
    """create_server with errors people can act on."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(factory, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        raise listen_error(exc, host, port, what) from None


def listen_error(exc: OSError, host: str, port: int, what: str) -> StartupError:
    if exc.errno == errno.EADDRINUSE:
        return StartupError(f"{what} port {host}:{port} is already in use: stop what holds it or choose another port")
    if exc.errno == errno.EACCES:
        return StartupError(
            f"no permission to listen on {host}:{port} ({what}): use a port above 1023, "
            "or grant the capability (setcap cap_net_bind_service=+ep on the python binary, "
            "or run the container as root)"
        )
    return StartupError(f"cannot listen on {host}:{port} ({what}): {exc.strerror or exc}")


def addresses(servers: list[asyncio.AbstractServer]) -> str:
    out = []
    for server in servers:
        for sock in server.sockets:
            host, port = sock.getsockname()[:2]
            out.append(f"{host}:{port}")
    return ", ".join(out) or "(none)"


class DataPlane:
    """The public side of one process: listeners, proxy, resolver, pool, housekeeping tick."""

    def __init__(self, settings: Settings, certs: CertStore | None = None):
        self.settings = settings
        self.resolver = Resolver(settings.dns_nameservers, settings.dns_ttl_cap, settings.dns_timeout)
        self.proxy: ProxyServer | None = None
        self.tls_proxy: ProxyServer | None = None  # the same routes, X-Forwarded-Proto: https
        self.tcp: TcpListeners | None = None
        self.certs = certs if certs is not None else cert_store(settings, persist=False)
        self.certs.subscribe(self._certs_changed)
        self.tls_waiting: list = []  # :ssl ports not bound until a certificate exists
        self.servers: list = []
        self.revision = 0
        self._tick_handle: asyncio.TimerHandle | None = None

    def _backend(self, host: str, port: int, tls: bool = False) -> Backend:
        return Backend(host, port, self.resolver, tls)

    def prepare(self) -> None:
        """Create the proxy (without listening yet) so a snapshot can be applied first."""
        s = self.settings
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, s.upstream_max_idle, s.upstream_idle_timeout, s.timeout_connect)
        self.proxy = ProxyServer(s, loop, pool, RouteTable((), self._backend))
        self.tls_proxy = ProxyServer(s, loop, pool, self.proxy.table)
        self.tls_proxy.proto = b"https"
        if s.ca_file:
            self.tls_proxy.factory = lambda: ClientCertConnection(self.tls_proxy)
        public = {spec.port for spec in s.default_ports + s.bind_ports}
        tls_ports = {spec.port for spec in s.default_ports + s.bind_ports if spec.ssl}
        self.tcp = TcpListeners(s, loop, self._backend, listen, public, tls_ports)

    async def start(self) -> None:
        if self.proxy is None:
            self.prepare()
        s = self.settings
        for spec in s.default_ports + s.bind_ports:
            if spec.ssl and not len(self.certs):
                log.warning("TLS port %d is not opened: no certificate yet (put PEM files in %s, add a cert-* "
                            "secret, or PUT /v1/docker-flow-proxy/cert); the first certificate opens it",
                            spec.port, s.certs_dir)
                self.tls_waiting.append(spec)
                continue
            self.servers.append(await self._listen(spec))
        self._tick_handle = asyncio.get_running_loop().call_later(self._tick_interval(), self._tick)

    async def _listen(self, spec):
        s = self.settings
        proxy = self.tls_proxy if spec.ssl else self.proxy
        context = self.certs.dispatch if spec.ssl else None
        what = "HTTPS" if spec.ssl else "HTTP"
        accept_proxy = "accept-proxy" in spec.options
        if not accept_proxy and not spec.ssl:
            return await listen(proxy.factory, s.bind_address, spec.port, what, reuse_port=True)
        # TLS ports (which sni services may share) and accept-proxy ports look at the first bytes.
        loop = asyncio.get_running_loop()

        def serve(sock: socket.socket, client_ip: str | None, sni_target) -> None:
            if sni_target is not None:
                tunnel_port = Port("tcp", (sni_target,))
                task = loop.create_task(loop.connect_accepted_socket(lambda: Tunnel(self.tcp, tunnel_port), sock))
                task.add_done_callback(_log_handover_error)
                return
            if client_ip is None:
                factory = proxy.factory
            else:
                ip = client_ip.encode()
                kind = ProxiedClientCertConnection if spec.ssl and s.ca_file else ProxiedClientConnection
                factory = lambda: kind(proxy, ip)  # noqa: E731
            kwargs = {"ssl": context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT} if context else {}
            task = loop.create_task(loop.connect_accepted_socket(factory, sock, **kwargs))
            task.add_done_callback(_log_handover_error)

        try:
            sock = listen_socket(s.bind_address, spec.port, LISTEN_BACKLOG)
        except OSError as exc:
            raise listen_error(exc, s.bind_address, spec.port, what) from None
        return PeekingListener(sock, serve, accept_proxy=accept_proxy, trusted=s.proxy_protocol_trusted,
                               sni_port=lambda: self.tcp.tls_sni.get(spec.port), timeout=s.timeout_http_request)

    def _certs_changed(self, certs: CertStore) -> None:
        if self.tls_waiting and len(certs) and self._tick_handle is not None:
            waiting, self.tls_waiting = self.tls_waiting, []
            asyncio.get_running_loop().create_task(self._open_tls(waiting))

    async def _open_tls(self, specs) -> None:
        for spec in specs:
            try:
                self.servers.append(await self._listen(spec))
                log.info("TLS port %d opened: the first certificate is in", spec.port)
            except StartupError as exc:
                log.error("%s", exc)

    def apply(self, revision: int, services: tuple[Service, ...]) -> None:
        """Compile and swap in a new route table: requests in flight keep the one they matched on."""
        table = RouteTable(services, self._backend, revision)
        self.proxy.table = table
        if any(d.https_port or d.verify_client_ssl for service in services for d in service.destinations):
            self.tls_proxy.table = RouteTable(services, self._backend, revision, tls_listener=True)
        else:
            self.tls_proxy.table = table
        self.tcp.apply(services)
        self.revision = revision
        self.resolver.forget({host for service in services for host in service.dial_hosts})

    async def drain(self, grace: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to `grace` s)."""
        for server in self.servers:
            server.close()
        if self._tick_handle is not None:
            self._tick_handle.cancel()
        proxy = self.proxy
        if proxy is None:
            return
        self.tcp.close()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + grace
        proxies = (proxy, self.tls_proxy)
        while True:
            for conn in [c for p in proxies for c in p.connections]:
                if not conn.queue and not conn.in_head:
                    conn.transport.close()
            if not any(p.connections for p in proxies) or loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL)
        for conn in [c for p in proxies for c in p.connections]:
            conn.transport.abort()
        proxy.pool.close_all()

    def _tick_interval(self) -> float:
        s = self.settings
        shortest = min(s.timeout_client, s.timeout_server, s.timeout_http_request, s.timeout_http_keep_alive)
        return max(0.05, min(0.5, shortest / 4))

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = loop.time()
            self.proxy.check_timeouts(now)
            self.tls_proxy.check_timeouts(now)
            self.tcp.check_timeouts(now)
        finally:
            self._tick_handle = loop.call_later(self._tick_interval(), self._tick)


def _log_handover_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("handing over an accepted connection failed: %s", task.exception())


class LocalPlanes:
    """The data plane in this very process (WORKERS=1): applying is immediate."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    def publish(self, snapshot: Snapshot) -> None:
        self.plane.apply(*snapshot)

    def publish_certs(self, certs: CertStore) -> None:
        pass  # the data plane shares the control plane's store

    async def wait_certs(self) -> list[str]:
        return []

    async def wait_applied(self, revision: int) -> list[str]:
        return []


class ControlPlane:
    """Registry and admin API; hands every snapshot to the data planes."""

    def __init__(self, settings: Settings, planes, certs: CertStore):
        self.settings = settings
        self.planes = planes
        self.registry = ServiceRegistry(settings.separator)
        self.certs = certs
        self.servers: list[asyncio.AbstractServer] = []

    async def start(self) -> None:
        self.registry.subscribe(self.planes.publish)
        self.certs.subscribe(self.planes.publish_certs)
        api = AdminApi(self.registry, self.planes.wait_applied, certs=self.certs, wait_certs=self.planes.wait_certs)
        s = self.settings
        self.servers.append(await listen(lambda: AdminConnection(api), s.ip, s.port, "admin API"))

    def close(self) -> None:
        for server in self.servers:
            server.close()


class Pyroute:
    """Both planes in one process (WORKERS=1; also what the demo and tests embed)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.certs = cert_store(settings)
        self.certs.load()
        self.data = DataPlane(settings, self.certs)
        self.control = ControlPlane(settings, LocalPlanes(self.data), self.certs)

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


async def wait_for_signal() -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()


async def serve(settings: Settings) -> None:
    """Run until SIGTERM or SIGINT, then drain."""
    if settings.workers > 1:
        from .workers import serve_with_workers

        return await serve_with_workers(settings)
    app = Pyroute(settings)
    await app.start()
    await wait_for_signal()
    log.info("stopping: draining connections")
    await app.stop()
