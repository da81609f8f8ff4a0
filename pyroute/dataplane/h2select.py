"""The protocol a connection starts with where HTTP/2 is offered (ENABLE_H2 on TLS, H2C on
plain ports): it picks HTTP/1.1 or HTTP/2 and hands the transport over.

Apart from http2.py so that a proxy no HTTP/2 client has reached never imports h2, hpack
and hyperframe (~2.6 MiB resident): `make_h2` (dataplane/plane.py) imports them with the
first HTTP/2 connection.
"""

from __future__ import annotations

import asyncio

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"  # what an h2c client sends first (RFC 9113 §3.4)


class AlpnSelect(asyncio.Protocol):
    """The protocol a TLS connection starts with (ENABLE_H2): after the handshake it hands
    the transport to an H2Connection (ALPN chose h2) or to the listener's HTTP/1.1 class."""

    __slots__ = ("make_h1", "make_h2", "client_ip")

    def __init__(self, make_h1, make_h2):
        self.make_h1 = make_h1
        self.make_h2 = make_h2
        self.client_ip = b""  # set by a PROXY header, passed on

    def connection_made(self, transport) -> None:
        ssl_object = transport.get_extra_info("ssl_object")
        h2_chosen = ssl_object is not None and ssl_object.selected_alpn_protocol() == "h2"
        protocol = self.make_h2() if h2_chosen else self.make_h1()
        if self.client_ip:
            protocol.client_ip = self.client_ip
        transport.set_protocol(protocol)
        protocol.connection_made(transport)


class PrefaceSniff(asyncio.Protocol):
    """The protocol a plain connection starts with (H2C=true): an HTTP/1.1 ClientConnection
    is made at once (counted, timed out as any), and the first bytes decide: the HTTP/2
    connection preface hands the transport to an H2Connection instead."""

    __slots__ = ("make_h2", "h1", "transport", "seen", "client_ip")

    def __init__(self, make_h1, make_h2):
        self.make_h2 = make_h2
        self.h1 = make_h1()
        self.transport = None
        self.seen = b""
        self.client_ip = b""

    def connection_made(self, transport) -> None:
        self.transport = transport
        if self.client_ip:
            self.h1.client_ip = self.client_ip
        self.h1.connection_made(transport)

    def data_received(self, data: bytes) -> None:
        seen = self.seen + data
        if len(seen) < len(PREFACE) and PREFACE.startswith(seen):
            self.seen = seen  # (a prefix of the preface so far: wait for the rest)
            return
        transport = self.transport
        h1 = self.h1
        if seen.startswith(PREFACE) and not h1.closed:
            h1.connection_lost(None)  # (it served nothing: only its place is given back)
            protocol = self.make_h2()
            protocol.client_ip = h1.client_ip
            transport.set_protocol(protocol)
            protocol.connection_made(transport)
        else:
            protocol = h1
            transport.set_protocol(h1)
        self.h1 = None
        protocol.data_received(seen)

    def eof_received(self) -> bool:
        return self.h1.eof_received() if self.h1 is not None else False

    def connection_lost(self, exc) -> None:
        if self.h1 is not None:
            self.h1.connection_lost(exc)
            self.h1 = None

    def pause_writing(self) -> None:
        if self.h1 is not None:
            self.h1.pause_writing()

    def resume_writing(self) -> None:
        if self.h1 is not None:
            self.h1.resume_writing()
