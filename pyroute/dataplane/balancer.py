"""Task-level balancing: pyroute spreads a service's requests over its tasks itself.

Swarm's VIP balances per connection and knows nothing of health or sessions (and is
absent without IPVS). With ``discoveryType=DNS`` (or sticky sessions) a route's
backend is a :class:`TaskSet`: the addresses of ``tasks.<service>``, looked up on an
interval on a fresh c-ares channel each round (Docker answers with TTL 600, which
c-ares would otherwise serve from its cache), each address a :class:`Task` carrying
its requests in flight and its health. New tasks join the rotation at the next
lookup, removed ones leave it; requests already on a removed task finish there.

With the built-in Swarm listener the control plane also tells each set which of its
addresses belong to tasks that are not (or no longer) running (`exclude`): a task Swarm
is about to stop leaves the rotation the moment its desired state changes, before it
stops listening and before DNS drops it. Leaving is draining: no new request goes
there, requests in flight (and tunnels) finish, pooled idle connections are closed and
busy ones are closed when their response ends.

Picking is round-robin, least-connections or power-of-two-choices over the tasks in
rotation. In-flight counts come from :class:`TrackedConnection`, the upstream
connection class used only for task addresses, so routes without task balancing run
no extra code. TaskSets outlive route tables (a reconfigure keeps counts and health).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import random

import aiodns

from pyroute.dataplane.exchange import Exchange
from pyroute.dataplane.health import HealthMonitor, HealthPolicy
from pyroute.resolver import ResolveError
from pyroute.dataplane.routing import Route
from pyroute.dataplane.upstream import UpstreamConnection, UpstreamPool

log = logging.getLogger("pyroute.dataplane.balancer")

NO_ANSWER = (1, 4)  # aiodns: "no data" and NXDOMAIN mean the service has no task


def task_cookie(address: tuple[str, int]) -> str:
    """The sticky-session identity of a task: stable for its address, not its position."""
    return hashlib.blake2s(f"{address[0]}:{address[1]}".encode(), digest_size=8).hexdigest()


def sticky_cookie(name: bytes, address: tuple[str, int]) -> bytes:
    """The Set-Cookie header line that pins a client to the task at `address`."""
    return b"Set-Cookie: %s=%s; Path=/; HttpOnly\r\n" % (name, task_cookie(address).encode())


def _load(task: Task) -> int:
    return task.inflight


class Task:
    """One task address with its load and health."""

    __slots__ = ("address", "cookie", "inflight", "in_rotation", "fails", "passes", "gone", "joined")

    def __init__(self, address: tuple[str, int], joined: float = float("-inf")):
        self.address = address
        self.joined = joined  # loop time it joined a running set (slowStart ramps from there)
        self.cookie = task_cookie(address)
        self.inflight = 0  # requests bound to a connection to this task now
        self.in_rotation = True
        self.fails = 0  # consecutive failures (connect, 5xx, probe)
        self.passes = 0  # consecutive passed probes while ejected
        self.gone = False

    def __repr__(self) -> str:
        return f"{self.address[0]}:{self.address[1]}"


class TrackedConnection(UpstreamConnection):
    """An upstream connection to a task: counts the exchange bound to it and reports 5xx."""

    __slots__ = ("task", "taskset", "counted")

    def __init__(self, pool: UpstreamPool, address: tuple[str, int], stats, task: Task, taskset: TaskSet):
        super().__init__(pool, address, stats)
        self.task = task
        self.taskset = taskset
        self.counted = False

    def bind(self, owner, exchange: Exchange, now: float) -> None:
        super().bind(owner, exchange, now)
        if not self.counted:
            self.counted = True
            self.task.inflight += 1

    def _uncount(self) -> None:
        if self.counted:
            self.counted = False
            self.task.inflight -= 1

    def close(self) -> None:
        self._uncount()
        super().close()

    def abort(self) -> None:
        self._uncount()
        super().abort()

    def connection_lost(self, exc) -> None:
        self._uncount()
        super().connection_lost(exc)

    def _complete(self, reusable: bool) -> None:
        self._uncount()
        super()._complete(reusable and not self.task.gone)  # a draining task's connection is not pooled

    def on_headers_complete(self) -> None:
        status = self.parser.get_status_code()
        if status >= 500:
            self.taskset.failed(self.task, f"answered {status}")
        elif status >= 200:
            self.task.fails = 0
        super().on_headers_complete()  # (last: a 503 the owner retries ends the parsing there)


class Sticky:
    """Cookie affinity for one route: the cookie names a task by its stable identity.

    A request whose cookie names a task in rotation goes to that task; any other
    request is balanced as usual and its response sets the cookie of the task chosen
    (the route variant's `set_cookie`, bound to the exchange when it is routed).
    """

    __slots__ = ("route", "taskset", "name", "prefix", "fresh", "_pinned")

    def __init__(self, route: Route, taskset: TaskSet, name: str):
        self.route = route
        self.taskset = taskset
        self.name = name.encode()
        self.prefix = self.name + b"="
        self.fresh = StickyRoute(route, taskset, self.name)
        self._pinned: dict[str, StickyRoute] = {}

    def route_for(self, headers: list[tuple[bytes, bytes]]) -> Route:
        """The route variant for a request: pinned to its task, or balanced and setting the cookie."""
        value = None
        prefix = self.prefix
        for name, header in headers:
            if len(name) == 6 and name.lower() == b"cookie":
                for item in header.split(b";"):
                    item = item.strip()
                    if item.startswith(prefix):
                        value = item[len(prefix):].decode("latin-1")
        if value is None:
            return self.fresh
        task = self.taskset.by_cookie.get(value)
        if task is None or not task.in_rotation:
            return self.fresh
        pinned = self._pinned.get(value)
        if pinned is None or pinned.backend.task is not task:
            if len(self._pinned) > 4 * len(self.taskset.tasks) + 16:
                self._pinned.clear()  # tasks came and went: forget the variants of old ones
            pinned = self._pinned[value] = StickyRoute(self.route, PinnedBackend(self.taskset, task), None)
        return pinned


class StickyRoute(Route):
    """A route variant used for one request of a sticky route."""

    __slots__ = ("set_cookie",)

    def __init__(self, route: Route, backend, set_cookie: bytes | None):
        super().__init__(route.service, route.destination, backend, route.priority, route.stats)
        self.set_cookie = set_cookie  # cookie name to set on the response, None when the client has it


class PinnedBackend:
    """A task of a sticky session; the rest of the set if it left the rotation meanwhile."""

    __slots__ = ("taskset", "task", "host", "port")

    def __init__(self, taskset: TaskSet, task: Task):
        self.taskset = taskset
        self.task = task
        self.host = taskset.host
        self.port = taskset.port

    def address(self) -> tuple[str, int] | None:
        if self.task.in_rotation:
            return self.task.address
        return self.taskset.address()

    async def resolve(self) -> tuple[str, int]:
        if self.task.in_rotation:
            return self.task.address
        return await self.taskset.resolve()

    def redispatch(self, failed: tuple[str, int], tried: tuple) -> tuple[str, int] | None:
        return self.taskset.redispatch(failed, tried)

    def alternative(self, failed: tuple[str, int], tried: tuple = ()) -> tuple[str, int] | None:
        return self.taskset.alternative(failed, tried)


class TaskSet:
    """The tasks of one service port (``tasks.<host>``), refreshed on an interval, balanced.

    `settings` gives the lookups (DNS_NAMESERVERS, DNS_TIMEOUT, TASK_REFRESH_INTERVAL) as
    they are when the set is made; a set lives as long as its route's options stay."""

    def __init__(self, host: str, port: int, algorithm: str, settings, pool: UpstreamPool, health: HealthPolicy,
                 known: set[tuple[str, int]] | None = None, slow_start: float = 0.0):
        self.host, self.port, self.algorithm, self.pool = host, port, algorithm, pool
        self.slow_start = slow_start  # seconds over which a new task's share ramps up to a full one
        self.warming: tuple[Task, ...] = ()  # tasks still ramping up
        self.nameservers = list(settings.dns_nameservers)
        self.dns_timeout = settings.dns_timeout
        self.refresh_interval = settings.task_refresh_interval
        self.tasks: dict[tuple[str, int], Task] = {}
        self.by_cookie: dict[str, Task] = {}
        self.rotation: tuple[Task, ...] = ()
        self.ready = asyncio.Event()  # the first lookup is done (with or without tasks)
        self.error = ""
        self.excluded: frozenset[str] = frozenset()  # task IPs the Swarm says are not running
        self._wake = asyncio.Event()  # look up now (a task may have started running)
        self._turn = 0
        self._pick = {"roundrobin": self._round_robin, "leastconn": self._least_connections,
                      "p2c": self._two_choices}[algorithm]
        self.health = HealthMonitor(self, health)
        if known:  # the addresses a set it replaces already found: no gap while the first lookup runs
            self.apply(known)
            self.ready.set()
        self._task = asyncio.get_running_loop().create_task(self._refresh_loop())

    # -- choosing a task (the hot path) ------------------------------------------------
    def address(self) -> tuple[str, int] | None:
        """A task address to dial now, or None before the first lookup (then await resolve())."""
        rotation = self.rotation
        if not rotation:
            return None
        task = self._pick(rotation)
        if self.warming:
            task = self._ramp(task, rotation)
        return task.address

    def _ramp(self, task: Task, rotation) -> Task:
        """slowStart: a task that joined `age` seconds ago keeps a pick with probability
        age/slowStart; otherwise another task in rotation takes it."""
        age = asyncio.get_running_loop().time() - task.joined
        if age >= self.slow_start:
            if task in self.warming:
                self.warming = tuple(t for t in self.warming if t is not task)
            return task
        if random.random() * self.slow_start < age:
            return task
        others = [t for t in rotation if t is not task and t not in self.warming] or \
            [t for t in rotation if t is not task]
        return random.choice(others) if others else task

    async def resolve(self) -> tuple[str, int]:
        if not self.ready.is_set():
            try:
                await asyncio.wait_for(self.ready.wait(), self.dns_timeout * 2 + 1)
            except asyncio.TimeoutError:
                pass
        rotation = self.rotation or tuple(self.tasks.values())  # all ejected: try them anyway
        if not rotation:
            raise ResolveError(self.error or f"tasks.{self.host}: no task")
        return self._pick(rotation).address

    def redispatch(self, failed: tuple[str, int], tried: tuple) -> tuple[str, int] | None:
        """A connect to `failed` did not succeed: count it, and name another task to try."""
        task = self.tasks.get(failed)
        if task is not None:
            self.failed(task, "connect failed")
        return self.alternative(failed, tried)

    def alternative(self, failed: tuple[str, int], tried: tuple = ()) -> tuple[str, int] | None:
        """The least busy task in rotation other than `failed` and `tried` (for a retry), or
        None when there is none (then the set's own pick decides). The turn order is left alone."""
        others = [t for t in self.rotation if t.address != failed and t.address not in tried]
        if not others:
            return None
        return min(others, key=_load).address

    def _round_robin(self, rotation) -> Task:
        self._turn += 1
        return rotation[self._turn % len(rotation)]

    def _least_connections(self, rotation) -> Task:
        self._turn += 1
        n = len(rotation)
        start = self._turn % n  # ties go round-robin
        best = rotation[start]
        for i in range(1, n):
            task = rotation[(start + i) % n]
            if task.inflight < best.inflight:
                best = task
        return best

    def _two_choices(self, rotation) -> Task:
        if len(rotation) == 1:
            return rotation[0]
        a, b = random.sample(rotation, 2)
        return a if a.inflight <= b.inflight else b

    # -- health ---------------------------------------------------------------------------
    def failed(self, task: Task, why: str) -> None:
        task.fails += 1
        task.passes = 0
        if task.in_rotation and task.fails >= self.health.policy.fall:
            self.eject(task, why)

    def eject(self, task: Task, why: str) -> None:
        if task.in_rotation and not task.gone:
            task.in_rotation = False
            log.warning("%s: task %s leaves the rotation (%s, %d in a row)", self.host, task, why, task.fails)
            self._rebuild()

    def restore(self, task: Task) -> None:
        if not task.in_rotation and not task.gone:
            task.in_rotation = True
            task.fails = 0
            log.warning("%s: task %s is back in the rotation", self.host, task)
            self._rebuild()

    def _rebuild(self) -> None:
        self.rotation = tuple(t for t in self.tasks.values() if t.in_rotation)
        if self.slow_start:
            now = asyncio.get_running_loop().time()
            self.warming = tuple(t for t in self.rotation if now - t.joined < self.slow_start)

    # -- discovery ------------------------------------------------------------------------
    async def _refresh_loop(self) -> None:
        self.health.start()
        while True:
            await self.refresh()
            self.ready.set()
            self._wake.clear()
            try:
                await asyncio.wait_for(self._wake.wait(), self.refresh_interval)
            except asyncio.TimeoutError:
                pass

    async def refresh(self) -> None:
        """Look up tasks.<host> once (fresh channel: no c-ares cache) and apply the answer."""
        name = f"tasks.{self.host}"
        channel = aiodns.DNSResolver(nameservers=self.nameservers, timeout=self.dns_timeout, tries=2)
        try:
            result = await channel.query_dns(name, "A")
            ips = {rr.data.addr for rr in result.answer if hasattr(rr.data, "addr")}
        except aiodns.error.DNSError as exc:
            if exc.args and exc.args[0] in NO_ANSWER:
                ips = set()
            else:  # DNS trouble: keep the tasks we know
                self.error = f"{name}: DNS lookup failed: {exc.args[-1] if exc.args else exc}"
                log.warning("%s; keeping %d known tasks", self.error, len(self.tasks))
                return
        finally:
            await channel.close()
        self.error = "" if ips else f"{name}: no task"
        self.apply({(ip, self.port) for ip in ips})

    def exclude(self, ips) -> None:
        """The Engine API's word on this service's tasks: `ips` are addresses of tasks that are
        not running or are being stopped. They leave (drain) now; a lookup follows at once,
        so a task that started running joins without waiting for the refresh interval."""
        excluded = frozenset(ips)
        if excluded == self.excluded:
            return
        self.excluded = excluded
        draining = [a for a in self.tasks if a[0] in excluded]
        if draining:
            log.info("%s: draining %s (stopping in Swarm)", self.host, ", ".join(f"{ip}:{port}" for ip, port in draining))
            self.apply(set(self.tasks))
        self._wake.set()

    def apply(self, addresses: set[tuple[str, int]]) -> None:
        """Make `addresses` the task set: new ones join, missing ones leave (in-flight requests finish)."""
        if self.excluded:
            addresses = {a for a in addresses if a[0] not in self.excluded}
        if addresses == self.tasks.keys():
            return
        joined = asyncio.get_running_loop().time() if self.slow_start and self.ready.is_set() else float("-inf")
        for address in addresses - self.tasks.keys():
            task = self.tasks[address] = Task(address, joined)
            self.by_cookie[task.cookie] = task
            self.pool.connection_factories[address] = self._factory(task)
        for address in self.tasks.keys() - addresses:
            task = self.tasks.pop(address)
            task.gone = True
            task.in_rotation = False
            self.by_cookie.pop(task.cookie, None)
            self._release(address)
        log.info("%s: tasks %s", self.host, ", ".join(sorted(str(t) for t in self.tasks.values())) or "none")
        self._rebuild()

    def _factory(self, task: Task):
        def make(pool: UpstreamPool, address: tuple[str, int], stats) -> TrackedConnection:
            return TrackedConnection(pool, address, stats, task, self)

        make.taskset = self
        return make

    def close(self) -> None:
        self._task.cancel()
        self.health.stop()
        for address in list(self.tasks):
            self._release(address)

    def _release(self, address: tuple[str, int]) -> None:
        """Stop making connections for `address` and close our idle ones (their counts are ours)."""
        factory = self.pool.connection_factories.get(address)
        if getattr(factory, "taskset", None) is self:
            del self.pool.connection_factories[address]
        idle = self.pool.idle.get(address)
        if idle:
            ours = [c for c in idle if getattr(c, "taskset", None) is self]
            idle[:] = [c for c in idle if c not in ours]
            for conn in ours:
                conn.close()

    def __repr__(self) -> str:
        return f"tasks.{self.host}:{self.port}"
