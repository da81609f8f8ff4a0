"""The accepted services: the one place configuration changes, and what it publishes.

Every change builds a new immutable snapshot (revision, services) and hands it to the
subscribers (the data plane), which compile their own route table from it. Durability
and replica sync belong here too as they land.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

from .eventlog import event
from .services import Service, is_removal, parse_service

log = logging.getLogger("pyroute.state")

Snapshot = tuple[int, tuple[Service, ...]]


class ServiceRegistry:
    def __init__(self, separator: str = ","):
        self.separator = separator
        self.revision = 0
        self._services: dict[str, Service] = {}
        self._subscribers: list[Callable[[Snapshot], None]] = []

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        self._subscribers.append(callback)
        callback(self.snapshot())

    def snapshot(self) -> Snapshot:
        return self.revision, tuple(self._services.values())

    def get(self, name: str) -> Service | None:
        return self._services.get(name)

    def services(self) -> tuple[Service, ...]:
        return tuple(self._services.values())

    def reconfigure(self, params: Mapping[str, str]) -> Service | None:
        """Add or replace the service the params describe (None: it was a replicas=0 removal).

        Raises services.ServiceError, leaving everything as it was.
        """
        if is_removal(params):
            name = params.get("serviceName") or next((v for k, v in params.items() if k.lower() == "servicename"), "")
            self.remove(name)
            return None
        service = parse_service(params, self.separator)
        self._services[service.name] = service
        self._publish("reconfigure", service.name)
        return service

    def remove(self, name: str) -> bool:
        if self._services.pop(name, None) is None:
            return False
        self._publish("remove", name)
        return True

    def _publish(self, what: str, name: str) -> None:
        self.revision += 1
        event(log, what, service=name, revision=self.revision, services=len(self._services))
        snapshot = self.snapshot()
        for callback in self._subscribers:
            callback(snapshot)
