"""DFP operating settings: DFP_SERVICE_* services at start, FILTER_PROXY_INSTANCE_NAME,
Docker secrets overriding env, reload?recreate, successfulinitreload, the HAProxy-style
/config text, and raw-HAProxy parameters and env vars refused or warned about."""
import base64

import pytest

from support.upstream import wait_until


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


def test_dfp_service_env_services_loaded_at_start(make_pyroute, dns, replicas, alt):
    dns.set_service("env-one", replicas[0].ip)
    dns.set_service("env-two", "127.0.0.11")
    p = make_pyroute(**{
        "DFP_SERVICE_SERVICE_NAME": "env-one", "DFP_SERVICE_SERVICE_PATH": "/env-one", "DFP_SERVICE_PORT": replicas[0].port,
        "DFP_SERVICE_1_SERVICE_NAME": "env-two", "DFP_SERVICE_1_ACL_NAME": "00-env-two",
        "DFP_SERVICE_1_SERVICE_PATH_1": "/env-two/a", "DFP_SERVICE_1_PORT_1": alt[0].port,
        "DFP_SERVICE_1_SERVICE_PATH_2": "/env-two/b", "DFP_SERVICE_1_PORT_2": replicas[0].port,
    })
    st, h, _ = p.get("/env-one/x")
    assert st == 200 and h["X-Upstream"] == replicas[0].addr
    assert p.get("/env-two/a")[1]["X-Upstream"] == f"127.0.0.11:{alt[0].port}"
    assert p.get("/env-two/b")[1]["X-Upstream"] == f"127.0.0.11:{replicas[0].port}"
    st, body = p.admin("config", type="json")
    assert body["env-two"]["AclName"] == "00-env-two"


def test_bad_dfp_service_env_stops_start(dns):
    from support.proxy import Pyroute, PyrouteDied
    p = Pyroute(dns.nameserver, DFP_SERVICE_SERVICE_NAME="env-bad", DFP_SERVICE_SERVICE_PATH="/x")
    with pytest.raises(PyrouteDied) as info:
        p.start(timeout=10)
    assert "port query is mandatory" in str(info.value)


def test_filter_proxy_instance_name(make_pyroute, dns, replicas):
    p = make_pyroute(FILTER_PROXY_INSTANCE_NAME="true", PROXY_INSTANCE_NAME="edge")
    dns.set_service("inst-mine", replicas[0].ip)
    dns.set_service("inst-other", replicas[0].ip)
    p.reconfigure(serviceName="inst-mine", servicePath="/inst-mine", port=replicas[0].port, proxyInstanceName="edge")
    p.reconfigure(serviceName="inst-other", servicePath="/inst-other", port=replicas[0].port, proxyInstanceName="internal")
    p.reconfigure(serviceName="inst-none", servicePath="/inst-none", port=replicas[0].port)
    assert p.get("/inst-mine")[0] == 200
    assert p.get("/inst-other")[0] == 503
    assert p.get("/inst-none")[0] == 503


def test_secret_overrides_env(make_pyroute, dns, replicas, tmp_path):
    (tmp_path / "dfp_users").write_text("fromsecret:pw\n")
    (tmp_path / "dfp_service_domain_algo").write_text("hdr(host)\n")
    p = make_pyroute(SECRETS_DIR=str(tmp_path), USERS="fromenv:pw", SERVICE_DOMAIN_ALGO="hdr_beg")
    dns.set_service("sec-svc", replicas[0].ip)
    p.reconfigure(serviceName="sec-svc", serviceDomain="sec.example", port=replicas[0].port)
    assert p.get("/", headers={"Host": "sec.example", **basic("fromsecret", "pw")})[0] == 200
    assert p.get("/", headers={"Host": "sec.example", **basic("fromenv", "pw")})[0] == 401
    assert p.get("/", headers={"Host": "sec.example.evil", **basic("fromsecret", "pw")})[0] == 503  # hdr, not hdr_beg


def test_reload_recreate_and_successful_init_reload(proxy, dns, replicas):
    dns.set_service("rl-svc", replicas[0].ip)
    proxy.reconfigure(serviceName="rl-svc", servicePath="/rl-svc", port=replicas[0].port)
    _, before = proxy.admin("ping")
    st, body = proxy.admin("reload", recreate="true")
    assert st == 200 and body["Status"] == "OK", body
    _, after = proxy.admin("ping")
    assert after["Revision"] == before["Revision"] + 1
    assert proxy.get("/rl-svc")[0] == 200
    assert proxy.admin("reload")[0] == 200
    assert proxy.admin("successfulinitreload")[0] == 200


def test_config_text_reads_like_haproxy(proxy, dns, replicas):
    dns.set_service("cfg-a", replicas[0].ip)
    proxy.reconfigure(serviceName="cfg-a", servicePath="^/cfg-a/[0-9]+$", pathType="path_reg", port=replicas[0].port,
                      servicePathExclude="/cfg-a/x", serviceDomain="cfg.example", serviceDomainAlgo="hdr",
                      serviceHeader="X-Version:2", userAgent="curl", isDefaultBackend="true")
    st, text = proxy.admin("config")
    assert st == 200
    lines = text.splitlines()
    acl = "cfg-a0"
    assert f"    acl url_{acl} path_reg ^/cfg-a/[0-9]+$" in lines
    assert f"    acl url_exclude_{acl} path_beg /cfg-a/x" in lines
    assert f"    acl domain_{acl} hdr(host) -i cfg.example" in lines
    assert f"    acl hdr_{acl}_0 hdr(x-version) 2" in lines
    assert f"    acl user_agent_{acl} hdr_sub(User-Agent) -i curl" in lines
    backend = f"cfg-a-be{replicas[0].port}_0"
    assert (f"    use_backend {backend} if url_{acl} !url_exclude_{acl} domain_{acl} hdr_{acl}_0 user_agent_{acl}"
            in lines)
    assert f"    default_backend {backend}" in lines
    assert f"backend {backend}" in lines and f"    server cfg-a cfg-a:{replicas[0].port}" in lines


@pytest.mark.parametrize("param", ["templateFePath", "templateBePath", "backendExtra"])
def test_raw_haproxy_parameters_are_400(proxy, replicas, param):
    st, body = proxy.admin("reconfigure", {"serviceName": "raw-svc", "servicePath": "/raw-svc",
                                           "port": replicas[0].port, param: "/cfg/tmpl/x.tmpl"})
    assert st == 400 and body["Status"] == "NOK", body
    assert param in body["Message"] and "raw HAProxy config" in body["Message"]
    assert proxy.get("/raw-svc")[0] == 503


def test_raw_haproxy_env_warns_at_start(make_pyroute):
    p = make_pyroute(EXTRA_GLOBAL="tune.ssl.default-dh-param 4096", EXTRA_FRONTEND="option httplog",
                     TIMEOUT_QUEUE="10")
    wait_until(lambda: "EXTRA_FRONTEND is set but ignored" in p.log(), what="warning logged")
    log = p.log()
    assert "EXTRA_GLOBAL is set but ignored: pyroute does not take raw HAProxy config" in log
    assert "TIMEOUT_QUEUE" not in log  # it has an effect now: the queue of maxConn (issue 20)


def test_features_in_worker_processes(make_pyroute, dns, replicas):
    """WORKERS>1: each worker re-parses the services with the same global settings."""
    p = make_pyroute(WORKERS="2", USERS="w:pw", COMPRESSION_ALGO="gzip")
    dns.set_service("wk-svc", replicas[0].ip)
    p.reconfigure(serviceName="wk-svc", servicePath="/wk-svc", port=replicas[0].port, addReqHeader="X-Wk 1")
    for _ in range(4):  # connections land on either worker
        assert p.get("/wk-svc/hello")[0] == 401
        st, h, _ = p.get("/wk-svc/hello", headers={"Accept-Encoding": "gzip", **basic("w", "pw")})
        assert st == 200 and h["Content-Encoding"] == "gzip"
