"""The control-plane log: one structured line per event (a JSON object after the usual
log prefix), so every reconfigure, removal, certificate change, replica sync and health
change can be found and parsed by its fields, with the revision it produced."""

from __future__ import annotations

import logging
import os

import orjson


def event(logger: logging.Logger, name: str, **fields) -> None:
    """Log `{"event": name, **fields, "pid": ...}` at INFO as one line."""
    logger.info("%s", orjson.dumps({"event": name, **fields, "pid": os.getpid()}).decode())
