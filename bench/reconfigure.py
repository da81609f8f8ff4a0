"""How long one reconfigure blocks the event loop with many routes loaded (issue 14, F9).

In one process, as WORKERS=1 runs it: the real ServiceRegistry publishing to the real
DataPlane (route table build, swap, housekeeping). N services are loaded in one
publication, then changes are applied one at a time and each is timed from the
registry call to the state document's serialisation for the state file: everything a
change runs on the loop before requests are served again (the admin request's parsing
and the file write itself, done in a thread, are not included).
The data plane's share (route table build, swap, housekeeping) and the state file's
(the document StateFile.save writes) are shown apart from the registry's (validation,
content hash, log line). Then the first request per Host after the change is timed:
lazily built per-Host indexes are paid on the request path too.

    python -m bench.reconfigure [--routes 10000] [--changes 200] [--domains 0.1]   (from the repository root)
"""

from __future__ import annotations

import argparse
import asyncio
import random
import statistics
import time

from pyroute.config import Settings
from pyroute.dataplane.plane import DataPlane
from pyroute.process import LocalPlanes
from pyroute.services import ServiceDefaults
from pyroute.controlplane.registry import ServiceRegistry


def service_params(i: int, domains: float, rng: random.Random) -> dict[str, str]:
    params = {"serviceName": f"svc-{i}", "servicePath": f"/svc-{i}", "port": "8080"}
    if rng.random() < domains:
        params["serviceDomain"] = f"svc-{i % 50}.example.com"
    return params


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * p))]


async def run(routes: int, changes: int, domains: float) -> None:
    rng = random.Random(14)
    settings = Settings(dns_nameservers=("127.0.0.1:9",), default_ports=(), workers=1)
    plane = DataPlane(settings)
    plane.prepare()
    registry = ServiceRegistry(",", ServiceDefaults.from_settings(settings))
    planes = LocalPlanes(plane)
    applying: list[float] = []

    def publish(snapshot) -> None:  # the data plane's share of a change: table build and swap
        started = time.perf_counter()
        planes.publish(snapshot)
        applying.append(time.perf_counter() - started)
    registry.subscribe(publish)
    registry.upsert_many([service_params(i, domains, rng) for i in range(routes)])
    blocked, saving, first_request = [], [], []
    del applying[:]
    for n in range(changes):
        i = rng.randrange(routes)
        kind = n % 3
        started = time.perf_counter()
        if kind == 0:  # a replace that moves a path
            registry.reconfigure({"serviceName": f"svc-{i}", "servicePath": f"/moved-{n}", "port": "8080"})
        elif kind == 1:  # a removal
            registry.remove(f"svc-{i}")
        else:  # an add
            registry.reconfigure(service_params(routes + n, domains, rng))
        exporting = time.perf_counter()
        registry.export_json()  # what StateFile.save runs on the loop before its write thread
        saving.append(time.perf_counter() - exporting)
        blocked.append(time.perf_counter() - started)
        started = time.perf_counter()
        plane.proxy.table.match(b"svc-3.example.com", b"/svc-3/x")
        first_request.append(time.perf_counter() - started)
    ms = 1000
    print(f"{routes} routes, {changes} changes (replace/remove/add), {domains:.0%} with a serviceDomain")
    print(f"  whole change (loop blocked): median {statistics.median(blocked) * ms:.2f} ms, "
          f"p99 {percentile(blocked, 0.99) * ms:.2f} ms, max {max(blocked) * ms:.2f} ms")
    print(f"  of which the data plane:   median {statistics.median(applying) * ms:.2f} ms, "
          f"p99 {percentile(applying, 0.99) * ms:.2f} ms, max {max(applying) * ms:.2f} ms")
    print(f"  of which the state file:   median {statistics.median(saving) * ms:.2f} ms, "
          f"p99 {percentile(saving, 0.99) * ms:.2f} ms, max {max(saving) * ms:.2f} ms")
    print(f"  first request after it:     median {statistics.median(first_request) * ms:.3f} ms, "
          f"max {max(first_request) * ms:.3f} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routes", type=int, default=10000)
    parser.add_argument("--changes", type=int, default=200)
    parser.add_argument("--domains", type=float, default=0.1, help="fraction of services with a serviceDomain")
    args = parser.parse_args()
    asyncio.run(run(args.routes, args.changes, args.domains))


if __name__ == "__main__":
    main()
