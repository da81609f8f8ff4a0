"""The ClientConnection variant for TLS listeners with client certificates (CA_FILE).

Only connections that need it pay for it: other listeners keep the base class.
"""

from __future__ import annotations

from pyroute.dataplane.client import ClientConnection, Refused, origin_form


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
