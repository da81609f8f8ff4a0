"""Talking to the other proxy replicas: the `tasks.<SERVICE_NAME>` lookup and the
distribute fan-out, over pyroute's own HTTP client (httpclient.py): one short request per
replica, the whole exchange bounded by PEER_TIMEOUT.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlencode

from pyroute.basicauth import authorization
from pyroute.httpclient import HttpClientError, request
from pyroute.resolver import Resolver, is_ip

log = logging.getLogger("pyroute.controlplane.peers")

PEER_TIMEOUT = 5.0  # seconds for one whole request to a peer or the listener
USER_AGENT = "pyroute-peer"
PEER_TOKEN_HEADER = "X-Pyroute-Peer-Token"  # PEER_TOKEN, sent only to the replicas tasks.<SERVICE_NAME> lists


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
                 credentials: tuple[str, str] | None = None, peer_token: str = ""):
        self.service_name = service_name
        self.peer_token = peer_token  # PEER_TOKEN: replicas know each other by it (certificate keys)
        self.port = port
        self.resolver = resolver
        self.timeout = timeout
        self.credentials = credentials  # the admin credentials: replicas require the same ones

    @property
    def _headers(self) -> dict[str, str]:
        headers = {"User-Agent": USER_AGENT}
        if self.credentials is not None:
            headers["Authorization"] = authorization(*self.credentials)
        if self.peer_token:
            headers[PEER_TOKEN_HEADER] = self.peer_token
        return headers

    async def addresses(self) -> tuple[str, ...]:
        """Every replica's IP (this one included). Raises resolver.ResolveError."""
        # Looked up afresh every time, as DFP does: a replica that just started or stopped
        # must be seen by the next fan-out, not after a cache expires.
        self.resolver.forget(set())
        return await self.resolver.resolve(f"tasks.{self.service_name}")

    async def request(self, address: str, method: str, target: str, body: bytes = b"") -> PeerResult:
        try:
            status, answer = await request((address, self.port), method, target, host=f"{address}:{self.port}",
                                           headers=self._headers, body=body, timeout=self.timeout)
        except HttpClientError as exc:
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

