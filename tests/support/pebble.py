"""Pebble (Let's Encrypt's test ACME server, Debian's `pebble` package) for the ACME tests.

Its listener certificate is made with trustme (trusted by pyroute through ACME_CA_FILE),
its validation authority resolves names through the tests' DNS server (``-dnsserver``)
and validates on the ports pyroute listens on (``httpPort``/``tlsPort``).
PEBBLE_VA_NOSLEEP=1 validates at once; PEBBLE_AUTHZREUSE=0 makes every order validate;
PEBBLE_WFE_NONCEREJECT=0 unless a test asks for nonce rejections.
"""
from __future__ import annotations

import json
import os
import shutil
import ssl
import subprocess
import tempfile
import time
import urllib.request

import trustme

from .upstream import free_port

PEBBLE = shutil.which("pebble") or "/usr/bin/pebble"


class Pebble:
    def __init__(self, dns_nameserver: str, http_port: int, tls_port: int, **env: str):
        self.dir = tempfile.mkdtemp(prefix="pebble-test-")
        ca = trustme.CA()
        leaf = ca.issue_cert("localhost", "127.0.0.1")
        self.ca_file = os.path.join(self.dir, "ca.pem")
        ca.cert_pem.write_to_path(self.ca_file)
        leaf.cert_chain_pems[0].write_to_path(os.path.join(self.dir, "cert.pem"))
        leaf.private_key_pem.write_to_path(os.path.join(self.dir, "key.pem"))
        self.port, self.management_port = free_port(), free_port()
        config = {"pebble": {
            "listenAddress": f"127.0.0.1:{self.port}",
            "managementListenAddress": f"127.0.0.1:{self.management_port}",
            "certificate": os.path.join(self.dir, "cert.pem"),
            "privateKey": os.path.join(self.dir, "key.pem"),
            "httpPort": http_port, "tlsPort": tls_port,
            "ocspResponderURL": "", "externalAccountBindingRequired": False}}
        self.config = os.path.join(self.dir, "pebble.json")
        with open(self.config, "w") as fh:
            json.dump(config, fh)
        self.env = {"PEBBLE_VA_NOSLEEP": "1", "PEBBLE_AUTHZREUSE": "0", "PEBBLE_WFE_NONCEREJECT": "0", **env}
        self.dns_nameserver = dns_nameserver
        self.log_path = os.path.join(self.dir, "pebble.log")
        self.proc: subprocess.Popen | None = None
        self._client = ssl.create_default_context(cafile=self.ca_file)

    @property
    def directory(self) -> str:
        return f"https://127.0.0.1:{self.port}/dir"

    def start(self, timeout: float = 10.0) -> "Pebble":
        self._log = open(self.log_path, "wb")
        self.proc = subprocess.Popen([PEBBLE, "-config", self.config, "-dnsserver", self.dns_nameserver],
                                     env={**os.environ, **self.env}, stdout=self._log, stderr=self._log,
                                     stdin=subprocess.DEVNULL)
        deadline = time.monotonic() + timeout
        while True:
            try:
                with urllib.request.urlopen(self.directory, context=self._client, timeout=1) as r:
                    if r.status == 200:
                        return self
            except OSError:
                pass
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"pebble did not start:\n{self.log()}")
            time.sleep(0.05)

    def roots(self) -> str:
        """The PEM root the issued chains lead to (the management interface's /roots/0)."""
        url = f"https://127.0.0.1:{self.management_port}/roots/0"
        with urllib.request.urlopen(url, context=self._client, timeout=5) as r:
            return r.read().decode()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as fh:
                return fh.read()[-8000:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.proc is not None:
            self._log.close()
        shutil.rmtree(self.dir, ignore_errors=True)
