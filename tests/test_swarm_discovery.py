"""The built-in Swarm listener against a fake Docker Engine API on a unix socket:
DFSL's label conversion, the initial listing, events, and polling when the stream breaks."""
import pytest

from pyroute.controlplane.swarm import service_params
from support.engine import FakeEngine
from support.upstream import wait_until



def labels(port, **extra):
    out = {"com.df.notify": "true", "com.df.servicePath": "/demo", "com.df.port": str(port)}
    out.update(extra)
    return out


def routes(proxy):
    st, body = proxy.admin("config", type="json")
    assert st == 200
    return body


# -- DFSL's conversion of labels to parameters (a pure function) -------------------------------
def service(name, lbls, mode=None):
    return {"ID": "x", "Spec": {"Name": name, "Labels": lbls, "Mode": mode or {"Replicated": {"Replicas": 3}}}}


def test_labels_become_params_with_service_name_replicas_and_distribute():
    params = service_params(service("go-demo", {"com.df.notify": "true", "com.df.servicePath": "/demo",
                                                "com.df.port": "8080", "other.label": "x"}))
    assert params == {"serviceName": "go-demo", "servicePath": "/demo", "port": "8080",
                      "replicas": "3", "distribute": "true"}


def test_global_service_has_no_replicas_and_distribute_label_wins():
    params = service_params(service("g", {"com.df.notify": "true", "com.df.distribute": "false",
                                          "com.df.port": "80"}, {"Global": {}}))
    assert params == {"serviceName": "g", "port": "80", "distribute": "false"}


def test_short_name_trims_the_stack_prefix_only_when_asked():
    stack = {"com.df.notify": "true", "com.docker.stack.namespace": "shop", "com.df.port": "80"}
    assert service_params(service("shop_web", stack))["serviceName"] == "shop_web"
    short = service_params(service("shop_web", {**stack, "com.df.shortName": "true"}))
    assert short["serviceName"] == "web" and short["shortName"] == "true"


def test_services_without_notify_true_are_not_routed():
    assert service_params(service("a", {"com.df.port": "80"})) is None
    assert service_params(service("a", {"com.df.notify": "false", "com.df.port": "80"})) is None
    assert service_params({"ID": "x", "Spec": {"Name": "a"}}) is None


# -- a real pyroute following the fake Engine ---------------------------------------------------
@pytest.fixture
def engine():
    e = FakeEngine()
    yield e
    e.close()


@pytest.fixture
def swarm_proxy(engine, make_pyroute, replicas, dns):
    dns.set_service("sw-before", replicas[0].ip)
    engine.create("sw-before", labels(replicas[0].port, **{"com.df.servicePath": "/sw-before"}))
    engine.create("sw-plain", {"com.df.port": "80"})  # not labelled notify=true
    p = make_pyroute(DOCKER_HOST=engine.docker_host, SWARM_POLL_INTERVAL="0.2")
    return p


def test_existing_services_are_routed_at_start_and_readiness_follows(swarm_proxy, replicas):
    wait_until(lambda: swarm_proxy.admin("successfulinitreload")[0] == 200, what="initial listing applied")
    assert set(routes(swarm_proxy)) == {"sw-before"}
    st, h, _ = swarm_proxy.get("/sw-before/x")
    assert st == 200 and h["X-Upstream"] == replicas[0].addr


def test_create_update_scale_and_remove_change_routes(swarm_proxy, engine, dns, replicas):
    up = replicas[1]
    dns.set_service("sw-live", up.ip)
    sid = engine.create("sw-live", labels(up.port, **{"com.df.servicePath": "/sw-live"}))
    wait_until(lambda: swarm_proxy.get("/sw-live/x")[0] == 200, what="route from the create event")
    assert swarm_proxy.get("/sw-live/x")[1]["X-Upstream"] == up.addr

    engine.update(sid, labels(up.port, **{"com.df.servicePath": "/sw-moved"}))
    wait_until(lambda: swarm_proxy.get("/sw-moved/x")[0] == 200, what="route from the label update")
    assert swarm_proxy.get("/sw-live/x")[0] == 503

    engine.scale(sid, 5)
    wait_until(lambda: routes(swarm_proxy).get("sw-live") is not None, what="still routed after scaling")
    engine.scale(sid, 0)  # DFSL: replicas=0 removes the route
    wait_until(lambda: "sw-live" not in routes(swarm_proxy), what="route removed at 0 replicas")
    engine.scale(sid, 2)
    wait_until(lambda: "sw-live" in routes(swarm_proxy), what="route back at 2 replicas")

    engine.remove(sid)
    wait_until(lambda: "sw-live" not in routes(swarm_proxy), what="route removed with the service")
    assert swarm_proxy.get("/sw-moved/x")[0] == 503


def test_losing_the_notify_label_removes_only_listener_routes(swarm_proxy, engine, dns, replicas):
    wait_until(lambda: "sw-before" in routes(swarm_proxy), what="initial route")
    dns.set_service("sw-admin", replicas[2].ip)
    swarm_proxy.reconfigure(serviceName="sw-admin", servicePath="/sw-admin", port=replicas[2].port)
    sid = next(i for i, s in engine.services.items() if s["Spec"]["Name"] == "sw-before")
    engine.update(sid, {"com.df.notify": "false", "com.df.port": str(replicas[0].port)})
    wait_until(lambda: "sw-before" not in routes(swarm_proxy), what="route removed with the label")
    assert "sw-admin" in routes(swarm_proxy)  # a route the listener did not create stays


def test_broken_event_stream_falls_back_to_polling_then_streams_again(swarm_proxy, engine, dns, replicas):
    wait_until(lambda: engine.open_streams == 1, what="event stream open")
    engine.streams_refused = True
    engine.break_streams()
    dns.set_service("sw-polled", replicas[0].ip)
    sid = engine.create("sw-polled", labels(replicas[0].port, **{"com.df.servicePath": "/sw-polled"}))
    # no stream is open, so only the polling can bring this route in
    wait_until(lambda: swarm_proxy.get("/sw-polled/x")[0] == 200, what="route found by polling")
    assert engine.open_streams == 0
    engine.remove(sid)
    wait_until(lambda: "sw-polled" not in routes(swarm_proxy), what="removal found by polling")
    engine.streams_refused = False
    wait_until(lambda: engine.open_streams == 1, what="event stream reopened")
    sid = engine.create("sw-streamed", labels(replicas[0].port, **{"com.df.servicePath": "/sw-streamed"}))
    wait_until(lambda: "sw-streamed" in routes(swarm_proxy), what="route from an event again")


def test_invalid_labels_are_logged_and_change_nothing(swarm_proxy, engine):
    wait_until(lambda: "sw-before" in routes(swarm_proxy), what="initial route")
    engine.create("sw-bad", {"com.df.notify": "true", "com.df.servicePath": "/sw-bad"})  # no port
    wait_until(lambda: "labels rejected" in swarm_proxy.log(), what="rejection logged")
    assert set(routes(swarm_proxy)) == {"sw-before"}
    assert swarm_proxy.alive()


def rejected_gauge(proxy) -> float:
    from prometheus_client.parser import text_string_to_metric_families
    c = proxy.conn()
    c.port = proxy.admin_port
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    return next(s.value for f in text_string_to_metric_families(text) for s in f.samples
                if s.name == "pyroute_rejected_services")


def test_rejected_labels_are_listed_with_why_and_counted_until_fixed(swarm_proxy, engine, dns, replicas):
    """Issue 17: a labelled service pyroute refuses is visible to a deploy pipeline
    (GET /v1/docker-flow-proxy/rejected and pyroute_rejected_services), not one log line."""
    wait_until(lambda: "sw-before" in routes(swarm_proxy), what="initial route")
    assert swarm_proxy.admin("rejected")[1]["Rejected"] == [] and rejected_gauge(swarm_proxy) == 0
    dns.set_service("sw-url", replicas[0].ip)
    sid = engine.create("sw-url", labels(replicas[0].port, **{"com.df.servicePath": "/sw-url",
                                                              "com.df.pathType": "url_sub"}))
    wait_until(lambda: swarm_proxy.admin("rejected")[1]["Rejected"], what="rejection listed")
    [entry] = swarm_proxy.admin("rejected")[1]["Rejected"]
    assert entry["ServiceName"] == "sw-url" and entry["Source"] == "swarm labels" and entry["Status"] == 400
    assert "url_sub" in entry["Reason"] and "path_sub" in entry["Reason"]
    assert rejected_gauge(swarm_proxy) == 1
    assert swarm_proxy.get("/sw-url/x")[0] == 503
    engine.update(sid, labels(replicas[0].port, **{"com.df.servicePath": "sw-url", "com.df.pathType": "path_sub"}))
    wait_until(lambda: swarm_proxy.get("/a/sw-url/x")[0] == 200, what="fixed labels routed")
    assert swarm_proxy.admin("rejected")[1]["Rejected"] == [] and rejected_gauge(swarm_proxy) == 0
    engine.update(sid, labels(replicas[0].port, **{"com.df.compressionAlgo": "brotli"}))
    wait_until(lambda: swarm_proxy.admin("rejected")[1]["Rejected"], what="second rejection listed")
    engine.remove(sid)  # the service is gone: so is its rejection
    wait_until(lambda: swarm_proxy.admin("rejected")[1]["Rejected"] == [], what="rejection dropped")


def test_listener_runs_in_the_control_process_with_workers(engine, make_pyroute, replicas, dns):
    dns.set_service("sw-workers", replicas[1].ip)
    engine.create("sw-workers", labels(replicas[1].port, **{"com.df.servicePath": "/sw-workers"}))
    p = make_pyroute(DOCKER_HOST=engine.docker_host, WORKERS="2")
    wait_until(lambda: p.get("/sw-workers/x")[0] == 200, what="route served by the workers")
    assert engine.open_streams == 1  # one listener (the control process), not one per worker
    assert {p.get("/sw-workers/x")[1]["X-Upstream"] for _ in range(4)} == {replicas[1].addr}


# -- settings --------------------------------------------------------------------------------------
def test_listener_is_on_when_docker_host_is_set_or_the_socket_exists(tmp_path):
    from pyroute.config import load_settings
    from pyroute.controlplane.swarm import listener_enabled

    default = load_settings([], {})
    assert default.docker_host == "unix:///var/run/docker.sock" and default.sources["docker_host"] == "default"
    missing = f"unix://{tmp_path}/docker.sock"
    assert not listener_enabled(missing, explicitly_set=False)
    assert listener_enabled(missing, explicitly_set=True)
    (tmp_path / "docker.sock").touch()
    assert listener_enabled(missing, explicitly_set=False)
    s = load_settings([], {"DOCKER_HOST": missing, "DISCOVERY_TYPE": "dns", "BALANCE": "P2C"})
    assert s.sources["docker_host"] == "env" and (s.discovery_type, s.balance) == ("DNS", "p2c")


@pytest.mark.parametrize("env, message", [
    ({"DISCOVERY_TYPE": "VIP"}, "DISCOVERY_TYPE: expected one of Overlay, DNS, got 'VIP'"),
    ({"BALANCE": "random"}, "BALANCE: expected one of roundrobin, leastconn, p2c, got 'random'"),
    ({"HEALTH_FALL": "0"}, "HEALTH_FALL: expected an integer >= 1, got '0'"),
])
def test_bad_swarm_settings_are_named(env, message):
    from pyroute.config import SettingsError, load_settings

    with pytest.raises(SettingsError) as err:
        load_settings([], env)
    assert str(err.value) == message
