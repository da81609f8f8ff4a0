"""The `pyroute` command as a user runs it: bad settings, version, the demo."""
import http.client
import json
import os
import platform
import re
import subprocess
import sys

import pyroute
from support.proxy import REPO
from support.upstream import free_port


def run(*args, env=None, timeout=20):
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([sys.executable, "-m", "pyroute", *args], env=full_env, capture_output=True,
                          text=True, timeout=timeout, stdin=subprocess.DEVNULL)


def test_invalid_setting_exits_nonzero_with_one_line_naming_it():
    result = run(env={"TIMEOUT_CONNECT": "soon", "PORT": str(free_port())})
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "TIMEOUT_CONNECT" in lines[0] and "soon" in lines[0]


def test_invalid_flag_value_names_the_flag():
    result = run("--default-ports", "80:tls")
    assert result.returncode != 0
    assert "--default-ports" in result.stderr and len(result.stderr.strip().splitlines()) == 1


def test_port_in_use_is_reported_as_what_to_do():
    busy = free_port()
    import socket

    holder = socket.socket()
    holder.bind(("127.0.0.1", busy))
    holder.listen()
    try:
        result = run(env={"PORT": str(busy), "IP": "127.0.0.1", "DEFAULT_PORTS": str(free_port()), "WORKERS": "1"})
    finally:
        holder.close()
    assert result.returncode != 0
    assert f"127.0.0.1:{busy}" in result.stderr and "already in use" in result.stderr


def test_version_names_python_and_the_libraries():
    result = run("version")
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0] == f"pyroute {pyroute.__version__}" and re.fullmatch(r"pyroute \d+\.\d+\.\d+", lines[0])
    assert lines[1].startswith(f"CPython {platform.python_version()} ")
    found = dict(line.split(" ", 1) for line in lines[2:])
    assert set(found) == {"uvloop", "httptools", "aiodns", "orjson", "google-re2", "libpass", "bcrypt", "h2",
                          "hyperframe", "acme", "josepy"}
    assert all(re.match(r"\d+\.\d+", v) for v in found.values()), found  # all installed: dependencies


def test_demo_routes_the_walkthrough():
    http_port, admin_port = free_port(), free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    demo = subprocess.Popen([sys.executable, "-m", "pyroute", "demo", "--http-port", str(http_port),
                             "--admin-port", str(admin_port)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, stdin=subprocess.DEVNULL)
    try:
        printed = []
        for line in demo.stdout:  # the demo prints its curl commands once the route is registered
            printed.append(line)
            if line.startswith("Ctrl-C stops it"):
                break
        text = "".join(printed)
        assert "registered through the admin API: HTTP/1.1 200 OK" in text, text
        assert f"curl -i localhost:{http_port}/demo/hello" in text
        c = http.client.HTTPConnection("127.0.0.1", http_port, timeout=5)
        c.request("GET", "/demo/hello")
        r = c.getresponse()
        assert (r.status, r.read()) == (200, b"hello, world!\n")
        c = http.client.HTTPConnection("127.0.0.1", admin_port, timeout=5)
        c.request("GET", "/v1/docker-flow-proxy/config?type=json")
        assert "go-demo" in json.loads(c.getresponse().read())
    finally:
        demo.terminate()
        assert demo.wait(10) == 0
