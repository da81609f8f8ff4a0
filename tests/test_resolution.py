"""Service resolution through the Swarm-like DNS (TTL 600 served, DNS_TTL_CAP=0.5)."""
import time

from support.upstream import wait_until

PYROUTE_ENV = {"DNS_TTL_CAP": "0.5"}


def who(proxy, path):
    st, h, _ = proxy.get(path)
    return st, h.get("X-Upstream")


def test_dns_change_seen_after_cap_despite_ttl_600(proxy, dns, replicas):
    a, b = replicas[0], replicas[1]
    dns.set_service("res-move", a.ip)
    proxy.reconfigure(serviceName="res-move", servicePath="/res-move", port=a.port)
    assert who(proxy, "/res-move/x") == (200, a.addr)
    dns.set_service("res-move", b.ip)   # "the task moved"; the old answer said TTL 600
    seen = []

    def moved():
        r = who(proxy, "/res-move/x")
        seen.append(r)
        return r == (200, b.addr)
    wait_until(moved, timeout=5, interval=0.05, what="the new address after DNS_TTL_CAP")
    # every answer on the way was a success from one of the two addresses
    assert all(r in ((200, a.addr), (200, b.addr)) for r in seen), seen


def test_scale_up_reaches_every_replica(proxy, dns, replicas):
    dns.set_service("res-scale", replicas[0].ip)
    proxy.reconfigure(serviceName="res-scale", servicePath="/res-scale", port=replicas[0].port)
    assert who(proxy, "/res-scale/x") == (200, replicas[0].addr)
    dns.set_service("res-scale", [u.ip for u in replicas])
    want = {u.addr for u in replicas}
    got = set()

    def all_seen():
        st, addr = who(proxy, "/res-scale/x")
        assert st == 200
        got.add(addr)
        return got >= want
    wait_until(all_seen, timeout=5, interval=0.01, what=f"requests spread on {want}")


def test_nxdomain_route_503_other_route_fine_then_recovers(proxy, dns, replicas):
    ok = replicas[2]
    dns.remove_service("res-missing")
    dns.set_service("res-ok", ok.ip)
    proxy.reconfigure(serviceName="res-missing", servicePath="/res-missing", port=replicas[0].port)
    proxy.reconfigure(serviceName="res-ok", servicePath="/res-ok", port=ok.port)
    for _ in range(3):
        st, _, body = proxy.get("/res-missing/x")
        assert st == 503 and b"503 Service Unavailable" in body
        assert who(proxy, "/res-ok/x") == (200, ok.addr)
    assert dns.queries_for("res-missing", rcode="NXDOMAIN")
    # the service appears: a later request retries the lookup
    dns.set_service("res-missing", replicas[0].ip)
    wait_until(lambda: who(proxy, "/res-missing/x") == (200, replicas[0].addr), timeout=5, interval=0.05,
               what="the route to work once its name resolves")


def test_stale_address_used_while_dns_fails(proxy, dns, replicas):
    a = replicas[0]
    dns.set_service("res-stale", a.ip)
    proxy.reconfigure(serviceName="res-stale", servicePath="/res-stale", port=a.port)
    assert who(proxy, "/res-stale/x") == (200, a.addr)
    t0 = time.monotonic()
    dns.servfail_service("res-stale")
    results = []

    def refresh_failed():
        results.append(who(proxy, "/res-stale/x"))
        return dns.queries_for("res-stale", since=t0, rcode="SERVFAIL")
    # keep asking until pyroute has tried a refresh and got SERVFAIL (it must, after the cap)
    wait_until(refresh_failed, timeout=5, interval=0.05, what="a refresh that got SERVFAIL")
    for _ in range(5):
        results.append(who(proxy, "/res-stale/x"))
    assert all(r == (200, a.addr) for r in results), results


def test_stale_address_used_when_name_vanishes(proxy, dns, replicas):
    a = replicas[1]
    dns.set_service("res-gone", a.ip)
    proxy.reconfigure(serviceName="res-gone", servicePath="/res-gone", port=a.port)
    assert who(proxy, "/res-gone/x") == (200, a.addr)
    t0 = time.monotonic()
    dns.remove_service("res-gone")
    results = []

    def refresh_failed():
        results.append(who(proxy, "/res-gone/x"))
        return dns.queries_for("res-gone", since=t0, rcode="NXDOMAIN")
    wait_until(refresh_failed, timeout=5, interval=0.05, what="a refresh that got NXDOMAIN")
    results.append(who(proxy, "/res-gone/x"))
    assert all(r == (200, a.addr) for r in results), results


def test_dns_not_queried_per_request(proxy, dns, replicas):
    a = replicas[2]
    dns.set_service("res-cache", a.ip)
    proxy.reconfigure(serviceName="res-cache", servicePath="/res-cache", port=a.port)
    t0 = time.monotonic()
    with proxy.raw() as c:
        for _ in range(100):
            c.request("GET", "/res-cache/x", [("Host", "t")])
            assert c.read_response()[0].status_code == 200
    elapsed = time.monotonic() - t0
    # at most one lookup per cap period (0.5 s) per name, plus the first
    n = len(dns.queries_for("res-cache", since=t0, ))
    assert n <= 2 * (2 + elapsed / 0.5), (n, elapsed)
