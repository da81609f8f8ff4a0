"""L4 modes: ``reqMode=tcp`` and ``reqMode=sni`` listeners, one per ``srcPort``.

A tcp listener forwards the raw byte stream to its service's ``serviceName:port``.
An sni listener reads the TLS ClientHello without terminating it, takes the SNI name,
and passes the untouched stream (ClientHello included) to the service whose patterns
(``servicePath`` in sni mode, as in DFP) match, matched as its ``pathType`` says
(``req_ssl_sni -i -m beg|end|sub|reg|dom|str``, HAProxy's methods) or, without one, as
names (exact, ``*.`` and ``.`` suffixes); no match is answered with a TLS
unrecognized_name alert and a close.
An sni service whose srcPort is one of the proxy's own TLS ports gets no listener of
its own: that port's acceptor (acceptor.py) peeks the SNI and hands matching
connections over (``tls_sni``), terminating the rest itself.

Each connection is a tunnel.Tunnel from accept (the one HTTP upgrades use too): it
counts toward MAXCONN and MAXCONN_PER_IP, and the listeners pause with the others at
MAXCONN. A port's timeouts: the client's first bytes must arrive within timeoutClient,
the upstream connect within min(TIMEOUT_CONNECT, timeoutServer), and an established
tunnel closes after timeoutTunnel without a byte in either direction.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import Callable
from dataclasses import dataclass

from pyroute.dataplane.tunnel import NoTarget, Tunnel, TunnelEnd
from pyroute.listen import StartupError
from pyroute.patterns import compile_pattern
from pyroute.services import Destination, Service, parse_sni_type

log = logging.getLogger("pyroute.dataplane.l4")

MAX_CLIENT_HELLO = 16 * 1024 + 5 * 4  # a ClientHello spread over a few records at most
# A TLS alert record (TLS 1.0 record version, as servers answer a ClientHello they cannot
# place): fatal (2), unrecognized_name (112). The client learns at once that no one serves the name.
UNRECOGNIZED_NAME_ALERT = bytes((0x15, 0x03, 0x01, 0x00, 0x02, 0x02, 0x70))


# -- the ClientHello SNI parser -------------------------------------------------------------
class NotTls(ValueError):
    """The bytes are not a TLS ClientHello."""


def client_hello_sni(data: bytes) -> str | None:
    """The SNI host name in a ClientHello at the start of `data`.

    Returns None when more bytes are needed, "" when the ClientHello carries no SNI;
    raises NotTls for anything that is not a TLS handshake.
    """
    body = _hello_body(data)
    return None if body is None else _sni_in_hello(body)


def client_hello_alpn(data: bytes) -> tuple[bytes, ...]:
    """The ALPN protocols a complete ClientHello (client_hello_sni answered) offers."""
    body = _hello_body(data)
    if body is None:
        return ()
    try:
        pos = _extensions_start(body)
        if pos == len(body):
            return ()  # no extensions
        end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            if ext_type == 16:  # application_layer_protocol_negotiation
                protocols, p = [], pos + 2
                while p < pos + ext_len:
                    protocols.append(body[p + 1 : p + 1 + body[p]])
                    p += 1 + body[p]
                return tuple(protocols)
            pos += ext_len
        return ()
    except (IndexError, struct.error):
        return ()


def _extensions_start(body: bytes) -> int:
    pos = 2 + 32  # client_version, random
    pos += 1 + body[pos]  # session id
    pos += 2 + struct.unpack_from("!H", body, pos)[0]  # cipher suites
    return pos + 1 + body[pos]  # compression methods


def _hello_body(data: bytes) -> bytes | None:
    """The ClientHello message's body, reassembled from the handshake records at the start
    of `data`; None when more bytes are needed. Raises NotTls."""
    # Reassemble the handshake message from consecutive handshake records.
    handshake = bytearray()
    pos = 0
    need = None
    while need is None or len(handshake) < need:
        if len(data) < pos + 5:
            return None
        ctype, major, length = data[pos], data[pos + 1], struct.unpack_from("!H", data, pos + 3)[0]
        if ctype != 0x16 or major != 3 or length == 0 or length > 16384 + 2048:
            raise NotTls("not a TLS handshake record")
        if len(data) < pos + 5 + length:
            return None
        handshake += data[pos + 5 : pos + 5 + length]
        pos += 5 + length
        if need is None and len(handshake) >= 4:
            if handshake[0] != 1:
                raise NotTls("the first handshake message is not a ClientHello")
            need = 4 + int.from_bytes(handshake[1:4], "big")
            if need > MAX_CLIENT_HELLO:
                raise NotTls("ClientHello too large")
    return bytes(handshake[4:need])


def _sni_in_hello(body: bytes) -> str:
    try:
        pos = _extensions_start(body)
        if pos == len(body):
            return ""  # no extensions
        end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
        pos += 2
        while pos + 4 <= end:
            ext_type, ext_len = struct.unpack_from("!HH", body, pos)
            pos += 4
            if ext_type == 0:  # server_name
                names_end = pos + 2 + struct.unpack_from("!H", body, pos)[0]
                p = pos + 2
                while p + 3 <= names_end:
                    name_type, name_len = body[p], struct.unpack_from("!H", body, p + 1)[0]
                    if name_type == 0:
                        return body[p + 3 : p + 3 + name_len].decode("ascii").lower().rstrip(".")
                    p += 3 + name_len
                return ""
            pos += ext_len
        return ""
    except (IndexError, struct.error, UnicodeDecodeError):
        raise NotTls("malformed ClientHello") from None


def sni_matches(pattern: str, name: str) -> bool:
    """DFP sni patterns: exact name, "*.example.com" (any subdomain) or ".example.com" (suffix)."""
    pattern = pattern.lower()
    if pattern.startswith("*."):
        return name.endswith(pattern[1:])
    if pattern.startswith("."):
        return name.endswith(pattern) or name == pattern[1:]
    return name == pattern


def sni_matcher(path_type: str, patterns: tuple[str, ...]) -> Callable[[str], bool]:
    """name -> matches any of `patterns`, the way the destination's pathType says (HAProxy's
    `-m` methods; `-i` lower-cases; SNI names arrive lower-case already), else as DFP's names."""
    if not path_type.startswith(("req_ssl_sni", "req.ssl_sni")):
        return lambda name: any(sni_matches(p, name) for p in patterns)
    method, ignore_case = parse_sni_type(path_type)
    if method == "reg":
        regexes = tuple(compile_pattern(("(?i)" if ignore_case else "") + p) for p in patterns)
        return lambda name: any(r.search(name.encode()) for r in regexes)
    if method == "dom":  # a run of whole dot-delimited labels
        runs = tuple(f".{p.strip('.')}." for p in patterns)
        return lambda name: any(run in f".{name}." for run in runs)
    test = {"str": str.__eq__, "beg": str.startswith, "end": str.endswith, "sub": str.__contains__}[method]
    return lambda name: any(test(name, p) for p in patterns)


# -- per-port targets ------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class Target:
    """Where one service's tcp/sni destination sends its connections, with its timeouts."""

    service: str
    backend: object  # upstream.Backend
    matches: Callable[[str], bool] | None  # sni mode only: does an SNI name pick this target
    timeout_client: float
    timeout_connect: float
    timeout_tunnel: float


class Port:
    """What a tcp/sni listener currently forwards to; replaced whole on every snapshot."""

    def __init__(self, mode: str, targets: tuple[Target, ...]):
        self.mode = mode
        self.targets = targets
        # how long a client may stay silent before its ClientHello picked a target
        self.timeout_client = max(t.timeout_client for t in targets)

    def for_sni(self, name: str) -> Target | None:
        for target in self.targets:
            if target.matches(name):
                return target
        return None

    def pick(self, first_bytes: bytes) -> Target | None:
        """The target of a connection that sent `first_bytes` so far (tcp: its one target,
        whatever they are); None while an sni port needs more; raises NoTarget."""
        if self.mode == "tcp":
            return self.targets[0]
        try:
            name = client_hello_sni(first_bytes)
        except NotTls as exc:
            raise NoTarget(f"sni port: {exc}") from None
        if name is None:
            return None
        target = self.for_sni(name)
        if target is None:
            raise NoTarget(f"no sni service for {name!r}", UNRECOGNIZED_NAME_ALERT)
        return target


# -- the listeners ------------------------------------------------------------------------------
class TcpListeners:
    """Opens and closes one listener per tcp/sni srcPort as snapshots come and go."""

    def __init__(self, settings, loop: asyncio.AbstractEventLoop, make_backend: Callable[..., object],
                 listener: Callable, limit, reserved: set[int], tls_ports: set[int]):
        self.settings = settings
        self.loop = loop
        self.make_backend = make_backend
        self.listener = listener  # plane.Listener: (factory, host, port, what) -> a listener pausable at MAXCONN
        self.limit = limit  # the process's ClientLimit: every tunnel counts in it
        self.reserved = reserved  # the public HTTP/TLS ports: never taken by a tcp/sni service
        self.tls_ports = tls_ports  # ...except TLS ones by sni services, served through their acceptor
        self.tls_sni: dict[int, Port] = {}  # TLS port -> its sni services
        self.ports: dict[int, Port] = {}
        self.servers: dict = {}  # port -> plane.Listener
        self.tunnels: set[Tunnel] = set()
        self._sync: asyncio.Task | None = None

    def _target(self, service: Service, d: Destination) -> Target:
        s = self.settings
        return Target(
            service=service.name,
            backend=self.make_backend(d.outbound_hostname or service.name, d.port, service),
            matches=sni_matcher(d.path_type, d.paths) if d.req_mode == "sni" else None,
            timeout_client=d.timeout_client or s.timeout_client,
            timeout_connect=min(s.timeout_connect, d.timeout_server or s.timeout_connect),
            timeout_tunnel=d.timeout_tunnel or s.timeout_tunnel,
        )

    def apply(self, services: tuple[Service, ...]) -> None:
        """Point every tcp/sni port at its new targets; open and close listeners to match."""
        wanted: dict[int, tuple[str, list[Target]]] = {}
        on_tls: dict[int, list[Target]] = {}
        for service in services:
            for d in service.destinations:
                if d.req_mode == "http":
                    continue
                if d.req_mode == "sni" and d.src_port in self.tls_ports:
                    on_tls.setdefault(d.src_port, []).append(self._target(service, d))
                    continue
                if d.src_port in self.reserved or d.src_port == self.settings.port:
                    log.error("%s: srcPort %d is the admin port or a public HTTP/TLS port; its %s destination "
                              "is ignored", service.name, d.src_port, d.req_mode)
                    continue
                mode, targets = wanted.setdefault(d.src_port, (d.req_mode, []))
                if mode != d.req_mode or (mode == "tcp" and targets):
                    log.error("%s: srcPort %d is already a %s port of another service; ignored",
                              service.name, d.src_port, mode)
                    continue
                targets.append(self._target(service, d))
        self.ports = {port: Port(mode, tuple(targets)) for port, (mode, targets) in wanted.items()}
        self.tls_sni = {port: Port("sni", tuple(targets)) for port, targets in on_tls.items()}
        if self._sync is None or self._sync.done():
            self._sync = self.loop.create_task(self._sync_listeners())

    async def _sync_listeners(self) -> None:
        """Bind ports that gained a service, close ports that lost theirs (until nothing changes)."""
        while True:
            to_open = [p for p in self.ports if p not in self.servers]
            to_close = [p for p in self.servers if p not in self.ports]
            if not to_open and not to_close:
                return
            for port in to_close:
                self.servers.pop(port).close()
                log.info("tcp/sni listener on port %d closed", port)
            for port in to_open:
                try:
                    listener = self.servers[port] = self.listener(
                        lambda port=port: self.tunnel(self.ports.get(port)), self.settings.bind_address, port,
                        f"{self.ports[port].mode} srcPort")
                except StartupError as exc:  # a taken port fails that service's listener only
                    log.error("%s", exc)
                    self.ports.pop(port, None)
                    continue
                if not self.limit.full:  # (at MAXCONN it starts accepting when the limit has room)
                    await listener.serve()
                log.info("%s listener on port %d open", self.ports[port].mode, port)

    def tunnel(self, port: Port | None, client_ip: bytes = b"") -> TunnelEnd:
        """The protocol of a new tcp/sni client connection (`port` None: its service just went)."""
        return Tunnel(self.tunnels, self.limit, self.loop, port, client_ip).client

    def check_timeouts(self, now: float) -> None:
        for tunnel in list(self.tunnels):
            tunnel.check_timeout(now)

    def close(self) -> None:
        for server in self.servers.values():
            server.close()
        self.servers.clear()
        for tunnel in list(self.tunnels):
            tunnel.close()
