"""PROXY protocol v1/v2 on listeners marked ``accept-proxy`` (HAProxy's spec).

A load balancer in front of the proxy (an L4 cloud balancer, another HAProxy) prepends
one header naming the real client. The header comes before anything else, TLS included,
so these listeners accept sockets themselves: the header is *peeked* (MSG_PEEK) until
complete, exactly its bytes are then consumed, and the socket is handed to the normal
HTTP or TLS server machinery with the client address from the header. Only peers inside
PROXY_PROTOCOL_TRUSTED may send a header; any other peer is served with its own address
(a header from it is then just a bad request).
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import socket
import struct

log = logging.getLogger("pyroute.proxyproto")

V2_SIGNATURE = b"\r\n\r\n\x00\r\nQUIT\n"
V1_MAX = 107
PEEK = 536  # v1's maximum, and v2 headers with typical TLVs


class BadHeader(ValueError):
    pass


def parse_header(data: bytes) -> tuple[int, str | None] | None:
    """(header length, client IP or None for LOCAL/UNKNOWN) for a header at the start of
    `data`; None while more bytes are needed; BadHeader if it is not a valid header."""
    if data[:12] == V2_SIGNATURE[: len(data[:12])] and len(data) < 16:
        return None
    if data.startswith(V2_SIGNATURE):
        ver_cmd, family, length = data[12], data[13], struct.unpack_from("!H", data, 14)[0]
        if ver_cmd >> 4 != 2 or ver_cmd & 0xF > 1:
            raise BadHeader("PROXY v2: unknown version or command")
        total = 16 + length
        if len(data) < total:
            return None
        if ver_cmd & 0xF == 0:  # LOCAL: the balancer's own connection (health checks)
            return total, None
        if family >> 4 == 1 and length >= 12:
            return total, str(ipaddress.IPv4Address(data[16:20]))
        if family >> 4 == 2 and length >= 36:
            return total, str(ipaddress.IPv6Address(data[16:32]))
        return total, None  # AF_UNSPEC / AF_UNIX: no usable address
    if data.startswith(b"PROXY "[: len(data)]) and len(data) < 6:
        return None
    if data.startswith(b"PROXY "):
        end = data.find(b"\r\n", 0, V1_MAX + 1)
        if end < 0:
            if len(data) >= V1_MAX:
                raise BadHeader("PROXY v1: no CRLF within 107 bytes")
            return None
        words = data[:end].split(b" ")
        if len(words) >= 2 and words[1] == b"UNKNOWN":
            return end + 2, None
        if len(words) != 6 or words[1] not in (b"TCP4", b"TCP6"):
            raise BadHeader("PROXY v1: malformed header")
        try:
            ip = ipaddress.ip_address(words[2].decode("ascii"))
            int(words[4]), int(words[5])
        except ValueError:
            raise BadHeader("PROXY v1: malformed address") from None
        if (ip.version == 4) != (words[1] == b"TCP4"):
            raise BadHeader("PROXY v1: address does not match the family")
        return end + 2, str(ip)
    raise BadHeader("no PROXY protocol header")


class AcceptProxyListener:
    """A listening socket whose connections may start with a PROXY header.

    `serve(sock, client_ip)` hands over an accepted socket (header consumed) together
    with the address to report (None: the socket's own peer).
    """

    def __init__(self, sock: socket.socket, trusted, timeout: float, serve):
        self.loop = asyncio.get_running_loop()
        self.sock = sock
        self.trusted = trusted
        self.timeout = timeout
        self.serve = serve
        self.waiting: dict[int, tuple[socket.socket, asyncio.TimerHandle]] = {}
        self.sockets = [sock]
        sock.setblocking(False)
        self.loop.add_reader(sock.fileno(), self._accept)

    def _accept(self) -> None:
        for _ in range(64):
            try:
                client, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # EMFILE and friends: try again at the next readiness
                log.warning("accept failed: %s", exc)
                return
            client.setblocking(False)
            if not self._is_trusted(peer[0]):
                self.serve(client, None)
                continue
            fd = client.fileno()
            timer = self.loop.call_later(self.timeout, self._drop, fd, "no complete PROXY header in time")
            self.waiting[fd] = (client, timer)
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
        client, _ = self.waiting[fd]
        try:
            data = client.recv(PEEK, socket.MSG_PEEK)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            return self._drop(fd, str(exc))
        if not data:
            return self._drop(fd, "closed before the PROXY header")
        try:
            parsed = parse_header(data)
        except BadHeader as exc:
            return self._drop(fd, str(exc))
        if parsed is None:
            if len(data) >= PEEK:
                return self._drop(fd, "PROXY header too long")
            return
        length, client_ip = parsed
        self._release(fd)
        try:
            client.recv(length)  # exactly the header: the next byte is the client's first
        except OSError as exc:
            client.close()
            log.info("PROXY header read failed: %s", exc)
            return
        self.serve(client, client_ip)

    def _release(self, fd: int) -> socket.socket:
        client, timer = self.waiting.pop(fd)
        timer.cancel()
        self.loop.remove_reader(fd)
        return client

    def _drop(self, fd: int, why: str) -> None:
        if fd in self.waiting:
            log.info("closing connection on an accept-proxy listener: %s", why)
            self._release(fd).close()

    def close(self) -> None:
        self.loop.remove_reader(self.sock.fileno())
        for fd in list(self.waiting):
            self._release(fd).close()
        self.sock.close()
