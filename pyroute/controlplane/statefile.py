"""The state file in STATE_DIR: written atomically before a change is answered, read at start.

A save writes ``state.json.tmp``, fsyncs it, moves the current ``state.json`` to
``state.prev.json`` (the last good copy), renames the temp file over ``state.json`` and
fsyncs the directory, so after a crash at any point one of the files holds every
change that was acknowledged. Loading checks each file's content hash. A damaged copy
(unreadable, partial, a hash that does not match, an unknown format) is never used nor
overwritten: it is renamed ``<name>.corrupt-<UTC time>`` and kept as evidence. With the
other copy good, that one is used and the revisions lost are logged; with none good the
state is *corrupt*, and the caller (replication.py) decides what that means for readiness.
A temp file that does not parse is what a save cut short leaves, and is simply ignored.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from datetime import datetime, timezone

import orjson

from pyroute.controlplane.registry import StateError, read_document
from pyroute.files import atomic_write

log = logging.getLogger("pyroute.controlplane.statefile")

CURRENT = "state.json"
PREVIOUS = "state.prev.json"
TEMP = "state.json.tmp"
PROBE = ".writable"  # created and removed at start to fail early on a read-only STATE_DIR


class Reading:
    """One state file as found at start: its document if valid, else why not."""

    def __init__(self, name: str, document: dict | None, problem: str = "", revision: int | None = None):
        self.name = name
        self.document = document
        self.problem = problem
        self.revision = revision  # the revision it claims, when that much is readable


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

    def load(self) -> tuple[dict | None, str]:
        """-> (the newest valid state document or None, "" or why the state is corrupt).

        A complete temp file is newer than the previous copy: it is what a save that was
        cut between its two renames left (its change was not answered yet). Damaged copies
        are kept aside; "corrupt" means some copy existed and none is usable.
        """
        current, temp, previous = (self._read(name) for name in (CURRENT, TEMP, PREVIOUS))
        if temp is not None and temp.document is None:
            log.info("ignoring %s: a save cut short (%s)", self._path(TEMP), temp.problem)
            temp = None
        chosen = next((r for r in (current, temp, previous) if r is not None and r.document is not None), None)
        kept = []
        for reading in (current, previous):
            if reading is not None and reading.document is None:
                kept.append(self._keep_aside(reading))
        if chosen is None:
            return None, (f"the state files in {self.directory} are corrupt; kept as {', '.join(kept)}" if kept else "")
        revision = chosen.document["revision"]
        if chosen is not current and current is None:
            log.warning("using the last good state copy %s (revision %d): %s is missing",
                        self._path(chosen.name), revision, CURRENT)
        elif chosen is not current:
            lost = f"revision {current.revision}" if current.revision is not None else \
                f"revision unknown, newer than {revision}"
            log.error("using the last good state copy %s (revision %d); lost with the damaged copy: %s",
                      self._path(chosen.name), revision, lost)
        return chosen.document, ""

    def _path(self, name: str) -> str:
        return os.path.join(self.directory, name)

    def _read(self, name: str) -> Reading | None:
        """The file `name` (None when absent), validated."""
        path = self._path(name)
        document = None
        try:
            with open(path, "rb") as fh:
                document = orjson.loads(fh.read())
            read_document(document)
            return Reading(name, document)
        except FileNotFoundError:
            return None
        except (OSError, orjson.JSONDecodeError, StateError) as exc:
            claimed = document.get("revision") if isinstance(document, dict) else None
            return Reading(name, None, str(exc), claimed if isinstance(claimed, int) else None)

    def _keep_aside(self, reading: Reading) -> str:
        """Rename a damaged copy to <name>.corrupt-<UTC time>, out of every later save's way."""
        stamp = datetime.now(timezone.utc).strftime("%Y%m%dT%H%M%S.%fZ")
        aside = self._path(f"{reading.name}.corrupt-{stamp}")
        os.rename(self._path(reading.name), aside)
        log.error("state file %s is unusable (%s); kept as %s", self._path(reading.name), reading.problem, aside)
        return aside

    async def save(self, export: Callable[[], bytes]) -> None:
        """Persist the state document `export()` serialises, durably; raises OSError if the
        disk refuses.

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
            data = export()
            await asyncio.to_thread(atomic_write, self.directory, CURRENT, data, temp=TEMP, previous=PREVIOUS)
            self._covered = covers
            self.writes += 1
