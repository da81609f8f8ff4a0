"""What an operator meets first: `pyroute --help`, `check-config`, `routes`, the start-up
summary, and the start-up errors, each phrased as what to do (real processes throughout;
errors about permissions run pyroute in a user namespace without privileges: `unshare --user`)."""
import os
import socket
import subprocess
import sys

import pytest

from support.proxy import REPO
from support.upstream import free_port, wait_until

BASE_ENV = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), "PYTHONPATH": str(REPO)}


def pyroute(*args, env=None, unprivileged=False, timeout=20):
    """`python -m pyroute ARGS` with only `env` set (no settings leak in from the test's environment)."""
    command = [sys.executable, "-m", "pyroute", *args]
    if unprivileged:
        command = ["unshare", "--user", *command]  # uid 65534, no capabilities outside the namespace
    return subprocess.run(command, env={**BASE_ENV, **(env or {})}, capture_output=True, text=True,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def _can_unshare() -> bool:
    try:
        return subprocess.run(["unshare", "--user", "true"], capture_output=True, timeout=10).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


needs_unshare = pytest.mark.skipif(not _can_unshare(), reason="needs unprivileged user namespaces (unshare --user)")


def serving_env(tmp_path, **extra):
    """A pyroute on free loopback ports that needs nothing from this machine."""
    return {"PORT": str(free_port()), "IP": "127.0.0.1", "DEFAULT_PORTS": str(free_port()),
            "BIND_ADDRESS": "127.0.0.1", "WORKERS": "1", "DNS_NAMESERVERS": "127.0.0.1:53",
            "CERTS_DIR": str(tmp_path / "certs"), "SECRETS_DIR": str(tmp_path / "secrets"), **extra}


# -- --help and version --------------------------------------------------------------------------
def test_help_lists_every_command_with_examples():
    result = pyroute("--help")
    assert result.returncode == 0
    for command in ("serve", "check-config", "routes", "top", "demo", "version"):
        assert f"\n    {command}" in result.stdout
    assert "examples:" in result.stdout
    assert "pyroute check-config /etc/pyroute.toml" in result.stdout
    assert "pyroute routes --admin http://proxy:8080" in result.stdout
    assert "docker stack deploy -c deploy/docker-stack.yml proxy" in result.stdout
    assert pyroute("routes", "--help").stdout.count("--admin URL") == 2


# -- check-config --------------------------------------------------------------------------------
def setting_row(stdout, name):
    return next(line.split() for line in stdout.splitlines() if line.split()[:1] == [name])


def test_check_config_prints_every_setting_with_its_source(tmp_path):
    config = tmp_path / "pyroute.toml"
    config.write_text('port = 9000\ndefault_ports = ["8000", "8443:ssl"]\ntimeout_connect = 7\n')
    secrets = tmp_path / "secrets"
    secrets.mkdir()
    (secrets / "dfp_admin_user").write_text("ops\n")
    (secrets / "dfp_admin_pass").write_text("s3cret\n")
    env = {"TIMEOUT_CONNECT": "3", "SECRETS_DIR": str(secrets), "STATE_DIR": str(tmp_path / "state"),
           "CERTS_DIR": str(tmp_path / "certs")}
    result = pyroute("check-config", str(config), env=env)
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert setting_row(out, "PORT") == ["PORT", "9000", "file", str(config)]
    assert setting_row(out, "DEFAULT_PORTS") == ["DEFAULT_PORTS", "8000,8443:ssl", "file", str(config)]
    assert setting_row(out, "TIMEOUT_CONNECT") == ["TIMEOUT_CONNECT", "3", "env", "TIMEOUT_CONNECT"]  # env wins
    assert setting_row(out, "ADMIN_USER") == ["ADMIN_USER", "ops", "secret", str(secrets / "dfp_admin_user")]
    assert setting_row(out, "ADMIN_PASS") == ["ADMIN_PASS", "***", "secret", str(secrets / "dfp_admin_pass")]
    assert setting_row(out, "TIMEOUT_SERVER") == ["TIMEOUT_SERVER", "20", "default"]
    assert "s3cret" not in out
    assert out.rstrip().endswith("pyroute check-config: OK")


def test_check_config_names_every_problem_and_exits_1(tmp_path):
    config = tmp_path / "pyroute.toml"
    config.write_text('prot = 9000\ntimeout_server = "soon"\n')
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    certs = tmp_path / "certs"
    certs.mkdir()
    (certs / "broken.pem").write_text("-----BEGIN CERTIFICATE-----\nnope\n-----END CERTIFICATE-----\n")
    env = {"TIMEOUT_CONNECT": "abc", "STATE_DIR": str(blocker / "state"), "CERTS_DIR": str(certs),
           "DOCKER_HOST": f"unix://{tmp_path}/missing.sock", "ADMIN_USER": "ops", "SECRETS_DIR": str(tmp_path)}
    result = pyroute("check-config", str(config), env=env)
    assert result.returncode == 1
    problems = [line for line in result.stderr.splitlines() if line.startswith("  - ")]
    assert result.stderr.startswith(f"pyroute check-config: {len(problems)} problems:")
    text = "\n".join(problems)
    assert "prot (in " in text and "did you mean 'port'" in text
    assert "timeout_server (in " in text and "'soon'" in text
    assert "TIMEOUT_CONNECT: expected a number of seconds > 0, got 'abc'" in text
    assert "STATE_DIR" in text and "not a writable directory" in text
    assert "broken.pem" in text
    assert "missing.sock does not exist" in text
    assert "ADMIN_USER / ADMIN_PASS: only one is set" in text
    assert len(problems) == 7, text
    assert setting_row(result.stdout, "TIMEOUT_CONNECT")[1:] == ["5", "default"]  # what would run instead: none


def test_check_config_unreadable_file_is_one_problem(tmp_path):
    result = pyroute("check-config", str(tmp_path / "nope.toml"))
    assert result.returncode == 1
    assert "cannot read" in result.stderr and "nope.toml" in result.stderr


# -- routes --------------------------------------------------------------------------------------
def test_routes_prints_the_live_table_in_match_order(make_pyroute, dns, replicas):
    dns.set_service("op-web", replicas[0].ip)
    dns.set_service("op-api", replicas[1].ip)
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="pw")
    p.reconfigure(serviceName="op-web", serviceDomain="shop.example.com", port=replicas[0].port)
    p.reconfigure(serviceName="op-api", servicePath="/api,/v2", port=replicas[1].port, aclName="01-api")
    assert p.get("/api/x")[0] == 200  # a connection: op-api's address is up
    admin = f"http://127.0.0.1:{p.admin_port}"

    result = pyroute("routes", "--admin", admin, env={"ADMIN_USER": "ops", "ADMIN_PASS": "pw"})
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].split() == ["#", "HOST", "PATH", "SERVICE", "PORT", "ADDRESS", "HEALTH"]
    assert lines[1].split() == ["1", "*", "/api,/v2", "op-api", str(replicas[1].port), replicas[1].addr, "up"]
    assert lines[2].split() == ["2", "shop.example.com", "/", "op-web", str(replicas[0].port), "(not", "resolved",
                                "yet)", "-"]
    assert lines[-1].startswith("revision ") and "2 routes in match order" in lines[-1]

    assert p.get("/", headers={"Host": "shop.example.com"})[0] == 200
    result = pyroute("routes", "--admin", admin, "--user", "ops", "--password", "pw")
    assert result.stdout.splitlines()[2].split()[-2:] == [replicas[0].addr, "up"]


def test_routes_lists_the_tasks_of_dns_discovered_services(make_pyroute, dns, replicas):
    """discoveryType=DNS balances over tasks.<service> inside pyroute: each task is a row with its health."""
    dns.set_service("op-tasks", [r.ip for r in replicas])
    p = make_pyroute(WORKERS="2")
    p.reconfigure(serviceName="op-tasks", servicePath="/op-tasks", port=replicas[0].port, discoveryType="DNS")
    wait_until(lambda: {p.get("/op-tasks/x")[1]["X-Upstream"] for _ in range(9)} == {r.addr for r in replicas},
               what="every task answered")
    result = pyroute("routes", "--admin", f"http://127.0.0.1:{p.admin_port}")
    assert result.returncode == 0, result.stderr
    rows = [line.split() for line in result.stdout.splitlines()[1:4]]
    assert rows[0][:5] == ["1", "*", "/op-tasks", "op-tasks", str(replicas[0].port)]
    assert sorted(row[-2:] for row in rows) == sorted([r.addr, "up"] for r in replicas)


def test_routes_says_what_to_do_without_credentials_or_pyroute(make_pyroute):
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="pw")
    result = pyroute("routes", "--admin", f"http://127.0.0.1:{p.admin_port}")
    assert result.returncode == 1 and "set ADMIN_USER and ADMIN_PASS" in result.stderr
    result = pyroute("routes", env={"PORT": str(free_port())})
    assert result.returncode == 1 and "cannot reach the admin API at http://127.0.0.1:" in result.stderr
    assert "--admin" in result.stderr


def test_routes_endpoint_is_json_behind_admin_auth(make_pyroute):
    p = make_pyroute(ADMIN_USER="ops", ADMIN_PASS="pw")
    status, body = p.admin("routes")
    assert status == 200 and body["Status"] == "OK" and body["Routes"] == []
    p.credentials = lambda: None
    assert p.admin("routes")[0] == 401


# -- start-up summary ----------------------------------------------------------------------------
def ready_line(p):
    return next(line for line in p.log().splitlines() if "pyroute ready:" in line)


def test_start_up_summary_names_listeners_admin_dns_state_and_discovery(make_pyroute, dns, tmp_path):
    state = tmp_path / "state"
    p = make_pyroute(STATE_DIR=str(state))
    line = ready_line(p)
    assert f"listeners 127.0.0.1:{p.http_port}" in line
    assert f"admin API 127.0.0.1:{p.admin_port} (open, no ADMIN_USER/ADMIN_PASS)" in line
    assert f"DNS {dns.nameserver}" in line
    assert f"state 0 services at revision 0 restored from {state}" in line
    assert line.endswith("discovery admin API")
    p.reconfigure(serviceName="sum-a", servicePath="/a", port=80)
    p.reconfigure(serviceName="sum-b", servicePath="/b", port=80)
    revision = p.admin("ping")[1]["Revision"]
    p.stop()
    again = make_pyroute(STATE_DIR=str(state))
    assert f"state 2 services at revision {revision} restored from {state}" in ready_line(again)


def test_start_up_summary_with_labels_listener_and_credentials(make_pyroute, tmp_path):
    from support.engine import FakeEngine

    engine = FakeEngine()
    try:
        p = make_pyroute(DOCKER_HOST=engine.docker_host, ADMIN_USER="a", ADMIN_PASS="b",
                         LISTENER_ADDRESS="127.0.0.1:1", RELOAD_INTERVAL="100")
        line = ready_line(p)
    finally:
        engine.close()
    assert "(basic auth)" in line and "state in memory only (STATE_DIR is empty)" in line
    assert line.endswith(f"discovery Docker labels com.df.* via {engine.docker_host} + "
                         "Swarm Listener at 127.0.0.1:1 + admin API")


# -- errors people meet --------------------------------------------------------------------------
def test_http_port_in_use(tmp_path):
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen()
    busy = holder.getsockname()[1]
    try:
        result = pyroute(env=serving_env(tmp_path, DEFAULT_PORTS=str(busy)))
    finally:
        holder.close()
    assert result.returncode == 2
    assert f"pyroute: HTTP port 127.0.0.1:{busy} is already in use: stop what holds it or choose another port" \
        in result.stderr


@needs_unshare
def test_permission_denied_on_port_80_suggests_the_capability_or_a_higher_port(tmp_path):
    result = pyroute(env=serving_env(tmp_path, DEFAULT_PORTS="80"), unprivileged=True)
    assert result.returncode == 2
    assert "no permission to listen on 127.0.0.1:80 (HTTP): use a port above 1023" in result.stderr
    assert "cap_net_bind_service" in result.stderr


def test_unreachable_dns_server_is_logged_and_pyroute_keeps_serving(make_pyroute):
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # bound, never answers: lookups time out
    silent.bind(("127.0.0.1", 0))
    try:
        p = make_pyroute(DNS_NAMESERVERS=f"127.0.0.1:{silent.getsockname()[1]}", DNS_TIMEOUT="0.3")
        wait_until(lambda: "does not answer" in p.log(), what="the unreachable-DNS log line")
        line = next(line for line in p.log().splitlines() if "does not answer" in line)
        assert f"the DNS server 127.0.0.1:{silent.getsockname()[1]} does not answer" in line
        assert "Set DNS_NAMESERVERS to a reachable server" in line and "127.0.0.11" in line
        assert p.alive() and p.admin("ping")[0] == 200
    finally:
        silent.close()


def test_slow_dns_server_that_accepts_tcp_is_not_reported(make_pyroute):
    """Docker's resolver forwards unknown names and may time out on them: it is reachable."""
    tcp = socket.create_server(("127.0.0.1", 0))
    port = tcp.getsockname()[1]
    silent = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)  # the same port on UDP: bound, never answers
    silent.bind(("127.0.0.1", port))
    try:
        p = make_pyroute(DNS_NAMESERVERS=f"127.0.0.1:{port}", DNS_TIMEOUT="0.3")
        tcp.settimeout(10)
        tcp.accept()  # the check's TCP connect, after its UDP query timed out
        p.stop()
        assert "does not answer" not in p.log()
    finally:
        silent.close()
        tcp.close()


def test_reachable_dns_server_is_not_reported(make_pyroute):
    p = make_pyroute()
    p.reconfigure(serviceName="dns-ok", servicePath="/dns-ok", port=80)
    wait_until(lambda: p.get("/dns-ok")[0] == 503, what="a lookup (NXDOMAIN) answered")
    assert "does not answer" not in p.log()


def test_missing_docker_socket(tmp_path):
    result = pyroute(env=serving_env(tmp_path, DOCKER_HOST=f"unix://{tmp_path}/docker.sock"))
    assert result.returncode == 2
    assert f"the Docker socket {tmp_path}/docker.sock does not exist: mount it" in result.stderr
    assert "unset DOCKER_HOST" in result.stderr


@needs_unshare
def test_unreadable_docker_socket(tmp_path):
    path = tmp_path / "docker.sock"
    engine = socket.socket(socket.AF_UNIX)
    engine.bind(str(path))
    engine.listen()
    os.chown(path, 4242, 4242)  # owned by others, 0660 as on a Docker host (root:docker)
    os.chmod(path, 0o660)
    os.chmod(tmp_path, 0o755)
    try:
        result = pyroute(env=serving_env(tmp_path, DOCKER_HOST=f"unix://{path}"), unprivileged=True)
    finally:
        engine.close()
    assert result.returncode == 2
    assert f"the Docker socket {path} is not readable by uid 65534" in result.stderr
    assert "run pyroute as root (user: root in the stack file) or in group id" in result.stderr


@needs_unshare
def test_state_dir_not_writable(tmp_path):
    state = tmp_path / "state"
    state.mkdir(mode=0o555)
    os.chmod(state, 0o555)
    result = pyroute(env=serving_env(tmp_path, STATE_DIR=str(state)), unprivileged=True)
    assert result.returncode == 2
    assert f"STATE_DIR '{state}' is not usable: Permission denied: mount a volume there writable by uid 65534" \
        in result.stderr
    assert "leave STATE_DIR empty" in result.stderr


def test_unreadable_certificate_directory_is_logged_and_http_keeps_serving(make_pyroute, tmp_path):
    not_a_dir = tmp_path / "certs"
    not_a_dir.write_text("")
    p = make_pyroute(CERTS_DIR=str(not_a_dir))
    assert f"CERTS_DIR {not_a_dir} is not a readable directory" in p.log()
    assert "point CERTS_DIR at another directory" in p.log()
    assert p.get("/nothing")[0] == 503  # plain HTTP serves (no route)


@needs_unshare
def test_certificate_directory_without_permission(tmp_path):
    certs = tmp_path / "certs"
    certs.mkdir()
    os.chmod(certs, 0o000)
    os.chmod(tmp_path, 0o755)
    env = serving_env(tmp_path, CERTS_DIR=str(certs))
    proc = subprocess.Popen(["unshare", "--user", sys.executable, "-m", "pyroute"], env={**BASE_ENV, **env},
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        for line in proc.stdout:
            if "CERTS_DIR" in line or "pyroute ready" in line:
                break
        assert f"CERTS_DIR {certs} is not a readable directory (Permission denied)" in line
        assert "readable by uid 65534" in line
    finally:
        proc.terminate()
        proc.wait(10)
