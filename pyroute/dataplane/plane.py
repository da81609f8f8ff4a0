"""The data plane of one process: public listeners (HTTP, TLS, PROXY, srcPort, tcp/sni),
the proxy servers, resolver and pool, the route tables it is handed, and the
housekeeping tick. It never imports the control plane: snapshots arrive through `apply`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import socket

from pyroute import metrics
from pyroute.config import Settings
from pyroute.dataplane import pages
from pyroute.dataplane.acceptor import PeekingListener, listen_socket
from pyroute.dataplane.accesslog import AccessLog
from pyroute.dataplane.balancer import Sticky, TaskSet
from pyroute.dataplane.client import ClientConnection, ClientLimit, ProxyServer
from pyroute.dataplane.clientcert import ClientCertConnection
from pyroute.dataplane.clock import clock
from pyroute.dataplane.h2select import AlpnSelect, PrefaceSniff
from pyroute.dataplane.health import HealthPolicy
from pyroute.dataplane.l4 import Port, TcpListeners
from pyroute.dataplane.routing import RouteTable
from pyroute.dataplane.servicelimits import Gate, GatedBackend
from pyroute.dataplane.upstream import Backend, UpstreamPool
from pyroute.listen import LISTEN_BACKLOG, StartupError, listen_error
from pyroute.resolver import Resolver, is_ip
from pyroute.services import Service, parse_service
from pyroute.tls import CertStore, cert_store

log = logging.getLogger("pyroute")

STATS_SERVICE = "pyroute-stats"  # the service name of the stats page's own route
ACME_SERVICE = "pyroute-acme"  # the route of ACME's HTTP-01 challenges (answered by the admin listener)
ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"
TLS_HANDSHAKE_TIMEOUT = 10.0
DRAIN_POLL = 0.05  # seconds between checks while draining in-flight requests
MAXCONN_LOG_EVERY = 60.0  # seconds between "MAXCONN reached" log lines


class Listener:
    """A public listening socket whose accepting stops and resumes (MAXCONN).

    pyroute holds the socket itself and serves a dup of it: closing the asyncio server
    closes only the dup, so the socket keeps listening and new connections wait in the
    kernel's backlog until accepting resumes. Nothing already accepted is touched.
    """

    def __init__(self, factory, host: str, port: int, what: str = "HTTP"):
        try:
            self.sock = socket.create_server((host, port), backlog=LISTEN_BACKLOG, reuse_port=True)
        except OSError as exc:
            raise listen_error(exc, host, port, what) from None
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


class DataPlane:
    """The public side of one process: listeners, proxy, resolver, pool, housekeeping tick."""

    def __init__(self, settings: Settings, certs: CertStore | None = None):
        self.settings = settings
        self.resolver = Resolver(settings.dns_nameservers, settings.dns_ttl_cap, settings.dns_timeout)
        self.proxy: ProxyServer | None = None
        # HTTP/2 to the tasks of upstreamProto=h2c|h2 routes (h2upstream.Relay), made with the
        # first HTTP/2 connection, as are the Stream classes by listener class (_h2_connection)
        self.relay = None
        self._h2_streams: dict[type, type] = {}
        self.tls_proxy: ProxyServer | None = None  # the same routes, X-Forwarded-Proto: https
        self.tcp: TcpListeners | None = None
        self.certs = certs if certs is not None else cert_store(settings, persist=False)
        self.servers: list = []  # Listener (plain HTTP, pausable at MAXCONN) or PeekingListener (TLS, PROXY)
        self.revision = 0
        self.services: tuple[Service, ...] = ()
        self.stats = metrics.DataStats()
        self.stats_service: tuple[Service, ...] = ()  # the admin listener's own routes, once its address is known
        self.tasksets: dict[tuple, TaskSet] = {}  # DNS-discovered task sets of the current table
        self._next_tasksets: dict[tuple, TaskSet] = {}
        self.gates: dict[str, Gate] = {}  # service name -> its limits (servicelimits.py), kept across tables
        self.not_running: dict[str, frozenset[str]] = {}  # host -> task IPs Swarm is not running (follow_tasks)
        self._tls_services: set[str] = set()  # services with an httpsPort or verifyClientSsl: a TLS table of its own
        self._dialed: dict[str, int] = {}  # host -> services dialing it (the resolver's cache follows)
        self._tick_handle: asyncio.TimerHandle | None = None
        self.src_port_servers: dict[int, Listener] = {}  # srcPort listeners opened at runtime
        self._listeners_lock = asyncio.Lock()
        self._maxconn_logged = -MAXCONN_LOG_EVERY

    def _backend(self, host: str, port: int, service: Service, tls: bool = False):
        """The service name (Overlay: the VIP balances) or, for DNS discovery and sticky
        sessions, the TaskSet of tasks.<host> (kept across tables while its options stay).
        `tls` (sslVerifyNone): TLS to the upstream, always through the service name.
        A service with limits gets it wrapped in a GatedBackend."""
        backend = self._plain_backend(host, port, service, tls)
        protection = service.protection
        if not protection.limited:
            return backend
        gate = self.gates.get(service.name)
        if gate is None:
            gate = self.gates[service.name] = Gate(protection, self.settings.timeout_queue, asyncio.get_running_loop(),
                                                   self.settings.workers)
        else:
            gate.configure(protection, self.settings.timeout_queue)
        return GatedBackend(backend, gate)

    def _plain_backend(self, host: str, port: int, service: Service, tls: bool):
        tasksets = self._next_tasksets
        balancing = service.balancing
        discovery = balancing.discovery or self.settings.discovery_type
        if tls or is_ip(host) or (discovery != "DNS" and balancing.sticky_cookie is None):
            return Backend(host, port, self.resolver, tls)
        s = self.settings
        policy = HealthPolicy(balancing.health_path, balancing.health_interval or s.health_check_interval,
                              balancing.health_timeout or s.health_check_timeout,
                              balancing.health_rise or s.health_rise, balancing.health_fall or s.health_fall)
        key = (host, port, balancing.algorithm or s.balance, policy, balancing.slow_start)
        taskset = tasksets.get(key) or self.tasksets.get(key)
        if taskset is None:
            known = next((set(t.tasks) for k, t in self.tasksets.items() if k[:2] == (host, port)), None)
            taskset = TaskSet(host, port, key[2], s, self.proxy.pool, policy, known, balancing.slow_start)
            taskset.exclude(self.not_running.get(host, ()))
        tasksets[key] = taskset
        return taskset

    def follow_tasks(self, host: str, not_running) -> None:
        """The Swarm listener's view of the tasks of service `host`: the IPs of tasks that are
        not running or are being stopped leave every task set of that host (they drain)."""
        self.not_running[host] = frozenset(not_running)
        for taskset in {*self.tasksets.values(), *self._next_tasksets.values()}:
            if taskset.host == host:
                taskset.exclude(self.not_running[host])

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
        self._offer_h2(s)
        public = {spec.port for spec in s.default_ports + s.bind_ports}
        tls_ports = {spec.port for spec in s.default_ports + s.bind_ports if spec.ssl}
        self.tcp = TcpListeners(s, loop, self._backend, Listener, limit, public, tls_ports)
        pages.use_directory(s.error_pages_dir)

    def _offer_h2(self, s: Settings) -> None:
        """ENABLE_H2: TLS connections that chose h2 (ALPN) get an H2Connection; H2C: plain
        connections that open with the HTTP/2 preface too. Others keep their HTTP/1.1 class."""
        for proxy, on in ((self.tls_proxy, s.enable_h2), (self.proxy, s.h2c)):
            if not on:
                continue
            make_h1 = proxy.factory
            base = ClientCertConnection if s.ca_file and proxy is self.tls_proxy else ClientConnection
            make_h2 = functools.partial(self._h2_connection, proxy, base)
            select = AlpnSelect if proxy is self.tls_proxy else PrefaceSniff
            proxy.factory = functools.partial(select, make_h1, make_h2)

    def _h2_connection(self, proxy: ProxyServer, base: type):
        """An HTTP/2 connection (http2.H2Connection) whose streams are `base` connections.
        h2, hpack and hyperframe (~2.6 MiB resident) are imported here, by the first one:
        a proxy no HTTP/2 client reaches never loads them (issue 16: RSS after start)."""
        from pyroute.dataplane import http2
        from pyroute.dataplane.h2upstream import Relay

        if self.relay is None:
            self.relay = Relay(asyncio.get_running_loop(), self.settings)
        streams = self._h2_streams.get(base)
        if streams is None:
            streams = self._h2_streams[base] = http2.stream_class(base)
        return http2.H2Connection(proxy, streams, self.relay)

    def reconfigure(self, settings: Settings) -> None:
        """Apply re-read settings (SIGHUP) at once; RESTART_ONLY ones keep their values."""
        self.settings = settings
        self.proxy.configure(settings)
        if self.relay is not None:
            self.relay.settings = settings
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
        for listener in self._public_listeners():
            listener.pause()

    def _resume_accepting(self) -> None:
        for listener in self._public_listeners():
            listener.resume()

    def _public_listeners(self) -> list:
        """Every listener whose connections count toward MAXCONN: HTTP, TLS, srcPort, tcp/sni."""
        return [*self.servers, *self.src_port_servers.values(), *self.tcp.servers.values()]

    async def start(self) -> None:
        if self.proxy is None:
            self.prepare()
        s = self.settings
        for spec in s.default_ports + s.bind_ports:
            if spec.ssl and not len(self.certs):
                # Open anyway: sni services (TLS ended in the services, DFP's sni tutorial) need no certificate.
                log.warning("TLS port %d has no certificate yet (put PEM files in %s, add a cert-* secret, or PUT "
                            "/v1/docker-flow-proxy/cert): until one exists, a ClientHello no reqMode=sni service "
                            "takes is answered with a TLS unrecognized_name alert", spec.port, s.certs_dir)
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

        def serve(sock: socket.socket, client_ip: str | None, sni_target, tls_context) -> None:
            if sni_target is not None:
                tunnel_port = Port("tcp", (sni_target,))
                ip = client_ip.encode() if client_ip is not None else b""  # the PROXY header's address
                task = loop.create_task(loop.connect_accepted_socket(lambda: self.tcp.tunnel(tunnel_port, ip), sock))
                task.add_done_callback(_log_handover_error)
                return
            if client_ip is None:
                factory = proxy.factory
            else:
                def factory(ip=client_ip.encode()):  # the PROXY header's address, kept by connection_made
                    conn = proxy.factory()
                    conn.client_ip = ip
                    return conn
            ssl_context = tls_context or context  # tls_context: an ACME TLS-ALPN-01 validation
            kwargs = {"ssl": ssl_context, "ssl_handshake_timeout": TLS_HANDSHAKE_TIMEOUT} if ssl_context else {}
            task = loop.create_task(loop.connect_accepted_socket(factory, sock, **kwargs))
            task.add_done_callback(_log_handover_error)

        try:
            sock = listen_socket(s.bind_address, spec.port, LISTEN_BACKLOG)
        except OSError as exc:
            raise listen_error(exc, s.bind_address, spec.port, what) from None
        return PeekingListener(sock, serve, accept_proxy=accept_proxy, trusted=s.proxy_protocol_trusted,
                               sni_port=lambda: self.tcp.tls_sni.get(spec.port),
                               can_terminate=lambda: not spec.ssl or len(self.certs) > 0,
                               challenges=lambda: self.certs.challenges if spec.ssl else {},
                               timeout=s.timeout_http_request)

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
                                  if any(d.https_port or d.verify_client_ssl or d.src_https_port
                                         for d in s.destinations))
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
        limited = {s.name for s in table.came if s.protection.limited}
        for service in table.gone:
            if service.name not in limited:  # removed, or no limits any more
                self.gates.pop(service.name, None)
        self._count_dial_hosts(table.gone, -1)
        self._count_dial_hosts(table.came, 1)
        if self._tick_handle is not None and any(d.src_port for s in changed for d in s.destinations):
            asyncio.get_running_loop().create_task(self.sync_src_ports())  # srcPort listeners follow the table

    def _close_unused_tasksets(self, *tables: RouteTable) -> None:
        """Close the task sets only routes of the previous tables used."""
        candidates = {id(_unwrapped(r)) for t in tables for r in t.removed if isinstance(_unwrapped(r), TaskSet)}
        if candidates:
            used = {id(_unwrapped(r)) for t in tables for r in t.routes}
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
        """Route what the admin listener at host:port serves on the public ports, ahead of
        every service: STATS_URI (the stats page; on STATS_PORT only, when set: a srcPort, its
        listener opened as srcPort listeners are) and, with ACME on, the HTTP-01 challenge
        path (answered from the replicated state, so whichever replica the CA reaches)."""
        s = self.settings
        own = []
        if s.stats_enabled:
            own.append({"serviceName": STATS_SERVICE, "servicePath": s.stats_path, "srcPort": str(s.stats_port)})
        if s.acme_enabled and s.acme_challenge == "http-01":
            own.append({"serviceName": ACME_SERVICE, "servicePath": ACME_CHALLENGE_PATH})
        if not own:
            return
        self.stats_service = tuple(parse_service({**params, "port": str(port), "outboundHostname": host})
                                   for params in own)
        self.apply(self.revision, self.services)
        if s.stats_port and self._tick_handle is not None:
            asyncio.get_running_loop().create_task(self.sync_src_ports())

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
        if self.relay is not None:  # (made with the first HTTP/2 connection)
            from pyroute.dataplane import http2

            http2.announce_drain(proxies)
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
        if self.relay is not None:
            self.relay.close_all()
        if proxy.access_log is not None:
            proxy.access_log.flush()

    def _tick_interval(self) -> float:
        s = self.settings
        shortest = min(s.timeout_client, s.timeout_server, s.timeout_http_request, s.timeout_http_keep_alive)
        return max(0.05, min(0.5, shortest / 4))

    def _tick(self) -> None:
        loop = asyncio.get_running_loop()
        try:
            now = clock()
            self.proxy.check_timeouts(now)
            self.tls_proxy.check_timeouts(now)
            self.proxy.check_upstream_timeouts(now)  # (its pool is the TLS server's too)
            self.tcp.check_timeouts(now)
            if self.relay is not None:
                self.relay.check_timeouts(now)
            self.stats.rotate()  # recent traffic: a new slot when the clock left the open one
        finally:
            self._tick_handle = loop.call_later(self._tick_interval(), self._tick)


def _unwrapped(route):
    """A route's backend without the GatedBackend of a limited service."""
    return getattr(route.backend, "inner", route.backend)


def _access_log(settings: Settings, loop) -> AccessLog | None:
    """DEBUG=true: one line per request in ACCESS_LOG_FORMAT (DEBUG_ERRORS_ONLY, ACCESS_LOG_SAMPLE narrow it)."""
    return AccessLog(loop, settings.debug_errors_only, settings.access_log_sample,
                     log_format=settings.access_log_format) if settings.debug else None


def _log_handover_error(task: asyncio.Task) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.info("handing over an accepted connection failed: %s", task.exception())
