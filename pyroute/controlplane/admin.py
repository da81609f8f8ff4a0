"""The admin listener: Docker Flow Proxy's HTTP API on PORT (default 8080).

Requests are small and rare, so this side favours plainness over speed: each request is
read whole (bounded), dispatched by path, and answered with DFP's JSON envelope
``{"Status": "OK"|"NOK", "Message": ..., ...}`` and DFP's status codes.
"""

from __future__ import annotations

import asyncio
import logging
import re
import ssl
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import httptools
import orjson

from pyroute import metrics
from pyroute.controlplane import statspage
from pyroute.controlplane.adminauth import BROWSER_HEADERS, PEER_HEADER, STATE_CHANGING, allowed, cross_site, is_peer
from pyroute.resolver import ResolveError
from pyroute.services import Service, ServiceError, is_removal, precedence_key
from pyroute.controlplane.registry import ServiceRegistry, StateError, format_stamp, parse_stamp
from pyroute.tls import load_certificate

log = logging.getLogger("pyroute.controlplane.admin")

PREFIX = "/v1/docker-flow-proxy/"
ACME_CHALLENGE_PATH = "/.well-known/acme-challenge/"  # routed here from the public ports when ACME is on
MAX_ADMIN_BODY = 1024 * 1024
MAX_ADMIN_HEAD = 64 * 1024
MAX_ADMIN_PIPELINE = 8  # queued requests per connection before reading pauses
STATUS_TEXT = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden", 404: "Not Found", 405: "Method Not Allowed",
               409: "Conflict", 413: "Payload Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


class Request:
    __slots__ = ("method", "target", "path", "params", "body", "authorization", "browser", "peer_token")

    def __init__(self, method: str, target: str, body: bytes, authorization: bytes | None = None,
                 browser: dict[bytes, str] | None = None, peer_token: bytes | None = None):
        parts = urlsplit(target)
        self.method = method
        self.target = target
        self.path = parts.path
        self.params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            self.params.setdefault(key, value)  # first value wins, as gorilla/schema does
        self.body = body
        self.authorization = authorization
        self.browser = browser or {}  # adminauth.BROWSER_HEADERS the request carried (cross-site check)
        self.peer_token = peer_token  # the X-Pyroute-Peer-Token header, if any

    @classmethod
    def of(cls, method: str, path: str, params: dict[str, str], body: bytes) -> "Request":
        request = cls(method, path, body)
        request.params = params
        return request


class Response:
    __slots__ = ("status", "body", "content_type", "headers")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json", headers: str = ""):
        self.status = status
        self.body = body
        self.content_type = content_type
        self.headers = headers  # extra header lines, each ending in CRLF


def json_response(status: int, message: str = "", **fields) -> Response:
    envelope = {"Status": "OK" if status < 400 else "NOK", "Message": message, **fields}
    return Response(status, orjson.dumps(envelope))


class AdminApi:
    """The endpoints, independent of the socket handling."""

    def __init__(
        self,
        registry: ServiceRegistry,
        wait_applied: Callable[[int], Awaitable[list[str]]],
        not_ready: Callable[[], str] = lambda: "",
        replication=None,
        collect: Callable[[], Awaitable[dict]] | None = None,
        settings=None,
        credentials: tuple[str, str] | None = None,
        certs=None,
        wait_certs: Callable[[], Awaitable[list[str]]] | None = None,
        routecheck=None,
        peer_token: str = "",
    ):
        self.peer_token = peer_token  # PEER_TOKEN: the replicas' own credential ("" = none)
        self.routecheck = routecheck  # routecheck.RouteCheck: shadowed routes and /match
        self.credentials = credentials  # (user, password) every call must present, None = open
        self.registry = registry
        self.certs = certs  # tls.CertStore: install(name, pem) / remove(name) / list()
        self.wait_certs = wait_certs  # -> the data planes that failed to take the current certificates
        self.wait_applied = wait_applied  # -> the data planes that failed to apply a revision
        self.not_ready = not_ready  # -> why this replica is not ready, empty once it is
        self.replication = replication  # replication.Replication: durability, peers, listener
        self.collect = collect  # -> the data planes' counters, merged (metrics.merge)
        self.settings = settings
        self.acme = None  # acme.AcmeManager once ACME is on: challenge answers, /certs status, metrics
        self.routes: dict[str, Callable[[Request], Response]] = {
            "reconfigure": self.reconfigure,
            "remove": self.remove,
            "config": self.config,
            "ping": self.ping,
            "reload": self.reload,
            "successfulinitreload": self.successful_init_reload,
            "state": self.state,
            "metrics": self.metrics_csv,
            "cert": self.cert,
            "certs": self.list_certs,
            "routes": self.route_table,
            "latency": self.latency,
            "rejected": self.rejected,
            "shadowed": self.shadowed,
            "match": self.match,
        }

    async def handle(self, request: Request) -> Response:
        settings = self.settings
        if settings is not None and settings.stats_enabled and request.path.startswith(settings.stats_path):
            # Requests under the stats path come from the public ports' stats route: only the page is here.
            if request.target.startswith(settings.stats_uri):
                return await self.stats_page(request)  # behind STATS_USER/STATS_PASS, not the admin credentials
            return Response(404, b"404 Not Found\n", "text/plain")
        if self.acme is not None and request.path.startswith(ACME_CHALLENGE_PATH):
            return self.acme_challenge(request)  # the CA asks anonymously, through any replica
        if not allowed(request.authorization, self.credentials) and not self._from_peer(request):
            response = json_response(401, "the admin API needs a user and password (HTTP basic auth)")
            response.headers = 'WWW-Authenticate: Basic realm="pyroute admin"\r\n'
            return response
        if self.credentials is not None and request.path.startswith(PREFIX) \
                and request.path[len(PREFIX):].strip("/") in STATE_CHANGING:
            why = cross_site(request.browser)
            if why is not None:
                return json_response(403, f"a cross-site request cannot change the proxy ({why})")
        if request.path == "/metrics" and self.collect is not None:
            return await self.prometheus(request)
        if request.path.startswith(PREFIX):
            handler = self.routes.get(request.path[len(PREFIX) :].strip("/"))
            if handler is not None:
                try:
                    response = handler(request)
                    return await response if asyncio.iscoroutine(response) else response
                except ServiceError as exc:
                    name = request.params.get("serviceName", "").strip()
                    if handler == self.reconfigure and name:  # what Docker Flow Swarm Listener sends
                        self.registry.reject(name, "reconfigure", exc)
                    return json_response(exc.status, exc.message, ServiceName=request.params.get("serviceName", ""))
        return json_response(404, f"no such endpoint: {request.path}")

    def _from_peer(self, request: Request) -> bool:
        """Did a replica send this (it presents PEER_TOKEN)?"""
        return is_peer(request.peer_token, self.peer_token)

    def _keys_allowed(self, request: Request) -> bool:
        """May this caller see private keys? Replicas (PEER_TOKEN) and callers who passed the
        admin credentials; with neither set nobody can be told apart, so nobody."""
        return self.credentials is not None or self._from_peer(request)

    async def _applied(self, ok: Response) -> Response:
        """`ok` once the change is on disk and every data plane serves the current revision
        (DFP answers 500 otherwise). An accepted change is an operator supplying state."""
        if self.replication is not None:
            try:
                await self.replication.commit()
            except OSError as exc:
                log.error("could not save the state: %s", exc)
                return json_response(500, f"the change is applied but could not be saved to STATE_DIR: {exc}")
            self.replication.state_supplied("an admin change")
        failed = await self.wait_applied(self.registry.revision)
        if failed:
            return json_response(500, f"the change is saved but these workers did not apply it: {', '.join(failed)}")
        return ok

    async def reconfigure(self, request: Request) -> Response:
        if self._distributing(request):
            if not is_removal(request.params):
                self.registry.validate(request.params)  # refuse bad input before fanning out
            return await self.distribute(request, self.reconfigure)
        if self.certs is not None and any(k.lower() == "servicecert" for k in request.params):
            # serviceCert: validate the service first, then the certificate, then apply both.
            candidate = self.registry.validate(request.params)
            if candidate.cert:
                try:
                    self.certs.install(candidate.cert_name, candidate.cert.encode())
                except (ValueError, OSError) as exc:
                    return json_response(400, f"serviceCert: {exc}", ServiceName=candidate.name)
                if self.wait_certs is not None:
                    await self.wait_certs()
        service = self.registry.reconfigure(request.params, _stamp(request))
        if service is None:
            return await self._applied(json_response(200, "", ServiceName=request.params.get("serviceName", "")))
        return await self._applied(json_response(200, self._shadow_warning(service.name), **service.to_json()))

    def _shadow_warning(self, name: str) -> str:
        """The reconfigure answer's Message: routes of `name` that can never match, or that it hides."""
        if self.routecheck is None:
            return ""
        found = self.routecheck.involving(name)
        return "; ".join(f"warning: {f['Reason']}" for f in found)

    def rejected(self, request: Request) -> Response:
        """Labelled services refused on their way in (Swarm labels, the Swarm Listener's list
        or its reconfigure calls), each with why: a deploy pipeline can fail on a non-empty list."""
        return json_response(200, "", Rejected=sorted(self.registry.rejected.values(), key=_by_name))

    def shadowed(self, request: Request) -> Response:
        """Routes that can never match because an earlier one always catches their requests."""
        found = self.routecheck.findings if self.routecheck is not None else []
        return json_response(200, "", Shadowed=found)

    def match(self, request: Request) -> Response:
        """Which route a request would take, and why each route tried before it lost:
        ?host=H&path=P[&method=M][&port=N][&tls=true][&header.Name=value...]."""
        if self.routecheck is None:
            return json_response(404, "route matching is not available")
        params = request.params
        path = params.get("path", "/") or "/"
        host = params.get("host", "")
        port_text = params.get("port", "0").strip() or "0"
        if not path.startswith("/") or not port_text.isdigit() or int(port_text) > 65535:
            return json_response(400, "path must start with '/' and port be a port number")
        headers = [(b"host", host.encode("latin-1"))] if host else []
        for key, value in params.items():
            if key.lower().startswith("header."):
                headers.append((key[7:].lower().encode("latin-1"), value.encode("latin-1")))
        answer = self.routecheck.match(host, path.split("?", 1)[0], headers, int(port_text),
                                       params.get("method", "GET") or "GET", params.get("tls", "").lower() == "true")
        return json_response(200, "", **answer)

    async def _every_replica(self, method: str, path: str, params: dict):
        """A read from every replica (metrics?distribute=true): their answers, or the 500 naming
        the replicas that did not answer (DFP's message)."""
        try:
            results = await self.replication.peers.fan_out(method, path, params)
        except ResolveError as exc:
            return json_response(500, f"could not list the replicas: {exc}")
        failed = [r for r in results if not r.ok]
        if failed:
            listed = ", ".join(f"{r.address} ({r.error or r.status})" for r in failed)
            return json_response(500, f"Could not send distribute request to the following addresses: [{listed}]")
        return results

    async def prometheus(self, request: Request) -> Response:
        """pyroute's metrics and haproxy_exporter's families; distribute=true: every
        replica's counters merged into one scrape."""
        if self._distributing(request):
            snaps = []
            results = await self._every_replica("GET", "/metrics", {"format": "json"})
            if isinstance(results, Response):
                return results
            for result in results:
                try:
                    snap = orjson.loads(result.body)
                    for process in snap["processes"]:
                        process["name"] = f"{result.address}/{process['name']}"
                except (orjson.JSONDecodeError, KeyError, TypeError):
                    return json_response(500, f"replica {result.address} did not answer its metrics as JSON: "
                                              "is it a pyroute of this version?")
                snaps.append(snap)
            snap = metrics.merge(snaps)
            # Every replica judges the same labels and routes: the most any of them counts, not a sum.
            control = {key: max((s.get("control", {}).get(key, 0) for s in snaps), default=0)
                       for key in ("rejected", "shadowed")}
        else:
            snap = await self.collect()
            control = {"rejected": len(self.registry.rejected),
                       "shadowed": len(self.routecheck.findings) if self.routecheck is not None else 0}
        if request.params.get("format") == "json":
            return Response(200, orjson.dumps({**snap, "control": control}))
        text = metrics.render_prometheus(snap, control) + self.certificate_metrics()  # certificates: one set for all
        return Response(200, text, "text/plain; version=0.0.4")

    async def remove(self, request: Request) -> Response:
        name = request.params.get("serviceName", "").strip()
        if not name:
            return json_response(400, "serviceName parameter is mandatory")
        if self._distributing(request):
            return await self.distribute(request, self.remove)
        removed = self.registry.remove(name, _stamp(request))
        return await self._applied(json_response(200, "" if removed else f"{name} was not configured", ServiceName=name))

    def config(self, request: Request) -> Response:
        services = sorted(self.registry.services(), key=precedence_key)
        if request.params.get("type", "").lower() == "json":
            state = f"X-Pyroute-Revision: {self.registry.revision}\r\nX-Pyroute-Hash: {self.registry.hash}\r\n"
            return Response(200, orjson.dumps({s.name: s.to_json() for s in services}), headers=state)
        return Response(200, render_config(services, self.registry.revision).encode(), "text/plain; charset=utf-8")

    async def cert(self, request: Request) -> Response:
        """PUT ?certName=NAME with a PEM body (chain + key): install or replace, no restart."""
        if request.method != "PUT":
            return json_response(405, "/cert accepts PUT only")
        name = request.params.get("certName", "").strip()
        if not name:
            return json_response(400, "certName parameter is mandatory")
        if not request.body.strip():
            return json_response(400, "the body must hold the PEM certificate and its key")
        try:
            load_certificate(name, request.body)  # bad PEM is refused before anything changes or is sent
        except ValueError as exc:
            return json_response(400, str(exc))
        if self._distributing(request):
            return await self.distribute(request, self.cert)
        try:
            self.certs.install(name, request.body)
        except ValueError as exc:
            return json_response(400, str(exc))
        except OSError as exc:
            return json_response(500, str(exc))
        failed = await self.wait_certs() if self.wait_certs is not None else []
        if failed:
            return json_response(500, f"the certificate is saved but these workers did not take it: {', '.join(failed)}")
        if self.credentials is not None or self.peer_token:
            # Also into the replicated state (saved with it, pulled by joining and repairing
            # peers), which then holds the private key: only behind admin credentials or the
            # peer token, which /state checks before it hands certificates out.
            self.registry.put_cert(name, request.body.decode("ascii", "replace"), _stamp(request))
            return await self._applied(json_response(200, ""))
        return json_response(200, "")

    def list_certs(self, request: Request) -> Response:
        """DFP's certificate list, with issuer, names, expiry and where each came from (and
        the ACME orders' status). Private keys go only to callers who authenticated: with no
        ADMIN_USER/ADMIN_PASS set nobody has, and CertContent holds the certificates alone;
        replicas presenting PEER_TOKEN get the keys either way."""
        keys = self._keys_allowed(request)  # (handle() already refused a caller without credentials)
        certs = [
            {"ProxyServiceName": c["Name"], "CertsDir": self.certs.certs_dir,
             "CertContent": c["Pem"] if keys else _without_private_keys(c["Pem"]),
             "ServicePort": "", "DnsNames": c["DnsNames"], "NotAfter": c["NotAfter"], "Issuer": c["Issuer"],
             "Source": self._source(c)}
            for c in self.certs.list() if not c["Secret"]
        ]
        return json_response(200, "", Certs=certs, Acme=self.acme.status() if self.acme is not None else [])

    def _source(self, cert: dict) -> str:
        """acme, api (PUT /cert or serviceCert, kept in the replicated state) or file (CERTS_DIR)."""
        if cert["Secret"]:
            return "secret"
        if self.acme is not None and self.acme.ordered(cert["Name"]):
            return "acme"
        stored = self.registry.certs()
        return "api" if cert["Name"] in stored or cert["Name"].removesuffix(".pem") in stored else "file"

    def certificate_metrics(self) -> bytes:
        expiry = {c["Name"]: float(ssl.cert_time_to_seconds(c["NotAfter"]))
                  for c in (self.certs.list() if self.certs is not None else ()) if c["NotAfter"]}
        return metrics.render_certificates(expiry, self.acme.orders if self.acme is not None else None)

    def acme_challenge(self, request: Request) -> Response:
        """HTTP-01: the key authorization for the token, from the replicated state."""
        answer = self.acme.http01_answer(request.path[len(ACME_CHALLENGE_PATH):])
        if answer is None:
            return Response(404, b"no such ACME challenge\n", "text/plain")
        return Response(200, answer.encode("ascii"), "application/octet-stream")

    def ping(self, request: Request) -> Response:
        extra = self.replication.counters() if self.replication is not None else {}
        return json_response(200, "", Revision=self.registry.revision, Hash=self.registry.hash,
                             Replica=self.registry.replica_id, **extra)

    async def state(self, request: Request) -> Response:
        """GET: the whole state document (services, removals, certificates, ACME records):
        what joining and repairing peers pull (keys only to callers allowed them). POST: a peer's document to merge now (what
        a replica pushes when its peers cannot wait for their repair, e.g. ACME challenges)."""
        if request.method != "POST":
            return Response(200, self.registry.export_json(secrets=self._keys_allowed(request)))
        try:
            self.registry.merge(orjson.loads(request.body), "a peer's push")
        except (orjson.JSONDecodeError, StateError) as exc:
            return json_response(400, f"not a usable state document: {exc}")
        return await self._applied(json_response(200, ""))

    async def reload(self, request: Request) -> Response:
        # Routes are applied in-process on every change, so a plain reload has nothing to do.
        # recreate=true rebuilds every data plane's route table from the registry, as DFP
        # regenerates haproxy.cfg from its in-memory services. fromListener=true asks the
        # Swarm Listener to re-send every service (they arrive as reconfigures).
        if request.params.get("fromListener", "").lower() == "true":
            listener = self.replication.listener if self.replication is not None else None
            if listener is None:
                return json_response(400, "fromListener=true needs LISTENER_ADDRESS")
            failed = await listener.notify()
            if failed:
                return json_response(500, f"could not reach the swarm listener: {', '.join(failed)}")
        if request.params.get("recreate", "").lower() == "true":
            self.registry.republish("recreate requested")
            return await self._applied(json_response(200, ""))
        return json_response(200, "")

    # -- distribute=true: one fan-out for every endpoint ---------------------------------
    def _distributing(self, request: Request) -> bool:
        return request.params.get("distribute", "").lower() == "true" and self.replication is not None

    async def distribute(self, request: Request, local: Callable[[Request], Awaitable[Response]] | None) -> Response:
        """Send `request` (method, path, query, body) to every replica in parallel with
        distribute=false, as DFP does, and answer which replicas failed.

        State changes pass `local`, the endpoint's own handler: the call is stamped once
        here so every replica stores it identically (see state.py), and it is applied on
        this replica too even when DNS does not list it yet. The DNS lookup failing (no
        Swarm, or a hiccup) applies it here only; the peers' repair pulls it later.
        """
        params = {k: v for k, v in request.params.items() if k.lower() != "distribute"}
        if local is not None:
            params.setdefault("pyrouteStamp", format_stamp(self.registry.new_stamp()))
        try:
            results = await self.replication.peers.fan_out(request.method, request.path, params, request.body)
        except ResolveError as exc:
            if local is None:
                return json_response(500, f"could not list the replicas: {exc}")
            log.warning("distribute: %s; applying on this replica only, peers will pull it", exc)
            results = []
        answer = None
        if local is not None:
            answer = await local(Request.of(request.method, request.path, params, request.body))
        failed = [r for r in results if not r.ok]
        if failed:
            listed = ", ".join(f"{r.address} ({r.error or r.status})" for r in failed)
            log.error("distribute %s failed on %s", request.path, listed)
            return json_response(500, f"Could not send distribute request to the following addresses: [{listed}]",
                                 ServiceName=request.params.get("serviceName", ""))
        return answer if answer is not None else json_response(200, "", Replicas=[r.address for r in results])

    async def metrics_csv(self, request: Request) -> Response:
        """DFP's metrics endpoint: the counters in HAProxy's stats CSV columns."""
        if self.collect is None:
            return json_response(404, "metrics are not available")
        if self._distributing(request):  # DFP: every replica's CSV, one after the other
            results = await self._every_replica(request.method, request.path, request.params)
            if isinstance(results, Response):
                return results
            return Response(200, b"".join(r.body for r in results), "text/plain; charset=utf-8")
        return Response(200, metrics.render_csv(await self.collect()), "text/plain; charset=utf-8")

    async def route_table(self, request: Request) -> Response:
        """pyroute's own: the live route table (what `pyroute routes` prints), in match order,
        as the data planes serve it, each route's resolved addresses with their passive health."""
        if self.collect is None:
            return json_response(404, "the route table is not available")
        snap = await self.collect()
        routes = []
        for r in snap["routes"]:
            health = snap["services"].get(r["service"], {}).get("addresses", {})
            routes.append({
                "Service": r["service"], "Index": r["index"], "Paths": r["paths"], "PathType": r.get("path_type", ""),
                "Domains": r["domains"], "DomainAlgo": r.get("domain_algo", ""), "Backend": r["backend"],
                "Addresses": [{"Address": a, "Health": health.get(a, {}).get("health", "unknown")}
                              for a in r["addresses"]],
            })
        revisions = sorted({p["revision"] for p in snap["processes"] if "revision" in p})
        return json_response(200, "", Revision=self.registry.revision, Served=revisions, Routes=routes)

    async def latency(self, request: Request) -> Response:
        """pyroute's own: STATS_URI;data's recent-traffic figures (statspage.recent, all
        workers merged) behind the admin credentials, for tools such as `pyroute top`."""
        if self.collect is None:
            return json_response(404, "latency figures are not available")
        return Response(200, orjson.dumps(statspage.recent(await self.collect())), headers="Cache-Control: no-store\r\n")

    async def stats_page(self, request: Request) -> Response:
        if not statspage.authorized(self.settings, request.authorization):
            return Response(401, b"401 Unauthorized: the stats page needs STATS_USER/STATS_PASS\n",
                            "text/plain", 'WWW-Authenticate: Basic realm="pyroute stats"\r\n')
        if request.target == self.settings.stats_uri + statspage.DATA_SUFFIX:
            return await self.latency(request)
        return Response(200, statspage.render(await self.collect(), self.registry.revision),
                        "text/html; charset=utf-8", "Cache-Control: no-store\r\n")

    def successful_init_reload(self, request: Request) -> Response:
        """Readiness: 200 once ready, else 503 saying what it waits for (liveness is /ping)."""
        reason = self.not_ready()
        return json_response(503, f"not ready: {reason}") if reason else json_response(200, "")


def _by_name(entry: dict) -> str:
    return entry["ServiceName"]


def _stamp(request: Request):
    """The stamp a distributing replica gave this call, or None (a local change)."""
    text = request.params.pop("pyrouteStamp", None)
    return parse_stamp(text) if text else None


_PRIVATE_KEY = re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----.*?-----END [A-Z ]*PRIVATE KEY-----\s*", re.S)


def _without_private_keys(pem: str) -> str:
    return _PRIVATE_KEY.sub("", pem)


def render_config(services: list[Service], revision: int) -> str:
    """The effective routes in HAProxy's vocabulary, in the order they are matched
    (acl / use_backend lines in the frontend, one backend with its server line per route),
    so that scripts written against DFP's haproxy.cfg keep finding what they grep for."""
    lines = [f"# pyroute routes, revision {revision}; first matching use_backend wins", "frontend services"]
    backends = []
    default = None
    for service in services:
        for d in service.destinations:
            acl = f"{service.acl_name}{d.index}"
            backend = f"{service.acl_name}-be{d.port}_{d.index}"
            # (condition in use_backend, the acl's test or nothing when the route has no such rule)
            acls = [
                (f"url_{acl}", d.paths and f"{d.path_type} {' '.join(d.paths)}"),
                (f"!url_exclude_{acl}", d.path_excludes and f"path_beg {' '.join(d.path_excludes)}"),
                (f"domain_{acl}", d.domains and f"{service.domain_algo}(host) -i {' '.join(d.domains)}"),
                *((f"hdr_{acl}_{n}", f"hdr({name}) {value}") for n, (name, value) in enumerate(d.header_match)),
                (f"user_agent_{acl}", d.user_agents and f"hdr_sub(User-Agent) -i {' '.join(d.user_agents)}"),
                (f"srcPort_{acl}", d.src_port and f"dst_port {d.src_port}"),
            ]
            conditions = [condition for condition, test in acls if test]
            lines += [f"    acl {condition.lstrip('!')} {test}" for condition, test in acls if test]
            lines.append(f"    use_backend {backend} if {' '.join(conditions)}")
            if service.is_default_backend and default is None:
                default = backend
            backends += ["", f"backend {backend}", f"    server {service.name} {d.outbound_hostname or service.name}:{d.port}"]
    if default:
        lines.append(f"    default_backend {default}")
    return "\n".join(lines + backends) + "\n"


class AdminConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, one request at a time, each read whole."""

    def __init__(self, api: AdminApi, timeout: float = 30.0):
        self.api = api
        self.timeout = timeout  # TIMEOUT_ADMIN: idle, or slow to send a request
        self.timer: asyncio.TimerHandle | None = None
        self.authorization: bytes | None = None
        self.browser: dict[bytes, str] = {}
        self.peer_token: bytes | None = None
        self.parser = httptools.HttpRequestParser(self)
        self.transport = None
        self.requests: deque[tuple[Request, bool]] = deque()  # pipelined requests, answered in order
        self.busy: asyncio.Task | None = None
        self.url = b""
        self.body: list[bytes] = []
        self.size = 0
        self.keep_alive = True

    def connection_made(self, transport) -> None:
        self.transport = transport
        self._arm()

    def connection_lost(self, exc) -> None:
        self.parser = None  # it holds our bound callbacks: without the cycle we die by refcount
        if self.timer is not None:
            self.timer.cancel()

    def _arm(self) -> None:
        """(Re)start the inactivity timer; it only fires while no request is being answered."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = asyncio.get_running_loop().call_later(self.timeout, self._expired)

    def _expired(self) -> None:
        if self.busy is not None and not self.busy.done():
            return self._arm()  # a reconfigure waiting for the workers is not the client's fault
        self.transport.close()

    def data_received(self, data: bytes) -> None:
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserUpgrade:
            self._send(json_response(400, "upgrade is not supported here"), close=True)
        except httptools.HttpParserError as exc:
            self._send(json_response(400, f"bad request: {exc}"), close=True)

    def on_message_begin(self) -> None:
        self.url = b""
        self.body = []
        self.size = 0
        self.authorization = None
        self.browser = {}
        self.peer_token = None

    def on_header(self, name: bytes, value: bytes) -> None:
        self.size += len(name) + len(value)
        if self.size > MAX_ADMIN_HEAD:
            raise ValueError("request head too large")
        name = name.lower()
        if name == b"authorization":
            self.authorization = value
        elif name in BROWSER_HEADERS:
            self.browser[name] = value.decode("latin-1")
        elif name == PEER_HEADER:
            self.peer_token = value

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_ADMIN_HEAD:
            raise ValueError("URL too long")

    def on_headers_complete(self) -> None:
        self.size = 0
        self.keep_alive = self.parser.should_keep_alive()  # llhttp resets it when the message ends

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ADMIN_BODY:
            raise ValueError("body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = Request(self.parser.get_method().decode(), self.url.decode("latin-1"), b"".join(self.body),
                          self.authorization, self.browser, self.peer_token)
        self.requests.append((request, not self.keep_alive))
        if len(self.requests) >= MAX_ADMIN_PIPELINE:
            self.transport.pause_reading()
        if self.busy is None or self.busy.done():
            self.busy = asyncio.ensure_future(self._answer_in_order())

    async def _answer_in_order(self) -> None:
        while self.requests and not self.transport.is_closing():
            request, close = self.requests.popleft()
            try:
                response = await self.api.handle(request)
            except Exception:
                log.exception("admin request %s %s failed", request.method, request.path)
                response = json_response(500, "internal error, see the proxy log")
            self._send(response, close)
        if not self.transport.is_closing():
            self.transport.resume_reading()

    def _send(self, response: Response, close: bool) -> None:
        if self.transport.is_closing():
            return
        head = (
            f"HTTP/1.1 {response.status} {STATUS_TEXT.get(response.status, 'Error')}\r\n"
            f"Content-Type: {response.content_type}\r\n"
            f"Content-Length: {len(response.body)}\r\n"
            + response.headers
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        self.transport.write(head.encode() + response.body)
        self._arm()
        if close:
            self.transport.close()
