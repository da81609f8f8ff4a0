"""Per-service limits that protect a service from its clients (issue 20).

A service with ``maxConn``, ``maxRequestsInFlight`` or ``rateLimit`` gets a :class:`Gate`
(one per service name, kept across route tables) and its routes a :class:`GatedBackend`,
whose ``address()`` is always None: every request of a limited service takes the
connection slow path (``ClientConnection._connect``), which asks the gate first. Routes
without limits never meet this module.

- ``rateLimit=R/s`` with ``rateLimitBurst=B``: a token bucket per client address
  (``Exchange.client_ip``, the address the access log shows: the trusted client address
  when the peer is in TRUSTED_PROXIES); an empty bucket is answered 429 with
  ``Retry-After`` and DFP's 429 page.
- ``maxRequestsInFlight=N``: requests of the service between admission and the end of
  their exchange.
- ``maxConn=N``: the same, per task address (the service address when Swarm's VIP
  balances). A request finding no room waits in a FIFO queue for up to TIMEOUT_QUEUE,
  then gets 503.

Every count is per pyroute process. With WORKERS=N each worker keeps its own: maxConn and
maxRequestsInFlight hold per worker (a service may see N times them), while the rate is
divided: each worker allows rateLimit/N and rateLimitBurst/N (rounded up), so a client
whose connections the kernel spreads over the workers gets about the configured rate
(one that keeps a single connection gets 1/N of it). See docs/reference.md.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque

from pyroute.services import Protection

MAX_CLIENTS = 65536  # token buckets kept per service; full ones are forgotten first


class LimitReached(Exception):
    """The gate answers the request itself: `status` (429 or 503), `retry_after` seconds."""

    def __init__(self, status: int, retry_after: int = 0):
        super().__init__(status)
        self.status = status
        self.retry_after = retry_after


class Slot:
    """A request's place in a gate, from admission to the end of its exchange."""

    __slots__ = ("gate", "address")

    def __init__(self, gate: Gate, address):
        self.gate = gate
        self.address = address

    def release(self) -> None:
        gate = self.gate
        if gate is None:
            return
        self.gate = None
        gate.in_flight -= 1
        count = gate.per_address.get(self.address, 1) - 1
        if count:
            gate.per_address[self.address] = count
        else:
            gate.per_address.pop(self.address, None)
        gate.wake()


class Gate:
    """The limits of one service in this process."""

    def __init__(self, protection: Protection, queue_timeout: float, loop: asyncio.AbstractEventLoop,
                 workers: int = 1):
        self.loop = loop
        self.workers = workers  # the rate is divided among the worker processes
        self.protection = protection
        self.queue_timeout = queue_timeout
        self.in_flight = 0
        self.per_address: dict = {}  # task address -> requests admitted to it now
        self.waiting: deque[asyncio.Future] = deque()
        self.buckets: dict[bytes, list[float]] = {}  # client address -> [tokens, stamp]

    def configure(self, protection: Protection, queue_timeout: float) -> None:
        """New limits from a reconfigure: counts and queues carry over."""
        if protection.rate != self.protection.rate or protection.burst != self.protection.burst:
            self.buckets.clear()
        self.protection = protection
        self.queue_timeout = queue_timeout
        while self.waiting:  # the limits may have grown: everyone in line looks again
            self.wake()

    # -- rateLimit -------------------------------------------------------------------
    def take_token(self, client: bytes) -> None:
        """One request of `client` against the rate; LimitReached(429) when its bucket is empty."""
        rate, burst = self._share()
        now = self.loop.time()
        bucket = self.buckets.get(client)
        if bucket is None:
            if len(self.buckets) >= MAX_CLIENTS:
                self._forget_full(now)
            bucket = self.buckets[client] = [float(burst), now]
        tokens = min(float(burst), bucket[0] + (now - bucket[1]) * rate)
        bucket[1] = now
        if tokens < 1.0:
            bucket[0] = tokens
            raise LimitReached(429, max(1, math.ceil((1.0 - tokens) / rate)))
        bucket[0] = tokens - 1.0

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled (their clients would start full anyway)."""
        rate, burst = self._share()
        full = [c for c, (tokens, stamp) in self.buckets.items() if tokens + (now - stamp) * rate >= burst]
        for client in full or list(self.buckets)[: len(self.buckets) // 2]:
            del self.buckets[client]

    def _share(self) -> tuple[float, int]:
        """This process's part of the rate and burst."""
        protection = self.protection
        return protection.rate / self.workers, math.ceil(protection.burst / self.workers)

    # -- maxRequestsInFlight, maxConn --------------------------------------------------
    async def admit(self, backend) -> Slot:
        """Wait (up to TIMEOUT_QUEUE) for room in the service and on a task; LimitReached(503) after."""
        deadline = self.loop.time() + self.queue_timeout
        first = True
        while True:
            if self.waiting and first:
                address = None  # others queued first: keep the order
            else:
                address = await self._room(backend)
            if address is not None:
                self.in_flight += 1
                self.per_address[address] = self.per_address.get(address, 0) + 1
                return Slot(self, address)
            left = deadline - self.loop.time()
            if left <= 0:
                raise LimitReached(503)
            waiter = self.loop.create_future()
            if first:
                self.waiting.append(waiter)
            else:
                self.waiting.appendleft(waiter)  # woken but beaten to the room: still first in line
            first = False
            try:
                await asyncio.wait_for(waiter, left)
            except asyncio.TimeoutError:
                raise LimitReached(503) from None
            finally:
                if waiter in self.waiting:
                    self.waiting.remove(waiter)

    async def _room(self, backend):
        """A task address with room for one more request, or None. The counts are read after
        the lookup's await, so admit() counts the request before anything else runs."""
        address = backend.address() or await backend.resolve()
        protection = self.protection
        if protection.max_in_flight and self.in_flight >= protection.max_in_flight:
            return None
        limit = protection.max_conn
        if not limit or self.per_address.get(address, 0) < limit:
            return address
        rotation = getattr(backend, "rotation", ())  # a TaskSet: another task may have room
        free = [t.address for t in rotation if self.per_address.get(t.address, 0) < limit]
        if not free:
            return None
        return min(free, key=lambda a: self.per_address.get(a, 0))

    def wake(self) -> None:
        """Room may have opened: the first request in line looks again."""
        while self.waiting:
            waiter = self.waiting.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return


class GatedBackend:
    """A limited service's backend: no address on the fast path, so every request passes
    its gate in ClientConnection._connect; the rest is the backend it wraps."""

    __slots__ = ("inner", "gate", "host", "port")

    def __init__(self, inner, gate: Gate):
        self.inner = inner
        self.gate = gate
        self.host = inner.host
        self.port = inner.port

    def address(self):
        return None

    async def resolve(self):
        return self.inner.address() or await self.inner.resolve()

    def redispatch(self, failed, tried):
        return self.inner.redispatch(failed, tried)

    def alternative(self, failed, tried=()):
        return self.inner.alternative(failed, tried)

    def __repr__(self) -> str:
        return f"{self.inner!r} (limited)"
