"""A Docker Flow Swarm Listener stand-in run as a Swarm task (stdlib only): answers
get-services on :8080 with one service, as DFSL lists services for the proxy at start."""
import json
import os
import signal
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

SERVICES = [{"serviceName": "dfsl-demo", "servicePath": "/dfsl", "port": "8080",
             "outboundHostname": "proxy_go-demo", "replicas": "3", "distribute": "true"}]


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self):
        found = self.path.startswith("/v1/docker-flow-swarm-listener/get-services")
        body = json.dumps(SERVICES).encode() if found else b"{}"
        self.send_response(200 if found else 404)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


if __name__ == "__main__":
    signal.signal(signal.SIGTERM, lambda *_: os._exit(0))
    ThreadingHTTPServer.daemon_threads = True
    ThreadingHTTPServer(("0.0.0.0", 8080), Handler).serve_forever()
