"""Limits that keep one client from holding what every client shares.

- ``AddressLimit``: MAXCONN_PER_IP, the open client connections of one client address
  (the PROXY header's address when one was given). Without it, one address opening
  MAXCONN idle sockets makes every other client wait in the backlog.
- ``body_too_slow``: MIN_BODY_RATE. TIMEOUT_CLIENT alone restarts with every byte, so a
  body trickling one byte a second holds its upstream connection for as long as the
  client likes. A body must instead arrive within TIMEOUT_CLIENT plus one second per
  MIN_BODY_RATE bytes received (Apache's mod_reqtimeout rule, ``body=20,MinRate=500``
  with the defaults); a fast upload is never cut, a trickle is answered 408 soon.
"""

from __future__ import annotations


class AddressLimit:
    """Open client connections per client address; `cap` 0 counts without refusing."""

    __slots__ = ("cap", "open")

    def __init__(self, cap: int):
        self.cap = cap
        self.open: dict[bytes, int] = {}

    def admit(self, address: bytes) -> bool:
        """Count a new connection from `address`; False (not counted) when it is at the cap."""
        count = self.open.get(address, 0)
        if self.cap and count >= self.cap:
            return False
        self.open[address] = count + 1
        return True

    def release(self, address: bytes) -> None:
        count = self.open.get(address, 0) - 1
        if count > 0:
            self.open[address] = count
        else:
            self.open.pop(address, None)


def body_too_slow(now: float, head_done: float, received: int, timeout_client: float, min_rate: int) -> bool:
    """Has a request body whose head ended at `head_done`, `received` bytes so far, fallen
    behind MIN_BODY_RATE (see the module docstring)? Always False when the rate is 0."""
    return min_rate > 0 and now - head_done > timeout_client + received / min_rate
