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
import gc
import logging
import os
import signal
import socket
from collections.abc import Callable

from pyroute import metrics
from pyroute.controlplane import statspage
from pyroute.dataplane.accesslog import AccessLog
from pyroute.controlplane.admin import AdminApi, AdminConnection
from pyroute.dataplane import pages
from pyroute.dataplane.acceptor import PeekingListener, listen_socket
from pyroute.controlplane.adminauth import admin_credentials
from pyroute.dataplane.balancer import Sticky, TaskSet
from pyroute.config import Settings, SettingsError, raw_haproxy_warnings
from pyroute.dataplane.clientcert import ClientCertConnection
from pyroute.controlplane.envservices import env_services
from pyroute.dataplane.health import HealthPolicy
from pyroute.dataplane.client import ClientLimit, ProxyServer
from pyroute.controlplane.replication import Replication
from pyroute.resolver import Resolver, is_ip, report_unreachable_dns
from pyroute.dataplane.routing import RouteTable
from pyroute.services import Service, ServiceDefaults, ServiceError, parse_service
from pyroute.controlplane.registry import ServiceRegistry, Snapshot
from pyroute.summary import ready_summary
from pyroute.controlplane.swarm import EngineClient, EngineError, SwarmListener, listener_enabled, socket_problem
from pyroute.dataplane.l4 import Port, TcpListeners, Tunnel
from pyroute.tls import CertStore, file_name
from pyroute.dataplane.upstream import Backend, UpstreamPool

log = logging.getLogger("pyroute")

LISTEN_BACKLOG = 1024
STATS_SERVICE = "pyroute-stats"  # the service name of the stats page's own route
TLS_HANDSHAKE_TIMEOUT = 10.0
DRAIN_POLL = 0.05  # seconds between checks while draining in-flight requests
MAXCONN_LOG_EVERY = 60.0  # seconds between "MAXCONN reached" log lines
# Settings a SIGHUP cannot change in a running process (sockets, processes, resolver).
RESTART_ONLY = ("port", "ip", "bind_address", "default_ports", "bind_ports", "workers", "dns_nameservers",
                "dns_timeout", "separator", "service_name", "header_env_allow")


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


def cert_store(settings: Settings, persist: bool = True) -> CertStore:
    return CertStore(settings.certs_dir, settings.secrets_dir, settings.preferred_certificate, settings.ca_file,
                     persist=persist)


async def listen(factory, host: str, port: int, what: str, reuse_port: bool = False) -> asyncio.AbstractServer:
    """create_server with errors people can act on."""
    loop = asyncio.get_running_loop()
    try:
        return await loop.create_server(factory, host, port, backlog=LISTEN_BACKLOG, reuse_port=reuse_port)
    except OSError as exc:
        raise _startup_error(exc, host, port, what) from None


listen_error = _startup_error  # (the TLS/PROXY listeners bind their sockets themselves)


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
        self.servers: list = []  # Listener (plain HTTP, pausable at MAXCONN) or PeekingListener (TLS, PROXY)
        self.revision = 0
        self.services: tuple[Service, ...] = ()
        self.stats = metrics.DataStats()
        self.stats_service: tuple[Service, ...] = ()  # the stats page's route, once its address is known
        self.tasksets: dict[tuple, TaskSet] = {}  # DNS-discovered task sets of the current table
        self._next_tasksets: dict[tuple, TaskSet] = {}
        self._tls_services: set[str] = set()  # services with an httpsPort or verifyClientSsl: a TLS table of its own
        self._dialed: dict[str, int] = {}  # host -> services dialing it (the resolver's cache follows)
        self._tick_handle: asyncio.TimerHandle | None = None
        self.src_port_servers: dict[int, Listener] = {}  # srcPort listeners opened at runtime
        self._listeners_lock = asyncio.Lock()
        self._maxconn_logged = -MAXCONN_LOG_EVERY

    def _backend(self, host: str, port: int, service: Service, tls: bool = False):
        """The service name (Overlay: the VIP balances) or, for DNS discovery and sticky
        sessions, the TaskSet of tasks.<host> (kept across tables while its options stay).
        `tls` (sslVerifyNone): TLS to the upstream, always through the service name."""
        tasksets = self._next_tasksets
        balancing = service.balancing
        discovery = balancing.discovery or self.settings.discovery_type
        if tls or is_ip(host) or (discovery != "DNS" and balancing.sticky_cookie is None):
            return Backend(host, port, self.resolver, tls)
        s = self.settings
        policy = HealthPolicy(balancing.health_path, balancing.health_interval or s.health_check_interval,
                              balancing.health_timeout or s.health_check_timeout,
                              balancing.health_rise or s.health_rise, balancing.health_fall or s.health_fall)
        key = (host, port, balancing.algorithm or s.balance, policy)
        taskset = tasksets.get(key) or self.tasksets.get(key)
        if taskset is None:
            known = next((set(t.tasks) for k, t in self.tasksets.items() if k[:2] == (host, port)), None)
            taskset = TaskSet(host, port, key[2], list(s.dns_nameservers), s.dns_timeout, s.task_refresh_interval,
                              self.proxy.pool, policy, known)
        tasksets[key] = taskset
        return taskset

    def prepare(self) -> None:
        """Create the proxy (without listening yet) so a snapshot can be applied first."""
        s = self.settings
        loop = asyncio.get_running_loop()
        pool = UpstreamPool(loop, s.upstream_max_idle, s.upstream_idle_timeout, s.timeout_connect)
        access_log = _access_log(s, loop)
        limit = ClientLimit(s.maxconn, s.maxconn_per_ip)  # HTTP and HTTPS clients count together, as HAProxy's maxconn
        limit.on_full, limit.on_room = self._stop_accepting, self._resume_accepting
        self.proxy = ProxyServer(s, loop, pool, RouteTable((), self._backend), self.stats.unrouted, access_log, limit)
        self.tls_proxy = ProxyServer(s, loop, pool, self.proxy.table, self.stats.unrouted, access_log, limit)
        self.tls_proxy.proto = b"https"
        if s.ca_file:
            self.tls_proxy.factory = lambda: ClientCertConnection(self.tls_proxy)
        public = {spec.port for spec in s.default_ports + s.bind_ports}
        tls_ports = {spec.port for spec in s.default_ports + s.bind_ports if spec.ssl}
        self.tcp = TcpListeners(s, loop, self._backend, listen, public, tls_ports)
        pages.use_directory(s.error_pages_dir)

    def reconfigure(self, settings: Settings) -> None:
        """Apply re-read settings (SIGHUP) at once; RESTART_ONLY ones keep their values."""
        self.settings = settings
        self.proxy.configure(settings)
        self.tls_proxy.configure(settings)
        pool = self.proxy.pool
        pool.max_idle, pool.idle_timeout = settings.upstream_max_idle, settings.upstream_idle_timeout
        self.resolver.ttl_cap = settings.dns_ttl_cap
        if self.proxy.access_log is not None:
            self.proxy.access_log.flush()  # (lines logged so far go out under the old settings)
        self.proxy.access_log = self.tls_proxy.access_log = _access_log(settings, asyncio.get_running_loop())
        pages.use_directory(settings.error_pages_dir)
        self.proxy.limit.set_maxconn(settings.maxconn)
        self.proxy.limit.addresses.cap = settings.maxconn_per_ip

    def _stop_accepting(self) -> None:
        now = asyncio.get_running_loop().time()
        if now >= self._maxconn_logged + MAXCONN_LOG_EVERY:  # at the limit this can happen many times a second
            self._maxconn_logged = now
            log.warning("MAXCONN %d reached: not accepting new connections until one closes", self.settings.maxconn)
        for listener in [*self.servers, *self.src_port_servers.values()]:
            listener.pause()

    def _resume_accepting(self) -> None:
        for listener in [*self.servers, *self.src_port_servers.values()]:
            listener.resume()

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
        await self.sync_src_ports()

    async def sync_src_ports(self) -> None:
        """Open an HTTP listener for every srcPort the routes use that no listener covers yet,
        and close the ones no route uses any more (BIND_PORTS are opened at start and kept)."""
        async with self._listeners_lock:
            s = self.settings
            static = {spec.port for spec in s.default_ports + s.bind_ports}
            wanted = {r.destination.src_port for r in self.proxy.table.routes if r.destination.src_port} - static
            for port in sorted(set(self.src_port_servers) - wanted):
                self.src_port_servers.pop(port).close()
                log.info("closed the srcPort listener on port %d", port)
            for port in sorted(wanted - set(self.src_port_servers)):
                try:
                    listener = self.src_port_servers[port] = Listener(self.proxy.factory, s.bind_address, port)
                except StartupError as exc:
                    log.error("srcPort: %s", exc)
                    continue
                if not self.proxy.limit.full:
                    await listener.serve()
                log.info("opened an HTTP listener on port %d for srcPort", port)

    async def _listen(self, spec):
        s = self.settings
        proxy = self.tls_proxy if spec.ssl else self.proxy
        context = self.certs.dispatch if spec.ssl else None
        what = "HTTPS" if spec.ssl else "HTTP"
        accept_proxy = "accept-proxy" in spec.options
        if not accept_proxy and not spec.ssl:
            listener = Listener(proxy.factory, s.bind_address, spec.port)  # pausable at MAXCONN
            await listener.serve()
            return listener
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
                def factory(ip=client_ip.encode()):  # the PROXY header's address, kept by connection_made
                    conn = proxy.factory()
                    conn.client_ip = ip
                    return conn
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
                listener = await self._listen(spec)
                if self.proxy.limit.full:
                    listener.pause()
                self.servers.append(listener)
                log.info("TLS port %d opened: the first certificate is in", spec.port)
            except StartupError as exc:
                log.error("%s", exc)

    def apply(self, revision: int, services: tuple[Service, ...]) -> None:
        """Compile and swap in a new route table: requests in flight keep the one they matched on.
        The table is derived from the current one, and everything here follows its delta
        (`gone`/`came` services), so a change costs the loop in proportion to its size."""
        self._next_tasksets = dict(self.tasksets)  # reused routes keep theirs; _backend adds new ones
        table = RouteTable(services, self._backend, revision, self.settings.longest_match,
                           self.stats.service, self.stats_service, previous=self.proxy.table)
        changed = (*table.gone, *table.came)
        for service in table.gone:
            self._tls_services.discard(service.name)
        self._tls_services.update(s.name for s in table.came
                                  if any(d.https_port or d.verify_client_ssl for d in s.destinations))
        tls_table = table
        if self._tls_services:
            separate = self.tls_proxy.table if self.tls_proxy.table is not self.proxy.table else None
            tls_table = RouteTable(services, self._backend, revision, self.settings.longest_match,
                                   self.stats.service, self.stats_service, tls_listener=True, previous=separate)
        for route in (*table.compiled, *(tls_table.compiled if tls_table is not table else ())):
            cookie = route.service.balancing.sticky_cookie
            if cookie is not None and isinstance(route.backend, TaskSet):
                route.sticky = Sticky(route, route.backend, cookie)
        self.proxy.table = table
        self.tls_proxy.table = tls_table
        if any(d.req_mode != "http" for s in changed for d in s.destinations):
            self.tcp.apply(services)
        self._close_unused_tasksets(table, tls_table)
        self.revision = revision
        self.services = services
        self.stats.reloads += 1
        came = {s.name for s in table.came}
        self.stats.forget({s.name for s in table.gone if s.name not in came})
        self._count_dial_hosts(table.gone, -1)
        self._count_dial_hosts(table.came, 1)
        if self._tick_handle is not None and any(d.src_port for s in changed for d in s.destinations):
            asyncio.get_running_loop().create_task(self.sync_src_ports())  # srcPort listeners follow the table

    def _close_unused_tasksets(self, *tables: RouteTable) -> None:
        """Close the task sets only routes of the previous tables used."""
        candidates = {id(r.backend) for t in tables for r in t.removed if isinstance(r.backend, TaskSet)}
        if candidates:
            used = {id(r.backend) for t in tables for r in t.routes}
            for key, taskset in list(self._next_tasksets.items()):
                if id(taskset) in candidates and id(taskset) not in used:
                    taskset.close()
                    del self._next_tasksets[key]
        self.tasksets = self._next_tasksets

    def _count_dial_hosts(self, services: list[Service], step: int) -> None:
        """Keep the number of services dialing each host; the resolver forgets a host at 0."""
        dialed = self._dialed
        for service in services:
            for host in set(service.dial_hosts):
                count = dialed.get(host, 0) + step
                if count > 0:
                    dialed[host] = count
                else:
                    dialed.pop(host, None)
                    self.resolver.forget_host(host)

    def serve_stats_from(self, host: str, port: int) -> None:
        """Route STATS_URI on the public ports to the stats page at host:port (the admin listener)."""
        s = self.settings
        if not statspage.enabled(s):
            return
        self.stats_service = (parse_service(
            {"serviceName": STATS_SERVICE, "servicePath": statspage.path(s), "port": str(port), "outboundHostname": host}),)
        self.apply(self.revision, self.services)

    def stats_snapshot(self, name: str) -> dict:
        return metrics.snapshot(self, name)

    async def drain(self, grace: float) -> None:
        """Stop accepting, close idle connections, let requests in flight finish (up to `grace` s)."""
        for server in [*self.servers, *self.src_port_servers.values()]:
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
            if not any(p.connections or p.tunnels for p in proxies) or loop.time() >= deadline:
                break
            await asyncio.sleep(DRAIN_POLL)
        for conn in [c for p in proxies for c in p.connections]:
            conn.transport.abort()
        for tunnel in [t for p in proxies for t in p.tunnels]:
            tunnel.close(abort=True)
        for taskset in self.tasksets.values():
            taskset.close()
        proxy.pool.close_all()
        if proxy.access_log is not None:
            proxy.access_log.flush()

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
            self.proxy.check_upstream_timeouts(now)  # (its pool is the TLS server's too)
            self.tcp.check_timeouts(now)
        finally:
            self._tick_handle = loop.call_later(self._tick_interval(), self._tick)


def _access_log(settings: Settings, loop) -> AccessLog | None:
    """DEBUG=true: one JSON line per request (DEBUG_ERRORS_ONLY, ACCESS_LOG_SAMPLE narrow it)."""
    return AccessLog(loop, settings.debug_errors_only, settings.access_log_sample) if settings.debug else None


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

    def unready(self) -> list[str]:
        return []  # this process serves, or it would not answer

    async def collect(self) -> dict:
        return metrics.merge([self.plane.stats_snapshot("pyroute")])


class ControlPlane:
    """Registry and admin API; hands every snapshot to the data planes."""

    def __init__(self, settings: Settings, planes, certs: CertStore):
        self.settings = settings
        self.planes = planes
        instance = settings.proxy_instance_name if settings.filter_proxy_instance_name else None
        self.registry = ServiceRegistry(settings.separator, ServiceDefaults.from_settings(settings), instance)
        self.replication = Replication(settings, self.registry)
        self.certs = certs
        self.servers: list[asyncio.AbstractServer] = []
        self.listener: SwarmListener | None = None
        self.restored = (0, 0)  # (services, revision) in STATE_DIR at start, for the start-up summary
        self._dns_check: asyncio.Future | None = None

    async def start(self) -> None:
        for warning in raw_haproxy_warnings():
            log.warning("%s", warning)
        try:
            self.replication.load()  # the saved state goes into the first table the data planes get
        except OSError as exc:
            raise StartupError(
                f"STATE_DIR {self.settings.state_dir!r} is not usable: {exc.strerror or exc}: mount a volume there "
                f"writable by uid {os.getuid()} (the image's user is pyroute), point STATE_DIR at a writable "
                "directory, or leave STATE_DIR empty to keep the routes in memory only") from None
        self.restored = (len(self.registry.services()), self.registry.revision)
        for params in env_services(os.environ):
            try:
                self.registry.reconfigure(params)
            except ServiceError as exc:
                raise StartupError(f"DFP_SERVICE_* service {params.get('servicename', '?')!r}: {exc.message}") from None
        self.registry.subscribe(self.planes.publish)
        self.registry.subscribe(self._certs_from_state)
        self.certs.subscribe(self.planes.publish_certs)
        s = self.settings
        if listener_enabled(s.docker_host, s.sources.get("docker_host", "default") != "default"):
            try:
                client = EngineClient(s.docker_host)
            except EngineError as exc:
                raise StartupError(str(exc)) from None
            problem = socket_problem(s.docker_host)
            if problem is not None:
                raise StartupError(problem)
            self.listener = SwarmListener(self.registry, client, s.swarm_poll_interval)
        self.api = api = AdminApi(self.registry, self.planes.wait_applied, self.not_ready, self.replication,
                                  collect=self.planes.collect, settings=self.settings,
                                  credentials=admin_credentials(s), certs=self.certs,
                                  wait_certs=self.planes.wait_certs)
        if api.credentials is None:
            log.warning("the admin API on %s:%d is unauthenticated: anyone who reaches it can change routes "
                        "(set ADMIN_USER and ADMIN_PASS, or the secrets dfp_admin_user / dfp_admin_pass)", s.ip, s.port)
        self.servers.append(await listen(lambda: AdminConnection(api, s.timeout_admin), s.ip, s.port, "admin API"))
        self.replication.start()  # join (pull from peers), then repair; the DFSL listener fetch
        self._dns_check = asyncio.ensure_future(report_unreachable_dns(self.replication.resolver, s.service_name))
        if self.listener is not None:
            self.listener.start()
            log.info("Swarm listener on %s: services labelled com.df.notify=true become routes", s.docker_host)

    def reconfigure(self, settings: Settings) -> None:
        """Re-read settings (SIGHUP): the admin credentials may have changed."""
        self.settings = settings
        self.api.credentials = admin_credentials(settings)
        self.api.settings = settings

    def _certs_from_state(self, snapshot) -> None:
        """Certificates that came with replicated state (a peer's PUT /cert, a join, a repair)
        go into the certificate store; the store itself keeps them in CERTS_DIR."""
        have = {name: pem.strip() for name, pem in self.certs.pems().items()}
        for name, pem in self.registry.certs().items():
            if have.get(file_name(name)) != pem.strip():
                try:
                    self.certs.install(name, pem.encode())
                except (ValueError, OSError) as exc:
                    log.error("certificate %s from the replicated state not installed: %s", name, exc)

    def not_ready(self) -> str:
        """Why successfulinitreload (DFP's readiness) refuses, empty once ready: saved state
        usable, peers and the Swarm Listener loaded, the built-in Swarm listener's first
        listing applied, and every data plane serving."""
        reasons = self.replication.waiting_for()
        if self.listener is not None and not self.listener.synced.is_set():
            reasons.append("the Docker Engine's service list is not applied yet")
        return "; ".join(reasons + self.planes.unready())

    def admin_address(self) -> tuple[str, int]:
        """Where the data plane reaches the admin listener (for the stats page route)."""
        host, port = self.servers[0].sockets[0].getsockname()[:2]
        return {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(host, host), port

    def close(self) -> None:
        if self.listener is not None:
            self.listener.stop()
        if self._dns_check is not None:
            self._dns_check.cancel()
        self.replication.close()
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
        self.data.serve_stats_from(*self.control.admin_address())
        await self.data.start()
        settle_memory()
        waiting = [f"{spec.port} (TLS, opens with the first certificate)" for spec in self.data.tls_waiting]
        log.info("%s", ready_summary(self.settings, ", ".join([addresses(self.data.servers), *waiting]),
                                     addresses(self.control.servers), self.control))

    async def stop(self, grace: float = 5.0) -> None:
        self.control.close()
        await self.data.drain(grace)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.control.reconfigure(settings)
        self.data.reconfigure(settings)


def settle_memory() -> None:
    """Once started: move every object made so far out of the garbage collector's view.

    A proxy's per-request objects die by reference counting; what the cyclic collector
    would otherwise rescan on every full collection is the ~100k long-lived objects of
    the interpreter, uvloop and pyroute itself, a pause of milliseconds that lands on
    whichever requests are in flight. Freezing them keeps collections short.
    """
    gc.collect()
    gc.freeze()



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
        from pyroute.workers import serve_with_workers

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
