"""Service name -> addresses, through Docker's DNS, with pyroute's own cache.

Docker's embedded DNS answers with TTL 600 and c-ares caches answers per channel for
the full TTL, which would hide a redeploy or a scale change for ten minutes. So every
lookup runs on a fresh c-ares channel and pyroute caches the answer itself, for the
record TTL capped by DNS_TTL_CAP (default 5 s).

The hot path reads an entry the route's Backend keeps from :meth:`Resolver.current` until
the entry is due (no clock read: a timer marks it due once 3/4 of its life has passed, and
a newer answer marks the one it replaces). A due entry is refreshed in the background when
a request uses it, so busy routes never wait on DNS. Once a name has resolved, no request waits on DNS again: an
expired answer is still served at once while one background refresh per name runs
(a DNS server that stops answering would otherwise hold every request for the whole
lookup timeout each time the entry expires). A failed refresh keeps the last good
answer (stale-on-error) and is retried after a backoff that doubles up to DNS_TTL_CAP,
so a DNS hiccup never takes a working route down and a recovered server is seen as
soon as a change would be. Only a name that never resolved makes a request await
:meth:`Resolver.resolve` (shared by every request that asks at once, bounded by the
lookup timeout); it fails fast, for that route only, and is looked up again later.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import time
import weakref

import aiodns

log = logging.getLogger("pyroute.resolver")

REFRESH_AT = 0.75  # fraction of an entry's life after which a use triggers a background refresh
MIN_TTL = 1.0  # a record TTL below this (e.g. 0) is treated as this, so one name is not looked up per request
NEGATIVE_TTL = 1.0  # how long a failed lookup is remembered before a request may try again


class ResolveError(Exception):
    """The name has no usable address (NXDOMAIN, no A record, DNS unreachable) and none is cached."""


class _Entry:
    __slots__ = ("addresses", "due", "expires", "error", "failures", "__weakref__")

    def __init__(self, addresses: tuple[str, ...], life: float, error: str = "", failures: int = 0):
        self.addresses = addresses
        self.due = False  # REFRESH_AT of its life has passed: the next use starts a background refresh
        self.expires = time.monotonic() + life
        self.error = error
        self.failures = failures  # failed refreshes in a row since the last good answer (backoff)
        asyncio.get_running_loop().call_later(life * REFRESH_AT, _mark_due, weakref.ref(self))


def _mark_due(entry: weakref.ref) -> None:
    entry = entry()
    if entry is not None:  # (an entry replaced or forgotten meanwhile is gone)
        entry.due = True


def is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
        return True
    except ValueError:
        return False


class Resolver:
    def __init__(self, nameservers: tuple[str, ...], ttl_cap: float, timeout: float = 2.0):
        self.nameservers = list(nameservers)
        self.ttl_cap = ttl_cap
        self.timeout = timeout
        self._cache: dict[str, _Entry] = {}
        self._inflight: dict[str, asyncio.Future] = {}
        self.lookups = 0
        self.failures = 0

    def current(self, host: str) -> _Entry | None:
        """The entry with usable addresses for `host`, without waiting (stale ones included, a
        refresh is started for those), or None when the name never resolved: then await
        resolve(). A caller may keep it until it is `due`: that flag also marks an entry a
        newer answer replaced, or one forgotten."""
        entry = self._cache.get(host)
        if entry is None or not entry.addresses:
            return None
        if entry.due and host not in self._inflight:
            self._start_lookup(host)
        return entry

    def cached(self, host: str) -> tuple[str, ...] | None:
        """Usable addresses for `host` without waiting (see current), or None."""
        entry = self.current(host)
        return entry.addresses if entry is not None else None

    async def resolve(self, host: str) -> tuple[str, ...]:
        """Addresses for `host`: the cached ones, even expired, else the lookup's answer."""
        addresses = self.cached(host)
        if addresses is not None:
            return addresses
        entry = self._cache.get(host)
        if entry is not None and time.monotonic() < entry.expires:
            raise ResolveError(entry.error)  # a recent failure (negative cache)
        future = self._inflight.get(host) or self._start_lookup(host)
        return await asyncio.shield(future)

    def _start_lookup(self, host: str) -> asyncio.Future:
        future = asyncio.get_running_loop().create_future()
        self._inflight[host] = future
        task = asyncio.ensure_future(self._lookup(host, future))
        task.add_done_callback(lambda t: t.cancelled() or t.exception())  # never "exception never retrieved"
        future.add_done_callback(lambda f: f.cancelled() or f.exception())
        return future

    async def _lookup(self, host: str, future: asyncio.Future) -> None:
        self.lookups += 1
        try:
            addresses, ttl = await self._query(host)
        except Exception as exc:  # any DNS failure: keep the stale answer if there is one
            self.failures += 1
            reason = _describe(host, exc)
            stale = self._cache.get(host)
            if stale is not None and stale.addresses:
                log.warning("%s; keeping the last good answer %s", reason, ",".join(stale.addresses))
                failures = stale.failures + 1
                backoff = min(self.ttl_cap, NEGATIVE_TTL * 2 ** (failures - 1))  # until the next refresh may start
                self._replace(host, _Entry(stale.addresses, backoff / REFRESH_AT, failures=failures))
                future.set_result(stale.addresses)
            else:
                self._replace(host, _Entry((), min(self.ttl_cap, NEGATIVE_TTL), reason))
                future.set_exception(ResolveError(reason))
        else:
            self._replace(host, _Entry(addresses, min(self.ttl_cap, max(ttl, MIN_TTL))))
            future.set_result(addresses)
        finally:
            self._inflight.pop(host, None)

    def _replace(self, host: str, entry: _Entry | None) -> None:
        """Put (or, None, drop) the entry of `host`; the one it replaces turns due."""
        old = self._cache.pop(host, None)
        if old is not None:
            old.due = True
        if entry is not None:
            self._cache[host] = entry

    async def _query(self, host: str) -> tuple[tuple[str, ...], float]:
        # A fresh channel per lookup: the only way to bypass c-ares' answer cache (see module doc).
        channel = aiodns.DNSResolver(nameservers=self.nameservers, timeout=self.timeout, tries=2)
        try:
            result = await channel.query_dns(host, "A")
        finally:
            await channel.close()
        records = [rr for rr in result.answer if hasattr(rr.data, "addr")]
        if not records:
            raise ResolveError(f"{host}: no A record")
        addresses = tuple(sorted({rr.data.addr for rr in records}))
        return addresses, float(min(rr.ttl for rr in records))

    def known(self, host: str) -> tuple[str, ...]:
        """The last addresses looked up for `host`, fresh or not (for the stats page)."""
        entry = self._cache.get(host)
        return entry.addresses if entry is not None else ()

    def forget(self, keep: set[str]) -> None:
        """Drop every cached name but `keep`."""
        for host in [h for h in self._cache if h not in keep]:
            self._replace(host, None)

    def forget_host(self, host: str) -> None:
        """Drop a name no route dials any more (called as the route table changes)."""
        self._replace(host, None)


def _describe(host: str, exc: Exception) -> str:
    if isinstance(exc, ResolveError):
        return str(exc)
    if isinstance(exc, aiodns.error.DNSError) and len(exc.args) > 1:
        return f"{host}: DNS lookup failed: {exc.args[1]}"
    return f"{host}: DNS lookup failed: {exc!r}"


async def report_unreachable_dns(resolver: Resolver, name: str) -> bool:
    """Ask the DNS servers one question at start and log, once, when none can be reached:
    every service route would answer 503. Any answer (NXDOMAIN included) is fine; so is a
    timeout from a server that accepts a TCP connection on its port (Docker's resolver
    forwards names it does not know, and an upstream may be slow). -> True when reachable.
    Never raises: pyroute keeps serving either way."""
    channel = aiodns.DNSResolver(nameservers=resolver.nameservers, timeout=resolver.timeout, tries=1)
    try:
        await channel.query_dns(f"tasks.{name}", "A")
        return True
    except aiodns.error.DNSError as exc:
        code = exc.args[0] if exc.args else None
        if code not in (aiodns.error.ARES_ETIMEOUT, aiodns.error.ARES_ECONNREFUSED):
            return True
        reason = exc.args[1] if len(exc.args) > 1 else str(exc)
    except Exception:  # anything else is an answer of some kind, or not this check's business
        return True
    finally:
        await channel.close()
    if code == aiodns.error.ARES_ETIMEOUT:
        for server in resolver.nameservers:
            if await _accepts_tcp(server, resolver.timeout):
                return True
    log.error("the DNS server %s does not answer (%s): service names cannot be resolved and their routes "
              "answer 503 until it does. Set DNS_NAMESERVERS to a reachable server (inside a Swarm task that is "
              "Docker's 127.0.0.11; outside one, your network's resolver)", ",".join(resolver.nameservers), reason)
    return False


async def _accepts_tcp(server: str, timeout: float) -> bool:
    """Does host[:port] (default 53; "[v6]:port" too) accept a TCP connection?"""
    host, port = server, 53
    if server.startswith("["):
        host, _, rest = server[1:].partition("]")
        port = int(rest[1:]) if rest.startswith(":") else 53
    elif server.count(":") == 1:
        host, _, port_text = server.partition(":")
        port = int(port_text)
    try:
        _, writer = await asyncio.wait_for(asyncio.open_connection(host, port), timeout)
    except (OSError, asyncio.TimeoutError):
        return False
    writer.close()
    return True
