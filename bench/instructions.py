"""Machine instructions per proxied request, counted by valgrind's callgrind: a figure that
other processes on the machine cannot move, for before/after a hot-path change on a
shared or noisy machine (wrk's req/s and CPU seconds move with the neighbours).

The same rig as bench/run.py (nginx upstream, the Swarm DNS stand-in, the route
registered as a DFP user does, `--extra-routes` more services) with the proxy under
callgrind, instrumentation off while it starts and takes its routes; then `--warmup`
requests, and the counters zeroed; then `--requests` keep-alive GETs of /demo/hello over
`--connections` connections (each sends its next request when the previous response
is read), and the counters dumped. Instructions per request = the dump's total / requests:
everything the proxy process executes (Python, uvloop, the syscalls' user side), nothing
the kernel does. The second figure counts only what runs inside libuv's socket-read callback
(`uv__read`): the same work without the timers, whose per-second cost valgrind's slowdown
spreads over fifty times fewer requests; it is the steadier one for before/after.

    python bench/instructions.py [--requests 5000] [--connections 1] [--extra-routes 1000]
        [--target pyroute|floor] [--tree DIR] [--env NAME=VALUE ...] [--keep DIR]

The proxy runs with DNS_TTL_CAP=600 (unless `--env` says otherwise): a background DNS
refresh is paid per second, not per request, and valgrind's slowdown would spread it over
fifty times fewer requests than a real run does, as noise.

`--tree` measures another checkout (e.g. `git worktree add /tmp/before <rev>`); `--keep`
keeps the callgrind output (callgrind_annotate reads it: the C functions' shares).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import run

VALGRIND = ["valgrind", "--tool=callgrind", "--instr-atstart=no", "--trace-children=no"]
STARTUP_TIMEOUT = 300.0  # a proxy under valgrind starts some 5-10 times slower
REQUEST = b"GET /demo/hello HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


async def _client(port: int, count: int) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    for _ in range(count):
        writer.write(REQUEST)
        head = await reader.readuntil(b"\r\n\r\n")
        if not head.startswith(b"HTTP/1.1 200 "):
            raise RuntimeError(f"unexpected response: {head[:200]!r}")
        length = int(re.search(rb"\r\ncontent-length: *(\d+)", head, re.I).group(1))
        await reader.readexactly(length)
    writer.close()


async def _load(port: int, requests: int, connections: int) -> None:
    share, extra = divmod(requests, connections)
    await asyncio.gather(*(_client(port, share + (n < extra)) for n in range(connections)))


def load(port: int, requests: int, connections: int) -> None:
    asyncio.run(_load(port, requests, connections))


def callgrind(pid: int, *args: str) -> None:
    subprocess.run(["callgrind_control", *args, str(pid)], check=True, capture_output=True, timeout=120)


def total_instructions(out_prefix: Path) -> int:
    """The newest dump's "summary:" or "totals:" line (Ir)."""
    dumps = sorted(glob.glob(f"{out_prefix}*"), key=lambda p: Path(p).stat().st_mtime)
    text = Path(dumps[-1]).read_text(errors="replace")
    m = re.search(r"^(?:summary|totals): (\d+)", text, re.M)
    return int(m.group(1)), dumps[-1]


def read_path_instructions(dump: str) -> int | None:
    """Instructions inside libuv's `uv__read`, inclusive: everything the socket reads set off
    (parsing, routing, forwarding, answering, counting), without timers: the proxy's tick
    (timeouts, pool sweep, closing latency slots of 1,001 services every 10 s) costs per
    second, not per request, and valgrind's slowdown spreads it over ~50x fewer requests."""
    text = subprocess.run(["callgrind_annotate", "--inclusive=yes", "--threshold=100", dump],
                          capture_output=True, text=True, check=True).stdout
    m = re.search(r"^\s*([\d,]+) \([^)]*\)\s+\S*:uv__read ", text, re.M)
    return int(m.group(1).replace(",", "")) if m else None


def profile(pid: int, port: int, duration: int, out: Path) -> None:
    """py-spy at 1000 samples/s on the proxy while wrk loads it: collapsed stacks, then the
    share of samples per function, self and inclusive."""
    spy = subprocess.Popen(["py-spy", "record", "-p", str(pid), "-r", "1000", "-d", str(duration + 1),
                            "-f", "raw", "--nolineno", "--native", "-o", str(out)], stdout=subprocess.DEVNULL)
    time.sleep(1)
    wrk = subprocess.run(["taskset", "-c", run.LOAD_CPUS, "wrk", "-t1", "-c64", f"-d{duration}s",
                          f"http://127.0.0.1:{port}/demo/hello"], capture_output=True, text=True, check=True)
    spy.wait()
    print(wrk.stdout.strip(), file=sys.stderr)
    print_shares(out)


def print_shares(collapsed: Path, top: int = 40) -> None:
    own: dict[str, int] = {}
    inclusive: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        frames = [re.sub(r" \(([^)]*/)?([^/)]+)\)$", r" (\2)", f) for f in stack.split(";")]
        n = int(count)
        total += n
        own[frames[-1]] = own.get(frames[-1], 0) + n
        for frame in set(frames):
            inclusive[frame] = inclusive.get(frame, 0) + n
    print(f"{total} samples; self %, inclusive %, function")
    for frame, n in sorted(own.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{100 * n / total:5.1f} {100 * inclusive[frame] / total:5.1f}  {frame}")


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=5000)
    p.add_argument("--warmup", type=int, default=500)
    p.add_argument("--connections", type=int, default=1)
    p.add_argument("--extra-routes", type=int, default=run.EXTRA_ROUTES)
    p.add_argument("--target", choices=("pyroute", "floor"), default="pyroute")
    p.add_argument("--tree", type=Path, default=run.REPO_DIR, help="the checkout whose pyroute is measured")
    p.add_argument("--env", action="append", default=[], help="NAME=VALUE for the proxy (e.g. DEBUG=true)")
    p.add_argument("--keep", type=Path, help="copy the callgrind output here")
    p.add_argument("--py-spy", type=Path, metavar="OUT",
                   help="no valgrind: profile the proxy with py-spy (collapsed stacks to OUT) while wrk "
                        "runs the small-GET workload (-c64) for --duration seconds")
    p.add_argument("--duration", type=int, default=20)
    args = p.parse_args(argv)

    run.STARTUP_TIMEOUT = STARTUP_TIMEOUT
    procs = run.Processes()
    with tempfile.TemporaryDirectory(prefix="pyroute-instr-") as tmpdir:
        tmp = Path(tmpdir)
        run.make_certificate(tmp)
        dns, _, dns_port = run.start_dns()
        upstream_port, _ = run.start_upstream(procs, tmp)
        out = tmp / "callgrind.out"
        valgrind = [] if args.py_spy else [*VALGRIND, f"--callgrind-out-file={out}.%p"]
        if args.target == "floor":
            port = run.free_port()
            proc = procs.start([*valgrind, sys.executable, str(run.BENCH_DIR / "floor.py"), str(port),
                                str(upstream_port)], run.SERVER_CPUS, tmp / "floor.log")
            run.wait_listening(port, proc, STARTUP_TIMEOUT)
        else:
            run.PYROUTE_CMD = [*valgrind, sys.executable, "-m", "pyroute"]
            env = {"DNS_TTL_CAP": "600", **dict(item.split("=", 1) for item in args.env)}
            target = run.start_pyroute(procs, tmp, upstream_port, dns_port, 1, args.extra_routes,
                                       env=env, tree=args.tree.resolve())
            port, proc = target.port, target.proc
        load(port, args.warmup, args.connections)
        if args.py_spy:
            return profile(proc.pid, port, args.duration, args.py_spy)
        callgrind(proc.pid, "-i", "on")
        load(port, args.warmup, args.connections)  # instrumented code warms up too
        callgrind(proc.pid, "-z")
        started = time.monotonic()
        load(port, args.requests, args.connections)
        callgrind(proc.pid, "-d")
        took = time.monotonic() - started
        total, dump = total_instructions(out)
        reads = read_path_instructions(dump)
        if args.keep:
            args.keep.mkdir(parents=True, exist_ok=True)
            kept = args.keep / Path(dump).name
            kept.write_bytes(Path(dump).read_bytes())
            print(f"callgrind output: {kept}", file=sys.stderr)
        procs.stop_all()
        dns.stop()
    print(f"{args.target} ({args.tree}) +{args.extra_routes} routes, {args.requests} requests over "
          f"{args.connections} connection(s), {took:.0f} s: {total / args.requests:,.0f} instructions/request"
          + (f", {reads / args.requests:,.0f} of them on the read path (timers excluded)" if reads else ""))


if __name__ == "__main__":
    main()
