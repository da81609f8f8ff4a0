"""Memory of pyroute: at rest, holding 10,000 idle keep-alive clients, and while
streaming 1 GiB up and 1 GiB down.

    python bench/memory.py [--connections 10000] [--stream-mib 1024] [--workers 1]

A proxy that buffers bodies grows by the body size; one that streams with
backpressure stays flat. Idle connections show the per-connection cost, which is
what decides whether a proxy survives many slow or idle clients. The upstream is
bench/upstream.py (not nginx, which would spool a 1 GiB upload to disk), and the
bodies are generated on the fly, never held in memory.
"""

from __future__ import annotations

import argparse
import asyncio
import socket
import sys
import tempfile
import threading
import time
from pathlib import Path

import run as bench  # bench/run.py: process control, /proc accounting, DNS, pyroute start

MIB = 1024 * 1024
IDLE_CONNECTIONS = 10_000
STREAM_MIB = 1024
CONNECT_BATCH = 500  # connections opened at once: stays under the listen backlog
SETTLE_SECONDS = 2.0  # let the proxy finish reacting before reading RSS
SAMPLE_INTERVAL = 0.02  # RSS sampling period while streaming
SEND_CHUNK = b"u" * MIB
RECV_SIZE = 256 * 1024
IO_TIMEOUT = 60.0
# pyroute's own timeouts would close idle clients (keep-alive 15 s) mid-measurement, and
# MAXCONN (DFP's 5000) would stop the listener accepting half way to 10,000.
PYROUTE_ENV = {"TIMEOUT_HTTP_KEEP_ALIVE": "3600", "TIMEOUT_CLIENT": "3600", "TIMEOUT_SERVER": "3600"}


class PeakSampler:
    """Samples a process tree's RSS in a thread; the peak is what a body would cost."""

    def __init__(self, root: int):
        self.root = root
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self):
        while not self._stop.is_set():
            self.peak = max(self.peak, bench.tree_rss_bytes(self.root))
            self._stop.wait(SAMPLE_INTERVAL)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


# --- idle keep-alive clients ------------------------------------------------------

async def open_idle_client(port: int):
    """Connect, do one request (so the connection is a served keep-alive one), keep it."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=RECV_SIZE)
    writer.write(b"GET /demo/hello HTTP/1.1\r\nHost: bench\r\n\r\n")
    head = await reader.readuntil(b"\r\n\r\n")
    if not head.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"idle client got {head[:40]!r}")
    await reader.readexactly(len(bench.HELLO_BODY))
    return reader, writer


async def hold_idle_clients(port: int, count: int, root: int) -> tuple[int, int]:
    """(connections opened, tree RSS while they are all open and idle)."""
    clients, failures = [], 0
    for start in range(0, count, CONNECT_BATCH):
        batch = min(CONNECT_BATCH, count - start)
        results = await asyncio.gather(*(asyncio.wait_for(open_idle_client(port), IO_TIMEOUT)
                                         for _ in range(batch)), return_exceptions=True)
        for result in results:
            if isinstance(result, BaseException):
                failures += 1
            else:
                clients.append(result)
    if failures:
        bench.log(f"{failures} of {count} idle clients failed to connect or get an answer")
    await asyncio.sleep(SETTLE_SECONDS)
    rss = bench.tree_rss_bytes(root)
    still_open = sum(1 for reader, _ in clients if not reader.at_eof())  # EOF = proxy closed it
    for _, writer in clients:
        writer.close()
    await asyncio.sleep(SETTLE_SECONDS)
    return still_open, rss


# --- 1 GiB streams ------------------------------------------------------------------

def read_response(sock: socket.socket) -> tuple[bytes, int]:
    """Status line and the number of body bytes read (Content-Length framed), discarding them."""
    buf = b""
    while b"\r\n\r\n" not in buf:
        data = sock.recv(RECV_SIZE)
        if not data:
            raise RuntimeError(f"connection closed before response head: {buf[:80]!r}")
        buf += data
    head, _, body = buf.partition(b"\r\n\r\n")
    length = next((int(line.split(b":", 1)[1]) for line in head.split(b"\r\n")
                   if line.lower().startswith(b"content-length:")), None)
    if length is None:
        raise RuntimeError(f"no Content-Length in {head[:200]!r}")
    received = len(body)
    while received < length:
        data = sock.recv(RECV_SIZE)
        if not data:
            break
        received += len(data)
    return head.split(b"\r\n", 1)[0], received


def stream_upload(port: int, size: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"POST /upload HTTP/1.1\r\nHost: bench\r\nContent-Type: application/octet-stream\r\n"
                     b"Content-Length: %d\r\n\r\n" % size)
        remaining = size
        while remaining:
            n = min(remaining, len(SEND_CHUNK))
            sock.sendall(SEND_CHUNK[:n] if n < len(SEND_CHUNK) else SEND_CHUNK)
            remaining -= n
        status, received = read_response(sock)
    return status.endswith(b" 200 OK"), f"{status.decode()} ({received} body bytes)"


def stream_download(port: int, size: int) -> str:
    with socket.create_connection(("127.0.0.1", port), timeout=IO_TIMEOUT) as sock:
        sock.sendall(b"GET /bytes/%d HTTP/1.1\r\nHost: bench\r\n\r\n" % size)
        status, received = read_response(sock)
    complete = received == size
    return status.endswith(b" 200 OK") and complete, \
        f"{status.decode()} ({'complete' if complete else f'INCOMPLETE: {received} of {size} bytes'})"


def measure_stream(label: str, transfer, port: int, size: int, root: int) -> tuple[str, int, int, str]:
    """(label, RSS before, peak RSS during, outcome incl. throughput)."""
    before = bench.tree_rss_bytes(root)
    started = time.monotonic()
    with PeakSampler(root) as sampler:
        try:
            ok, outcome = transfer(port, size)
        except (OSError, RuntimeError) as err:
            ok, outcome = False, repr(err)
    elapsed = time.monotonic() - started
    note = f"{outcome}, {size / MIB / elapsed:,.0f} MiB/s" if ok else f"FAILED: {outcome}"
    return label, before, max(sampler.peak, before), note


# --- main ---------------------------------------------------------------------------

def render(rows: list[tuple[str, int, int, str]]) -> str:
    lines = ["| measurement | RSS MiB before | RSS MiB at peak / with load | growth MiB | note |",
             "|---|---|---|---|---|"]
    for label, before, after, note in rows:
        lines.append(f"| {label} | {before / MIB:.1f} | {after / MIB:.1f} | {(after - before) / MIB:+.1f} | {note} |")
    return "\n".join(lines)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--connections", type=int, default=IDLE_CONNECTIONS)
    p.add_argument("--stream-mib", type=int, default=STREAM_MIB, help="size of the upload and the download")
    p.add_argument("--workers", type=int, default=1, help="pyroute WORKERS")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    bench.stop_on_sigterm()
    bench.raise_nofile()
    procs = bench.Processes()
    dns, _resolver, dns_port = bench.start_dns()
    tmp = Path(tempfile.mkdtemp(prefix="pyroute-memory-"))
    try:
        upstream_port, _ = bench.start_upstream(procs, tmp, prefer_nginx=False)
        bench.make_certificate(tmp)  # start_pyroute also opens a TLS port with it
        env = {**PYROUTE_ENV, "MAXCONN": str(args.connections + 1000)}
        target = bench.start_pyroute(procs, tmp, upstream_port, dns_port, args.workers, env=env)
        root = target.proc.pid
        time.sleep(SETTLE_SECONDS)
        at_start = bench.tree_rss_bytes(root)
        rows = [("after start, 1 route", at_start, at_start, f"WORKERS={args.workers}")]
        opened, with_idle = asyncio.run(hold_idle_clients(target.port, args.connections, root))
        per_conn = (with_idle - at_start) / max(opened, 1) / 1024
        rows.append((f"{args.connections:,} idle keep-alive clients", at_start, with_idle,
                     f"{opened:,} open at measurement, {per_conn:.1f} KiB per connection"))
        size = args.stream_mib * MIB
        rows.append(measure_stream(f"{args.stream_mib} MiB upload", stream_upload, target.port, size, root))
        rows.append(measure_stream(f"{args.stream_mib} MiB download", stream_download, target.port, size, root))
        if target.proc.poll() is not None:
            rows.append(("pyroute exited", 0, 0, f"exit code {target.proc.returncode}, see {target.log}"))
    finally:
        procs.stop_all()
        dns.stop()
    table = render(rows)
    print(f"pyroute memory ({bench.git_revision()}; Python {sys.version.split()[0]})\n\n{table}")
    failed = any("FAILED" in note or label == "pyroute exited" for label, _, _, note in rows)
    if failed:
        bench.log(f"something failed: pyroute's log is in {target.log}")
    else:
        bench.shutil.rmtree(tmp, ignore_errors=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
