"""Flow control shared by the client, upstream and tunnel protocols.

A protocol stops reading for reasons of its own (a pipelined request waits, too much body
is buffered, ...) and for one every protocol has: the socket it forwards to has a full
send buffer (`PEER_FULL`, set from that side's `pause_writing`). Each reason is a bit of
`paused`; reading stops with the first bit and resumes when none is left, so one reason
ending never resumes a read another still holds back.

`ReadPauses` is a mixin (no slots of its own, no call layer added: `_pause`/`_resume` are
the protocol's methods) for protocols that have `transport`, `paused` (int), `closed`,
and `last_io`.
"""

from __future__ import annotations

from pyroute.dataplane.clock import clock

PEER_FULL = 1  # the socket this one's bytes go to has a full send buffer


class ReadPauses:
    __slots__ = ()

    def _pause(self, reason: int) -> None:
        if not self.paused and not self.closed:
            self.transport.pause_reading()
        self.paused |= reason

    def _resume(self, reason: int) -> None:
        if self.paused & reason:
            self.paused &= ~reason
            if not self.paused and not self.closed:
                self.last_io = clock()  # not idle while we did not read
                self.transport.resume_reading()

    def peer_writable(self, writable: bool) -> None:
        """The other side's send buffer drained (True) or filled (False): read again, or stop."""
        if writable:
            self._resume(PEER_FULL)
        else:
            self._pause(PEER_FULL)
