"""The built-in Swarm listener: services labelled ``com.df.notify=true`` become routes.

Operators of Docker Flow Proxy run a separate Docker Flow Swarm Listener that reads
the Docker Engine API and calls the proxy's reconfigure/remove endpoints. pyroute does
the same in its control process: it lists the labelled services, turns their
``com.df.*`` labels into reconfigure parameters exactly as the listener does, and
follows ``/events`` so a created, updated, scaled or removed service changes the
routes at once. When the event stream breaks it polls the service list until the
stream is back, so nothing is missed either way.

The Engine API is spoken over its unix socket (or tcp://) with pyroute's own HTTP client
(httpclient.py): one connection per request, JSON bodies, and a stream for ``/events``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import urllib.parse
from collections.abc import AsyncIterator

from pyroute.controlplane.registry import ServiceRegistry
from pyroute.httpclient import Endpoint, HttpClientError, open_request, request
from pyroute.services import ServiceError

log = logging.getLogger("pyroute.controlplane.swarm")

API_VERSION = "v1.41"  # what Docker 20.10 speaks; newer engines accept it too
NOTIFY_FILTER = {"label": ["com.df.notify=true"]}
LABEL_PREFIX = "com.df."
STACK_LABEL = "com.docker.stack.namespace"
RETRY_STREAM = 1.0  # seconds between attempts to reopen a broken event stream


class EngineError(Exception):
    """The Engine API could not be reached or answered something unusable."""


def socket_path(docker_host: str) -> str | None:
    """The unix socket path of DOCKER_HOST, or None when it is tcp://."""
    if docker_host.startswith("unix://"):
        return docker_host[len("unix://"):]
    return None


def listener_enabled(docker_host: str, explicitly_set: bool) -> bool:
    """On when DOCKER_HOST was set, or when the default socket exists."""
    if explicitly_set:
        return True
    path = socket_path(docker_host)
    return path is not None and os.path.exists(path)


def socket_problem(docker_host: str) -> str | None:
    """Why the Engine API socket of DOCKER_HOST cannot be used, phrased as what to do;
    None when a connection opens (or DOCKER_HOST is tcp://, checked when first used).
    Refused connections (dockerd restarting) are no problem here: the listener polls."""
    path = socket_path(docker_host)
    if path is None:
        return None
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(2.0)
    try:
        probe.connect(path)
    except FileNotFoundError:
        return (f"DOCKER_HOST: the Docker socket {path} does not exist: mount it into the container "
                "(/var/run/docker.sock:/var/run/docker.sock:ro, on a manager node) for label discovery, "
                "or unset DOCKER_HOST to take routes from the admin API only")
    except PermissionError:
        try:
            group = f"group id {os.stat(path).st_gid}"
        except OSError:
            group = "its group"
        return (f"the Docker socket {path} is not readable by uid {os.getuid()}: run pyroute as root "
                f"(user: root in the stack file) or in {group}, or remove the socket mount / DOCKER_HOST "
                "to take routes from the admin API only")
    except (ConnectionRefusedError, socket.timeout):
        return None
    except OSError as exc:
        return f"DOCKER_HOST: cannot use the Docker socket {path}: {exc.strerror or exc}"
    finally:
        probe.close()
    return None


class EngineClient:
    """Just enough of the Docker Engine API, over pyroute's HTTP client."""

    def __init__(self, docker_host: str, timeout: float = 10.0):
        self.docker_host = docker_host
        self.timeout = timeout  # for one listing, or for an event stream to start
        self._endpoint: Endpoint | None = socket_path(docker_host)
        if self._endpoint is None:
            parsed = urllib.parse.urlsplit(docker_host.replace("tcp://", "http://", 1))
            if not parsed.hostname:
                raise EngineError(f"DOCKER_HOST {docker_host!r}: expected unix:///path or tcp://host:port")
            self._endpoint = (parsed.hostname, parsed.port or 2375)

    async def get_json(self, path: str):
        """GET a JSON document; (status, parsed body or None)."""
        try:
            status, body = await request(self._endpoint, "GET", f"/{API_VERSION}{path}", host="docker",
                                         timeout=self.timeout)
        except HttpClientError as exc:
            raise EngineError(f"GET {path} from the Docker Engine at {self.docker_host}: {exc}") from None
        try:
            return status, (json.loads(body) if body.strip() else None)
        except ValueError:
            raise EngineError(f"GET {path}: answer is not JSON") from None

    async def events(self, filters: dict) -> AsyncIterator[dict]:
        """The /events stream, one decoded event at a time; raises EngineError when it breaks."""
        path = "/events?filters=" + urllib.parse.quote(json.dumps(filters, separators=(",", ":")))
        try:
            response = await open_request(self._endpoint, "GET", f"/{API_VERSION}{path}", host="docker",
                                          timeout=self.timeout)
        except HttpClientError as exc:
            raise EngineError(f"GET /events from the Docker Engine at {self.docker_host}: {exc}") from None
        try:
            if response.status != 200:
                raise EngineError(f"GET /events answered {response.status}")
            pending = b""
            async for data in response.chunks():
                pending += data
                *lines, pending = pending.split(b"\n")
                for line in lines:
                    if line.strip():
                        try:
                            yield json.loads(line)
                        except ValueError:
                            log.warning("ignoring a malformed event: %r", line[:200])
        except HttpClientError as exc:
            raise EngineError(f"the event stream broke: {exc}") from None
        finally:
            response.close()


def service_params(service: dict) -> dict[str, str] | None:
    """Docker Flow Swarm Listener's conversion of one service (Engine API JSON) to
    reconfigure parameters, or None when it is not labelled com.df.notify=true.

    Every ``com.df.<key>=<value>`` label becomes ``<key>=<value>``; ``serviceName`` is the
    service name (without its stack prefix when ``com.df.shortName=true``); ``replicas``
    is the replicated count (absent for global services); ``distribute=true`` unless a
    label says otherwise.
    """
    spec = service.get("Spec") or {}
    labels = spec.get("Labels") or {}
    if labels.get("com.df.notify") != "true":
        return None
    name = spec.get("Name", "")
    if labels.get("com.df.shortName", "").lower() == "true":
        stack = labels.get(STACK_LABEL, "")
        if stack and name.startswith(stack + "_"):
            name = name[len(stack) + 1:]
    params = {"serviceName": name}
    for key, value in labels.items():
        if key.startswith(LABEL_PREFIX) and key != "com.df.notify":
            params[key[len(LABEL_PREFIX):]] = value
    params["serviceName"] = name  # a com.df.serviceName label does not rename it
    replicated = (spec.get("Mode") or {}).get("Replicated")
    if replicated is not None:
        params["replicas"] = str(replicated.get("Replicas", 0))
    params.setdefault("distribute", "true")
    return params


class SwarmListener:
    """Keeps the registry in step with the labelled services of one Docker Engine.

    It owns the routes it created (by service id) and removes them when their service
    goes away or loses its label; routes added through the admin API are left alone.
    """

    def __init__(self, registry: ServiceRegistry, client: EngineClient, poll_interval: float):
        self.registry = registry
        self.client = client
        self.poll_interval = poll_interval
        self.names: dict[str, str] = {}  # service id -> route name we applied
        self.applied: dict[str, dict[str, str]] = {}  # service id -> params last applied
        self.refused: dict[str, str] = {}  # service id -> name of its refused labels (registry.rejected)
        self.synced = asyncio.Event()  # the first full listing has been applied

    async def run(self) -> None:
        """Stream events; when the stream breaks, list again every poll interval until it is
        back. Runs until cancelled (the control plane's close)."""
        while True:
            stream = self.client.events({"type": ["service"]})
            first = asyncio.ensure_future(anext(stream))
            try:
                # Subscribe first, then list: a change between the two still arrives as an event.
                await self.sync()
                event = await first
                while True:
                    await self._on_event(event)
                    event = await anext(stream)
            except (EngineError, StopAsyncIteration) as exc:
                log.warning("Docker event stream unavailable (%s); polling every %gs", exc or "closed", self.poll_interval)
            finally:
                if not first.done():
                    first.cancel()
                await asyncio.wait([first])
                if not first.cancelled():
                    first.exception()  # retrieved: it was reported above or is moot
                await stream.aclose()
            await asyncio.sleep(self.poll_interval)

    async def sync(self) -> None:
        """Apply the full listing: new and changed services, and removal of vanished ones."""
        filters = urllib.parse.quote(json.dumps(NOTIFY_FILTER, separators=(",", ":")))
        status, services = await self.client.get_json(f"/services?filters={filters}")
        if status != 200 or not isinstance(services, list):
            raise EngineError(f"GET /services answered {status}")
        seen = set()
        for service in services:
            if isinstance(service, dict) and service.get("ID"):
                seen.add(service["ID"])
                self._apply(service["ID"], service_params(service))
        for service_id in [i for i in self.names if i not in seen]:
            self._apply(service_id, None)
        self.synced.set()

    async def _on_event(self, event: dict) -> None:
        if event.get("Type") != "service":
            return
        actor = event.get("Actor") or {}
        service_id = actor.get("ID", "")
        if not service_id:
            return
        if event.get("Action") == "remove":
            return self._apply(service_id, None)
        status, service = await self.client.get_json(f"/services/{urllib.parse.quote(service_id)}")
        if status == 404:
            return self._apply(service_id, None)
        if status != 200 or not isinstance(service, dict):
            raise EngineError(f"GET /services/{service_id} answered {status}")
        self._apply(service_id, service_params(service))

    def _apply(self, service_id: str, params: dict[str, str] | None) -> None:
        """Reconfigure (params) or remove (None) the route of one service, if it changed."""
        old_name = self.names.get(service_id)
        if params is not None and params.get("replicas") == "0":
            params = None  # DFSL: a service scaled to 0 is removed
        refused = self.refused.pop(service_id, None)
        if refused is not None and refused in self.registry.rejected:
            del self.registry.rejected[refused]  # new labels or no service: judged again below
        if params is None:
            self.applied.pop(service_id, None)
            if old_name is not None:
                del self.names[service_id]
                self.registry.remove(old_name)
            return
        if self.applied.get(service_id) == params:
            return
        try:
            self.registry.reconfigure(params)
        except ServiceError as exc:
            log.warning("service %s: labels rejected (%s): %s", params.get("serviceName"), exc.status, exc.message)
            name = params.get("serviceName") or service_id
            self.refused[service_id] = name
            self.registry.reject(name, "swarm labels", exc)
            return
        self.applied[service_id] = params
        self.names[service_id] = params["serviceName"]
        if old_name is not None and old_name != params["serviceName"]:
            self.registry.remove(old_name)
