"""The process model: how pyroute runs its two planes.

WORKERS=1: one process runs the control plane and the data plane (`Pyroute`), and the
control plane hands each snapshot straight to the data plane (`LocalPlanes`).

WORKERS > 1: one control process supervising N data-plane worker processes (`Supervisor`).

Every worker binds the public ports itself with SO_REUSEPORT, so the kernel spreads
connections across them and the control process never touches a request. Each worker
has a socketpair to the control process carrying newline-delimited JSON messages:

    control -> worker   {"settings": {...}}              first, and again after each SIGHUP
                        {"certs": {name: pem, ...}, "generation": G}  at start and after every
                                                         certificate change
                        {"revision": N, "services": [...]}  the whole snapshot (raw DFP params),
                                                         first, before the worker binds
                        {"revision": N, "base": B, "services": [...], "removed": [names]}
                                                         every later snapshot, as its change from
                                                         revision B: services added or replaced
                                                         and names removed
                        {"stats_route": [host, port]}    route STATS_URI to the admin listener there
                        {"collect": K}                   send your counters (a /metrics scrape)
    worker -> control   {"ready": true}  after its listeners are bound (it has a table by then)
                        {"applied": N}   after it swapped in revision N
                        {"collected": K, "stats": {...}}  the answer to collect K (metrics.snapshot)
                        {"certs_applied": G}  after it took certificate generation G
                        {"error": "..."} a start-up problem, or a change out of step; the worker
                                         then exits

A change costs the worker in proportion to the change (issue 14, F9): it parses only the
services the message carries and keeps every other parsed Service object, so its route
table reuses their compiled routes. A change message that does not follow the revision
the worker has is a bug the worker cannot repair: it exits, and its replacement starts
from the whole snapshot.

A reconfigure answers only once every live worker acknowledged its revision. A worker
that dies (or fails to start) is started again after a pause that doubles with each
death that follows a short life (RESTART_BACKOFF up to RESTART_BACKOFF_MAX), and gets
the current snapshot before it binds, so it never serves an empty table. While any
worker is down, readiness (successfulinitreload) says so. SIGTERM to the control process drains every worker;
SIGHUP re-reads the settings there and sends them to every worker.
If the control process dies, the workers see their socket close and exit.

Either way SIGTERM drains (`DataPlane.drain`), SIGHUP re-reads the settings (`reread`), and
`run` runs the whole on uvloop.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import ipaddress
import logging
import os
import signal
import socket
import sys
from collections.abc import Callable

import orjson
import uvloop

from pyroute import eventlog, metrics
from pyroute.config import ListenSpec, Settings, SettingsError
from pyroute.controlplane.plane import ControlPlane
from pyroute.controlplane.registry import ServiceRegistry, Snapshot
from pyroute.dataplane.plane import DataPlane
from pyroute.listen import StartupError, addresses
from pyroute.services import Service, ServiceDefaults, parse_service
from pyroute.summary import ready_summary
from pyroute.tls import CertStore, cert_store

log = logging.getLogger("pyroute")

# Settings a SIGHUP cannot change in a running process (sockets, processes, resolver).
RESTART_ONLY = ("port", "ip", "bind_address", "default_ports", "bind_ports", "workers", "dns_nameservers",
                "dns_timeout", "separator", "service_name", "header_env_allow", "preferred_certificate",
                "ssl_bind_options", "ssl_bind_ciphers", "ssl_bind_ciphersuites", "trusted_proxies", "stats_port",
                "enable_h2", "h2c",
                "acme_email", "acme_domains", "acme_directory", "acme_ca_file", "acme_challenge", "acme_renew_before",
                "acme_lease", "acme_retry")


class LocalPlanes:
    """The data plane in this very process (WORKERS=1): applying is immediate."""

    def __init__(self, plane: DataPlane):
        self.plane = plane

    def publish(self, snapshot: Snapshot) -> None:
        self.plane.apply(*snapshot)

    def publish_certs(self, certs: CertStore) -> None:
        pass  # the data plane shares the control plane's store

    async def wait_certs(self) -> list[str]:
        return []

    async def wait_applied(self, revision: int) -> list[str]:
        return []

    def unready(self) -> list[str]:
        return []  # this process serves, or it would not answer

    async def collect(self) -> dict:
        return metrics.merge([self.plane.stats_snapshot("pyroute")])


class Pyroute:
    """Both planes in one process (WORKERS=1; also what the demo and tests embed)."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.certs = cert_store(settings)
        self.certs.load()
        self.data = DataPlane(settings, self.certs)
        self.control = ControlPlane(settings, LocalPlanes(self.data), self.certs)

    @property
    def registry(self) -> ServiceRegistry:
        return self.control.registry

    async def start(self) -> None:
        self.data.prepare()
        await self.control.start()
        self.data.serve_stats_from(*self.control.admin_address())
        await self.data.start()
        settle_memory()
        log.info("%s", ready_summary(self.settings, addresses(self.data.servers),
                                     addresses(self.control.servers), self.control))

    async def stop(self, grace: float = 5.0) -> None:
        self.control.close()
        await self.data.drain(grace)

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings
        self.control.reconfigure(settings)
        self.data.reconfigure(settings)


def settle_memory() -> None:
    """Once started: move every object made so far out of the garbage collector's view.

    A proxy's per-request objects die by reference counting; what the cyclic collector
    would otherwise rescan on every full collection is the ~100k long-lived objects of
    the interpreter, uvloop and pyroute itself, a pause of milliseconds that lands on
    whichever requests are in flight. Freezing them keeps collections short.
    """
    gc.collect()
    gc.freeze()



def reread(current: Settings, load: Callable[[], Settings]) -> Settings | None:
    """The settings a SIGHUP asks for, or None (logged) when the file is bad.

    RESTART_ONLY settings keep their running values, with a warning if they changed.
    """
    try:
        new = load()
    except SettingsError as exc:
        log.error("SIGHUP: settings not reloaded, keeping the current ones: %s", exc)
        return None
    kept = {name: getattr(current, name) for name in RESTART_ONLY if getattr(new, name) != getattr(current, name)}
    if kept:
        log.warning("SIGHUP: %s only change on restart; keeping the running values", ", ".join(sorted(kept)))
    log.info("SIGHUP: settings reloaded from %s", new.config_file or "the environment")
    logging.getLogger().setLevel(new.log_level.upper())
    return dataclasses.replace(new, **kept)


async def wait_for_signal(on_hup: Callable[[], None] | None = None) -> None:
    """Return on SIGTERM or SIGINT; call `on_hup` on each SIGHUP."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if on_hup is not None:
        loop.add_signal_handler(signal.SIGHUP, on_hup)
    await stop.wait()


async def serve(settings: Settings, load: Callable[[], Settings] | None = None) -> None:
    """Run until SIGTERM or SIGINT, then drain. `load` re-reads the settings on SIGHUP."""
    if settings.workers > 1:
        return await serve_with_workers(settings, load)
    app = Pyroute(settings)
    await app.start()

    def on_hup() -> None:
        new = reread(app.settings, load) if load is not None else None
        if new is not None:
            app.reconfigure(new)

    await wait_for_signal(on_hup)
    log.info("stopping: draining connections (up to %g s)", app.settings.drain_grace)
    await app.stop(app.settings.drain_grace)


# -- WORKERS > 1: the control process's side --------------------------------------------
FD_ENV = "PYROUTE_WORKER_FD"
APPLY_TIMEOUT = 5.0  # a worker that has not applied a revision by then is restarted
RESTART_BACKOFF = 1.0  # pause before restarting a dead worker; doubled per death after a short life
RESTART_BACKOFF_MAX = 30.0
RESTART_STABLE = 30.0  # a worker that ran this long before dying starts again from the first pause
COLLECT_TIMEOUT = 2.0  # a worker that has not sent its counters by then is left out of that scrape


def settings_to_json(settings: Settings) -> dict:
    out = {}
    for f in dataclasses.fields(settings):
        if f.name == "sources":
            continue
        value = getattr(settings, f.name)
        if f.name in ("default_ports", "bind_ports"):
            value = [dataclasses.asdict(spec) for spec in value]
        elif f.name == "proxy_protocol_trusted":
            value = [str(net) for net in value]
        out[f.name] = value
    return out


def settings_from_json(data: dict) -> Settings:
    values = dict(data)
    for key in ("default_ports", "bind_ports"):
        values[key] = tuple(ListenSpec(d["port"], d["ssl"], tuple(d["options"])) for d in values[key])
    values["dns_nameservers"] = tuple(values["dns_nameservers"])
    values["listener_address"] = tuple(values["listener_address"])
    values["proxy_protocol_trusted"] = tuple(ipaddress.ip_network(n) for n in values["proxy_protocol_trusted"])
    return Settings(**values)


def _certs_message(certs: CertStore, generation: int) -> bytes:
    return orjson.dumps({"certs": certs.pems(), "challenges": certs.challenge_pems(),
                         "generation": generation}) + b"\n"


def _snapshot_message(snapshot: Snapshot) -> bytes:
    revision, services = snapshot
    return orjson.dumps({"revision": revision, "services": [s.params for s in services]}) + b"\n"


def _change_message(base: int, revision: int, changed: list[Service], removed: list[str]) -> bytes:
    return orjson.dumps({"revision": revision, "base": base, "services": [s.params for s in changed],
                         "removed": removed}) + b"\n"


class OutOfStep(Exception):
    """A change message that does not follow the revision the worker has."""


class WorkerServices:
    """A worker's copy of the control process's services: parsed once each, kept by name."""

    def __init__(self):
        self.revision: int | None = None
        self.by_name: dict[str, Service] = {}

    def follow(self, message: dict, separator: str, defaults: ServiceDefaults) -> tuple[Service, ...]:
        """The services after `message` (a whole snapshot or a change); raises OutOfStep
        for a change that does not follow this copy's revision."""
        if "base" in message:
            if message["base"] != self.revision:
                raise OutOfStep(f"a change from revision {message['base']} reached a worker at revision "
                                 f"{self.revision}")
            for name in message["removed"]:
                self.by_name.pop(name, None)
        else:
            self.by_name = {}
        for params in message["services"]:
            service = parse_service(dict(params), separator, defaults)
            self.by_name[service.name] = service
        self.revision = message["revision"]
        return tuple(self.by_name.values())


class Worker:
    """The control process's handle on one worker process."""

    def __init__(self, number: int):
        self.number = number
        self.process: asyncio.subprocess.Process | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.applied = 0
        self.certs_applied = 0
        self.ready: asyncio.Future | None = None
        self.started_at = 0.0
        self.failures = 0  # deaths in a row, each after a life shorter than RESTART_STABLE
        self.down = ""  # why it is not serving (empty while it is)
        self.changed = asyncio.Event()  # set whenever `applied` moves or the worker goes away
        self.collecting: dict[int, asyncio.Future] = {}  # collect request number -> its answer

    @property
    def name(self) -> str:
        pid = self.process.pid if self.process else "-"
        return f"worker {self.number} (pid {pid})"

    @property
    def serving(self) -> bool:
        ready = self.ready
        return self.writer is not None and ready is not None and ready.done() and not ready.cancelled() \
            and ready.exception() is None

    def send(self, message: bytes) -> None:
        if self.writer is not None and not self.writer.is_closing():
            self.writer.write(message)


class Supervisor:
    """Starts, feeds, watches and restarts the workers; the control plane's `planes`."""

    def __init__(self, settings: Settings, certs: CertStore):
        self.settings = settings
        self.certs = certs
        self.workers = [Worker(n) for n in range(settings.workers)]
        self.certs_generation = 0
        self.snapshot: Snapshot = (0, ())
        self._sent: dict[str, Service] = {}  # the snapshot's services by name: what workers have
        self.stopping = False
        self.started = False  # every first worker is up: a death from now on is restarted, not fatal
        self.stats_route: tuple[str, int] | None = None
        self._collects = 0
        self._watchers: set[asyncio.Task] = set()

    async def start(self) -> None:
        await asyncio.gather(*(self._spawn(w) for w in self.workers))
        await asyncio.gather(*(w.ready for w in self.workers))
        self.started = True

    async def _spawn(self, worker: Worker) -> None:
        loop = asyncio.get_running_loop()
        ours, theirs = socket.socketpair()
        worker.process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "pyroute.process",
            pass_fds=(theirs.fileno(),),
            env={**os.environ, FD_ENV: str(theirs.fileno())},
        )
        theirs.close()
        reader, worker.writer = await asyncio.open_unix_connection(sock=ours)
        worker.applied = 0
        worker.certs_applied = 0
        worker.ready = loop.create_future()
        worker.started_at = loop.time()
        worker.send(orjson.dumps({"settings": settings_to_json(self.settings)}) + b"\n")
        if self.stats_route is not None:
            worker.send(orjson.dumps({"stats_route": self.stats_route}) + b"\n")
        worker.send(_certs_message(self.certs, self.certs_generation))
        worker.send(_snapshot_message(self.snapshot))
        task = asyncio.ensure_future(self._watch(worker, reader))
        self._watchers.add(task)
        task.add_done_callback(self._watchers.discard)

    async def _watch(self, worker: Worker, reader: asyncio.StreamReader) -> None:
        """Read the worker's messages until it goes away, then restart it."""
        error = ""
        while line := await reader.readline():
            message = orjson.loads(line)
            if "applied" in message:
                worker.applied = message["applied"]
                worker.changed.set()
            elif "collected" in message:
                future = worker.collecting.pop(message["collected"], None)
                if future is not None and not future.done():
                    future.set_result(message["stats"])
            elif "certs_applied" in message:
                worker.certs_applied = message["certs_applied"]
                worker.changed.set()
            elif "ready" in message and not worker.ready.done():
                worker.ready.set_result(None)
                worker.down = ""
            elif "error" in message:
                error = message["error"]
        code = await worker.process.wait()
        worker.writer.close()
        worker.writer = None
        worker.changed.set()
        if not self.started and not worker.ready.done():  # a first worker that cannot start stops pyroute
            worker.ready.set_exception(StartupError(error or f"{worker.name} exited with status {code} while starting"))
            return
        loop = asyncio.get_running_loop()
        short_life = loop.time() - worker.started_at < RESTART_STABLE
        worker.failures = worker.failures + 1 if short_life else 1
        why = f"exited with status {code}" + (f" ({error})" if error else "")
        await self._restart(worker, why)

    async def _restart(self, worker: Worker, why: str) -> None:
        """Start `worker` again after its backoff pause; readiness reports it down meanwhile."""
        while not self.stopping:
            delay = min(RESTART_BACKOFF_MAX, RESTART_BACKOFF * 2 ** (worker.failures - 1))
            worker.down = f"{worker.name} {why}; next start in {delay:g} s"
            log.error("%s %s; starting a new one in %g s", worker.name, why, delay)
            await asyncio.sleep(delay)
            if self.stopping:
                return
            try:
                await self._spawn(worker)
            except OSError as exc:
                worker.failures += 1
                why = f"could not be started: {exc}"
                continue
            worker.down = f"{worker.name} is starting"
            return

    def unready(self) -> list[str]:
        """Why each worker that is not serving is down (empty when all serve)."""
        return [w.down or f"{w.name} is starting" for w in self.workers if not w.serving]

    # -- the `planes` interface the control plane uses -------------------------------------
    def publish(self, snapshot: Snapshot) -> None:
        """Send workers what changed since the last snapshot (the registry hands out the
        very same Service object for a service that did not change)."""
        revision, services = snapshot
        now = {s.name: s for s in services}
        changed = [s for s in services if self._sent.get(s.name) is not s]
        removed = [name for name in self._sent if name not in now]
        message = _change_message(self.snapshot[0], revision, changed, removed)
        self.snapshot, self._sent = snapshot, now
        for worker in self.workers:
            worker.send(message)

    def publish_certs(self, certs: CertStore) -> None:
        self.certs_generation += 1
        message = _certs_message(certs, self.certs_generation)
        for worker in self.workers:
            worker.send(message)

    async def wait_certs(self) -> list[str]:
        """Wait until every live worker serves the current certificates."""
        generation = self.certs_generation
        await self._wait(lambda w: w.certs_applied >= generation)
        return [w.name for w in self.workers if w.writer is not None and w.certs_applied < generation]

    async def _wait(self, done) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPLY_TIMEOUT
        for worker in self.workers:
            while worker.writer is not None and not done(worker) and loop.time() < deadline:
                worker.changed.clear()
                try:
                    await asyncio.wait_for(worker.changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break

    async def wait_applied(self, revision: int) -> list[str]:
        """Wait until every live worker serves `revision`; restart those that don't in time."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + APPLY_TIMEOUT
        for worker in self.workers:
            while worker.writer is not None and worker.applied < revision and loop.time() < deadline:
                worker.changed.clear()
                try:
                    await asyncio.wait_for(worker.changed.wait(), deadline - loop.time())
                except asyncio.TimeoutError:
                    break
        late = [w for w in self.workers if w.writer is not None and w.applied < revision]
        for worker in late:  # its replacement starts from the current snapshot
            log.error("%s did not apply revision %d in %.0f s; restarting it", worker.name, revision, APPLY_TIMEOUT)
            worker.process.kill()
        return []  # every worker serving traffic now has it (or is being replaced by one that will)

    async def collect(self) -> dict:
        """Every live worker's counters, merged, plus this process's own size."""
        loop = asyncio.get_running_loop()
        self._collects += 1
        number = self._collects
        waiting = []
        for worker in self.workers:
            if worker.writer is not None:
                future = worker.collecting[number] = loop.create_future()
                worker.send(orjson.dumps({"collect": number}) + b"\n")
                waiting.append(future)
        if waiting:
            await asyncio.wait(waiting, timeout=COLLECT_TIMEOUT)
        for worker in self.workers:
            worker.collecting.pop(number, None)
        merged = metrics.merge([f.result() for f in waiting if f.done() and not f.cancelled()])
        merged["processes"].insert(0, metrics.process_info("control"))
        return merged

    def serve_stats_from(self, host: str, port: int) -> None:
        """Tell every worker (and every future one) to route STATS_URI to the admin listener."""
        self.stats_route = (host, port)
        for worker in self.workers:
            worker.send(orjson.dumps({"stats_route": self.stats_route}) + b"\n")

    def reconfigure(self, settings: Settings) -> None:
        """New settings (SIGHUP) for every worker, and for those started later."""
        self.settings = settings
        message = orjson.dumps({"settings": settings_to_json(settings)}) + b"\n"
        for worker in self.workers:
            worker.send(message)

    async def stop(self) -> None:
        self.stopping = True
        for worker in self.workers:
            if worker.process and worker.process.returncode is None:
                worker.process.send_signal(signal.SIGTERM)
        await asyncio.gather(*(w.process.wait() for w in self.workers if w.process))


async def serve_with_workers(settings: Settings, load=None) -> None:
    certs = cert_store(settings)
    certs.load()
    supervisor = Supervisor(settings, certs)
    control = ControlPlane(settings, supervisor, certs)
    try:
        await supervisor.start()
        await control.start()
        supervisor.serve_stats_from(*control.admin_address())
    except BaseException:
        await supervisor.stop()
        raise
    ports = ", ".join(f"{settings.bind_address}:{s.port}" + (" (TLS)" if s.ssl else "")
                      for s in settings.default_ports + settings.bind_ports)
    log.info("%s", ready_summary(settings, f"{ports} in {settings.workers} workers",
                                 addresses(control.servers), control))
    def on_hup() -> None:
        new = reread(supervisor.settings, load) if load is not None else None
        if new is not None:
            control.reconfigure(new)
            supervisor.reconfigure(new)

    await wait_for_signal(on_hup)
    log.info("stopping: draining %d workers", settings.workers)
    control.close()
    await supervisor.stop()


# -- the worker process --------------------------------------------------------------------
async def _worker_main(fd: int) -> int:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    plane: DataPlane | None = None
    copy = WorkerServices()
    name = f"worker pid {os.getpid()}"
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: None)  # the control process re-reads settings

    async def follow() -> None:
        nonlocal plane
        while line := await reader.readline():
            message = orjson.loads(line)
            if "settings" in message:
                settings = settings_from_json(message["settings"])
                logging.getLogger().setLevel(settings.log_level.upper())
                if plane is not None:  # a SIGHUP in the control process
                    plane.reconfigure(settings)
                    continue
                plane = DataPlane(settings)
                plane.prepare()
            elif "collect" in message:
                reply = {"collected": message["collect"], "stats": plane.stats_snapshot(name)}
                writer.write(orjson.dumps(reply) + b"\n")
            elif "stats_route" in message:
                plane.serve_stats_from(*message["stats_route"])
            elif "certs" in message:
                plane.certs.replace_all(message["certs"])
                plane.certs.set_challenges(message["challenges"])
                writer.write(orjson.dumps({"certs_applied": message["generation"]}) + b"\n")
            elif "revision" in message:
                try:
                    services = copy.follow(message, plane.settings.separator,
                                           ServiceDefaults.from_settings(plane.settings))
                except OutOfStep as exc:  # exit: the replacement starts from the whole snapshot
                    writer.write(orjson.dumps({"error": str(exc)}) + b"\n")
                    await writer.drain()
                    raise
                plane.apply(message["revision"], services)
                writer.write(orjson.dumps({"applied": message["revision"]}) + b"\n")
                if not plane.servers:  # first table in hand: now accept traffic
                    try:
                        await plane.start()
                    except StartupError as exc:
                        writer.write(orjson.dumps({"error": str(exc)}) + b"\n")
                        await writer.drain()
                        raise
                    settle_memory()
                    writer.write(b'{"ready": true}\n')
        stop.set()  # the control process is gone

    follower = asyncio.ensure_future(follow())
    await asyncio.wait([follower, asyncio.ensure_future(stop.wait())], return_when=asyncio.FIRST_COMPLETED)
    if follower.done() and follower.exception() is not None:
        return 2
    if plane is not None:
        await plane.drain(plane.settings.drain_grace)
    return 0


def worker_main() -> int:
    eventlog.setup_logging("INFO", "%(asctime)s %(levelname)s %(name)s[worker]: %(message)s")
    result = []

    async def go() -> None:
        result.append(await _worker_main(int(os.environ[FD_ENV])))

    run(go())
    return result[0] if result else 1


def run(coro) -> None:
    """Run on uvloop: pyroute's hot path is written for it."""
    uvloop.run(coro)


if __name__ == "__main__":  # a worker process, started by Supervisor._spawn
    raise SystemExit(worker_main())
