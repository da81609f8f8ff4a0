"""The stack files in deploy/: parsed as YAML (as `docker stack deploy` interpolates them) and
checked against what pyroute reads: its settings, ports, readiness endpoint, Docker socket,
and the go-demo labels, which a real pyroute following a fake Engine API turns into a route.
`docker stack deploy` of both files runs in the real-Swarm tier (tests/swarm)."""
import re
from pathlib import Path

import pytest
import yaml

from pyroute.config import ListenSpec, load_settings
from pyroute.services import parse_service
from pyroute.controlplane.swarm import service_params
from support.engine import FakeEngine
from support.upstream import wait_until

DEPLOY = Path(__file__).resolve().parents[1] / "deploy"
STACKS = ["docker-stack.yml", "docker-stack-dfsl.yml"]
SOCKET = "/var/run/docker.sock"
_VARIABLE = re.compile(r"\$\{(\w+)(?::-([^}]*))?\}")


def load(name, **variables):
    """The stack file with ${VAR:-default} replaced as docker stack deploy does."""
    text = (DEPLOY / name).read_text()
    return yaml.safe_load(_VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(2) or ""), text))


def environment(service, service_name="proxy_proxy"):
    """The service's environment as pyroute sees it in a task (Swarm fills {{.Service.Name}})."""
    env = dict(item.split("=", 1) for item in service["environment"])
    return {k: v.replace("{{.Service.Name}}", service_name) for k, v in env.items()}


@pytest.mark.parametrize("name", STACKS)
def test_proxy_service_contract(name):
    stack = load(name)
    proxy = stack["services"]["proxy"]
    assert proxy["image"] == "pyroute:latest"
    assert load(name, PYROUTE_IMAGE="registry.example/pyroute:1")["services"]["proxy"]["image"] == \
        "registry.example/pyroute:1"

    settings = load_settings([], environ=environment(proxy))  # every variable is one pyroute reads, valid
    assert settings.service_name == "proxy_proxy"
    published = {p["published"]: p for p in proxy["ports"]}
    assert set(published) == {80, 443} and settings.port not in published  # admin: overlay only
    assert {(p["target"], p["protocol"], p["mode"]) for p in proxy["ports"]} == {(80, "tcp", "ingress"),
                                                                              (443, "tcp", "ingress")}
    assert {p["mode"] for p in load(name, PUBLISH_MODE="host")["services"]["proxy"]["ports"]} == {"host"}
    assert set(settings.default_ports) == {ListenSpec(80), ListenSpec(443, ssl=True)}

    mounts = {v.split(":")[1]: v for v in proxy["volumes"]}
    assert settings.state_dir in mounts and settings.certs_dir in mounts  # both survive a task replacement
    assert settings.dns_nameservers == ("127.0.0.11",)

    check = " ".join(proxy["healthcheck"]["test"])
    assert f"http://127.0.0.1:{settings.port}/v1/docker-flow-proxy/successfulinitreload" in check
    update = proxy["deploy"]["update_config"]
    assert update["order"] == "start-first" and update["failure_action"] == "rollback"
    assert load(name, UPDATE_ORDER="stop-first")["services"]["proxy"]["deploy"]["update_config"]["order"] == \
        "stop-first"
    assert proxy["stop_grace_period"] == "15s" and settings.drain_grace < 15

    assert proxy["networks"] == ["proxy"]

    # issue 17: the replicas' own credential, a Docker secret whose creation the file explains
    assert proxy["secrets"] == ["dfp_peer_token"] and stack["secrets"]["dfp_peer_token"] == {"external": True}
    assert "openssl rand -hex 32 | docker secret create dfp_peer_token -" in (DEPLOY / name).read_text()
    token_file = "/run/secrets/dfp_peer_token"  # where Swarm mounts it: pyroute's default SECRETS_DIR
    assert settings.secrets_dir == token_file.rsplit("/", 1)[0]


def test_built_in_listener_reads_the_socket_read_only_on_managers():
    stack = load("docker-stack.yml")
    proxy = stack["services"]["proxy"]
    network = stack["networks"]["proxy"]  # created by the stack, named for other stacks to join
    assert (network["name"], network["driver"], network["attachable"]) == ("proxy", "overlay", True)
    settings = load_settings([], environ=environment(proxy))
    assert settings.docker_host == f"unix://{SOCKET}"
    assert f"{SOCKET}:{SOCKET}:ro" in proxy["volumes"]
    assert "node.role == manager" in proxy["deploy"]["placement"]["constraints"]
    assert proxy["user"] == "root"  # the socket is root:docker 0660
    assert proxy["deploy"]["mode"] == "global" and "replicas" not in proxy["deploy"]


def test_dfsl_variant_replaces_only_dfps_proxy_service():
    """Deployed onto DFP's stack `proxy`: its swarm-listener stays, the proxy network exists."""
    stack = load("docker-stack-dfsl.yml")
    assert set(stack["services"]) == {"proxy"}
    proxy = stack["services"]["proxy"]
    settings = load_settings([], environ=environment(proxy))
    assert not any(SOCKET in v for v in proxy["volumes"]) and "user" not in proxy  # the image's own user
    assert settings.listener_address == ("swarm-listener",)  # DFP's stack names DFSL so, on port 8080
    assert stack["networks"]["proxy"] == {"external": True}
    assert proxy["deploy"]["replicas"] == 2 and proxy["deploy"]["rollback_config"]["order"] == "start-first"


def go_demo(name):
    service = load(name)["services"]["go-demo"]
    return service, {**service["deploy"]["labels"], "com.docker.stack.namespace": "proxy"}


def test_go_demo_labels_are_a_valid_route_on_the_proxy_network():
    service, labels = go_demo("docker-stack.yml")
    assert "proxy" in service["networks"]
    params = service_params({"ID": "x", "Spec": {"Name": "proxy_go-demo", "Labels": labels,
                                                 "Mode": {"Replicated": {"Replicas": 3}}}})
    parsed = parse_service(params)
    assert parsed.name == "go-demo"
    assert [(d.paths, d.port) for d in parsed.destinations] == [(("/demo",), 8080)]


def test_go_demo_labels_route_through_a_real_pyroute(make_pyroute, dns, replicas):
    """The labels as the stack file sets them, listed by a (fake) Engine API: routed, no admin call."""
    _, labels = go_demo("docker-stack.yml")
    labels["com.df.port"] = str(replicas[0].port)  # the stand-in go-demo's port
    engine = FakeEngine()
    try:
        engine.create("proxy_go-demo", labels)
        dns.set_service("go-demo", replicas[0].ip)
        p = make_pyroute(DOCKER_HOST=engine.docker_host)
        wait_until(lambda: p.admin("successfulinitreload")[0] == 200, what="labels listed")
        status, headers, _ = p.get("/demo/hello")
        assert status == 200 and headers["X-Upstream"] == replicas[0].addr
    finally:
        engine.close()
