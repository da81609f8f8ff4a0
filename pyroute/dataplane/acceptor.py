"""Listeners that look at a connection's first bytes before deciding who serves it.

Used for TLS ports and for HTTP ports marked ``accept-proxy``. Each accepted socket
goes through up to two stages, both by *peeking* (MSG_PEEK), so nothing is consumed
that the final owner must see:

1. PROXY header (``accept-proxy`` ports, peers in PROXY_PROTOCOL_TRUSTED only): once
   complete, exactly its bytes are consumed and the client address is taken from it.
   Other peers are served with their own address.
2. SNI (TLS ports while ``reqMode=sni`` services use that port, or while the proxy has
   no certificate): the ClientHello's server name picks an sni service, which gets the
   raw stream (not terminated); no match: the proxy terminates TLS itself as usual, or,
   without a certificate, answers a TLS unrecognized_name alert and closes (written here:
   a handshake failing inside the TLS transport closes without flushing its alert).
   While ACME TLS-ALPN-01 challenges are pending (``challenges``), a ClientHello offering
   only ``acme-tls/1`` for a name with a challenge is served with that name's validation
   certificate.

Then ``serve(sock, client_ip, sni_target, tls_context)`` hands the socket over. While waiting for more
bytes, SO_RCVLOWAT is raised so epoll wakes only when the next byte is in (peeked data
stays readable, so plain level-triggered readiness would spin); it is reset before the
hand-over. A connection that does not complete its stages in `timeout` is closed.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
from collections.abc import Callable

from pyroute.dataplane.proxyproto import PEEK, BadHeader, parse_header
from pyroute.dataplane.l4 import (MAX_CLIENT_HELLO, UNRECOGNIZED_NAME_ALERT, NotTls, Port, client_hello_alpn,
                                   client_hello_sni)

log = logging.getLogger("pyroute.dataplane.acceptor")

ACCEPT_BATCH = 64
ACME_TLS = (b"acme-tls/1",)  # what a CA validating TLS-ALPN-01 offers, alone (RFC 8737)


def listen_socket(host: str, port: int, backlog: int) -> socket.socket:
    """A bound, listening, non-blocking SO_REUSEPORT socket; raises OSError."""
    family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                         flags=socket.AI_PASSIVE)[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind(address)
        sock.listen(backlog)
    except OSError:
        sock.close()
        raise
    return sock


class _Pending:
    __slots__ = ("sock", "timer", "needs_header", "client_ip")

    def __init__(self, sock: socket.socket, timer: asyncio.TimerHandle, needs_header: bool):
        self.sock = sock
        self.timer = timer
        self.needs_header = needs_header
        self.client_ip: str | None = None


class PeekingListener:
    def __init__(self, sock: socket.socket, serve: Callable, *, accept_proxy: bool = False, trusted=(),
                 sni_port: Callable[[], Port | None] = lambda: None,
                 can_terminate: Callable[[], bool] = lambda: True,
                 challenges: Callable[[], dict] = dict, timeout: float = 5.0):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.sockets = [sock]  # like asyncio.Server, for the start-up log
        self.serve = serve
        self.accept_proxy = accept_proxy
        self.trusted = trusted
        self.sni_port = sni_port  # the sni services on this port right now (None: none)
        self.can_terminate = can_terminate  # a TLS port: the proxy has a certificate to answer with
        self.challenges = challenges  # name -> TLS-ALPN-01 validation SSLContext, pending ones only
        self.timeout = timeout
        self.pending: dict[int, _Pending] = {}
        self.paused = False
        self.closed = False
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def pause(self) -> None:
        """MAXCONN: stop accepting; new connections wait in the kernel's backlog."""
        if not self.paused and not self.closed:
            self.paused = True
            self.loop.remove_reader(self.sock.fileno())

    def resume(self) -> None:
        if self.paused and not self.closed:  # (connections closing while draining make room too)
            self.paused = False
            self.loop.add_reader(self.sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                client, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again at the next readiness
                log.warning("accept failed: %s", exc)
                return
            client.setblocking(False)
            needs_header = self.accept_proxy and self._is_trusted(peer[0])
            if not needs_header and self.sni_port() is None and self.can_terminate() and not self.challenges():
                self.serve(client, None, None, None)  # nothing to look at: straight to the server
                continue
            fd = client.fileno()
            timer = self.loop.call_later(self.timeout, self._drop, fd, "first bytes not complete in time")
            self.pending[fd] = _Pending(client, timer, needs_header)
            self.loop.add_reader(fd, self._readable, fd)

    def _is_trusted(self, host: str) -> bool:
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            return False
        if ip.version == 6 and ip.ipv4_mapped is not None:
            ip = ip.ipv4_mapped
        return any(ip in net for net in self.trusted)

    def _readable(self, fd: int) -> None:
        state = self.pending[fd]
        sock = state.sock
        try:
            if state.needs_header:
                data = sock.recv(PEEK, socket.MSG_PEEK)
                if not data:
                    return self._drop(fd, "closed before the PROXY header")
                try:
                    parsed = parse_header(data)
                except BadHeader as exc:
                    return self._drop(fd, str(exc))
                if parsed is None:
                    return self._wait_for_more(fd, len(data), PEEK, "PROXY header too long")
                length, state.client_ip = parsed
                sock.recv(length)  # exactly the header: the next byte is the client's first
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
                state.needs_header = False
            target = context = None
            port = self.sni_port()
            can_terminate = self.can_terminate()
            challenges = self.challenges()
            if port is not None or not can_terminate or challenges:
                data = sock.recv(MAX_CLIENT_HELLO, socket.MSG_PEEK)
                if not data:
                    return self._drop(fd, "closed before the ClientHello")
                try:
                    name = client_hello_sni(data)
                except NotTls:
                    name = ""  # the TLS server will refuse it
                if name is None:
                    if len(data) < MAX_CLIENT_HELLO:
                        return self._wait_for_more(fd, len(data), MAX_CLIENT_HELLO, "")
                    name = ""
                target = port.for_sni(name) if name and port is not None else None
                if target is None and name in challenges and client_hello_alpn(data) == ACME_TLS:
                    context = challenges[name]
                elif target is None and not can_terminate:
                    sock.send(UNRECOGNIZED_NAME_ALERT)
                    return self._drop(fd, f"no sni service and no certificate for {name!r}")
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            return self._drop(fd, str(exc))
        self._release(fd)
        self.serve(sock, state.client_ip, target, context)

    def _wait_for_more(self, fd: int, have: int, limit: int, too_long: str) -> None:
        if have >= limit:
            return self._drop(fd, too_long)
        try:
            self.pending[fd].sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, have + 1)
        except OSError as exc:
            self._drop(fd, str(exc))

    def _release(self, fd: int) -> socket.socket:
        state = self.pending.pop(fd)
        state.timer.cancel()
        self.loop.remove_reader(fd)
        try:
            state.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVLOWAT, 1)
        except OSError:
            pass
        return state.sock

    def _drop(self, fd: int, why: str) -> None:
        if fd in self.pending:
            log.info("closing a new connection: %s", why)
            self._release(fd).close()

    def close(self) -> None:
        self.closed = True
        self.loop.remove_reader(self.sock.fileno())
        for fd in list(self.pending):
            self._release(fd).close()
        self.sock.close()
