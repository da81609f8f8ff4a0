"""Fixtures for the black-box suite: one DNS server and one upstream fleet per session,
one pyroute process per test module (its env from the module's PYROUTE_ENV), services
removed between tests. See tests/README.md."""
from __future__ import annotations

import pytest

from support.dns import SwarmDNS
from support.proxy import Pyroute
from support.upstream import Fleet

_live: list[Pyroute] = []


def pytest_configure(config):
    import sys, os
    sys.path.insert(0, os.path.dirname(__file__))


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    rep = outcome.get_result()
    if rep.failed:
        for p in _live:
            rep.sections.append((f"pyroute :{p.http_port} stderr (tail)", p.log()[-8000:] or "<empty>"))


@pytest.fixture(scope="session")
def dns():
    d = SwarmDNS().start()
    yield d
    d.stop()


@pytest.fixture(scope="session")
def fleet():
    f = Fleet()
    yield f
    f.close()


@pytest.fixture(scope="session")
def replicas(fleet):
    """Three replicas of one service: 127.0.0.11/.12/.13, same port."""
    return fleet.start_group(["127.0.0.11", "127.0.0.12", "127.0.0.13"])


@pytest.fixture(scope="session")
def alt(fleet):
    """Two more upstreams on a different port: 127.0.0.11/.14."""
    return fleet.start_group(["127.0.0.11", "127.0.0.14"])


@pytest.fixture(autouse=True)
def no_upstream_protocol_errors(request):
    """Fail any test after which an upstream saw a message h11 could not parse."""
    if "fleet" not in request.fixturenames:
        yield
        return
    f = request.getfixturevalue("fleet")
    f.clear()
    yield
    assert not f.protocol_errors, f"upstreams saw malformed requests: {f.protocol_errors}"


def start_pyroute(dns: SwarmDNS, **env) -> Pyroute:
    base = {"TIMEOUT_CONNECT": "1", "DNS_TTL_CAP": "0.5"}
    base.update(env)
    p = Pyroute(dns.nameserver, **base).start()
    _live.append(p)
    return p


def stop_pyroute(p: Pyroute):
    try:
        p.stop()
    finally:
        if p in _live:
            _live.remove(p)


@pytest.fixture(scope="module")
def _module_proxy(request, dns):
    env = getattr(request.module, "PYROUTE_ENV", {})
    p = start_pyroute(dns, **env)
    yield p
    stop_pyroute(p)


@pytest.fixture
def proxy(_module_proxy):
    """The module's pyroute; every service a test registered is removed afterwards."""
    p = _module_proxy
    assert p.alive(), f"pyroute died before the test:\n{p.log()}"
    yield p
    alive = p.alive()
    p.remove_all()
    assert alive, f"pyroute died during the test:\n{p.log()}"


@pytest.fixture
def make_pyroute(dns):
    """Factory for a private pyroute process (stopped at teardown)."""
    started = []

    def make(**env):
        p = start_pyroute(dns, **env)
        started.append(p)
        return p
    yield make
    for p in started:
        stop_pyroute(p)


@pytest.fixture
def artifacts(request):
    """A directory kept after the run for what a test leaves to look at (screenshots):
    $PYROUTE_TEST_ARTIFACTS/<test name>, by default build/test-artifacts/<test name> in the repo."""
    import os
    from pathlib import Path
    root = os.environ.get("PYROUTE_TEST_ARTIFACTS") or Path(__file__).resolve().parents[1] / "build" / "test-artifacts"
    path = Path(root) / request.node.name
    path.mkdir(parents=True, exist_ok=True)
    return path
