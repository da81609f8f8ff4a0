"""A fake Docker Engine API on a unix socket, answering in the JSON shapes of Docker 20.10
(API 1.41) as seen on a real Swarm here (shared reference test-infra.md §3):

- ``GET /v1.41/services?filters={"label":["k=v"]}`` -> list of services (label filters ANDed);
- ``GET /v1.41/services/<id or name>`` -> one service, or 404 ``{"message": ...}``;
- ``GET /v1.41/tasks?filters={"service":["<id>"]}`` -> the service's tasks (DesiredState,
  Status.State, NetworksAttachments[].Addresses), set by ``set_tasks``: Swarm emits no
  task events, so changing them emits nothing; ``rolling()`` sets UpdateStatus as
  ``docker service update`` does, with its service update event;
- ``GET /v1.41/events?filters={"type":["service"]}`` -> chunked stream, one JSON event per
  line: ``{"Type":"service","Action":"create|update|remove","Actor":{"ID":..,"Attributes":{"name":..}}}``.
  Events carry no labels (a reader must GET the service), and a create is followed by
  an update, as Docker does.

Tests change services with create/update/scale/remove, cut the event stream with
``break_streams()`` and refuse new streams with ``streams_refused = True``.
Everything runs on one asyncio loop in a background thread.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import tempfile
import threading
import time
import urllib.parse


class FakeEngine:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="fake-engine-")
        self.path = os.path.join(self.dir, "docker.sock")
        self.services: dict[str, dict] = {}
        self.tasks: dict[str, list[dict]] = {}  # service id -> its tasks
        self.requests: list[str] = []  # request targets, in order
        self.streams_refused = False
        self._streams: set[asyncio.Queue] = set()
        self._handlers: set[asyncio.Task] = set()  # connections being served, cancelled by close()
        self._ids = itertools.count(1)
        self._version = itertools.count(10)
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="fake-engine", daemon=True)
        self._thread.start()
        self._server = self._call(self._start())

    @property
    def docker_host(self) -> str:
        return f"unix://{self.path}"

    @property
    def open_streams(self) -> int:
        return len(self._streams)

    def _call(self, coro):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(10)

    async def _start(self):
        return await asyncio.start_unix_server(self._handle, self.path)

    def close(self) -> None:
        async def stop():
            self._server.close()
            for q in list(self._streams):
                q.put_nowait(None)
            while self._handlers:  # e.g. a client that connected and never sent a request; and
                handlers = list(self._handlers)  # any handler a connection accepted meanwhile started
                for task in handlers:
                    task.cancel()
                await asyncio.gather(*handlers, return_exceptions=True)
                self._handlers.difference_update(handlers)
        self._call(stop())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(5)
        try:
            os.unlink(self.path)
            os.rmdir(self.dir)
        except OSError:
            pass

    # -- the Swarm's state ---------------------------------------------------------------
    def create(self, name: str, labels: dict[str, str], replicas: int | None = 3) -> str:
        """A new service; replicas None makes it global."""
        service_id = f"svc{next(self._ids):04d}{'x' * 21}"
        mode = {"Global": {}} if replicas is None else {"Replicated": {"Replicas": replicas}}
        now = time.strftime("%Y-%m-%dT%H:%M:%S.000000000Z", time.gmtime())
        self._call(self._set(service_id, {
            "ID": service_id,
            "Version": {"Index": next(self._version)},
            "CreatedAt": now,
            "UpdatedAt": now,
            "Spec": {
                "Name": name,
                "Labels": dict(labels),
                "TaskTemplate": {"ContainerSpec": {"Image": "busybox:latest", "Args": ["sleep", "3600"]},
                                 "ForceUpdate": 0, "Runtime": "container"},
                "Mode": mode,
                "EndpointSpec": {"Mode": "dnsrr"},
            },
            "Endpoint": {"Spec": {"Mode": "dnsrr"}},
        }, "create", {"name": name}))
        self._call(self._emit("update", service_id, {"name": name}))  # Docker: VIP allocation right after
        return service_id

    def update(self, service_id: str, labels: dict[str, str]) -> None:
        """Replace the labels (docker service update --label-add/--label-rm)."""
        service = json.loads(json.dumps(self.services[service_id]))
        service["Spec"]["Labels"] = dict(labels)
        service["Version"]["Index"] = next(self._version)
        self._call(self._set(service_id, service, "update", {"name": service["Spec"]["Name"]}))

    def scale(self, service_id: str, replicas: int) -> None:
        service = json.loads(json.dumps(self.services[service_id]))
        old = service["Spec"]["Mode"]["Replicated"]["Replicas"]
        service["Spec"]["Mode"]["Replicated"]["Replicas"] = replicas
        service["Version"]["Index"] = next(self._version)
        self._call(self._set(service_id, service, "update", {
            "name": service["Spec"]["Name"], "replicas.new": str(replicas), "replicas.old": str(old)}))

    def set_tasks(self, service_id: str, tasks: list[tuple[str, str, str]]) -> None:
        """The service's tasks as (ip, desired state, state); no event, as in Swarm."""
        self.tasks[service_id] = [{
            "ID": f"task{service_id[:7]}{n:03d}", "ServiceID": service_id, "Slot": n + 1,
            "DesiredState": desired, "Status": {"State": state, "Message": state},
            "NetworksAttachments": [{"Network": {"Spec": {"Name": "proxy"}}, "Addresses": [f"{ip}/24"]}],
        } for n, (ip, desired, state) in enumerate(tasks)]

    def rolling(self, service_id: str, state: str) -> None:
        """UpdateStatus.State ("updating", "completed", ...), with Docker's update event."""
        service = json.loads(json.dumps(self.services[service_id]))
        service["UpdateStatus"] = {"State": state, "Message": f"update {state}"}
        service["Version"]["Index"] = next(self._version)
        self._call(self._set(service_id, service, "update", {
            "name": service["Spec"]["Name"], "updatestate.new": state}))

    def remove(self, service_id: str) -> None:
        name = self.services[service_id]["Spec"]["Name"]
        self._call(self._set(service_id, None, "remove", {"name": name}))

    def break_streams(self) -> None:
        """Cut every open event stream (the reader sees the connection close)."""
        async def cut():
            for q in list(self._streams):
                q.put_nowait(None)
        self._call(cut())

    async def _set(self, service_id, service, action, attributes):
        if service is None:
            self.services.pop(service_id, None)
        else:
            self.services[service_id] = service
        await self._emit(action, service_id, attributes)

    async def _emit(self, action, service_id, attributes):
        now = time.time()
        event = {"Type": "service", "Action": action, "Actor": {"ID": service_id, "Attributes": attributes},
                 "scope": "swarm", "time": int(now), "timeNano": int(now * 1e9)}
        for q in list(self._streams):
            q.put_nowait(event)

    # -- HTTP ------------------------------------------------------------------------------
    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        task = asyncio.current_task()
        self._handlers.add(task)
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, target, _ = head.split(b"\r\n", 1)[0].decode().split(" ", 2)
            self.requests.append(target)
            url = urllib.parse.urlsplit(target)
            query = urllib.parse.parse_qs(url.query)
            filters = json.loads(query["filters"][0]) if "filters" in query else {}
            path = url.path
            if not path.startswith("/v1.41/"):
                return await self._json(writer, 400, {"message": f"client version not supported: {path}"})
            path = path[len("/v1.41"):]
            if method != "GET":
                return await self._json(writer, 405, {"message": "method not allowed"})
            if path == "/services":
                wanted = filters.get("label", [])
                found = [s for s in self.services.values() if all(_label_matches(s, f) for f in wanted)]
                return await self._json(writer, 200, found)
            if path.startswith("/services/"):
                key = urllib.parse.unquote(path[len("/services/"):])
                service = self.services.get(key) or next(
                    (s for s in self.services.values() if s["Spec"]["Name"] == key), None)
                if service is None:
                    return await self._json(writer, 404, {"message": f"service {key} not found"})
                return await self._json(writer, 200, service)
            if path == "/tasks":
                wanted = filters.get("service", [])
                found = [t for sid, tasks in self.tasks.items() for t in tasks if not wanted or sid in wanted]
                return await self._json(writer, 200, found)
            if path == "/events":
                return await self._events(writer, filters)
            await self._json(writer, 404, {"message": "page not found"})
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            self._handlers.discard(task)
            writer.close()

    async def _json(self, writer, status, body):
        data = json.dumps(body).encode() + b"\n"
        reason = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
                  500: "Internal Server Error"}[status]
        writer.write(b"HTTP/1.1 %d %s\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n"
                     b"Content-Length: %d\r\n\r\n%s" % (status, reason.encode(), len(data), data))
        await writer.drain()

    async def _events(self, writer, filters):
        if self.streams_refused:
            return await self._json(writer, 500, {"message": "event stream unavailable"})
        types = filters.get("type")
        q: asyncio.Queue = asyncio.Queue()
        self._streams.add(q)
        try:
            writer.write(b"HTTP/1.1 200 OK\r\nApi-Version: 1.41\r\nContent-Type: application/json\r\n"
                         b"Transfer-Encoding: chunked\r\n\r\n")
            await writer.drain()
            while (event := await q.get()) is not None:
                if types and event["Type"] not in types:
                    continue
                line = json.dumps(event).encode() + b"\n"
                writer.write(b"%x\r\n%s\r\n" % (len(line), line))
                await writer.drain()
        finally:
            self._streams.discard(q)


def _label_matches(service: dict, wanted: str) -> bool:
    labels = service["Spec"].get("Labels") or {}
    key, eq, value = wanted.partition("=")
    return key in labels and (not eq or labels[key] == value)
