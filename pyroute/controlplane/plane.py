"""The control plane of one process: the registry, replication, the admin listener, the
Swarm listener and DFP_SERVICE_* services. It hands every snapshot to its `planes` (the
data plane in this process, or the worker supervisor) and answers a change once they
serve it.
"""

from __future__ import annotations

import asyncio
import logging
import os

from pyroute.config import Settings, startup_warnings
from pyroute.controlplane.acme import AcmeManager
from pyroute.controlplane.admin import AdminApi, AdminConnection
from pyroute.controlplane.adminauth import admin_credentials
from pyroute.controlplane.envservices import env_services
from pyroute.controlplane.registry import ServiceRegistry
from pyroute.controlplane.replication import Replication
from pyroute.controlplane.routecheck import RouteCheck
from pyroute.controlplane.swarm import EngineClient, EngineError, SwarmListener, listener_enabled, socket_problem
from pyroute.listen import StartupError, listen
from pyroute.resolver import report_unreachable_dns
from pyroute.services import ServiceDefaults, ServiceError
from pyroute.tls import CertStore, file_name

log = logging.getLogger("pyroute")


class ControlPlane:
    """Registry and admin API; hands every snapshot to the data planes."""

    def __init__(self, settings: Settings, planes, certs: CertStore):
        self.settings = settings
        self.planes = planes
        instance = settings.proxy_instance_name if settings.filter_proxy_instance_name else None
        self.registry = ServiceRegistry(settings.separator, ServiceDefaults.from_settings(settings), instance)
        self.replication = Replication(settings, self.registry)
        self.routecheck = RouteCheck(settings.longest_match)
        self.certs = certs
        self.servers: list[asyncio.AbstractServer] = []
        self.listener: SwarmListener | None = None
        self.acme: AcmeManager | None = None
        self.restored = (0, 0)  # (services, revision) in STATE_DIR at start, for the start-up summary
        self._tasks: list[asyncio.Future] = []  # the DNS check and the Swarm listener, cancelled by close()

    async def start(self) -> None:
        for warning in startup_warnings(self.settings):
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
        self.registry.subscribe(self.routecheck.published)
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
                                  wait_certs=self.planes.wait_certs, routecheck=self.routecheck,
                                  peer_token=s.peer_token)
        if s.acme_enabled:
            if api.credentials is None:
                raise StartupError("ACME needs ADMIN_USER and ADMIN_PASS (or the secrets dfp_admin_user / "
                                   "dfp_admin_pass): the ACME account key and the certificates' keys travel in "
                                   "the replicated state, which only authenticated callers may read")
            self.acme = api.acme = AcmeManager(s, self.registry, self.certs, self.replication, self.planes.wait_certs)
        if api.credentials is None:
            log.warning("the admin API on %s:%d is unauthenticated: anyone who reaches it can change routes "
                        "(set ADMIN_USER and ADMIN_PASS, or the secrets dfp_admin_user / dfp_admin_pass)", s.ip, s.port)
        self.servers.append(await listen(lambda: AdminConnection(api, s.timeout_admin), s.ip, s.port, "admin API"))
        self.replication.start()  # join (pull from peers), then repair; the DFSL listener fetch
        if self.acme is not None:
            self.acme.start()
        self._tasks.append(asyncio.ensure_future(report_unreachable_dns(self.replication.resolver, s.service_name)))
        if self.listener is not None:
            self._tasks.append(asyncio.ensure_future(self.listener.run()))
            log.info("Swarm listener on %s: services labelled com.df.notify=true become routes", s.docker_host)

    def reconfigure(self, settings: Settings) -> None:
        """Re-read settings (SIGHUP): the admin credentials may have changed."""
        self.settings = settings
        self.routecheck.longest_match = settings.longest_match  # the next change rebuilds its tables
        self.api.credentials = admin_credentials(settings)
        self.api.peer_token = self.replication.peers.peer_token = settings.peer_token
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
        for task in self._tasks:
            task.cancel()
        self.replication.close()
        if self.acme is not None:
            self.acme.close()
        for server in self.servers:
            server.close()
