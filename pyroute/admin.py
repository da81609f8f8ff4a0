"""The admin listener: Docker Flow Proxy's HTTP API on PORT (default 8080).

Requests are small and rare, so this side favours plainness over speed: each request is
read whole (bounded), dispatched by path, and answered with DFP's JSON envelope
``{"Status": "OK"|"NOK", "Message": ..., ...}`` and DFP's status codes.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from collections.abc import Awaitable, Callable
from urllib.parse import parse_qsl, urlsplit

import httptools
import orjson

from .routing import precedence_key
from .services import Service, ServiceError, parse_service
from .state import ServiceRegistry

log = logging.getLogger("pyroute.admin")

PREFIX = "/v1/docker-flow-proxy/"
MAX_ADMIN_BODY = 1024 * 1024
MAX_ADMIN_HEAD = 64 * 1024
MAX_ADMIN_PIPELINE = 8  # queued requests per connection before reading pauses
STATUS_TEXT = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 409: "Conflict",
               413: "Payload Too Large", 500: "Internal Server Error"}


class Request:
    __slots__ = ("method", "path", "params", "body")

    def __init__(self, method: str, target: str, body: bytes):
        parts = urlsplit(target)
        self.method = method
        self.path = parts.path
        self.params: dict[str, str] = {}
        for key, value in parse_qsl(parts.query, keep_blank_values=True):
            self.params.setdefault(key, value)  # first value wins, as gorilla/schema does
        self.body = body


class Response:
    __slots__ = ("status", "body", "content_type")

    def __init__(self, status: int, body: bytes, content_type: str = "application/json"):
        self.status = status
        self.body = body
        self.content_type = content_type


def json_response(status: int, message: str = "", **fields) -> Response:
    envelope = {"Status": "OK" if status < 400 else "NOK", "Message": message, **fields}
    return Response(status, orjson.dumps(envelope))


class AdminApi:
    """The endpoints, independent of the socket handling."""

    def __init__(
        self,
        registry: ServiceRegistry,
        wait_applied: Callable[[int], Awaitable[list[str]]],
        is_ready: Callable[[], bool] = lambda: True,
        certs=None,
        wait_certs: Callable[[], Awaitable[list[str]]] | None = None,
    ):
        self.registry = registry
        self.certs = certs  # tls.CertStore: install(name, pem) / remove(name) / list()
        self.wait_certs = wait_certs  # -> the data planes that failed to take the current certificates
        self.wait_applied = wait_applied  # -> the data planes that failed to apply a revision
        self.is_ready = is_ready
        self.routes: dict[str, Callable[[Request], Response]] = {
            "reconfigure": self.reconfigure,
            "remove": self.remove,
            "config": self.config,
            "ping": self.ping,
            "reload": self.reload,
            "successfulinitreload": self.successful_init_reload,
            "cert": self.cert,
            "certs": self.list_certs,
        }

    async def handle(self, request: Request) -> Response:
        if request.path.startswith(PREFIX):
            handler = self.routes.get(request.path[len(PREFIX) :].strip("/"))
            if handler is not None:
                try:
                    response = handler(request)
                    return await response if asyncio.iscoroutine(response) else response
                except ServiceError as exc:
                    return json_response(exc.status, exc.message, ServiceName=request.params.get("serviceName", ""))
        return json_response(404, f"no such endpoint: {request.path}")

    async def _applied(self, ok: Response) -> Response:
        """`ok` once every data plane serves the current revision (DFP answers 500 otherwise)."""
        failed = await self.wait_applied(self.registry.revision)
        if failed:
            return json_response(500, f"the change is saved but these workers did not apply it: {', '.join(failed)}")
        return ok

    async def reconfigure(self, request: Request) -> Response:
        if self.certs is not None and any(k.lower() == "servicecert" for k in request.params):
            # serviceCert: validate the service first, then the certificate, then apply both.
            candidate = parse_service(request.params, self.registry.separator)
            if candidate.cert:
                try:
                    self.certs.install(candidate.cert_name, candidate.cert.encode())
                except (ValueError, OSError) as exc:
                    return json_response(400, f"serviceCert: {exc}", ServiceName=candidate.name)
                if self.wait_certs is not None:
                    await self.wait_certs()
        service = self.registry.reconfigure(request.params)
        if service is None:
            return await self._applied(json_response(200, "", ServiceName=request.params.get("serviceName", "")))
        return await self._applied(json_response(200, "", **service.to_json()))

    async def remove(self, request: Request) -> Response:
        name = request.params.get("serviceName", "").strip()
        if not name:
            return json_response(400, "serviceName parameter is mandatory")
        removed = self.registry.remove(name)
        return await self._applied(json_response(200, "" if removed else f"{name} was not configured", ServiceName=name))

    def config(self, request: Request) -> Response:
        services = sorted(self.registry.services(), key=precedence_key)
        if request.params.get("type", "").lower() == "json":
            return Response(200, orjson.dumps({s.name: s.to_json() for s in services}))
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
            self.certs.install(name, request.body)
        except ValueError as exc:
            return json_response(400, str(exc))
        except OSError as exc:
            return json_response(500, str(exc))
        failed = await self.wait_certs() if self.wait_certs is not None else []
        if failed:
            return json_response(500, f"the certificate is saved but these workers did not take it: {', '.join(failed)}")
        return json_response(200, "")

    def list_certs(self, request: Request) -> Response:
        certs = [
            {"ProxyServiceName": c["Name"], "CertsDir": self.certs.certs_dir, "CertContent": c["Pem"],
             "ServicePort": "", "DnsNames": c["DnsNames"], "NotAfter": c["NotAfter"]}
            for c in self.certs.list() if not c["Secret"]
        ]
        return json_response(200, "", Certs=certs)

    def ping(self, request: Request) -> Response:
        return json_response(200, "", Revision=self.registry.revision)

    def reload(self, request: Request) -> Response:
        # Routes are applied in-process on every change, so there is nothing to reload:
        # answered as DFP does so that scripts calling it keep working.
        return json_response(200, "")

    def successful_init_reload(self, request: Request) -> Response:
        return Response(200 if self.is_ready() else 500, b"")


def render_config(services: list[Service], revision: int) -> str:
    """The effective routes in HAProxy's vocabulary, in the order they are matched."""
    lines = [f"# pyroute routes, revision {revision}; first matching use_backend wins", "frontend services"]
    backends = []
    for service in services:
        for d in service.destinations:
            acl = f"{service.acl_name}{d.index}"
            backend = f"{service.acl_name}-be{d.port}_{d.index}"
            conditions = []
            if d.paths:
                lines.append(f"    acl url_{acl} path_beg {' '.join(d.paths)}")
                conditions.append(f"url_{acl}")
            if d.domains:
                lines.append(f"    acl domain_{acl} {service.domain_algo}(host) -i {' '.join(d.domains)}")
                conditions.append(f"domain_{acl}")
            lines.append(f"    use_backend {backend} if {' '.join(conditions)}")
            backends += ["", f"backend {backend}", f"    server {service.name} {d.outbound_hostname or service.name}:{d.port}"]
    return "\n".join(lines + backends) + "\n"


class AdminConnection(asyncio.Protocol):
    """HTTP/1.1 with keep-alive, one request at a time, each read whole."""

    def __init__(self, api: AdminApi):
        self.api = api
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

    def on_url(self, url: bytes) -> None:
        self.url += url
        if len(self.url) > MAX_ADMIN_HEAD:
            raise ValueError("URL too long")

    def on_headers_complete(self) -> None:
        self.keep_alive = self.parser.should_keep_alive()  # llhttp resets it when the message ends

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ADMIN_BODY:
            raise ValueError("body too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        request = Request(self.parser.get_method().decode(), self.url.decode("latin-1"), b"".join(self.body))
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
            + ("Connection: close\r\n" if close else "")
            + "\r\n"
        )
        self.transport.write(head.encode() + response.body)
        if close:
            self.transport.close()
