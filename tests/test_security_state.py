"""Issue 14, the control plane's findings, against real pyroute processes:

- F2: nothing the data plane cannot compile is accepted (admin API, Swarm labels, the
  Swarm Listener, DFP_SERVICE_*, the state file); a dead worker is restarted with
  backoff and readiness says so while it is down.
- F7: corrupt state files are kept aside, readiness waits for state (or STATE_CORRUPT),
  a damaged copy names the revision it lost.
- F8: an encrypted private key is refused (PUT /cert) or skipped (CERTS_DIR) without
  ever prompting on the process's terminal.
- Deliver 2: every reconfigure pyroute accepts survives a restart and is served
  (hypothesis; FUZZ_EXAMPLES raises the count).
"""
from __future__ import annotations

import hashlib
import http.client
import itertools
import json
import os
import pty
import re
import signal
import urllib.parse
from pathlib import Path

import orjson
import pytest
import trustme
from cryptography.hazmat.primitives import serialization
from hypothesis import HealthCheck, given, settings, strategies as st

from conftest import start_pyroute, stop_pyroute
from support.engine import FakeEngine
from support.listener import ListenerStandIn
from support.proxy import API, Pyroute, PyrouteDied, children
from support.upstream import free_port, wait_until

CONNECTIONS = 16  # fresh connections per check: with WORKERS=2 both workers get some
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "40"))

# Changes that pass services.py's checks on the unfixed code but raise while the route
# table is built: a header value outside Latin-1 (UnicodeEncodeError) and a str regex
# escape that a bytes regex does not know (re.error). Either way: 4xx, nothing changes.
UNCOMPILABLE = {
    "latin1-header": {"servicePath": "/f2bad", "addReqHeader": "X-Euro \u20ac"},
    "bytes-regex": {"servicePath": "/f2bad/caf\\u00e9", "pathType": "path_reg"},
}


# -- helpers --------------------------------------------------------------------------------
def config(p) -> dict:
    st_, body = p.admin("config", type="json")
    assert st_ == 200, body
    return body


def readiness(p):
    return p.admin("successfulinitreload")


def ready(p) -> bool:
    return readiness(p)[0] == 200


def all_served(p, path: str, upstream) -> bool:
    """CONNECTIONS fresh connections all answered 200 by `upstream`."""
    answers = [p.get(path) for _ in range(CONNECTIONS)]
    return all(a[0] == 200 and a[1]["X-Upstream"] == upstream.addr for a in answers)


def state_document(services: dict[str, dict[str, str]], revision: int, schema: int = 1) -> bytes:
    """A state file exactly as durable.py writes it: entries with stamps, the content hash."""
    entries = {name: {"stamp": [i + 1, f"handmade.{i:010d}"], "value": [[k, v] for k, v in params.items()]}
               for i, (name, params) in enumerate(services.items())}
    canonical = {"services": {n: [e["stamp"], e["value"]] for n, e in entries.items()}, "certs": {}}
    digest = hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()
    return orjson.dumps({"format": schema, "revision": revision, "hash": digest, "services": entries, "certs": {}})


def aside(directory: Path, name: str) -> list[Path]:
    return sorted(directory.glob(f"{name}.corrupt-*"))


def restart(p: Pyroute) -> Pyroute:
    p.stop()
    return p.start()


# -- F2a: compiled before stored, replicated or answered -------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"])
@pytest.mark.parametrize("case", sorted(UNCOMPILABLE))
def test_F2_change_that_cannot_compile_is_refused_and_nothing_changes(make_pyroute, dns, replicas, tmp_path,
                                                                      workers, case):
    u = replicas[0]
    state = tmp_path / "state"
    p = make_pyroute(WORKERS=workers, STATE_DIR=str(state))
    dns.set_service("f2good", u.ip)
    p.reconfigure(serviceName="f2good", servicePath="/f2good", port=u.port)
    before = (config(p), p.admin("ping")[1]["Revision"], (state / "state.json").read_bytes())

    st_, body = p.admin("reconfigure", {"serviceName": "f2bad", "port": u.port, **UNCOMPILABLE[case]})
    assert 400 <= st_ < 500 and body["Status"] == "NOK", (st_, body)
    assert body.get("ServiceName") == "f2bad" and body["Message"], body
    assert (config(p), p.admin("ping")[1]["Revision"], (state / "state.json").read_bytes()) == before
    assert all_served(p, "/f2good/hello", u)
    assert ready(p)

    dns.set_service("f2next", u.ip)  # the next change is accepted and served as usual
    p.reconfigure(serviceName="f2next", servicePath="/f2next", port=u.port)
    assert all_served(p, "/f2next/hello", u)

    restart(p)
    wait_until(lambda: ready(p), timeout=10, what="ready after a restart on the state")
    assert set(config(p)) == {"f2good", "f2next"}
    assert all_served(p, "/f2good/hello", u) and all_served(p, "/f2next/hello", u)


def test_F2_uncompilable_services_from_the_listener_and_labels_are_refused_by_name(make_pyroute, dns, replicas):
    u = replicas[1]
    dns.set_service("f2lst-good", u.ip)
    dns.set_service("f2lab-good", u.ip)
    stand_in = ListenerStandIn()
    engine = FakeEngine()
    try:
        stand_in.services = [
            {"serviceName": "f2lst-good", "servicePath": "/f2lst-good", "port": str(u.port), "replicas": "1"},
            {"serviceName": "f2lst-bad", "servicePath": "/f2lst-bad", "port": str(u.port), "replicas": "1",
             "addReqHeader": "X-Euro \u20ac"},
        ]
        good = {"com.df.notify": "true", "com.df.servicePath": "/f2lab-good", "com.df.port": str(u.port)}
        good_id = engine.create("f2lab-good", good)
        engine.create("f2lab-bad", {"com.df.notify": "true", "com.df.servicePath": "/f2lab-bad/caf\\u00e9",
                                    "com.df.pathType": "path_reg", "com.df.port": str(u.port)})
        p = make_pyroute(LISTENER_ADDRESS=stand_in.address, RELOAD_INTERVAL="100", DOCKER_HOST=engine.docker_host,
                         SWARM_POLL_INTERVAL="0.2", SERVICE_NAME="f2-lst-proxy")
        wait_until(lambda: ready(p), timeout=10, what="ready")
        assert set(config(p)) == {"f2lst-good", "f2lab-good"}
        assert all_served(p, "/f2lst-good/hello", u) and all_served(p, "/f2lab-good/hello", u)
        log = p.log()
        assert "f2lst-bad" in log and "f2lab-bad" in log and "Traceback" not in log
        # a later label change that cannot compile is refused too: the route stays as it was
        before = config(p)["f2lab-good"]
        engine.update(good_id, {**good, "com.df.addResHeader": "X-Euro \u20ac"})
        wait_until(lambda: re.search(r"f2lab-good.*rejected", p.log()), what="the label update refused by name")
        assert config(p)["f2lab-good"] == before
        assert all_served(p, "/f2lab-good/hello", u)
    finally:
        stand_in.close()
        engine.close()


def test_F2_uncompilable_dfp_service_env_stops_start_naming_it(dns, replicas):
    p = Pyroute(dns.nameserver, DFP_SERVICE_SERVICE_NAME="f2env-bad", DFP_SERVICE_SERVICE_PATH="/f2env",
                DFP_SERVICE_PORT=str(replicas[0].port), DFP_SERVICE_ADD_REQ_HEADER="X-Euro \u20ac")
    with pytest.raises(PyrouteDied) as info:
        p.start(timeout=10)
    assert "f2env-bad" in str(info.value) and "Traceback" not in str(info.value)


# -- F2c: a stored state that cannot be compiled ---------------------------------------------
@pytest.mark.parametrize("workers", ["1", "2"])
def test_F2_stored_state_with_an_uncompilable_service_starts_without_it(make_pyroute, dns, replicas, tmp_path,
                                                                        workers):
    u = replicas[2]
    dns.set_service("f2c-good", u.ip)
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_bytes(state_document({
        "f2c-good": {"serviceName": "f2c-good", "servicePath": "/f2c-good", "port": str(u.port)},
        "f2c-bad": {"serviceName": "f2c-bad", "servicePath": "/f2c-bad", "port": str(u.port),
                    "addReqHeader": "X-Euro \u20ac"},
        "f2c-re": {"serviceName": "f2c-re", "servicePath": "/f2c-re/caf\\u00e9", "pathType": "path_reg",
                   "port": str(u.port)},
    }, revision=3))
    p = make_pyroute(STATE_DIR=str(state), WORKERS=workers)
    wait_until(lambda: ready(p), timeout=10, what="ready")
    assert set(config(p)) == {"f2c-good"}
    assert all_served(p, "/f2c-good/hello", u)
    errors = [line for line in p.log().splitlines() if " ERROR " in line]
    assert any("f2c-bad" in line for line in errors) and any("f2c-re" in line for line in errors), p.log()


# -- F2b: a dead worker comes back, with backoff; readiness reports it ------------------------
def test_F2_dead_worker_is_restarted_with_backoff_and_readiness_reports_it(make_pyroute, dns, replicas):
    u = replicas[0]
    p = make_pyroute(WORKERS="2")
    dns.set_service("f2w", u.ip)
    p.reconfigure(serviceName="f2w", servicePath="/f2w", port=u.port)
    wait_until(lambda: ready(p), what="ready")
    delays = []
    pids = set(children(p.proc.pid))
    victim = min(pids)
    for _ in range(2):  # then its replacement: a death after a short life, a longer pause before the next start
        os.kill(victim, signal.SIGKILL)
        st_, body = wait_until(lambda: (lambda r: r if r[0] != 200 else None)(readiness(p)), timeout=5,
                               what="readiness to report the dead worker")
        assert st_ == 503 and body["Status"] == "NOK" and "worker" in body["Message"], body
        assert p.admin("ping")[0] == 200  # liveness is not readiness
        wait_until(lambda: ready(p), timeout=15, what="ready again with a new worker")
        now = set(children(p.proc.pid))
        assert len(now) == 2 and victim not in now
        assert all_served(p, "/f2w/hello", u)
        (victim,) = now - pids
        pids = now
        delays = [float(d) for d in re.findall(r"starting a new one in ([0-9.]+) s", p.log())]
    assert len(delays) == 2 and delays[1] > delays[0] > 0, p.log()


# -- F7: corrupt state ---------------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["garbage", "wrong-schema"])
def test_F7_both_state_copies_bad_are_kept_aside_and_readiness_waits_for_an_operator(make_pyroute, dns, replicas,
                                                                                      tmp_path, damage):
    u = replicas[1]
    state = tmp_path / "state"
    state.mkdir()
    if damage == "garbage":
        bad = {"state.json": b"\x00garbage-current", "state.prev.json": b'{"format": 1, "revis'}
    else:
        doc = state_document({"f7x": {"serviceName": "f7x", "servicePath": "/f7x", "port": "1"}}, 9, schema=99)
        bad = {"state.json": doc, "state.prev.json": doc.replace(b'"revision":9', b'"revision":8')}
    for name, data in bad.items():
        (state / name).write_bytes(data)
    p = make_pyroute(STATE_DIR=str(state), SERVICE_NAME="f7-alone")  # no peers in DNS
    wait_until(lambda: p.admin("ping")[1]["Joined"], what="the join with peers done")
    st_, body = readiness(p)
    assert st_ == 503 and body["Status"] == "NOK", (st_, body)
    assert "corrupt" in body["Message"] and str(state) in body["Message"], body
    for name, data in bad.items():  # the evidence is kept, byte for byte, under a new name
        kept = aside(state, name)
        assert len(kept) == 1 and kept[0].read_bytes() == data, kept
        assert re.fullmatch(re.escape(name) + r"\.corrupt-\d{8}T\d{6}(\.\d+)?Z", kept[0].name), kept[0].name

    dns.set_service("f7op", u.ip)  # an operator supplies state: ready, saved, evidence untouched
    p.reconfigure(serviceName="f7op", servicePath="/f7op", port=u.port)
    assert ready(p)
    assert all_served(p, "/f7op/hello", u)
    restart(p)
    wait_until(lambda: ready(p), timeout=10, what="ready after restart")
    assert set(config(p)) == {"f7op"}
    for name, data in bad.items():
        kept = aside(state, name)
        assert len(kept) == 1 and kept[0].read_bytes() == data


def test_F7_start_empty_only_with_the_explicit_setting(make_pyroute, tmp_path):
    state = tmp_path / "state"
    state.mkdir()
    (state / "state.json").write_bytes(b"\x00garbage")
    p = make_pyroute(STATE_DIR=str(state), STATE_CORRUPT="start-empty")
    wait_until(lambda: ready(p), timeout=10, what="ready with an empty state")
    assert config(p) == {}
    assert [f.read_bytes() for f in aside(state, "state.json")] == [b"\x00garbage"]
    assert "STATE_CORRUPT=start-empty" in p.log()


def test_F7_a_peer_supplies_the_state_of_a_replica_whose_files_are_corrupt(dns, replicas, tmp_path):
    u = replicas[2]
    name = f"f7-cluster-{os.getpid()}"
    ips = ["127.0.0.171", "127.0.0.172"]
    port = free_port(ips[0])
    dns.set(f"tasks.{name}", ips)
    started = []
    try:
        env = {"PORT": port, "SERVICE_NAME": name, "REPAIR_INTERVAL": "0.3"}
        first = start_pyroute(dns, IP=ips[0], STATE_DIR=str(tmp_path / "s0"), **env)
        started.append(first)
        dns.set_service("f7peer", u.ip)
        first.reconfigure(serviceName="f7peer", servicePath="/f7peer", port=u.port)
        broken = tmp_path / "s1"
        broken.mkdir()
        (broken / "state.json").write_bytes(b"\x00garbage")
        second = start_pyroute(dns, IP=ips[1], STATE_DIR=str(broken), **env)
        started.append(second)
        wait_until(lambda: ready(second), timeout=10, what="ready once the peer's state is merged")
        assert set(config(second)) == {"f7peer"}
        assert all_served(second, "/f7peer/hello", u)
        assert len(aside(broken, "state.json")) == 1
    finally:
        for p in started:
            stop_pyroute(p)
        dns.remove(f"tasks.{name}")


@pytest.mark.parametrize("damage", ["torn", "hash-mismatch"])
def test_F7_one_damaged_copy_falls_back_and_names_the_lost_revision(make_pyroute, dns, replicas, tmp_path, damage):
    u = replicas[0]
    state = tmp_path / "state"
    p = make_pyroute(STATE_DIR=str(state))
    dns.set_service("f7one", u.ip)
    p.reconfigure(serviceName="f7one", servicePath="/f7one-a", port=u.port)
    p.reconfigure(serviceName="f7one", servicePath="/f7one-b", port=u.port)
    p.stop()
    current = (state / "state.json").read_bytes()
    kept_revision = json.loads((state / "state.prev.json").read_bytes())["revision"]
    lost_revision = json.loads(current)["revision"]
    damaged = current[: len(current) // 2] if damage == "torn" else current.replace(b"/f7one-b", b"/f7one-X")
    (state / "state.json").write_bytes(damaged)

    p.start()
    wait_until(lambda: ready(p), timeout=10, what="ready on the previous copy")
    assert all_served(p, "/f7one-a/hello", u)  # the previous copy's route
    lost = f"revision {lost_revision}" if damage == "hash-mismatch" else f"unknown, newer than {kept_revision}"
    assert lost in p.log() and f"revision {kept_revision}" in p.log(), p.log()
    assert [f.read_bytes() for f in aside(state, "state.json")] == [damaged]


# -- F8: encrypted private keys -------------------------------------------------------------------
def encrypted_pem() -> bytes:
    leaf = trustme.CA().issue_cert("f8.test")
    key = serialization.load_pem_private_key(leaf.private_key_pem.bytes(), None)
    locked = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                               serialization.BestAvailableEncryption(b"secret"))
    return leaf.cert_chain_pems[0].bytes() + locked


def on_terminal(dns, **env) -> tuple[Pyroute, int]:
    """pyroute with a pseudo-terminal as its controlling terminal and stdin, as under
    `docker run -it`: a pass phrase prompt would go to (and wait on) that terminal.
    -> (the started process, the terminal's master side, non-blocking)."""
    master, slave = pty.openpty()
    os.set_blocking(master, False)
    p = Pyroute(dns.nameserver, **env)
    p.terminal = slave
    try:
        p.start()
    finally:
        os.close(slave)
    return p, master


def terminal_output(master: int) -> bytes:
    try:
        return os.read(master, 65536)
    except (BlockingIOError, OSError):
        return b""


def put_cert(p: Pyroute, name: str, pem: bytes):
    c = http.client.HTTPConnection(p.admin_host, p.admin_port, timeout=10)
    try:
        c.request("PUT", f"{API}/cert?" + urllib.parse.urlencode({"certName": name}), body=pem)
        r = c.getresponse()
        return r.status, json.loads(r.read())
    finally:
        c.close()


def test_F8_encrypted_private_key_is_refused_without_prompting(dns, tmp_path):
    p, terminal = on_terminal(dns, CERTS_DIR=str(tmp_path / "certs"))
    try:
        st_, body = put_cert(p, "f8", encrypted_pem())
        assert st_ == 400 and body["Status"] == "NOK", body
        assert "encrypted" in body["Message"] and "unencrypted key" in body["Message"], body
        assert b"pass phrase" not in terminal_output(terminal).lower()
        assert p.admin("ping")[0] == 200 and not (tmp_path / "certs" / "f8.pem").exists()
        assert "Traceback" not in p.log()
    finally:
        p.stop()
        os.close(terminal)


def test_F8_encrypted_key_in_certs_dir_is_skipped_at_start(dns, replicas, tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "locked.pem").write_bytes(encrypted_pem())
    p, terminal = on_terminal(dns, CERTS_DIR=str(certs))
    try:
        u = replicas[1]
        dns.set_service("f8svc", u.ip)
        p.reconfigure(serviceName="f8svc", servicePath="/f8svc", port=u.port)
        assert all_served(p, "/f8svc/hello", u)
        assert re.search(r"locked\.pem skipped: .*encrypted", p.log()), p.log()
        assert b"pass phrase" not in terminal_output(terminal).lower() and "Traceback" not in p.log()
    finally:
        p.stop()
        os.close(terminal)


# -- Deliver 2: every accepted change compiles and survives a restart ------------------------------
_serial = itertools.count()


def mostly(valid, hostile):
    """The valid strategy 3 times in 4, so that many changes are accepted and stored."""
    return st.integers(0, 3).flatmap(lambda n: hostile if n == 0 else valid)


hostile_text = st.sampled_from([
    "", " ", "\u20ac", "caf\u00e9", "\u00ff", "\U0001f600", "a\r\nb", "a\nX-Injected: 1", "\x00", "\t", "%00",
    "%[env(ADMIN_PASS)]", "%[req.hdr(Host)]", "%[src]", "(a+)+$", "^/x/(.*)$", "\\u00e9", "\\g<0>", "[", "\\",
    "*", "?", "x" * 3000, "Content-Length 0", "Transfer-Encoding chunked", "Connection close", "Host evil",
    "X-A b,X-C d", "X-A", ":", "a:b:c", "../..", "/p?q#f",
])
plain_text = st.text("abcdefgXYZ0123-_.", min_size=1, max_size=12)
text = mostly(plain_text, st.one_of(hostile_text, st.text(max_size=16)))
header_value = mostly(plain_text, st.one_of(hostile_text, st.text(max_size=16)))
header_name = mostly(st.sampled_from(["X-A", "X-Forwarded-Thing", "Cache-Control"]),
                     st.sampled_from(["Content-Length", "Transfer-Encoding", "Host", "Connection", "X-\u00e9", "X A",
                                      "", "X-A\r\nX-B"]))
header_edit = mostly(st.builds(lambda n, v: f"{n} {v}", header_name, header_value),
                     st.one_of(st.builds(lambda a, b: f"{a},{b}", text, text), hostile_text))
path = mostly(st.builds(lambda s: "/" + s, plain_text), st.one_of(hostile_text, st.text(max_size=16)))
regex = mostly(st.sampled_from(["^/r/[a-z]+$", "/x/(.*)", "\\.png$", "^/caf\u00e9"]),
               st.sampled_from(["(a+)+$", "[", "\\u00e9", "(?P<x>a)(?P=x)", "\\N{EURO SIGN}", "a{99999}"]))
OPTIONAL = {
    "pathType": mostly(st.sampled_from(["path_beg", "path", "path_end", "path_dir"]), st.just("nope")),
    "servicePathExclude": path,
    "serviceDomain": mostly(st.sampled_from(["a.test", "*.b.test", "a.test,c.test"]),
                            st.one_of(st.just("\u00e9.test"), hostile_text)),
    "serviceDomainAlgo": mostly(st.sampled_from(["hdr", "hdr_beg", "hdr_dom", "hdr_end"]), st.just("regex")),
    "aclName": text,
    "outboundHostname": mostly(st.sampled_from(["up.internal", "127.0.0.1"]), text),
    "addReqHeader": header_edit, "setReqHeader": header_edit, "delReqHeader": mostly(header_name, text),
    "addResHeader": header_edit, "setResHeader": header_edit, "delResHeader": mostly(header_name, text),
    "reqPathSearchReplace": mostly(st.sampled_from(["/a,/b", "^/x/(.*)$,/\\1", "/a,/\u00e9"]),
                                   st.one_of(st.sampled_from(["(a+)+$,/z", "/a," + "\\g<0>" * 50, "/a,/b c",
                                                              "/a,/b\\r\\nX: y", "/a"]), text)),
    "users": mostly(st.sampled_from(["u:p", "u:p,v:q", "\u00e9:\u20ac"]), text),
    "allowedMethods": mostly(st.sampled_from(["GET", "GET,POST"]), text),
    "deniedMethods": mostly(st.sampled_from(["DELETE", "PUT,PATCH"]), text),
    "allowedIPs": mostly(st.sampled_from(["10.0.0.0/8", "127.0.0.1", "::1"]), st.just("300.1.1.1")),
    "deniedIPs": mostly(st.sampled_from(["192.0.2.0/24"]), text),
    "httpsOnly": st.sampled_from(["true", "false", "yes"]),
    "redirectFromDomain": mostly(st.sampled_from(["old.test"]), text),
    "userAgent": text,
    "serviceHeader": mostly(st.builds(lambda n, v: f"{n}:{v}", header_name, header_value), text),
    "isDefaultBackend": st.sampled_from(["true", "false"]),
    "compressionAlgo": mostly(st.sampled_from(["gzip", "deflate", "gzip deflate"]), st.sampled_from(["br", ""])),
    "timeoutServer": mostly(st.sampled_from(["5", "30"]), st.sampled_from(["0", "-1", "x"])),
    "discoveryType": mostly(st.sampled_from(["DNS", "Overlay"]), st.just("x")),
    "sessionType": mostly(st.just("sticky-server"), st.just("x")),
    "servicePath.1": path, "port.1": mostly(st.just("81"), st.sampled_from(["0", "x"])),
    "addReqHeader.1": header_edit,
}


@st.composite
def reconfigure_params(draw):
    """A reconfigure from the documented parameter space (docs/reference.md), hostile now and then."""
    suffix = draw(mostly(st.just(""), st.sampled_from(["-x", "\u00e9", "\u20ac", " x", "a" * 300, "x\r\ny", "../x"])))
    params = {"serviceName": f"prop{next(_serial)}{suffix}", "servicePath": draw(path),
              "port": draw(mostly(st.just("8080"), st.sampled_from(["0", "65536", "x", "", "80 "])))}
    if draw(st.integers(0, 3)) == 0:
        params["pathType"] = "path_reg"
        params["servicePath"] = draw(regex)
    for key in draw(st.lists(st.sampled_from(sorted(OPTIONAL)), max_size=4, unique=True)):
        params[key] = draw(OPTIONAL[key])
    return params


def test_accepted_changes_compile_and_survive_restart(make_pyroute, dns, tmp_path):
    p = make_pyroute(STATE_DIR=str(tmp_path / "state"))
    accepted: dict[str, dict] = {}

    @settings(max_examples=EXAMPLES, deadline=None, database=None,
              suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
    @given(reconfigure_params())
    def send(params):
        st_, body = p.admin("reconfigure", params)
        assert st_ < 500, f"{params} -> {st_} {body}"
        assert p.alive()
        if st_ == 200:
            name = body["ServiceName"]
            assert name in config(p), f"{params} answered 200 but is not in the state"
            accepted[name] = params
        else:
            assert body["Status"] == "NOK"

    send()
    restart(p)
    wait_until(lambda: ready(p), timeout=15, what="ready after a restart with every accepted change")
    served = config(p)
    missing = {name: accepted[name] for name in accepted if name not in served}
    assert not missing, f"accepted changes lost at restart: {missing}"
    st_, body = p.admin("routes")
    assert st_ == 200 and body["Served"] == [p.admin("ping")[1]["Revision"]], body
