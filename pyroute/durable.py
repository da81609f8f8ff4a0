"""The state file in STATE_DIR: written atomically before a change is answered, read at start.

A save writes ``state.json.tmp``, fsyncs it, moves the current ``state.json`` to
``state.prev.json`` (the last good copy), renames the temp file over ``state.json`` and
fsyncs the directory, so after a crash at any point one of the files holds every
change that was acknowledged. Loading checks each file's content hash; a corrupt or
partial file is logged and the other one used, and with neither pyroute starts empty
(and then copies from its peers) rather than not at all.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import orjson

from .state import StateError, read_document

log = logging.getLogger("pyroute.durable")

CURRENT = "state.json"
PREVIOUS = "state.prev.json"
TEMP = "state.json.tmp"
PROBE = ".writable"  # created and removed at start to fail early on a read-only STATE_DIR


class StateFile:
    def __init__(self, directory: str):
        self.directory = directory
        self._lock = asyncio.Lock()
        self._requested = 0  # saves asked for
        self._covered = 0  # saves whose change is in a file already on disk
        self.writes = 0

    def prepare(self) -> None:
        """Create the directory; OSError says why it cannot be used."""
        os.makedirs(self.directory, exist_ok=True)
        probe = os.path.join(self.directory, PROBE)
        with open(probe, "wb"):
            pass
        os.unlink(probe)

    def load(self) -> dict | None:
        """The newest valid state document, or None when there is none.

        A complete temp file is newer than the previous copy: it is what a save that was
        cut between its two renames left (its change was not answered yet).
        """
        for name in (CURRENT, TEMP, PREVIOUS):
            path = os.path.join(self.directory, name)
            try:
                with open(path, "rb") as fh:
                    document = orjson.loads(fh.read())
                read_document(document)
            except FileNotFoundError:
                continue
            except (OSError, orjson.JSONDecodeError, StateError, AttributeError) as exc:
                log.error("state file %s is unusable (%s); trying the previous copy", path, exc)
                continue
            if name != CURRENT:
                log.warning("using the last good state copy %s (revision %d)", path, document["revision"])
            return document
        return None

    async def save(self, export: Callable[[], dict]) -> None:
        """Persist the state `export()` gives, durably; raises OSError if the disk refuses.

        Callers change the state, then save. Writes are serialised and take the state as
        it is when the write starts, so one write covers every save asked for before it
        (group commit): a burst of changes costs a few fsyncs, not one each.
        """
        self._requested += 1
        mine = self._requested
        async with self._lock:
            if self._covered >= mine:
                return
            covers = self._requested
            data = orjson.dumps(export())
            await asyncio.to_thread(self._write, data)
            self._covered = covers
            self.writes += 1

    def _write(self, data: bytes) -> None:
        temp = os.path.join(self.directory, TEMP)
        current = os.path.join(self.directory, CURRENT)
        fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if os.path.exists(current):
            os.replace(current, os.path.join(self.directory, PREVIOUS))
        os.replace(temp, current)
        dirfd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(dirfd)
        finally:
            os.close(dirfd)
