"""Run a real pyroute process and talk to it."""
from __future__ import annotations

import base64
import fcntl
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import termios
import tempfile
import time
import urllib.parse
from pathlib import Path

import h11

from .upstream import free_port

REPO = Path(__file__).resolve().parents[2]
API = "/v1/docker-flow-proxy"


class PyrouteDied(RuntimeError):
    pass


class Pyroute:
    def __init__(self, dns_nameserver: str, wrapper: tuple[str, ...] = (), **env: str):
        self.wrapper = wrapper  # a command the process runs under (e.g. support/mounted_at.sh)
        self.admin_port = free_port()
        self.http_port = free_port()
        self.env = {
            "PORT": str(self.admin_port),
            "IP": "127.0.0.1",
            "DEFAULT_PORTS": str(self.http_port),
            "BIND_ADDRESS": "127.0.0.1",
            "DNS_NAMESERVERS": dns_nameserver,
            "WORKERS": "1",
        }
        self.env.update({k: str(v) for k, v in env.items()})
        self.admin_port = int(self.env["PORT"])  # a test may give one PORT to several replicas
        self.admin_host = self.env["IP"]  # replicas bind 127.0.0.N on one shared PORT
        self._logdir = tempfile.mkdtemp(prefix="pyroute-test-")
        self.stderr_path = os.path.join(self._logdir, "stderr.log")
        self.proc: subprocess.Popen | None = None
        self.services: set[str] = set()
        self.terminal: int | None = None  # a pty's slave fd: the process's stdin and controlling terminal

    # -- lifecycle -----------------------------------------------------------------
    def start(self, timeout: float = 15.0) -> "Pyroute":
        env = dict(os.environ)
        env.pop("DOCKER_HOST", None)  # the Swarm listener talks only to an Engine a test gives it
        env.update(self.env)
        env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
        self._stderr = open(self.stderr_path, "wb")
        terminal = {} if self.terminal is None else {
            "stdin": self.terminal, "start_new_session": True,
            "preexec_fn": lambda: fcntl.ioctl(0, termios.TIOCSCTTY, 0)}  # as under `docker run -it`
        self.proc = subprocess.Popen([*self.wrapper, sys.executable, "-m", "pyroute"], env=env, cwd=self._logdir,
                                     **{"stdin": subprocess.DEVNULL, **terminal},
                                     stdout=self._stderr, stderr=self._stderr)
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise PyrouteDied(f"pyroute exited with {self.proc.returncode} during startup:\n{self.log()}")
            try:
                st, _ = self.admin("ping", timeout=1)
                if st == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                self.stop()
                raise PyrouteDied(f"pyroute not ready after {timeout}s:\n{self.log()}")
            time.sleep(0.02)
        return self

    def kill(self) -> int:
        """SIGKILL: no draining, no final save; what is on disk is all that survives."""
        self.proc.kill()
        code = self.proc.wait(5)
        self._stderr.close()
        return code

    def stop(self, timeout: float = 5.0) -> int | None:
        if self.proc is None:
            return None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        self._stderr.close()
        return self.proc.returncode

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def log(self) -> str:
        try:
            return Path(self.stderr_path).read_text(errors="replace")[-20000:]
        except OSError:
            return ""

    # -- admin API -------------------------------------------------------------------
    def credentials(self) -> tuple[str, str] | None:
        """What pyroute will require: the secrets in SECRETS_DIR, else ADMIN_USER/ADMIN_PASS."""
        found = []
        for name, env in (("dfp_admin_user", "ADMIN_USER"), ("dfp_admin_pass", "ADMIN_PASS")):
            try:
                found.append(Path(self.env["SECRETS_DIR"], name).read_text().strip())
            except (KeyError, OSError):
                found.append(self.env.get(env, ""))
        return (found[0], found[1]) if all(found) else None

    def admin(self, endpoint: str, params: dict | None = None, timeout: float = 10, **kw):
        """GET /v1/docker-flow-proxy/<endpoint>?params -> (status, parsed JSON or text)."""
        q = dict(params or {})
        q.update(kw)
        path = f"{API}/{endpoint}"
        if q:
            path += "?" + urllib.parse.urlencode(q)
        c = http.client.HTTPConnection(self.admin_host, self.admin_port, timeout=timeout)
        headers = {}
        if credentials := self.credentials():
            headers["Authorization"] = "Basic " + base64.b64encode(":".join(credentials).encode()).decode()
        try:
            c.request("GET", path, headers=headers)
            r = c.getresponse()
            body = r.read()
        finally:
            c.close()
        text = body.decode("utf-8", "replace")
        try:
            return r.status, json.loads(text)
        except ValueError:
            return r.status, text

    def reconfigure(self, params: dict | None = None, **kw):
        q = dict(params or {})
        q.update(kw)
        if "serviceName" in q:
            self.services.add(q["serviceName"])
        st, body = self.admin("reconfigure", q)
        assert st == 200, f"reconfigure {q} -> {st} {body}"
        return body

    def remove(self, name: str):
        st, body = self.admin("remove", serviceName=name)
        assert st == 200, f"remove {name} -> {st} {body}"
        self.services.discard(name)
        return body

    def remove_all(self):
        for s in list(self.services):
            try:
                self.admin("remove", serviceName=s)
            except OSError:
                pass
            self.services.discard(s)

    # -- data plane helpers -------------------------------------------------------------
    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.http_port}{path}"

    def conn(self, timeout: float = 10) -> http.client.HTTPConnection:
        return http.client.HTTPConnection("127.0.0.1", self.http_port, timeout=timeout)

    def get(self, path: str, headers: dict | None = None, method: str = "GET", body=None, timeout: float = 10):
        """One request on a fresh connection -> (status, headers(HTTPMessage), body bytes)."""
        c = self.conn(timeout)
        try:
            c.request(method, path, body=body, headers=headers or {})
            r = c.getresponse()
            return r.status, r.headers, r.read()
        finally:
            c.close()

    def raw(self, timeout: float = 10) -> "H11Client":
        return H11Client("127.0.0.1", self.http_port, timeout)

    def rss_kib(self) -> int:
        return rss_kib(self.proc.pid)


def children(pid: int) -> list[int]:
    """pid's child processes; a thread that ends while its list is read is skipped."""
    out = []
    try:
        for tid in os.listdir(f"/proc/{pid}/task"):
            try:
                out += [int(x) for x in Path(f"/proc/{pid}/task/{tid}/children").read_text().split()]
            except OSError:
                pass
    except OSError:
        pass
    return out


def rss_kib(pid: int) -> int:
    """VmRSS of pid plus all its descendants, in KiB."""
    total = 0
    stack = [pid]
    while stack:
        p = stack.pop()
        try:
            for line in Path(f"/proc/{p}/status").read_text().splitlines():
                if line.startswith("VmRSS:"):
                    total += int(line.split()[1])
        except OSError:
            continue
        stack += children(p)
    return total


class H11Client:
    """A raw-socket client that parses what the proxy sends back strictly with h11.

    send_raw() puts exact bytes on the wire; expect(request) tells the parser which
    request the next response answers (so pipelining works: write several requests in
    one go, then read_response() for each in order).
    """

    def __init__(self, host: str, port: int, timeout: float = 10):
        self.sock = socket.create_connection((host, port), timeout=timeout)
        self.conn = h11.Connection(h11.CLIENT)
        self._started = False

    def close(self):
        self.sock.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()

    def send_raw(self, data: bytes):
        self.sock.sendall(data)

    def expect(self, method: str, target: str, headers: list[tuple[str, str]], body: bytes = b""):
        """Tell the parser a request went out (its bytes are discarded: the caller sent its own)."""
        if self._started:
            self.conn.start_next_cycle()
        self._started = True
        self.conn.send(h11.Request(method=method, target=target, headers=headers))
        if body:
            self.conn.send(h11.Data(data=body))
        self.conn.send(h11.EndOfMessage())

    def request(self, method: str, target: str, headers: list[tuple[str, str]] | None = None,
                body: bytes = b"", send: bool = True):
        headers = list(headers or [("Host", "test.local")])
        if body:
            headers.append(("Content-Length", str(len(body))))
        wire = self.request_bytes(method, target, headers, body)
        self.expect(method, target, headers, body)
        if send:
            self.send_raw(wire)
        return wire

    @staticmethod
    def request_bytes(method, target, headers, body=b""):
        lines = [f"{method} {target} HTTP/1.1"] + [f"{k}: {v}" for k, v in headers]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    def _next(self):
        while True:
            ev = self.conn.next_event()
            if ev is h11.NEED_DATA:
                data = self.sock.recv(65536)
                self.conn.receive_data(data)
                continue
            return ev

    def next_event(self):
        return self._next()

    def read_response(self, informational: list | None = None):
        """-> (h11.Response, body bytes). 1xx responses are appended to `informational`."""
        while True:
            ev = self._next()
            if isinstance(ev, h11.InformationalResponse):
                if informational is not None:
                    informational.append(ev)
                continue
            break
        assert isinstance(ev, h11.Response), ev
        body = bytearray()
        while True:
            b = self._next()
            if isinstance(b, h11.Data):
                body += b.data
            elif isinstance(b, h11.EndOfMessage):
                break
            else:
                raise AssertionError(f"unexpected event {b!r}")
        return ev, bytes(body)

    def peer_closed(self, timeout: float = 2.0) -> bool:
        """True when the proxy closes the connection (EOF) within timeout."""
        self.sock.settimeout(timeout)
        try:
            return self.sock.recv(1) == b""
        except (socket.timeout, TimeoutError):
            return False
        except ConnectionResetError:
            return True


def hdr(resp: h11.Response, name: str) -> str | None:
    n = name.lower().encode()
    for k, v in resp.headers:
        if k == n:
            return v.decode("latin-1")
    return None


def register(proxy, dns, up, **params):
    """Reconfigure a service named in `params` whose name the test DNS resolves to `up`
    (servicePath /<name> and up's port unless given)."""
    dns.set_service(params["serviceName"], up.ip)
    params.setdefault("port", up.port)
    params.setdefault("servicePath", "/" + params["serviceName"])
    return proxy.reconfigure(params)
