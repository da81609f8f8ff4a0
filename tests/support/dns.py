"""An in-process DNS server that answers like Docker Swarm's embedded DNS.

- TTL 600 on every answer (what libnetwork serves), so a proxy that honours the TTL
  misses every change for ten minutes;
- ``<svc>`` and ``tasks.<svc>`` each answer one A record per replica;
- unknown names get NXDOMAIN; names can be switched to SERVFAIL, or blackholed (the
  question is logged with rcode "DROPPED" and never answered, as an unreachable server).
UDP and TCP on the same ephemeral port of 127.0.0.1.
"""
from __future__ import annotations

import threading
import time

from dnslib import QTYPE, RCODE, RR, A
from dnslib.dns import DNSError
from dnslib.server import BaseResolver, DNSLogger, DNSServer


class _Resolver(BaseResolver):
    def __init__(self, owner: "SwarmDNS"):
        self.owner = owner

    def resolve(self, request, handler):
        return self.owner._answer(request)


class SwarmDNS:
    TTL = 600

    def __init__(self, ttl: int = TTL):
        self.ttl = ttl
        self._lock = threading.Lock()
        self._records: dict[str, list[str]] = {}
        self._servfail: set[str] = set()
        self._blackholed: set[str] = set()
        self.queries: list[tuple[float, str, str, str]] = []  # (time, name, qtype, rcode)
        quiet = DNSLogger("-request,-reply,-truncated,-error,-recv,-send,-data", prefix=False)
        res = _Resolver(self)
        for _ in range(50):  # UDP port 0, then TCP on the same number (may be taken)
            self._udp = DNSServer(res, port=0, address="127.0.0.1", logger=quiet)
            self.port = self._udp.server.server_address[1]
            try:
                self._tcp = DNSServer(res, port=self.port, address="127.0.0.1", tcp=True, logger=quiet)
                break
            except OSError:
                self._udp.server.server_close()
        else:
            raise RuntimeError("no port free for both UDP and TCP")

    # -- lifecycle -------------------------------------------------------------
    def start(self) -> "SwarmDNS":
        self._udp.start_thread()
        self._tcp.start_thread()
        return self

    def stop(self) -> None:
        self._udp.stop()
        self._tcp.stop()

    @property
    def nameserver(self) -> str:
        return f"127.0.0.1:{self.port}"

    # -- records -----------------------------------------------------------------
    def set(self, name: str, ips: list[str] | str) -> None:
        if isinstance(ips, str):
            ips = [ips]
        with self._lock:
            self._records[name.lower()] = list(ips)
            self._servfail.discard(name.lower())

    def remove(self, name: str) -> None:
        with self._lock:
            self._records.pop(name.lower(), None)
            self._servfail.discard(name.lower())

    def servfail(self, name: str, on: bool = True) -> None:
        with self._lock:
            (self._servfail.add if on else self._servfail.discard)(name.lower())

    def blackhole(self, name: str, on: bool = True) -> None:
        """Questions for `name` get no answer at all (a DNS server that went away)."""
        with self._lock:
            (self._blackholed.add if on else self._blackholed.discard)(name.lower())

    def blackhole_service(self, svc: str, on: bool = True) -> None:
        self.blackhole(svc, on)
        self.blackhole(f"tasks.{svc}", on)

    def set_service(self, svc: str, ips: list[str] | str) -> None:
        """Like a Swarm service: ``svc`` and ``tasks.svc`` both list the replicas."""
        self.set(svc, ips)
        self.set(f"tasks.{svc}", ips)

    def remove_service(self, svc: str) -> None:
        self.remove(svc)
        self.remove(f"tasks.{svc}")

    def servfail_service(self, svc: str, on: bool = True) -> None:
        self.servfail(svc, on)
        self.servfail(f"tasks.{svc}", on)

    def queries_for(self, svc: str, since: float = 0.0, rcode: str | None = None):
        names = {svc.lower(), f"tasks.{svc}".lower()}
        return [q for q in list(self.queries)
                if q[1] in names and q[0] >= since and (rcode is None or q[3] == rcode)]

    # -- answering ---------------------------------------------------------------
    def _answer(self, request):
        reply = request.reply()
        name = str(request.q.qname).rstrip(".").lower()
        qtype = QTYPE[request.q.qtype]
        with self._lock:
            fail = name in self._servfail
            ips = self._records.get(name)
            dropped = name in self._blackholed
        if dropped:
            self.queries.append((time.monotonic(), name, qtype, "DROPPED"))
            raise DNSError(f"blackholed: {name}")  # dnslib's handler sends nothing back
        if fail:
            reply.header.rcode = RCODE.SERVFAIL
        elif ips is None:
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype == QTYPE.A:
            for ip in ips:
                reply.add_answer(RR(request.q.qname, QTYPE.A, rdata=A(ip), ttl=self.ttl))
        # other qtypes for a known name: NOERROR, no data (as Docker answers AAAA)
        self.queries.append((time.monotonic(), name, qtype, RCODE[reply.header.rcode]))
        return reply
