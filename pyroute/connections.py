"""ClientConnection variants for TLS and PROXY-protocol listeners.

Only connections that need them pay for them: plain listeners keep the base class.
"""

from __future__ import annotations

from .proxy import ClientConnection, ProxyServer, Refused, origin_form


class ProxiedClientConnection(ClientConnection):
    """A client connection whose address came in a PROXY protocol header."""

    __slots__ = ("proxied_ip",)

    def __init__(self, server: ProxyServer, proxied_ip: bytes):
        super().__init__(server)
        self.proxied_ip = proxied_ip

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.client_ip = self.proxied_ip


class ClientCertConnection(ClientConnection):
    """A TLS client connection when CA_FILE is set: routes with verifyClientSsl answer 403
    unless the handshake verified a client certificate (an invalid one fails the handshake)."""

    __slots__ = ("verified",)

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.verified = bool(transport.get_extra_info("peercert"))

    def on_headers_complete(self) -> None:
        if not self.verified:
            url, host = self.url, self.host
            if url[:1] != b"/":
                url, host = origin_form(url, host, self.parser.get_method())
            if url is not None:
                query = url.find(b"?")
                route = self.server.table.match(host, url if query < 0 else url[:query], self.headers, self)
                if route is not None and route.destination.verify_client_ssl:
                    raise Refused(403)
        super().on_headers_complete()


class ProxiedClientCertConnection(ClientCertConnection):
    __slots__ = ("proxied_ip",)

    def __init__(self, server: ProxyServer, proxied_ip: bytes):
        super().__init__(server)
        self.proxied_ip = proxied_ip

    def connection_made(self, transport) -> None:
        super().connection_made(transport)
        self.client_ip = self.proxied_ip
