"""The service rolled by the rolling-update check (issue 20), run as a Swarm task (stdlib only).

GET and POST (the body is read whole) take WORK seconds each and answer 200 with
``X-Served-By: <hostname>``. Every request with an ``X-Req-Id`` is logged to
``/log/<hostname>`` as ``B <id>`` when it arrives and ``E <id>`` once answered, so the
check can tell a request that reached a task which died mid-request from one that
never reached any.

On SIGTERM, with ABRUPT unset (a graceful app): stop accepting, finish the requests in
flight, then exit. With ABRUPT=1: exit at once, whatever is in flight.
"""
import os
import signal
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = socket.gethostname()
WORK = 0.05
LOG = os.open(f"/log/{HOST}", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
state = {"in_flight": 0, "stopping": False}
lock = threading.Lock()


def note(what: str, req_id: str | None) -> None:
    if req_id:
        os.write(LOG, f"{what} {req_id}\n".encode())


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def answer(self, body: bytes) -> None:
        req_id = self.headers.get("X-Req-Id")
        with lock:
            state["in_flight"] += 1
        try:
            note("B", req_id)
            time.sleep(WORK)
            self.send_response(200)
            self.send_header("Content-Type", "text/plain")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("X-Served-By", HOST)
            if state["stopping"]:
                self.send_header("Connection", "close")
                self.close_connection = True
            self.end_headers()
            self.wfile.write(body)
            self.wfile.flush()
            note("E", req_id)
        finally:
            with lock:
                state["in_flight"] -= 1

    def do_GET(self):
        self.answer(f"task {HOST}\n".encode())

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        data = self.rfile.read(length)
        self.answer(f"task {HOST} got {len(data)} bytes\n".encode())

    def log_message(self, *args):
        pass


def graceful_stop(server: ThreadingHTTPServer) -> None:
    """Stop accepting, let the requests in flight finish, exit."""
    state["stopping"] = True
    server.shutdown()  # the accept loop ends (serve_forever returns) ...
    server.socket.close()  # ... and new connections are refused
    quiet = 0
    while quiet < 3:
        time.sleep(0.05)
        quiet = quiet + 1 if state["in_flight"] == 0 else 0
    os._exit(0)


if __name__ == "__main__":
    ThreadingHTTPServer.daemon_threads = True
    server = ThreadingHTTPServer(("0.0.0.0", 8080), Handler)
    if os.environ.get("ABRUPT") == "1":
        signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    else:
        signal.signal(signal.SIGTERM, lambda *_: threading.Thread(target=graceful_stop, args=(server,)).start())
    server.serve_forever()
    threading.Event().wait()  # stopping: graceful_stop exits once the requests in flight are answered
