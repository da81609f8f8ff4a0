"""Replicas and durability: several real pyroute processes on 127.0.0.N sharing one admin
PORT, found through `tasks.<SERVICE_NAME>` in the test DNS, each with its own STATE_DIR.

Covers: distribute=true reaching every replica (and naming a dead one), SIGKILL in the
middle of a stream of changes losing none that was answered 200, corrupt and partial
state files, a joining replica serving the same routes by the time it is ready, a replica
that missed changes converging within the repair interval, and concurrent (even
conflicting) changes sent to different replicas ending in the same state everywhere.
"""
from __future__ import annotations

import base64
import http.client
import itertools
import json
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from conftest import start_pyroute, stop_pyroute
from support.proxy import PyrouteDied
from support.upstream import free_port, wait_until

_names = itertools.count()


class Cluster:
    """Replicas of one proxy service: 127.0.0.<base+i>, one admin PORT, one state dir each."""

    def __init__(self, dns, tmp_path: Path, base: int, **env):
        self.dns = dns
        self.tmp = tmp_path
        self.name = f"proxy-r{next(_names)}-{os.getpid()}"
        self.ips = [f"127.0.0.{base + i}" for i in range(8)]
        self.port = free_port(self.ips[0])
        self.env = {"SERVICE_NAME": self.name, "REPAIR_INTERVAL": "0.3", **env}
        self.members: dict[int, object] = {}

    def announce(self, *indexes: int, extra: tuple[str, ...] = ()) -> None:
        """What tasks.<name> answers (Swarm's DNS view of the running tasks)."""
        self.dns.set(f"tasks.{self.name}", [self.ips[i] for i in indexes] + list(extra))

    def start(self, i: int, **env):
        p = start_pyroute(self.dns, PORT=self.port, IP=self.ips[i], STATE_DIR=str(self.tmp / f"state{i}"),
                          **{**self.env, **env})
        self.members[i] = p
        return p

    def stop(self, i: int) -> None:
        stop_pyroute(self.members.pop(i))

    def close(self) -> None:
        for i in list(self.members):
            self.stop(i)


@pytest.fixture
def cluster(dns, tmp_path):
    made = []

    def make(base: int, **env) -> Cluster:
        c = Cluster(dns, tmp_path, base, **env)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()
        c.dns.remove(f"tasks.{c.name}")


def state_of(p) -> tuple[int, str]:
    st, body = p.admin("ping")
    assert st == 200, body
    return body["Revision"], body["Hash"]


def routes(p) -> dict:
    st, body = p.admin("config", type="json")
    assert st == 200
    return body


def served_by(p, path: str):
    st, headers, _ = p.get(path)
    return st, headers.get("X-Upstream")


def ready(p) -> bool:
    return p.admin("successfulinitreload")[0] == 200


def test_distribute_reaches_every_replica_and_reports_a_dead_one(cluster, dns, replicas):
    c = cluster(40)
    c.announce(0, 1, 2)
    members = [c.start(i) for i in range(3)]
    dns.set_service("rep-dist", replicas[0].ip)

    st, body = members[0].admin("reconfigure", serviceName="rep-dist", servicePath="/rep-dist",
                                port=replicas[0].port, distribute="true")
    assert st == 200 and body["Status"] == "OK" and body["ServiceName"] == "rep-dist", body
    for p in members:
        assert served_by(p, "/rep-dist/hello") == (200, replicas[0].addr)
    assert len({state_of(p)[1] for p in members}) == 1

    # bad input is refused before any replica sees it
    st, body = members[1].admin("reconfigure", serviceName="rep-bad", port="80", distribute="true")
    assert st == 409 and body["Status"] == "NOK", body
    assert all("rep-bad" not in routes(p) for p in members)

    # a replica DNS still lists but that is gone: named in DFP's message, the others applied it
    c.announce(0, 1, 2, extra=("127.0.0.99",))
    st, body = members[2].admin("reconfigure", serviceName="rep-dist", servicePath="/rep-moved",
                                port=replicas[0].port, distribute="true")
    assert st == 500 and body["Status"] == "NOK", body
    assert "Could not send distribute request to the following addresses" in body["Message"]
    assert "127.0.0.99" in body["Message"] and c.ips[0] not in body["Message"], body
    for p in members:
        assert served_by(p, "/rep-moved/hello") == (200, replicas[0].addr)
        assert served_by(p, "/rep-dist/hello")[0] == 503

    c.announce(0, 1, 2)
    st, body = members[1].admin("remove", serviceName="rep-dist", distribute="true")
    assert st == 200, body
    assert all("rep-dist" not in routes(p) for p in members)
    assert all(served_by(p, "/rep-moved/hello")[0] == 503 for p in members)


def test_sigkill_mid_changes_keeps_every_acknowledged_change(cluster, dns, replicas):
    c = cluster(50)
    c.announce(0)
    p = c.start(0)
    dns.set_service("rep-kill", replicas[1].ip)
    acked: set[str] = set()
    lock = threading.Lock()
    enough = threading.Event()

    def change(n: int) -> None:
        name = f"rep-kill-{n}"
        try:
            st, _ = p.admin("reconfigure", serviceName=name, servicePath=f"/{name}",
                            outboundHostname="rep-kill", port=replicas[1].port)
        except OSError:
            return  # in flight when the process died: never acknowledged
        if st == 200:
            with lock:
                acked.add(name)
                if len(acked) >= 40:
                    enough.set()

    with ThreadPoolExecutor(4) as pool:
        futures = [pool.submit(change, n) for n in range(400)]
        assert enough.wait(30), "40 changes were not acknowledged"
        p.kill()
        for f in futures:
            f.result()
    assert 40 <= len(acked) < 400

    c.members.pop(0)
    again = c.start(0)
    present = set(routes(again))
    assert acked <= present, f"lost acknowledged changes: {sorted(acked - present)}"
    some = sorted(acked)[0]
    assert served_by(again, f"/{some}/hello") == (200, replicas[1].addr)


def test_corrupt_or_partial_state_file_falls_back_to_the_last_good_copy(cluster, dns, replicas):
    c = cluster(60)
    c.announce(0)
    p = c.start(0)
    dns.set_service("rep-disk", replicas[2].ip)
    p.reconfigure(serviceName="rep-disk", servicePath="/rep-disk-1", port=replicas[2].port)
    p.reconfigure(serviceName="rep-disk", servicePath="/rep-disk-2", port=replicas[2].port)
    c.stop(0)

    state = c.tmp / "state0"
    current = (state / "state.json").read_bytes()
    (state / "state.json").write_bytes(current[: len(current) // 2])  # a torn write
    p = c.start(0)
    assert served_by(p, "/rep-disk-1/hello") == (200, replicas[2].addr)  # the previous copy
    assert "unusable" in p.log() and "last good state copy" in p.log() and "revision unknown" in p.log()
    c.stop(0)

    # a well-formed file whose content does not match its hash is refused the same way
    (state / "state.json").write_bytes(current.replace(b"/rep-disk-2", b"/rep-disk-X"))
    p = c.start(0)
    assert served_by(p, "/rep-disk-X/hello")[0] == 503
    assert "does not match its hash" in p.log()
    c.stop(0)

    assert len(list(state.glob("state.json.corrupt-*"))) == 2  # each damaged copy kept aside, not reused

    # a crash between the two renames of a save: no state.json, a complete temp file
    (state / "state.json.tmp").write_bytes(current)
    p = c.start(0)
    assert served_by(p, "/rep-disk-2/hello") == (200, replicas[2].addr)
    c.stop(0)

    # nothing usable: it starts, keeps the files aside and is not ready until state is
    # supplied (F7: tests/test_security_state.py covers the rules)
    for name in ("state.json", "state.json.tmp", "state.prev.json"):
        (state / name).write_bytes(b"\x00garbage")
    p = c.start(0)
    wait_until(lambda: p.admin("ping")[1]["Joined"], timeout=10, what="joined")
    assert p.admin("successfulinitreload")[0] == 503
    assert routes(p) == {}


def test_joining_replica_serves_the_same_routes_when_ready(cluster, dns, replicas):
    c = cluster(70)
    c.announce(0, 1)
    members = [c.start(0), c.start(1)]
    dns.set_service("rep-join", replicas[0].ip)
    for n in range(5):
        members[n % 2].admin("reconfigure", serviceName=f"rep-join-{n}", servicePath=f"/rep-join-{n}",
                             outboundHostname="rep-join", port=replicas[0].port, distribute="true")
    members[0].admin("remove", serviceName="rep-join-4", distribute="true")
    expected = routes(members[0])
    assert len(expected) == 4

    c.announce(0, 1, 2)
    new = c.start(2)  # empty state dir
    wait_until(lambda: ready(new), timeout=10, what="the new replica ready")
    assert routes(new) == expected
    assert state_of(new)[1] == state_of(members[0])[1]
    for n in range(4):
        assert served_by(new, f"/rep-join-{n}/hello") == (200, replicas[0].addr)
    assert served_by(new, "/rep-join-4/hello")[0] == 503


def test_replica_that_missed_changes_converges_within_the_repair_interval(cluster, dns, replicas):
    c = cluster(80)
    c.announce(0, 1, 2)
    members = [c.start(i) for i in range(3)]
    dns.set_service("rep-heal", replicas[1].ip)

    # replica 2 drops out of tasks.<name> (down, or DNS lag): the fan-out misses it
    c.announce(0, 1)
    members[0].reconfigure(serviceName="rep-heal", servicePath="/rep-heal", port=replicas[1].port,
                           distribute="true")
    assert '"event":"reconfigure","service":"rep-heal"' not in members[2].log()  # the fan-out did not reach it
    # a change only one replica received (distribute=false) must spread too
    members[1].reconfigure(serviceName="rep-heal-b", servicePath="/rep-heal-b", outboundHostname="rep-heal",
                           port=replicas[1].port)

    c.announce(0, 1, 2)
    wait_until(lambda: len({state_of(p)[1] for p in members}) == 1, timeout=10, what="equal hashes")
    for p in members:
        assert served_by(p, "/rep-heal/hello") == (200, replicas[1].addr)
        assert served_by(p, "/rep-heal-b/hello") == (200, replicas[1].addr)
    st, body = members[2].admin("ping")
    assert body["Drift"] >= 1 and body["Repairs"] >= 1, body
    assert "drift:" in members[2].log() and "repair: adopted" in members[2].log()


def test_concurrent_reconfigures_to_different_replicas_end_in_the_same_state(cluster, dns, replicas):
    c = cluster(90)
    c.announce(0, 1, 2)
    members = [c.start(i) for i in range(3)]
    dns.set_service("rep-conc", replicas[2].ip)

    def send(n: int):
        p = members[n % 3]
        # every replica also fights over one shared service, with different paths
        name = "rep-conc-shared" if n % 4 == 0 else f"rep-conc-{n}"
        return p.admin("reconfigure", serviceName=name, servicePath=f"/rep-conc-{n}", outboundHostname="rep-conc",
                       port=replicas[2].port, distribute="true")

    with ThreadPoolExecutor(6) as pool:
        results = list(pool.map(send, range(36)))
    assert all(st == 200 for st, _ in results), [r for r in results if r[0] != 200]
    hashes = {state_of(p)[1] for p in members}
    assert len(hashes) == 1, hashes
    tables = [routes(p) for p in members]
    assert tables[0] == tables[1] == tables[2]
    assert len(tables[0]) == 1 + 27
    shared = tables[0]["rep-conc-shared"]
    path = shared["ServiceDest"][0]["ServicePath"][0]
    assert all(served_by(p, f"{path}/hello") == (200, replicas[2].addr) for p in members)


def test_replica_down_during_changes_catches_up_before_ready(cluster, dns, replicas):
    c = cluster(100)
    c.announce(0, 1)
    members = [c.start(0), c.start(1)]
    dns.set_service("rep-down", replicas[0].ip)
    members[0].reconfigure(serviceName="rep-down-1", servicePath="/rep-down-1", outboundHostname="rep-down",
                           port=replicas[0].port, distribute="true")
    members[1].kill()
    c.members.pop(1)
    st, body = members[0].admin("reconfigure", serviceName="rep-down-2", servicePath="/rep-down-2",
                                outboundHostname="rep-down", port=replicas[0].port, distribute="true")
    assert st == 500 and c.ips[1] in body["Message"], body
    st, _ = members[0].admin("reconfigure", serviceName="rep-down-1", servicePath="/rep-down-1b",
                             outboundHostname="rep-down", port=replicas[0].port, distribute="true")
    assert st == 500  # and applied on replica 0
    again = c.start(1)  # its state dir holds only rep-down-1 at /rep-down-1
    wait_until(lambda: ready(again), timeout=10, what="restarted replica ready")
    assert routes(again) == routes(members[0])
    assert served_by(again, "/rep-down-2/hello") == (200, replicas[0].addr)
    assert served_by(again, "/rep-down-1b/hello") == (200, replicas[0].addr)
    assert served_by(again, "/rep-down-1/hello")[0] == 503


def test_distribute_without_swarm_dns_applies_here(cluster, dns, replicas):
    c = cluster(110)  # tasks.<name> is not in DNS at all: NXDOMAIN
    p = c.start(0)
    dns.set_service("rep-solo", replicas[1].ip)
    st, body = p.admin("reconfigure", serviceName="rep-solo", servicePath="/rep-solo", port=replicas[1].port,
                       distribute="true")
    assert st == 200, body
    assert served_by(p, "/rep-solo/hello") == (200, replicas[1].addr)
    assert "applying on this replica only" in p.log()


def test_unusable_state_dir_stops_start_with_a_clear_message(dns, tmp_path):
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("a file where the state directory should be")
    with pytest.raises(PyrouteDied) as exc:
        start_pyroute(dns, STATE_DIR=str(blocker / "state"))
    assert "STATE_DIR" in str(exc.value) and "is not usable" in str(exc.value)


def test_config_json_carries_revision_and_hash(cluster, dns, replicas):
    c = cluster(120)
    p = c.start(0)
    dns.set_service("rep-hdr", replicas[0].ip)
    p.reconfigure(serviceName="rep-hdr", servicePath="/rep-hdr", port=replicas[0].port)
    conn = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
    conn.request("GET", "/v1/docker-flow-proxy/config?type=json")
    r = conn.getresponse()
    assert r.status == 200 and "rep-hdr" in json.loads(r.read())
    conn.close()
    revision, digest = state_of(p)
    assert r.headers["X-Pyroute-Revision"] == str(revision) and r.headers["X-Pyroute-Hash"] == digest
    saved = json.loads((c.tmp / "state0" / "state.json").read_text())
    assert (saved["revision"], saved["hash"]) == (revision, digest)


def test_replicas_with_admin_credentials_distribute_and_repair_among_themselves(cluster, dns, replicas):
    """ADMIN_USER/ADMIN_PASS guard every admin port; replicas send the same ones to each other."""
    c = cluster(70, ADMIN_USER="ops", ADMIN_PASS="s3cret", REPAIR_INTERVAL="0.3")
    c.announce(0, 1)
    members = [c.start(i) for i in range(2)]
    dns.set_service("rep-auth", replicas[1].ip)
    st, body = members[0].admin("reconfigure", serviceName="rep-auth", servicePath="/rep-auth",
                                port=replicas[1].port, distribute="true")
    assert st == 200, body
    for p in members:
        assert served_by(p, "/rep-auth/hello") == (200, replicas[1].addr)
    # a change made on one replica only reaches the other through repair, which pulls /state
    members[1].reconfigure(serviceName="rep-auth2", servicePath="/rep-auth2", port=replicas[1].port)
    dns.set_service("rep-auth2", replicas[1].ip)
    wait_until(lambda: "rep-auth2" in routes(members[0]), timeout=10, what="repair across authenticated peers")
    # and without the credentials the state is not handed out
    conn = http.client.HTTPConnection(c.ips[0], c.port, timeout=5)
    conn.request("GET", "/v1/docker-flow-proxy/state")
    assert conn.getresponse().status == 401


def test_certificate_put_with_distribute_reaches_every_replica_and_a_joining_one(cluster, dns, tmp_path):
    """PUT /cert?distribute=true goes to every replica with its body; a replica that starts
    later pulls the certificate with the rest of the state (keys travel between replicas
    only behind admin credentials)."""
    import trustme

    ca = trustme.CA()
    leaf = ca.issue_cert("rep.example.test")
    body = b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    c = cluster(80, ADMIN_USER="ops", ADMIN_PASS="s3cret")
    c.announce(0, 1)
    members = [c.start(i, CERTS_DIR=str(tmp_path / f"certs{i}")) for i in range(2)]

    def certs_of(p) -> set[str]:
        st, answer = p.admin("certs")
        assert st == 200, answer
        return {entry["ProxyServiceName"] for entry in answer["Certs"]}

    def put(p, query: str, data: bytes) -> int:
        conn = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
        auth = "Basic " + base64.b64encode(b"ops:s3cret").decode()
        conn.request("PUT", f"/v1/docker-flow-proxy/cert?{query}", body=data, headers={"Authorization": auth})
        return conn.getresponse().status

    assert put(members[0], "certName=rep&distribute=true", b"not a certificate") == 400  # refused before fan-out
    assert all(not certs_of(p) for p in members)
    assert put(members[0], "certName=rep&distribute=true", body) == 200
    assert all(certs_of(p) == {"rep.pem"} for p in members)

    c.announce(0, 1, 2)
    joiner = c.start(2, CERTS_DIR=str(tmp_path / "certs2"))
    wait_until(lambda: ready(joiner), timeout=10, what="the new replica to be ready")
    assert certs_of(joiner) == {"rep.pem"}


def test_metrics_with_distribute_concatenates_every_replicas_csv(cluster, dns):
    """DFP's /metrics?distribute=true: the stats CSV of each replica, one after the other."""
    c = cluster(90)
    c.announce(0, 1)
    members = [c.start(i) for i in range(2)]
    st, own = members[0].admin("metrics")
    assert st == 200 and own.count("FRONTEND") == 1
    st, both = members[0].admin("metrics", distribute="true")
    assert st == 200 and both.count("FRONTEND") == 2, both
    c.announce(0, 1, extra=("127.0.0.99",))
    st, body = members[1].admin("metrics", distribute="true")
    assert st == 500 and "127.0.0.99" in body["Message"], body


def _call(p, method: str, target: str, body: bytes = b"", headers: dict | None = None) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
    try:
        conn.request(method, target, body=body or None, headers=headers or {})
        r = conn.getresponse()
        return r.status, r.read()
    finally:
        conn.close()


@pytest.mark.parametrize("admin", [{}, {"ADMIN_USER": "ops", "ADMIN_PASS": "s3cret"}], ids=["open", "admin-auth"])
def test_peer_token_carries_certificate_keys_between_replicas_and_to_nobody_else(cluster, dns, tmp_path, admin):
    """Issue 17: the Docker secret dfp_peer_token is the replicas' own credential. A PUT
    certificate reaches every replica and a new one with its key, with or without admin
    credentials; a caller without the token (or the admin credentials) never sees a key."""
    import trustme

    token = "3f1c9a7be2d64c08a5e1b7d93c2f60aa"
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "dfp_peer_token").write_text(token + "\n")  # as `openssl rand -hex 32 | docker secret create` leaves it
    leaf = trustme.CA().issue_cert("peer.example.test")
    pem = b"".join(b.bytes() for b in leaf.cert_chain_pems) + leaf.private_key_pem.bytes()
    c = cluster(130, SECRETS_DIR=str(secrets), **admin)
    c.announce(0, 1)
    members = [c.start(i, CERTS_DIR=str(tmp_path / f"pcerts{i}")) for i in range(2)]
    auth = {"Authorization": "Basic " + base64.b64encode(b"ops:s3cret").decode()} if admin else {}
    status, answer = _call(members[0], "PUT", "/v1/docker-flow-proxy/cert?certName=peer&distribute=true", pem, auth)
    assert status == 200, answer

    c.announce(0, 1, 2)
    joiner = c.start(2, CERTS_DIR=str(tmp_path / "pcerts2"))
    wait_until(lambda: ready(joiner), timeout=10, what="the new replica to be ready")
    for p in (*members, joiner):
        # the key is on every replica: it serves TLS with that certificate's key file
        assert b"PRIVATE KEY" in (Path(p.env["CERTS_DIR"]) / "peer.pem").read_bytes()

    as_peer = {"X-Pyroute-Peer-Token": token}
    for headers, keys in (({}, False), ({"X-Pyroute-Peer-Token": "not-the-token-0123456789"}, False),
                          (as_peer, True), (auth, bool(admin))):
        status, body = _call(joiner, "GET", "/v1/docker-flow-proxy/certs", headers=headers)
        if admin and not headers.get("Authorization") and headers != as_peer:
            assert status == 401  # admin credentials guard everything; the token stands in for them
            continue
        assert status == 200, body
        [entry] = json.loads(body)["Certs"]
        assert ("PRIVATE KEY" in entry["CertContent"]) is keys, headers
        assert "CERTIFICATE" in entry["CertContent"]
        status, state = _call(joiner, "GET", "/v1/docker-flow-proxy/state", headers=headers)
        assert status == 200 and (b"PRIVATE KEY" in state) is keys and ("peer" in json.loads(state)["certs"]) is keys


def test_prometheus_metrics_with_distribute_merge_every_replica(cluster, dns, replicas):
    """Issue 17: /metrics?distribute=true is one scrape of the whole proxy service: every
    replica's counters summed, each process labelled with its replica (DFP only had per-replica
    numbers)."""
    from prometheus_client.parser import text_string_to_metric_families

    c = cluster(140)
    c.announce(0, 1)
    members = [c.start(i) for i in range(2)]
    dns.set_service("rep-metrics", replicas[0].ip)
    st, body = members[0].admin("reconfigure", serviceName="rep-metrics", servicePath="/rep-metrics",
                                port=replicas[0].port, distribute="true")
    assert st == 200, body
    for p, n in ((members[0], 2), (members[1], 3)):
        for _ in range(n):
            assert served_by(p, "/rep-metrics/x")[0] == 200

    def scrape(p, query=""):
        status, text = _call(p, "GET", "/metrics" + query)
        assert status == 200, text
        return {(s.name, tuple(sorted(s.labels.items()))): s.value
                for f in text_string_to_metric_families(text.decode()) for s in f.samples}

    ok = ("pyroute_requests_total", (("code", "200"), ("method", "GET"), ("service", "rep-metrics")))
    assert scrape(members[0])[ok] == 2 and scrape(members[1])[ok] == 3
    merged = scrape(members[1], "?distribute=true")
    assert merged[ok] == 5
    backend = (("backend", f"rep-metrics-be{replicas[0].port}_0"), ("code", "2xx"))
    assert merged[("haproxy_backend_http_responses_total", backend)] == 5
    processes = {dict(labels)["process"] for name, labels in merged if name == "pyroute_route_table_revision"}
    assert processes == {f"{c.ips[0]}/pyroute", f"{c.ips[1]}/pyroute"}, processes
    c.announce(0, 1, extra=("127.0.0.99",))
    status, text = _call(members[0], "GET", "/metrics?distribute=true")
    assert status == 500 and b"127.0.0.99" in text
