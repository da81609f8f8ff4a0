"""WORKERS=2: a control process and two SO_REUSEPORT workers behave as one proxy.

Each new client connection lands on either worker (the kernel hashes the 4-tuple), so
a batch of fresh connections reaches both; the worker pids come from /proc.
"""
import os
import signal
import threading

import pytest

from support.proxy import Pyroute, children
from support.upstream import wait_until

CONNECTIONS = 24  # fresh connections per check: both workers get some unless the hash is absurdly skewed


def worker_pids(p: Pyroute) -> set[int]:
    return set(children(p.proc.pid))


def statuses(p: Pyroute, path: str) -> list[int]:
    return [p.get(path)[0] for _ in range(CONNECTIONS)]


@pytest.fixture
def workers(dns, make_pyroute):
    p = make_pyroute(WORKERS="2")
    assert len(worker_pids(p)) == 2
    return p


def test_reconfigure_answers_once_every_worker_serves_it(workers, dns, replicas):
    u = replicas[0]
    for i in range(5):
        dns.set_service(f"wsvc{i}", u.ip)
        workers.reconfigure(serviceName=f"wsvc{i}", servicePath=f"/w{i}", port=u.port)
        # no wait: the 200 above means both workers already route /w{i}
        assert statuses(workers, f"/w{i}/hello") == [200] * CONNECTIONS
    workers.remove("wsvc0")
    assert statuses(workers, "/w0/hello") == [503] * CONNECTIONS


def test_a_killed_worker_is_replaced_with_the_current_table(workers, dns, replicas):
    u = replicas[1]
    dns.set_service("wkill", u.ip)
    workers.reconfigure(serviceName="wkill", servicePath="/wk", port=u.port)
    victim = min(worker_pids(workers))
    os.kill(victim, signal.SIGKILL)

    def replaced():
        pids = worker_pids(workers)
        return len(pids) == 2 and victim not in pids

    wait_until(replaced, timeout=5, what="a replacement worker")
    # the replacement serves the table it was given at start, and later changes too
    assert statuses(workers, "/wk/hello") == [200] * CONNECTIONS
    workers.reconfigure(serviceName="wkill2", servicePath="/wk2", port=u.port)
    dns.set_service("wkill2", u.ip)
    assert statuses(workers, "/wk2/hello") == [200] * CONNECTIONS


def test_sigterm_drains_in_flight_requests_and_exits_zero(workers, dns, replicas):
    u = replicas[2]
    dns.set_service("wdrain", u.ip)
    workers.reconfigure(serviceName="wdrain", servicePath="/wd", port=u.port)
    result = {}

    def slow_request():
        result["response"] = workers.get("/wd/slow/1", timeout=10)

    client = threading.Thread(target=slow_request)
    client.start()
    wait_until(lambda: u.requests("/wd/slow/1"), timeout=5, what="the slow request to reach the upstream")
    workers.proc.send_signal(signal.SIGTERM)
    client.join(10)
    assert result["response"][0] == 200 and result["response"][2] == b"slow done"
    assert workers.proc.wait(10) == 0
