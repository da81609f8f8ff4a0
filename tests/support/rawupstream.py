"""A deliberately broken upstream: a plain socket server that answers every request head
with exact bytes, for the responses h11 (the fleet's strict server) refuses to write:
malformed framing, oversized heads, a reset in the middle of a body.

Each connection is served on a thread of its own: the request head is read and kept in
``heads``, ``answer`` is written, then ``after(conn)`` runs when set (e.g. ``reset`` once
the test says so); otherwise the server waits for pyroute to end the connection and
records in ``closed_by_proxy`` whether it did (True) or kept it (False, after ``keep_for``
seconds), which tells a discarded connection from a pooled one.
"""
from __future__ import annotations

import socket
import struct
import threading


class RawUpstream:
    def __init__(self, ip: str = "127.0.0.41", answer: bytes = b"", keep_for: float = 10.0):
        self.sock = socket.socket()
        self.sock.bind((ip, 0))
        self.sock.listen(16)
        self.ip = ip
        self.port = self.sock.getsockname()[1]
        self.answer = answer
        self.after = None  # callable(conn) run after the answer instead of waiting for pyroute
        self.keep_for = keep_for
        self.heads: list[bytes] = []
        self.closed_by_proxy: list[bool] = []
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            threading.Thread(target=self._handle, args=(conn,), daemon=True).start()

    def _handle(self, conn: socket.socket) -> None:
        conn.settimeout(self.keep_for)
        try:
            head = b""
            while b"\r\n\r\n" not in head:
                chunk = conn.recv(65536)
                if not chunk:
                    return
                head += chunk
            self.heads.append(head)
            conn.sendall(self.answer)
            if self.after is not None:
                return self.after(conn)
            try:
                self.closed_by_proxy.append(conn.recv(1) == b"")
            except ConnectionResetError:
                self.closed_by_proxy.append(True)
            except (socket.timeout, TimeoutError):
                self.closed_by_proxy.append(False)
        except OSError:
            pass
        finally:
            conn.close()

    def close(self) -> None:
        self.sock.close()


def reset(conn: socket.socket) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP reset instead of a clean FIN."""
    conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    conn.close()
