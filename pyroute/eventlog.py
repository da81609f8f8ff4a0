"""The control-plane log: one structured line per event (a JSON object after the usual
log prefix), so every reconfigure, removal, certificate change, replica sync and health
change can be found and parsed by its fields, with the revision it produced.

Every log line goes through `EscapingFormatter`: values that come from clients, labels,
peers or admin calls (a service name, a path, an SNI name, a certificate name) cannot
start a forged line or hide text with control characters (issue 14, F15).
"""

from __future__ import annotations

import logging
import os
import sys

import orjson


def event(logger: logging.Logger, name: str, **fields) -> None:
    """Log `{"event": name, **fields, "pid": ...}` at INFO as one line."""
    logger.info("%s", orjson.dumps({"event": name, **fields, "pid": os.getpid()}).decode())


# C0 and C1 controls, DEL and the Unicode line separators, written as Python escapes.
_ESCAPES = {c: repr(chr(c))[1:-1] for c in (*range(0x20), *range(0x7F, 0xA0), 0x2028, 0x2029)}


class EscapingFormatter(logging.Formatter):
    """A Formatter whose message part holds no control character: one record, one line
    (a traceback, added after the message, keeps its own lines)."""

    def formatMessage(self, record: logging.LogRecord) -> str:
        return super().formatMessage(record).translate(_ESCAPES)


def setup_logging(level: str, fmt: str) -> None:
    """The process's log handler on stderr, with `fmt` and escaped messages."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EscapingFormatter(fmt))
    logging.basicConfig(level=level.upper(), handlers=[handler])
