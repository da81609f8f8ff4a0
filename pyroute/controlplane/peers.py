"""Talking to the other proxy replicas (and the Swarm Listener): a small HTTP/1.1 client,
the `tasks.<SERVICE_NAME>` lookup, and the distribute fan-out.

Control-plane traffic only: one short request per connection (``Connection: close``),
the whole exchange bounded by a timeout, answers read whole and size-capped.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

import httptools

from pyroute.basicauth import authorization
from pyroute.resolver import Resolver, is_ip

log = logging.getLogger("pyroute.controlplane.peers")

PEER_TIMEOUT = 5.0  # seconds for one whole request to a peer or the listener
MAX_ANSWER = 64 * 1024 * 1024  # a state document with many certificates stays far below


class PeerError(Exception):
    """A request to a peer that got no HTTP answer (refused, timed out, garbled)."""


class _Answer:
    def __init__(self):
        self.body: list[bytes] = []
        self.size = 0
        self.done = False

    def on_body(self, body: bytes) -> None:
        self.size += len(body)
        if self.size > MAX_ANSWER:
            raise PeerError("answer too large")
        self.body.append(body)

    def on_message_complete(self) -> None:
        self.done = True


async def http_request(host: str, port: int, method: str, target: str, body: bytes = b"",
                       timeout: float = PEER_TIMEOUT, extra_headers: str = "") -> tuple[int, bytes]:
    """One HTTP/1.1 exchange -> (status, body); `extra_headers` are whole CRLF-ended lines.
    Raises PeerError."""
    try:
        async with asyncio.timeout(timeout):
            reader, writer = await asyncio.open_connection(host, port)
            try:
                head = (f"{method} {target} HTTP/1.1\r\nHost: {host}:{port}\r\nContent-Length: {len(body)}\r\n"
                        f"Connection: close\r\nUser-Agent: pyroute-peer\r\n{extra_headers}\r\n")
                writer.write(head.encode("latin-1") + body)
                answer = _Answer()
                parser = httptools.HttpResponseParser(answer)
                while not answer.done:
                    data = await reader.read(65536)
                    if not data:
                        break
                    parser.feed_data(data)
                if not answer.done:
                    raise PeerError("connection closed before the answer was complete")
                return parser.get_status_code(), b"".join(answer.body)
            finally:
                writer.close()
    except PeerError:
        raise
    except TimeoutError:
        raise PeerError(f"no answer within {timeout:g} s") from None
    except (OSError, httptools.HttpParserError) as exc:
        raise PeerError(str(exc) or type(exc).__name__) from None


@dataclass(frozen=True, slots=True)
class PeerResult:
    address: str
    status: int  # 0 when there was no HTTP answer
    body: bytes
    error: str = ""

    @property
    def ok(self) -> bool:
        return self.status == 200


class Peers:
    """The replicas of this proxy, as `tasks.<SERVICE_NAME>` lists them, on the admin PORT."""

    def __init__(self, service_name: str, port: int, resolver: Resolver, timeout: float = PEER_TIMEOUT,
                 credentials: tuple[str, str] | None = None):
        self.service_name = service_name
        self.port = port
        self.resolver = resolver
        self.timeout = timeout
        self.credentials = credentials  # the admin credentials: replicas require the same ones

    @property
    def _auth_header(self) -> str:
        if self.credentials is None:
            return ""
        return f"Authorization: {authorization(*self.credentials)}\r\n"

    async def addresses(self) -> tuple[str, ...]:
        """Every replica's IP (this one included). Raises resolver.ResolveError."""
        # Looked up afresh every time, as DFP does: a replica that just started or stopped
        # must be seen by the next fan-out, not after a cache expires.
        self.resolver.forget(set())
        return await self.resolver.resolve(f"tasks.{self.service_name}")

    async def request(self, address: str, method: str, target: str, body: bytes = b"") -> PeerResult:
        try:
            status, answer = await http_request(address, self.port, method, target, body, self.timeout,
                                                self._auth_header)
        except PeerError as exc:
            return PeerResult(address, 0, b"", str(exc))
        return PeerResult(address, status, answer)

    async def fan_out(self, method: str, path: str, params: Mapping[str, str], body: bytes = b"",
                      addresses: tuple[str, ...] | None = None) -> list[PeerResult]:
        """Send one admin call to every replica at once (DFP's distribute, in parallel).

        `params` go out as given plus ``distribute=false``, so the receivers apply the
        call locally. Raises resolver.ResolveError when the replicas cannot be listed.
        """
        if addresses is None:
            addresses = await self.addresses()
        query = {k: v for k, v in params.items() if k.lower() != "distribute"}
        query["distribute"] = "false"
        target = f"{path}?{urlencode(query)}"
        return list(await asyncio.gather(*(self.request(a, method, target, body) for a in addresses)))


async def resolve_host(resolver: Resolver, host: str) -> str:
    """An address to dial for `host` (an IP as is, a name through the resolver)."""
    if is_ip(host):
        return host
    addresses = await resolver.resolve(host)
    return addresses[0]

