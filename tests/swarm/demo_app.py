"""A go-demo stand-in run as a Swarm task (stdlib only): every answer names the task.

GET /demo/hello -> "hello, world!"; anything else -> "task <hostname>". Both carry
``X-Served-By: <hostname>`` (the container id) so a client can tell tasks apart.
"""
import os
import signal
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

HOST = socket.gethostname()


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        body = b"hello, world!\n" if self.path == "/demo/hello" else f"task {HOST}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(body)))
        self.send_header("X-Served-By", HOST)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))  # PID 1 has no default SIGTERM action
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", int(os.environ.get("PORT", "8080"))), Handler).serve_forever()
