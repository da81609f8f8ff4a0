"""LISTENER_ADDRESS against a stand-in for Docker Flow Swarm Listener (support/listener.py):
retrying the initial get-services every RELOAD_INTERVAL with readiness held back until it
succeeds, REPEAT_RELOAD publishing only on change, and reload?fromListener=true."""
from __future__ import annotations

import pytest

from support.listener import ListenerStandIn
from support.upstream import wait_until


@pytest.fixture
def listener():
    stand_in = ListenerStandIn()
    yield stand_in
    stand_in.close()


def service(name: str, upstream, **extra) -> dict[str, str]:
    # what DFSL sends: the com.df.* labels plus serviceName, replicas and distribute
    return {"serviceName": name, "servicePath": f"/{name}", "port": str(upstream.port), "replicas": "1",
            "distribute": "true", **extra}


def revision(p) -> int:
    return p.admin("ping")[1]["Revision"]


def test_initial_fetch_retries_until_the_listener_answers_then_ready(make_pyroute, listener, dns, replicas):
    dns.set_service("lst-a", replicas[0].ip)
    dns.set_service("lst-b", replicas[1].ip)
    listener.services = [service("lst-a", replicas[0]), service("lst-b", replicas[1]),
                         service("lst-bad", replicas[1], servicePath="")]  # refused (409), logged
    listener.fail_next(3)
    p = make_pyroute(LISTENER_ADDRESS=listener.address, RELOAD_INTERVAL="100", SERVICE_NAME="lst-proxy-1")
    wait_until(lambda: p.admin("successfulinitreload")[0] == 200, timeout=10, what="ready")
    assert listener.count("/get-services") == 4  # three 500s, then the list
    for name, upstream in (("lst-a", replicas[0]), ("lst-b", replicas[1])):
        st, headers, _ = p.get(f"/{name}/hello")
        assert (st, headers["X-Upstream"]) == (200, upstream.addr)
    assert "lst-bad" not in p.admin("config", type="json")[1]
    assert '"event":"apply-list","changed":2' in p.log()  # one publication, one table swap
    assert "service refused: lst-bad" in p.log()
    # issue 17: listed with why (a deploy pipeline can fail on it), until the list drops it
    [entry] = p.admin("rejected")[1]["Rejected"]
    assert (entry["ServiceName"], entry["Source"], entry["Status"]) == ("lst-bad", "swarm listener", 409)


def test_not_ready_while_the_listener_is_unreachable(make_pyroute, dns):
    p = make_pyroute(LISTENER_ADDRESS="127.0.0.99:9", RELOAD_INTERVAL="50", SERVICE_NAME="lst-proxy-2")
    wait_until(lambda: p.log().count("swarm listener 127.0.0.99:9") >= 2, timeout=10, what="retries")
    assert p.admin("successfulinitreload")[0] == 503


def test_repeat_reload_publishes_only_when_something_changed(make_pyroute, listener, dns, replicas):
    dns.set_service("lst-r", replicas[2].ip)
    listener.services = [service("lst-r", replicas[2])]
    p = make_pyroute(LISTENER_ADDRESS=listener.address, RELOAD_INTERVAL="50", REPEAT_RELOAD="true",
                     SERVICE_NAME="lst-proxy-3")
    wait_until(lambda: p.admin("successfulinitreload")[0] == 200, timeout=10, what="ready")
    first = revision(p)
    seen = listener.count("/get-services")
    wait_until(lambda: listener.count("/get-services") >= seen + 5, timeout=10, what="five more fetches")
    assert revision(p) == first  # unchanged list: nothing published

    listener.services = [service("lst-r", replicas[2], servicePath="/lst-moved")]
    wait_until(lambda: p.get("/lst-moved/hello")[0] == 200, timeout=10, what="changed list applied")
    assert revision(p) > first
    assert p.get("/lst-r/hello")[0] == 503


def test_reload_from_listener_asks_it_to_resend(make_pyroute, listener, dns, replicas):
    listener.services = []
    p = make_pyroute(LISTENER_ADDRESS=listener.address, RELOAD_INTERVAL="50", SERVICE_NAME="lst-proxy-4")
    wait_until(lambda: p.admin("successfulinitreload")[0] == 200, timeout=10, what="ready")
    dns.set_service("lst-n", replicas[0].ip)
    listener.services = [service("lst-n", replicas[0], distribute="false"),
                         service("lst-nbad", replicas[0], distribute="false", pathType="hdr(host)")]
    listener.notify_url = f"http://127.0.0.1:{p.admin_port}/v1/docker-flow-proxy"
    st, body = p.admin("reload", fromListener="true")
    assert st == 200 and body["Status"] == "OK", body
    assert listener.count("/notify-services") == 1
    wait_until(lambda: p.get("/lst-n/hello")[0] == 200, timeout=10, what="re-sent service routed")
    # issue 17: the listener's reconfigure call that was refused is listed with why
    wait_until(lambda: p.admin("rejected")[1]["Rejected"], timeout=10, what="refused reconfigure listed")
    [entry] = p.admin("rejected")[1]["Rejected"]
    assert (entry["ServiceName"], entry["Source"], entry["Status"]) == ("lst-nbad", "reconfigure", 400)
    assert listener.refused == [("lst-nbad", 400)]
    assert "hdr(host)" in entry["Reason"] and "serviceHeader" in entry["Reason"]
    p.reconfigure(service("lst-nbad", replicas[0], distribute="false"))  # fixed: no longer listed
    assert p.admin("rejected")[1]["Rejected"] == []


def test_reload_from_listener_without_one_is_refused(proxy):
    st, body = proxy.admin("reload", fromListener="true")
    assert st == 400 and body["Status"] == "NOK" and "LISTENER_ADDRESS" in body["Message"]
