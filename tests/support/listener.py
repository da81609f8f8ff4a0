"""A stand-in for Docker Flow Swarm Listener's API (DFSL docs/usage.md):

- ``GET /v1/docker-flow-swarm-listener/get-services``: JSON array of flat string maps,
  the reconfigure parameters of every service (with serviceName, replicas, distribute);
- ``GET /v1/docker-flow-swarm-listener/notify-services``: answers at once, then sends
  ``GET <notify_url>/reconfigure?<params>`` for every service, as DFSL does.
`fail_next(n)` makes the next n get-services calls answer 500 (a listener still starting).
"""
from __future__ import annotations

import json
import threading
import urllib.error
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class ListenerStandIn:
    def __init__(self, ip: str = "127.0.0.1"):
        self.services: list[dict[str, str]] = []
        self.notify_url = ""  # e.g. http://127.0.0.1:PORT/v1/docker-flow-proxy
        self.calls: list[str] = []
        self.refused: list[tuple[str | None, int]] = []  # (serviceName, status) of re-sent services refused
        self._fail = 0
        self._lock = threading.Lock()
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                path = urllib.parse.urlsplit(self.path).path
                with owner._lock:
                    owner.calls.append(path)
                    failing = owner._fail > 0 and path.endswith("/get-services")
                    if failing:
                        owner._fail -= 1
                    services = [dict(s) for s in owner.services]
                if failing:
                    return self._answer(500, b'{"error":"not ready"}')
                if path == "/v1/docker-flow-swarm-listener/get-services":
                    return self._answer(200, json.dumps(services).encode())
                if path == "/v1/docker-flow-swarm-listener/notify-services":
                    self._answer(200, b'{"Status":"OK"}')
                    threading.Thread(target=owner._notify, args=(services,), daemon=True).start()
                    return None
                return self._answer(404, b"{}")

            def _answer(self, status, body):
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = ThreadingHTTPServer((ip, 0), Handler)
        self.address = f"{ip}:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail_next(self, n: int) -> None:
        with self._lock:
            self._fail = n

    def count(self, suffix: str) -> int:
        with self._lock:
            return sum(1 for c in self.calls if c.endswith(suffix))

    def _notify(self, services):
        """Re-send each service as DFSL does; a refused one is recorded (DFSL logs it) and the
        rest are still sent."""
        for params in services:
            url = f"{self.notify_url}/reconfigure?{urllib.parse.urlencode(params)}"
            try:
                with urllib.request.urlopen(url, timeout=10) as r:
                    r.read()
            except urllib.error.HTTPError as exc:
                with self._lock:
                    self.refused.append((params.get("serviceName"), exc.code))

    def close(self):
        self.server.shutdown()
        self.server.server_close()
