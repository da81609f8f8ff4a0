"""The process model: one process running both planes (WORKERS=1), or a control process
supervising WORKERS data-plane processes (workers.py); the uvloop runner, signals
(SIGTERM drains, SIGHUP re-reads the settings) and the start-up summary.
"""

from __future__ import annotations

import asyncio
import dataclasses
import gc
import logging
import signal
from collections.abc import Callable

from pyroute import metrics
from pyroute.config import Settings, SettingsError
from pyroute.controlplane.plane import ControlPlane
from pyroute.controlplane.registry import ServiceRegistry, Snapshot
from pyroute.dataplane.plane import DataPlane
from pyroute.listen import addresses
from pyroute.summary import ready_summary
from pyroute.tls import CertStore, cert_store

log = logging.getLogger("pyroute")

# Settings a SIGHUP cannot change in a running process (sockets, processes, resolver).
RESTART_ONLY = ("port", "ip", "bind_address", "default_ports", "bind_ports", "workers", "dns_nameservers",
                "dns_timeout", "separator", "service_name", "header_env_allow")


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
        waiting = [f"{spec.port} (TLS, opens with the first certificate)" for spec in self.data.tls_waiting]
        log.info("%s", ready_summary(self.settings, ", ".join([addresses(self.data.servers), *waiting]),
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
        from pyroute.workers import serve_with_workers

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
