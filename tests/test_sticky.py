"""sessionType=sticky-server: a cookie names the task by a stable identity (a hash of its
address), so scaling keeps sessions on surviving tasks and moves only those of removed ones."""
import hashlib

import pytest

from support.upstream import wait_until

PYROUTE_ENV = {"TASK_REFRESH_INTERVAL": "0.1"}


@pytest.fixture(scope="module")
def tasks5(fleet):
    return fleet.start_group([f"127.0.0.{n}" for n in range(41, 46)])


def deploy(proxy, dns, name, tasks, **params):
    dns.set(name, "127.0.0.99")  # the VIP: sticky sessions never use it
    dns.set(f"tasks.{name}", [t.ip for t in tasks])
    proxy.reconfigure(serviceName=name, servicePath=f"/{name}", port=tasks[0].port, sessionType="sticky-server",
                      **params)


def request(proxy, path, cookie=None):
    """-> (status, upstream, the Set-Cookie header or None, headers the upstream saw)."""
    st, h, _ = proxy.get(path, headers={"Cookie": cookie} if cookie else {})
    assert st == 200
    return h["X-Upstream"], h.get("Set-Cookie")


def sessions(proxy, path, name, tasks):
    """Open new sessions until there is one on every task: {upstream: cookie}."""
    found = {}
    for _ in range(4 * len(tasks)):
        upstream, set_cookie = request(proxy, path)
        assert set_cookie is not None and set_cookie.startswith(f"{name}=")
        found.setdefault(upstream, set_cookie.split(";")[0])
        if len(found) == len(tasks):
            return found
    raise AssertionError(f"sessions only on {found}")


def test_cookie_pins_the_task_and_is_set_only_when_missing(proxy, dns, tasks5):
    three = tasks5[:3]
    deploy(proxy, dns, "st-pin", three)
    wait_until(lambda: request(proxy, "/st-pin/x")[1] is not None, what="tasks known")
    found = sessions(proxy, "/st-pin/x", "st-pin", three)
    assert set(found) == {t.addr for t in three}
    for upstream, cookie in found.items():
        for _ in range(4):
            assert request(proxy, "/st-pin/x", f"other=1; {cookie}; x=y") == (upstream, None)
    # the identity is the task's address, not its place in the list
    t = three[1]
    want = hashlib.blake2s(f"{t.ip}:{t.port}".encode(), digest_size=8).hexdigest()
    assert found[t.addr] == f"st-pin={want}"


def test_scaling_keeps_sessions_on_surviving_tasks(proxy, dns, tasks5):
    three = tasks5[:3]
    deploy(proxy, dns, "st-scale", three)
    wait_until(lambda: request(proxy, "/st-scale/x")[1] is not None, what="tasks known")
    found = sessions(proxy, "/st-scale/x", "st-scale", three)

    dns.set("tasks.st-scale", [t.ip for t in tasks5])  # scale 3 -> 5
    wait_until(lambda: len(set(request(proxy, "/st-scale/x")[0] for _ in range(5))) == 5, timeout=5,
               what="new tasks in rotation")
    for upstream, cookie in found.items():
        assert request(proxy, "/st-scale/x", cookie) == (upstream, None)

    removed = three[0]
    survivors = [t for t in tasks5 if t is not removed]
    dns.set("tasks.st-scale", [t.ip for t in survivors])  # scale down: one original task goes
    wait_until(lambda: request(proxy, "/st-scale/x", found[removed.addr])[1] is not None, timeout=5,
               what="removed task's session moved")
    for upstream, cookie in found.items():
        got, set_cookie = request(proxy, "/st-scale/x", cookie)
        if upstream == removed.addr:
            assert got != removed.addr and set_cookie is not None  # moved, and told its new task
            assert request(proxy, "/st-scale/x", set_cookie.split(";")[0]) == (got, None)
        else:
            assert (got, set_cookie) == (upstream, None)


def test_reconfigure_keeps_sessions_and_cookie_name_is_configurable(proxy, dns, tasks5):
    two = tasks5[3:5]
    deploy(proxy, dns, "st-name", two, sessionCookie="SID")
    wait_until(lambda: request(proxy, "/st-name/x")[1] is not None, what="tasks known")
    found = sessions(proxy, "/st-name/x", "SID", two)
    # the service is redeployed with other options: a new table, the same sessions
    deploy(proxy, dns, "st-name", two, sessionCookie="SID", balance="leastconn")
    for upstream, cookie in found.items():
        assert request(proxy, "/st-name/x", cookie) == (upstream, None)
    # an unknown or foreign cookie value gets a fresh session
    upstream, set_cookie = request(proxy, "/st-name/x", "SID=0123456789abcdef")
    assert set_cookie.startswith("SID=") and set_cookie.split(";")[0] == found[upstream]
