"""Counters the data plane keeps, and what they become at scrape time.

The hot path only does plain integer increments on objects it already holds: a
ServiceStats per service (hung on every Route of that service, kept across route-table
swaps) and an AddressStats per (service, task address) hung on each upstream
connection. Everything else (the JSON snapshot a worker sends to the control process,
the merge across workers, Prometheus text, HAProxy-style CSV) happens when someone asks.

Recent traffic (latency percentiles of the last minute, rates of the last 15 minutes) is
latency.py's: each ServiceStats and AddressStats holds a latency.Recent the same
per-request call feeds, closed slot by slot by the data plane's tick (DataStats.rotate).

Health is passive: a task address is "up" after a connection to it succeeded and
"down" after one failed (refused, unreachable, connect timeout); each change is logged
once, as a structured line.
"""

from __future__ import annotations

import logging
import os
import time
from bisect import bisect_left, bisect_right

import orjson

from pyroute import latency
from pyroute.eventlog import event
from pyroute.resolver import is_ip

log = logging.getLogger("pyroute.dataplane.health")

# Upper bounds (seconds) of the request duration histogram buckets; +Inf is implicit.
DURATION_BOUNDS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
FIRST_BOUND = DURATION_BOUNDS[0]
METHOD_CLASSES = ("GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS")
UNROUTED = ""  # the service label of requests no route matched (or refused before routing)


def _duration_buckets() -> tuple[tuple[int, float], ...]:
    """Per latency bucket (latency.BOUNDS, then the bucket above them): the duration bucket
    of its durations and the DURATION_BOUNDS bound that splits it (inf: none), so that a
    request's one bisect gives both buckets. A latency bucket is 9% wide and duration bounds
    are twice as far apart or more: one bound at most falls inside."""
    out = []
    lower = float("-inf")
    for upper in (*latency.BOUNDS, float("inf")):
        inside = [bound for bound in DURATION_BOUNDS if lower < bound < upper]
        out.append((bisect_right(DURATION_BOUNDS, lower), inside[0] if inside else float("inf")))
        lower = upper
    return tuple(out)


LATENCY_BOUNDS = latency.BOUNDS
DURATION_OF_LATENCY = _duration_buckets()  # (first duration bucket, bound above which it is the next)


def method_class(method: str) -> str:
    return method if method in METHOD_CLASSES else "other"


class AddressStats:
    """Upstream connection counters and passive health for one task address of one service."""

    __slots__ = ("service", "address", "connects", "reuses", "failures", "retries", "timeouts", "health", "changed",
                 "recent", "connect", "connect_sum", "errors", "errors_counted")

    def __init__(self, service: str, address: str):
        self.service = service
        self.address = address
        self.connects = 0
        self.reuses = 0
        self.failures = 0
        self.retries = 0
        self.timeouts = 0
        self.health = "unknown"
        self.changed = 0.0  # wall-clock time of the last health change
        self.recent = latency.Recent()  # its requests' total durations, per slot
        self.errors = 0  # 5xx responses of requests sent to it
        self.errors_counted = 0  # ... up to the open slot
        self.connect = [0] * (len(DURATION_BOUNDS) + 1)  # new connections' connect time (histogram buckets)
        self.connect_sum = 0.0

    def connected(self, took: float) -> None:
        """A new connection opened, `took` seconds after the attempt began (TCP, and TLS if any)."""
        self.connects += 1
        self.connect[bisect_left(DURATION_BOUNDS, took)] += 1
        self.connect_sum += took
        if self.health != "up":
            self._set_health("up", "")

    def connect_failed(self, reason: str) -> None:
        self.failures += 1
        if self.health != "down":
            self._set_health("down", reason)

    def _set_health(self, health: str, reason: str) -> None:
        before = self.health
        self.health = health
        self.changed = time.time()
        event(log, "health", service=self.service, address=self.address, to=health, before=before, reason=reason)

    def to_json(self, slot: int) -> dict:
        return {"connects": self.connects, "reuses": self.reuses, "failures": self.failures,
                "retries": self.retries, "timeouts": self.timeouts, "health": self.health, "changed": self.changed,
                "connect": self.connect, "connect_sum": self.connect_sum,
                "recent": self.recent.to_json(slot, self.errors - self.errors_counted)}


class ServiceStats:
    """Request counters of one service (or of UNROUTED requests)."""

    __slots__ = ("name", "responses", "total", "total_sum", "upstream", "upstream_sum", "first_byte",
                 "first_byte_sum", "bytes_in", "bytes_out", "addresses", "recent", "errors_counted", "closed_at")

    def __init__(self, name: str):
        self.name = name
        self.responses: dict[bytes, dict[int, int]] = {}  # method -> status -> count; status 0 = no response
        self.total = [0] * (len(DURATION_BOUNDS) + 1)  # histogram buckets (not cumulative), last = +Inf
        self.total_sum = 0.0
        self.upstream = [0] * (len(DURATION_BOUNDS) + 1)
        self.upstream_sum = 0.0
        self.first_byte = [0] * (len(DURATION_BOUNDS) + 1)  # request sent upstream -> response head arrived
        self.first_byte_sum = 0.0
        self.bytes_in = 0
        self.bytes_out = 0
        self.addresses: dict[tuple[str, int], AddressStats] = {}
        self.recent = latency.Recent()  # total durations per slot, and 5xx per closed slot
        self.errors_counted = 0  # 5xx responses up to the open slot
        self.closed_at = 0  # requests counted (the sum of `total`) when the last slot closed

    def address(self, address: tuple[str, int]) -> AddressStats:
        stats = self.addresses.get(address)
        if stats is None:
            stats = self.addresses[address] = AddressStats(self.name, f"{address[0]}:{address[1]}")
        return stats

    def count(self, ex, status: int, now: float, received: int, sent: int) -> None:
        """One finished (or abandoned) exchange (exchange.Exchange), ended at `now`."""
        method = ex.method
        try:
            codes = self.responses[method]
        except KeyError:
            codes = self.responses[method] = {}
        codes[status] = codes.get(status, 0) + 1
        took = now - ex.started
        recent = bisect_left(LATENCY_BOUNDS, took)
        self.recent.counts[recent] += 1
        if took <= FIRST_BOUND:  # most requests: as cheap as it gets
            self.total[0] += 1
        else:
            bucket, split = DURATION_OF_LATENCY[recent]
            self.total[bucket if took <= split else bucket + 1] += 1
        self.total_sum += took
        address = ex.address
        if address is not None:
            task = self.addresses.get(address)
            if task is not None:
                task.recent.counts[recent] += 1
                if status >= 500:
                    task.errors += 1
        sent_at = ex.sent_at
        if sent_at:
            took = now - sent_at
            self.upstream[0 if took <= FIRST_BOUND else bisect_left(DURATION_BOUNDS, took)] += 1
            self.upstream_sum += took
            if ex.response_at:
                took = ex.response_at - sent_at
                self.first_byte[0 if took <= FIRST_BOUND else bisect_left(DURATION_BOUNDS, took)] += 1
                self.first_byte_sum += took
        self.bytes_in += received
        self.bytes_out += sent

    def count_refused(self, status: int) -> None:
        """A request refused before it was parsed whole: no method, no duration."""
        codes = self.responses.setdefault(b"", {})
        codes[status] = codes.get(status, 0) + 1
        self.total[0] += 1

    def errors(self) -> int:
        """5xx responses so far (what the error rate counts)."""
        return sum(n for codes in self.responses.values() for status, n in codes.items() if status >= 500)

    def close_slot(self, slot: int) -> None:
        """The open slot (number `slot`) ends, for the service and each of its tasks."""
        self.closed_at = sum(self.total)
        errors = self.errors()
        self.recent.close(slot, errors - self.errors_counted)
        self.errors_counted = errors
        for task in self.addresses.values():
            task.recent.close(slot, task.errors - task.errors_counted)
            task.errors_counted = task.errors

    def to_json(self, slot: int) -> dict:
        return {
            "responses": [[m.decode("latin-1"), s, n] for m, codes in self.responses.items() for s, n in codes.items()],
            "total": self.total, "total_sum": self.total_sum,
            "upstream": self.upstream, "upstream_sum": self.upstream_sum,
            "first_byte": self.first_byte, "first_byte_sum": self.first_byte_sum,
            "bytes_in": self.bytes_in, "bytes_out": self.bytes_out,
            "addresses": {a.address: a.to_json(slot) for a in self.addresses.values()},
            "recent": self.recent.to_json(slot, self.errors() - self.errors_counted),
        }


class DataStats:
    """Every counter of one data plane process, keyed by service name."""

    def __init__(self):
        self.services: dict[str, ServiceStats] = {}
        self.unrouted = ServiceStats(UNROUTED)
        self.reloads = 0
        self.slot = latency.slot_now()  # the wall-clock slot the counters' open slot belongs to

    def rotate(self) -> None:
        """Called by the data plane's tick: close the open slot once the clock has left it."""
        slot = latency.slot_now()
        if slot != self.slot:
            for stats in (self.unrouted, *self.services.values()):
                # Every count adds to `total`: when its sum has not moved, the service and its
                # tasks counted nothing in the slot, and there is nothing to close.
                if sum(stats.total) != stats.closed_at:
                    stats.close_slot(self.slot)
            self.slot = slot

    def service(self, name: str) -> ServiceStats:
        stats = self.services.get(name)
        if stats is None:
            stats = self.services[name] = ServiceStats(name)
        return stats

    def forget(self, names: set[str]) -> None:
        """Drop the counters of services that are no longer configured."""
        for name in names:
            self.services.pop(name, None)


def process_info(name: str) -> dict:
    """RSS and open file descriptors of this process, read from /proc."""
    rss = 0
    try:
        with open("/proc/self/statm") as fh:
            rss = int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        pass
    try:
        fds = len(os.listdir("/proc/self/fd"))
    except OSError:
        fds = 0
    return {"name": name, "pid": os.getpid(), "rss": rss, "fds": fds}


def snapshot(plane, name: str) -> dict:
    """One data plane's counters and route table as plain JSON data (what a worker sends)."""
    proxy = plane.proxy
    stats: DataStats = plane.stats
    connections = proxy.connections
    routes = []
    for route in proxy.table.routes:
        backend = route.backend
        d = route.destination
        tasks = getattr(backend, "tasks", None)  # balancer.TaskSet (discoveryType=DNS, sticky): its task addresses
        if tasks is not None:
            addresses = [f"{ip}:{port}" for ip, port in sorted(tasks)]
        else:
            ips = (backend.host,) if is_ip(backend.host) else backend.resolver.known(backend.host)
            addresses = [f"{ip}:{backend.port}" for ip in ips or ()]
        routes.append({
            "service": route.service.name, "index": d.index, "paths": list(d.paths), "domains": list(d.domains),
            "path_type": d.path_type, "domain_algo": route.service.domain_algo,
            "haproxy_backend": f"{route.service.acl_name}-be{d.port}_{d.index}",  # DFP's backend name
            "backend": f"{backend.host}:{backend.port}",
            "addresses": addresses,
        })
    process = process_info(name)
    process.update(revision=plane.revision, reloads=stats.reloads)
    services = {s.name: s.to_json(stats.slot) for s in [stats.unrouted, *stats.services.values()]}
    resolved: dict[str, set[str]] = {}
    for route in routes:
        resolved.setdefault(route["service"], set()).update(route["addresses"])
    for name, svc in services.items():  # a task no longer in DNS keeps its counters but has no health
        for address, a in svc["addresses"].items():
            a["resolved"] = address in resolved.get(name, ())
    return {
        "services": services,
        "connections": {
            "active": len(connections),
            "total": proxy.accepted,
            "bytes_in": proxy.closed_received + sum(c.received for c in connections),
            "bytes_out": proxy.closed_sent + sum(c.sent for c in connections),
        },
        "dns": {"lookups": plane.resolver.lookups, "failures": plane.resolver.failures},
        "routes": routes,
        "processes": [process],
    }


def _add_lists(a: list, b: list) -> list:
    return [x + y for x, y in zip(a, b)]


def merge(snapshots: list[dict]) -> dict:
    """Sum the counters of several processes; health: the most recent change wins."""
    out: dict = {"services": {}, "connections": {"active": 0, "total": 0, "bytes_in": 0, "bytes_out": 0},
                 "dns": {"lookups": 0, "failures": 0}, "routes": [], "processes": []}
    routes: dict[tuple[str, int], dict] = {}
    for snap in snapshots:
        for key in out["connections"]:
            out["connections"][key] += snap["connections"][key]
        for key in out["dns"]:
            out["dns"][key] += snap["dns"][key]
        out["processes"] += snap["processes"]
        for route in snap["routes"]:
            known = routes.setdefault((route["service"], route["index"]), {**route, "addresses": []})
            known["addresses"] = sorted(set(known["addresses"]) | set(route["addresses"]))
        for name, svc in snap["services"].items():
            have = out["services"].get(name)
            if have is None:
                out["services"][name] = orjson.loads(orjson.dumps(svc))  # a deep copy to add into
                continue
            counts = {(m, s): n for m, s, n in have["responses"]}
            for m, s, n in svc["responses"]:
                counts[(m, s)] = counts.get((m, s), 0) + n
            have["responses"] = [[m, s, n] for (m, s), n in counts.items()]
            for key in ("total", "upstream", "first_byte"):
                have[key] = _add_lists(have[key], svc[key])
            for key in ("total_sum", "upstream_sum", "first_byte_sum", "bytes_in", "bytes_out"):
                have[key] += svc[key]
            have["recent"] = latency.merge(have["recent"], svc["recent"])
            for address, a in svc["addresses"].items():
                mine = have["addresses"].get(address)
                if mine is None:
                    have["addresses"][address] = dict(a)
                    continue
                for key in ("connects", "reuses", "failures", "retries", "timeouts", "connect_sum"):
                    mine[key] += a[key]
                mine["connect"] = _add_lists(mine["connect"], a["connect"])
                mine["recent"] = latency.merge(mine["recent"], a["recent"])
                if a["changed"] > mine["changed"]:
                    mine["health"], mine["changed"] = a["health"], a["changed"]
                mine["resolved"] = mine.get("resolved", True) or a.get("resolved", True)
    out["routes"] = list(routes.values())
    return out


# -- Prometheus text exposition format (version 0.0.4) ---------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(**labels) -> str:
    return "{" + ",".join(f'{k}="{_escape(str(v))}"' for k, v in labels.items()) + "}"


def _number(value: float) -> str:
    return repr(float(value)) if isinstance(value, float) else str(value)


class _Writer:
    def __init__(self):
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str) -> None:
        self.lines.append(f"# HELP {name} {help_text}")
        self.lines.append(f"# TYPE {name} {kind}")

    def sample(self, name: str, value: float, **labels) -> None:
        self.lines.append(f"{name}{_labels(**labels) if labels else ''} {_number(value)}")

    def histogram(self, name: str, buckets: list[int], total: float, **labels) -> None:
        running = 0
        for bound, count in zip((*DURATION_BOUNDS, float("inf")), buckets):
            running += count
            le = "+Inf" if bound == float("inf") else repr(bound)
            self.sample(f"{name}_bucket", running, **labels, le=le)
        self.sample(f"{name}_count", running, **labels)
        self.sample(f"{name}_sum", total, **labels)


def render_prometheus(snap: dict, control: dict | None = None) -> bytes:
    """pyroute's families, the control plane's gauges (`control`: rejected services, shadowed
    routes), then haproxy_exporter's families computed from the same counters."""
    w = _Writer()
    services = snap["services"]
    w.family("pyroute_requests_total", "counter",
             "Requests by service (\"\" = no route), method class and status code (0 = no response: aborted)")
    for name, svc in services.items():
        counts: dict[tuple[str, int], int] = {}
        for method, status, n in svc["responses"]:
            key = (method_class(method), status)
            counts[key] = counts.get(key, 0) + n
        for (method, status), n in sorted(counts.items()):
            w.sample("pyroute_requests_total", n, service=name, method=method, code=status)
    for key, metric, what in (("total", "pyroute_request_duration_seconds", "from the first byte of the request "
                               "head to the last byte of the response"),
                              ("upstream", "pyroute_upstream_duration_seconds", "from sending the request upstream "
                               "to the end of the upstream's response"),
                              ("first_byte", "pyroute_upstream_first_byte_seconds", "from sending the request "
                               "upstream to its response head (time to first byte)")):
        w.family(metric, "histogram", f"Request duration by service, {what}")
        for name, svc in services.items():
            if any(svc[key]):
                w.histogram(metric, svc[key], svc[f"{key}_sum"], service=name)
    w.family("pyroute_upstream_connect_seconds", "histogram",
             "Time to open a new upstream connection (TCP, and TLS if any), per service and task address")
    for name, svc in services.items():
        for address, a in sorted(svc["addresses"].items()):
            if any(a["connect"]):
                w.histogram("pyroute_upstream_connect_seconds", a["connect"], a["connect_sum"],
                            service=name, address=address)
    for key, metric, what in (("bytes_in", "pyroute_service_received_bytes_total", "received from clients"),
                              ("bytes_out", "pyroute_service_sent_bytes_total", "sent to clients")):
        w.family(metric, "counter", f"Bytes {what} per service")
        for name, svc in services.items():
            w.sample(metric, svc[key], service=name)
    conns = snap["connections"]
    w.family("pyroute_client_received_bytes_total", "counter", "Bytes received from clients (all connections)")
    w.sample("pyroute_client_received_bytes_total", conns["bytes_in"])
    w.family("pyroute_client_sent_bytes_total", "counter", "Bytes sent to clients (all connections)")
    w.sample("pyroute_client_sent_bytes_total", conns["bytes_out"])
    w.family("pyroute_client_connections", "gauge", "Open client connections")
    w.sample("pyroute_client_connections", conns["active"])
    w.family("pyroute_client_connections_total", "counter", "Client connections accepted")
    w.sample("pyroute_client_connections_total", conns["total"])
    for key, help_text in (("connects", "New upstream connections opened"),
                           ("reuses", "Requests sent on a pooled (reused) upstream connection"),
                           ("failures", "Upstream connections that could not be opened (refused, timeout)"),
                           ("retries", "Requests retried after failing at this address (connect failure, or a pooled connection closed before any response byte)"),
                           ("timeouts", "Upstream responses that timed out (TIMEOUT_SERVER)")):
        metric = f"pyroute_upstream_{key}_total"
        w.family(metric, "counter", f"{help_text}, per service and task address")
        for name, svc in services.items():
            for address, a in sorted(svc["addresses"].items()):
                w.sample(metric, a[key], service=name, address=address)
    w.family("pyroute_upstream_up", "gauge",
             "Passive health per task address in DNS now: 1 after a successful connect, 0 after a failed one")
    for name, svc in services.items():
        for address, a in sorted(svc["addresses"].items()):
            if a["health"] != "unknown" and a.get("resolved", True):
                w.sample("pyroute_upstream_up", 1 if a["health"] == "up" else 0, service=name, address=address)
    w.family("pyroute_dns_lookups_total", "counter", "DNS lookups made")
    w.sample("pyroute_dns_lookups_total", snap["dns"]["lookups"])
    w.family("pyroute_dns_failures_total", "counter", "DNS lookups that failed")
    w.sample("pyroute_dns_failures_total", snap["dns"]["failures"])
    for key, kind, metric, help_text in (
        ("revision", "gauge", "pyroute_route_table_revision", "Revision of the route table each process serves"),
        ("reloads", "counter", "pyroute_route_table_reloads_total", "Route tables swapped in, per process"),
        ("rss", "gauge", "pyroute_process_resident_memory_bytes", "Resident memory per process"),
        ("fds", "gauge", "pyroute_process_open_fds", "Open file descriptors per process"),
    ):
        w.family(metric, kind, help_text)
        for process in snap["processes"]:
            if key in process:
                w.sample(metric, process[key], process=process["name"])
    if control is not None:
        w.family("pyroute_rejected_services", "gauge",
                 "Labelled services refused (Swarm labels, Swarm Listener): GET /v1/docker-flow-proxy/rejected says why")
        w.sample("pyroute_rejected_services", control.get("rejected", 0))
        w.family("pyroute_shadowed_routes", "gauge",
                 "Service paths that can never match: GET /v1/docker-flow-proxy/shadowed says which route catches them")
        w.sample("pyroute_shadowed_routes", control.get("shadowed", 0))
    _haproxy_exporter(w, snap)
    return ("\n".join(w.lines) + "\n").encode()


# -- haproxy_exporter's families (what DFP's /metrics served), from the same counters ----------
HAPROXY_FRONTEND = "services"  # DFP's HTTP/HTTPS frontend
RESPONSE_CLASSES = ("1xx", "2xx", "3xx", "4xx", "5xx", "other")


def _classes(responses) -> dict[str, int]:
    out = dict.fromkeys(RESPONSE_CLASSES, 0)
    for _, status, n in responses:
        out[f"{status // 100}xx" if 100 <= status < 600 else "other"] += n
    return out


def _haproxy_exporter(w: _Writer, snap: dict) -> None:
    """haproxy_exporter's names, types and labels (frontend; backend; backend + server), each
    family mapped from a pyroute counter as docs/reference.md ("haproxy_exporter names")
    tables. Counters pyroute does not keep (limits, rates, denials by rule, downtime) are
    left out rather than served as zeros, except the queue gauge, which is truly 0: pyroute
    does not queue requests."""
    services = snap["services"]
    conns = snap["connections"]
    everything = [r for svc in services.values() for r in svc["responses"]]
    routed = {name: svc for name, svc in services.items() if name != UNROUTED}
    backends: dict[str, str] = {}
    for route in snap["routes"]:
        backends.setdefault(route["service"], route.get("haproxy_backend", route["service"]))

    def family(scope: str, name: str, kind: str, help_text: str, samples) -> None:
        metric = f"haproxy_{scope}_{name}"
        w.family(metric, kind, help_text)
        for value, labels in samples:
            w.sample(metric, value, **labels)

    w.family("haproxy_up", "gauge", "Was the last scrape of haproxy successful (pyroute: always 1).")
    w.sample("haproxy_up", 1)
    fe = {"frontend": HAPROXY_FRONTEND}
    family("frontend", "current_sessions", "gauge", "Current number of active sessions.", [(conns["active"], fe)])
    family("frontend", "sessions_total", "counter", "Total number of sessions.", [(conns["total"], fe)])
    family("frontend", "connections_total", "counter", "Total number of connections.", [(conns["total"], fe)])
    family("frontend", "bytes_in_total", "counter", "Current total of incoming bytes.", [(conns["bytes_in"], fe)])
    family("frontend", "bytes_out_total", "counter", "Current total of outgoing bytes.", [(conns["bytes_out"], fe)])
    family("frontend", "http_requests_total", "counter", "Total HTTP requests.",
           [(sum(n for _, _, n in everything), fe)])
    family("frontend", "http_responses_total", "counter", "Total of HTTP responses.",
           [(n, {**fe, "code": code}) for code, n in _classes(everything).items()])
    family("frontend", "request_errors_total", "counter", "Total of request errors.",
           [(sum(n for _, status, n in services.get(UNROUTED, {"responses": []})["responses"]
                 if 400 <= status < 500), fe)])

    def per_backend(name: str, kind: str, help_text: str, value) -> None:
        family("backend", name, kind, help_text,
               [(value(svc), {"backend": backends.get(svc_name, svc_name)}) for svc_name, svc in routed.items()])

    per_backend("up", "gauge", "Current health status of the backend (1 = UP, 0 = DOWN).",
                lambda svc: int(not svc["addresses"] or any(a["health"] != "down" for a in svc["addresses"].values())))
    per_backend("current_queue", "gauge", "Current number of queued requests not assigned to any server.",
                lambda svc: 0)
    per_backend("sessions_total", "counter", "Total number of sessions.",
                lambda svc: sum(n for _, _, n in svc["responses"]))
    per_backend("bytes_in_total", "counter", "Current total of incoming bytes.", lambda svc: svc["bytes_in"])
    per_backend("bytes_out_total", "counter", "Current total of outgoing bytes.", lambda svc: svc["bytes_out"])
    per_backend("connection_errors_total", "counter", "Total of connection errors.",
                lambda svc: sum(a["failures"] for a in svc["addresses"].values()))
    per_backend("response_errors_total", "counter", "Total of response errors.",
                lambda svc: sum(a["timeouts"] for a in svc["addresses"].values()))
    per_backend("retry_warnings_total", "counter", "Total of retry warnings.",
                lambda svc: sum(a["retries"] for a in svc["addresses"].values()))
    family("backend", "http_responses_total", "counter", "Total of HTTP responses.",
           [(n, {"backend": backends.get(name, name), "code": code})
            for name, svc in routed.items() for code, n in _classes(svc["responses"]).items()])
    per_backend("http_total_time_average_seconds", "gauge",
                "Avg. HTTP total time (pyroute: since start, not over the last 1024 requests).",
                lambda svc: svc["total_sum"] / max(1, sum(svc["total"])))
    per_backend("http_response_time_average_seconds", "gauge",
                "Avg. HTTP response time (pyroute: since start, not over the last 1024 requests).",
                lambda svc: svc["upstream_sum"] / max(1, sum(svc["upstream"])))

    servers = [(name, address, a) for name, svc in routed.items() for address, a in sorted(svc["addresses"].items())]

    def per_server(metric: str, kind: str, help_text: str, value) -> None:
        family("server", metric, kind, help_text,
               [(value(a), {"backend": backends.get(name, name), "server": address}) for name, address, a in servers])

    per_server("up", "gauge", "Current health status of the server (1 = UP, 0 = DOWN).",
               lambda a: int(a["health"] != "down"))
    per_server("sessions_total", "counter", "Total number of sessions.", lambda a: a["connects"])
    per_server("server_selected_total", "counter",
               "Total number of times a server was selected, either for new sessions, or when re-dispatching.",
               lambda a: a["connects"] + a["reuses"])
    per_server("connection_errors_total", "counter", "Total of connection errors.", lambda a: a["failures"])
    per_server("response_errors_total", "counter", "Total of response errors.", lambda a: a["timeouts"])
    per_server("retry_warnings_total", "counter", "Total of retry warnings.", lambda a: a["retries"])
    per_server("check_failures_total", "counter",
               "Total number of failed health checks (pyroute: failed connects, its passive check).",
               lambda a: a["failures"])


def render_certificates(expiry: dict[str, float], orders: dict[str, int] | None) -> bytes:
    """The control plane's certificate metrics: each certificate's expiry (Unix time) and,
    with ACME on, this replica's finished orders by result."""
    w = _Writer()
    w.family("pyroute_certificate_expiry_timestamp_seconds", "gauge", "When each certificate expires (Unix time)")
    for name, when in sorted(expiry.items()):
        w.lines.append(f"pyroute_certificate_expiry_timestamp_seconds{_labels(name=name)} {_number(when)}")
    if orders is not None:
        w.family("pyroute_acme_orders_total", "counter", "ACME orders this replica finished, by result")
        for result, n in orders.items():
            w.sample("pyroute_acme_orders_total", n, result=result)
    return ("\n".join(w.lines) + "\n").encode()


# -- HAProxy's stats CSV (the columns that apply) ---------------------------------------------
CSV_COLUMNS = (
    "pxname", "svname", "qcur", "qmax", "scur", "smax", "slim", "stot", "bin", "bout", "dreq", "dresp", "ereq",
    "econ", "eresp", "wretr", "wredis", "status", "weight", "act", "bck", "chkfail", "chkdown", "lastchg",
    "downtime", "qlimit", "pid", "iid", "sid", "throttle", "lbtot", "tracked", "type", "rate", "rate_lim",
    "rate_max", "check_status", "check_code", "check_duration", "hrsp_1xx", "hrsp_2xx", "hrsp_3xx", "hrsp_4xx",
    "hrsp_5xx", "hrsp_other", "hanafail", "req_rate", "req_rate_max", "req_tot", "cli_abrt", "srv_abrt",
)


def render_csv(snap: dict) -> bytes:
    """One FRONTEND row, then per service its task addresses and a BACKEND row."""
    rows = []

    def row(**values) -> None:
        rows.append(",".join(str(values.get(c, "")) for c in CSV_COLUMNS))

    def classes(responses) -> dict:
        out = {"hrsp_1xx": 0, "hrsp_2xx": 0, "hrsp_3xx": 0, "hrsp_4xx": 0, "hrsp_5xx": 0, "hrsp_other": 0,
               "req_tot": 0, "cli_abrt": 0}
        for _, status, n in responses:
            key = f"hrsp_{status // 100}xx" if 100 <= status < 600 else "hrsp_other"
            out[key] += n
            out["req_tot"] += n
            if status == 0:
                out["cli_abrt"] += n
        return out

    services = snap["services"]
    everything = [r for svc in services.values() for r in svc["responses"]]
    conns = snap["connections"]
    row(pxname="services", svname="FRONTEND", scur=conns["active"], stot=conns["total"], bin=conns["bytes_in"],
        bout=conns["bytes_out"], status="OPEN", pid=os.getpid(), type=0, **classes(everything))
    for name, svc in services.items():
        if name == UNROUTED:
            continue
        up = 0
        for address, a in sorted(svc["addresses"].items()):
            status = {"up": "UP", "down": "DOWN"}.get(a["health"], "no check")
            up += a["health"] != "down"
            row(pxname=name, svname=address, stot=a["connects"], econ=a["failures"], wretr=a["retries"],
                eresp=a["timeouts"], status=status, weight=1, act=1, bck=0, type=2, lbtot=a["connects"] + a["reuses"],
                lastchg=int(time.time() - a["changed"]) if a["changed"] else "")
        counts = classes(svc["responses"])
        row(pxname=name, svname="BACKEND", bin=svc["bytes_in"], bout=svc["bytes_out"],
            stot=counts["req_tot"], status="UP" if up or not svc["addresses"] else "DOWN", act=up, type=1,
            econ=sum(a["failures"] for a in svc["addresses"].values()),
            wretr=sum(a["retries"] for a in svc["addresses"].values()), **counts)
    return ("# " + ",".join(CSV_COLUMNS) + "\n" + "\n".join(rows) + "\n").encode()
