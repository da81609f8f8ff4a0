"""Health of a service's tasks: active probes, and probing ejected tasks back.

Passive ejection happens where traffic flows (balancer.TaskSet.failed: consecutive
connect failures or 5xx). This module runs the probes: with ``healthCheckPath`` every
task is probed each interval with ``GET <path>`` (2xx/3xx passes; ``fall`` failures in a
row eject it); without it only ejected tasks are probed, with a TCP connect. An ejected
task returns after ``rise`` passes in a row.
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from pyroute.httpclient import HttpClientError, connect, open_request

log = logging.getLogger("pyroute.dataplane.health")

PROBE_HEADERS = {"User-Agent": "pyroute-health"}


@dataclass(frozen=True, slots=True)
class HealthPolicy:
    path: str | None  # active checks when set
    interval: float
    timeout: float
    rise: int
    fall: int


class HealthMonitor:
    """Probes the tasks of one TaskSet on an interval."""

    def __init__(self, taskset, policy: HealthPolicy):
        self.taskset = taskset
        self.policy = policy
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._loop())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.policy.interval)
            tasks = [t for t in self.taskset.tasks.values() if self.policy.path or not t.in_rotation]
            if tasks:
                results = await asyncio.gather(*(self.probe(t.address) for t in tasks))
                for task, (ok, why) in zip(tasks, results):
                    self._record(task, ok, why)

    def _record(self, task, ok: bool, why: str) -> None:
        if task.gone:
            return
        if ok:
            task.fails = 0
            if not task.in_rotation:
                task.passes += 1
                if task.passes >= self.policy.rise:
                    self.taskset.restore(task)
        else:
            log.info("%s: probe of %s failed: %s", self.taskset.host, task, why)
            self.taskset.failed(task, f"health check: {why}")

    async def probe(self, address: tuple[str, int]) -> tuple[bool, str]:
        """(passed, why not): a TCP connect, plus GET <path> answering 2xx/3xx when a path is set."""
        timeout = self.policy.timeout
        try:
            if self.policy.path is None:
                _, writer = await connect(address, timeout)
                writer.close()
                return True, ""
            response = await open_request(address, "GET", self.policy.path, host=self.taskset.host,
                                          headers=PROBE_HEADERS, timeout=timeout)
        except HttpClientError as exc:
            return False, str(exc)
        response.close()
        return 200 <= response.status < 400, f"status {response.status}"
