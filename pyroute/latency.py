"""Recent traffic per service and per task: latency percentiles over the last minute and
request and error rates over the last 15 minutes (what the stats page charts).

The hot path pays one bisect and an integer increment per counted request: durations
fall into a fixed array of log-scale buckets (``BOUNDS``: 10 us to ~2 min, each 9% wider
than the one before) of the open time slot. Time is cut into wall-clock slots of
``SLOT`` seconds; the data plane's tick closes the open slot when the clock passes its
end (``Recent.close``), keeping only its non-empty buckets. Percentiles, rates and the
merge of several workers' slots (same wall clock, so the same slot numbers) are computed
when someone reads them.
"""

from __future__ import annotations

import math
import time
from collections import deque

SLOT = 10  # seconds per slot
MINUTE_SLOTS = 6  # the last minute: the open slot and the five before it
HISTORY_SLOTS = 90  # 15 minutes of closed slots are kept
BOUNDS = tuple(1e-5 * 2 ** (i / 8) for i in range(190))  # bucket upper bounds (s); the last bucket: above
PERCENTILES = (0.5, 0.95, 0.99)
IDLE = [0] * (len(BOUNDS) + 1)  # an open slot without requests (compared with, never changed)


def slot_now() -> int:
    """The number of the wall-clock slot open now."""
    return int(time.time() // SLOT)


class Recent:
    """Counts of one service (or task) per slot: latency buckets, and errors (5xx)."""

    __slots__ = ("counts", "slots")

    def __init__(self):
        self.counts = [0] * (len(BOUNDS) + 1)  # the open slot, by bucket (incremented per request)
        self.slots: deque[tuple[int, list[list[int]], int]] = deque(maxlen=HISTORY_SLOTS)  # closed: (slot, sparse, errors)

    def close(self, slot: int, errors: int) -> None:
        """The open slot (number `slot`) ends: keep its non-empty buckets, start a new one."""
        counts = self.counts
        if errors or counts != IDLE:  # (list equality runs in C, some 6x faster than any())
            self.slots.append((slot, _sparse(counts), errors))
            self.counts = [0] * len(counts)

    def to_json(self, slot: int, errors: int) -> list:
        """[[slot, [[bucket, count], ...], errors], ...]: the closed slots, then the open one."""
        out = [list(s) for s in self.slots if s[0] > slot - HISTORY_SLOTS]
        out.append([slot, _sparse(self.counts), errors])
        return out


def _sparse(counts: list[int]) -> list[list[int]]:
    """[[bucket, count], ...] of a slot's non-empty buckets (an idle slot's without a Python loop)."""
    return [[i, n] for i, n in enumerate(counts) if n] if counts != IDLE else []


def merge(a: list, b: list) -> list:
    """Two processes' slots (Recent.to_json) as one: counts of the same slot and bucket add."""
    slots: dict[int, tuple[dict[int, int], list[int]]] = {}
    for number, buckets, errors in (*a, *b):
        counts, errs = slots.setdefault(number, ({}, [0]))
        for i, n in buckets:
            counts[i] = counts.get(i, 0) + n
        errs[0] += errors
    return [[number, sorted([i, n] for i, n in counts.items()), errs[0]]
            for number, (counts, errs) in sorted(slots.items())]


def _value(bucket: int) -> float:
    """A bucket's representative duration: the geometric middle of its bounds."""
    if bucket == 0:
        return BOUNDS[0]
    if bucket >= len(BOUNDS):
        return BOUNDS[-1]
    return math.sqrt(BOUNDS[bucket - 1] * BOUNDS[bucket])


def percentiles(counts: dict[int, int]) -> list[float | None]:
    """p50, p95, p99 (seconds) of bucket counts; None without any request."""
    total = sum(counts.values())
    if not total:
        return [None] * len(PERCENTILES)
    out = []
    ordered = sorted(counts.items())
    for q in PERCENTILES:
        rank = max(1, math.ceil(q * total))
        running = 0
        for bucket, n in ordered:
            running += n
            if running >= rank:
                out.append(_value(bucket))
                break
    return out


def summary(slots: list, now: int) -> dict:
    """What the stats page and tools show for one service or task, from its merged slots at
    slot `now`: p50/p95/p99 (ms) over the last minute, and per slot of the last 15 minutes
    (oldest first) the request rate, the error rate (per second) and the p99 (ms, None when idle)."""
    first = now - HISTORY_SLOTS + 1
    requests = [0] * HISTORY_SLOTS
    errors = [0] * HISTORY_SLOTS
    p99: list[float | None] = [None] * HISTORY_SLOTS
    minute: dict[int, int] = {}
    for number, buckets, errs in slots:
        if number < first or number > now:
            continue
        at = number - first
        counts = dict(buckets)
        requests[at] = sum(counts.values())
        errors[at] = errs
        p = percentiles(counts)[-1]
        p99[at] = None if p is None else round(p * 1000, 3)
        if number > now - MINUTE_SLOTS:
            for i, n in counts.items():
                minute[i] = minute.get(i, 0) + n
    p50, p95, p99_minute = (None if p is None else round(p * 1000, 3) for p in percentiles(minute))
    return {
        "p50_ms": p50, "p95_ms": p95, "p99_ms": p99_minute, "requests_minute": sum(minute.values()),
        "slot_seconds": SLOT, "first_slot": first,
        "request_rate": [n / SLOT for n in requests], "error_rate": [n / SLOT for n in errors],
        "p99_ms_by_slot": p99,
    }
