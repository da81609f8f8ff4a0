"""The data plane's one clock: every timestamp it stores, and the tick it compares them with.

time.monotonic (CLOCK_MONOTONIC): seconds as a float, at sub-microsecond resolution, for
the cost of uvloop's `loop.time()`, which reads the same clock but ticks in whole
milliseconds (a single fast request then lasted 0 or 1 ms). The hot path reads it once
per socket read and stamps everything that read caused with that one value, so a plain
request costs two reads: its head arriving and its response arriving.
"""

from time import monotonic as clock

__all__ = ["clock"]
