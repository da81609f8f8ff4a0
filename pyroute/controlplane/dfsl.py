"""Docker Flow Swarm Listener compatibility (LISTENER_ADDRESS).

At start pyroute fetches ``GET http://<addr>:8080/v1/docker-flow-swarm-listener/get-services``
(a JSON array of reconfigure parameter maps), trying each address in turn every
RELOAD_INTERVAL ms until one answers, and applies the whole list in one publication, so
the data plane swaps one table rather than one per service. With REPEAT_RELOAD it keeps
fetching every interval and publishes only when an entry changed. Like DFP, a fetched
list adds or replaces services; removals arrive as the listener's remove calls.
``reload?fromListener=true`` asks each listener to re-send everything (notify-services).
An address may carry a port (``host:port``); DFP's 8080 otherwise.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import orjson

from pyroute.config import Settings
from pyroute.controlplane.peers import PEER_TIMEOUT, USER_AGENT, resolve_host
from pyroute.httpclient import HttpClientError, request
from pyroute.resolver import Resolver, ResolveError
from pyroute.controlplane.registry import ServiceRegistry

log = logging.getLogger("pyroute.controlplane.dfsl")

LISTENER_PORT = 8080
GET_SERVICES = "/v1/docker-flow-swarm-listener/get-services"
NOTIFY_SERVICES = "/v1/docker-flow-swarm-listener/notify-services"


def split_address(address: str) -> tuple[str, int]:
    host, colon, port = address.rpartition(":")
    if colon and port.isdigit() and host and not host.endswith(":"):
        return host.strip("[]"), int(port)
    return address, LISTENER_PORT


class ListenerClient:
    def __init__(self, settings: Settings, registry: ServiceRegistry, resolver: Resolver,
                 commit: Callable[[], Awaitable[None]]):
        self.addresses = settings.listener_address
        self.interval = settings.reload_interval / 1000
        self.repeat = settings.repeat_reload
        self.registry = registry
        self.resolver = resolver
        self.commit = commit
        self.fetched = False  # the first list has been applied (readiness)

    async def run(self) -> None:
        while True:
            try:
                if await self.fetch_once() and not self.repeat:
                    return
            except Exception:
                log.exception("applying the listener's services failed")
            await asyncio.sleep(self.interval)

    async def fetch_once(self) -> bool:
        """Fetch from the first address that answers and apply it; -> whether one answered."""
        for address in self.addresses:
            try:
                services = await self._get(address, GET_SERVICES)
                if not isinstance(services, list) or not all(isinstance(s, dict) for s in services):
                    raise HttpClientError("get-services did not answer a JSON array of objects")
            except (HttpClientError, ResolveError, orjson.JSONDecodeError) as exc:
                log.warning("swarm listener %s: %s", address, exc)
                continue
            items = [{str(k): str(v) for k, v in s.items()} for s in services]
            changed, errors = self.registry.upsert_many(items, source="swarm listener")
            for error in errors:
                log.error("swarm listener %s: service refused: %s", address, error)
            if changed:
                await self.commit()
            if not self.fetched:
                log.info("swarm listener %s: applied %d services (%d changed)", address, len(items), changed)
            self.fetched = True
            return True
        return False

    async def notify(self) -> list[str]:
        """Ask every listener to re-send its services; -> the addresses that failed, with why."""
        failed = []
        for address in self.addresses:
            try:
                await self._get(address, NOTIFY_SERVICES, parse=False)
            except (HttpClientError, ResolveError) as exc:
                failed.append(f"{address} ({exc})")
        return failed

    async def _get(self, address: str, path: str, parse: bool = True):
        host, port = split_address(address)
        ip = await resolve_host(self.resolver, host)
        status, body = await request((ip, port), "GET", path, host=f"{ip}:{port}", headers={"User-Agent": USER_AGENT},
                                     timeout=PEER_TIMEOUT)
        if status != 200:
            raise HttpClientError(f"{path} answered {status}")
        return orjson.loads(body) if parse else body
