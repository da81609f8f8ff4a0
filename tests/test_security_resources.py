"""Issue 14, resource findings: F9 (reconfigure cost on the request loop), F12 (a blackholed
DNS server stalls requests when a cached name expires), F16 (per-address connection cap,
minimum request body rate, cross-site admin calls)."""
from __future__ import annotations

import time

from support.upstream import wait_until


# -- F12: stale DNS answers are served at once, refreshed in the background -------------------

F12_DNS_TIMEOUT = 3.0  # the resolver waits this long per try, 2 tries: a stalled request waits >= 6 s
F12_CLIENT_TIMEOUT = 1.5  # well below one resolver try: an answer in time never waited on DNS


def test_F12_expired_name_on_blackholed_dns_is_served_stale_at_once(make_pyroute, dns, replicas):
    a, b = replicas[0], replicas[1]
    p = make_pyroute(DNS_TTL_CAP="0.5", DNS_TIMEOUT=str(F12_DNS_TIMEOUT))
    dns.set_service("f12-stale", a.ip)
    p.reconfigure(serviceName="f12-stale", servicePath="/f12", port=a.port)
    status, headers, _ = p.get("/f12/x")
    assert (status, headers.get("X-Upstream")) == (200, a.addr)
    answered = max(q[0] for q in dns.queries_for("f12-stale", rcode="NOERROR"))
    dns.blackhole_service("f12-stale")
    # the cached answer (life DNS_TTL_CAP = 0.5 s from `answered`) is now expired
    wait_until(lambda: time.monotonic() > answered + 1.0, timeout=3, what="the cached answer to expire")
    for _ in range(3):  # each answered from the stale entry, long before one DNS try could time out
        status, headers, _ = p.get("/f12/x", timeout=F12_CLIENT_TIMEOUT)
        assert (status, headers.get("X-Upstream")) == (200, a.addr)
    # the refresh went out in the background (and got no answer)
    wait_until(lambda: dns.queries_for("f12-stale", since=answered, rcode="DROPPED"), timeout=5,
               what="a background refresh to reach the blackholed server")
    # the DNS server comes back with a new address: a later refresh (backoff <= DNS_TTL_CAP) sees it
    dns.set_service("f12-stale", b.ip)
    dns.blackhole_service("f12-stale", on=False)
    wait_until(lambda: p.get("/f12/x", timeout=F12_CLIENT_TIMEOUT)[1].get("X-Upstream") == b.addr,
               timeout=2 * 2 * F12_DNS_TIMEOUT + 5, interval=0.1, what="the new address once DNS answers again")


def test_F12_first_lookup_of_a_blackholed_name_waits_bounded_then_503(make_pyroute, dns, replicas):
    p = make_pyroute(DNS_TTL_CAP="0.5", DNS_TIMEOUT="0.5")
    dns.set_service("f12-never", replicas[0].ip)
    dns.blackhole_service("f12-never")
    p.reconfigure(serviceName="f12-never", servicePath="/f12never", port=replicas[0].port)
    status, _, _ = p.get("/f12never/x", timeout=10)  # no answer ever cached: the lookup's timeout bounds it
    assert status == 503
    assert dns.queries_for("f12-never", rcode="DROPPED")
