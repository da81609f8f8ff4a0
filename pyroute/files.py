"""Durable file replacement, for the state file and API-installed certificates.

Both must survive a crash at any instant with either the old content or the new one,
never a torn mix: the data go to a temp file in the same directory, which is fsynced and
renamed over the target, and the directory is fsynced so the rename itself is on disk.
"""

from __future__ import annotations

import os
import tempfile


def atomic_write(directory: str, name: str, data: bytes, *, temp: str | None = None,
                 previous: str | None = None) -> None:
    """Replace `directory`/`name` with `data` (mode 0600), creating the directory if needed.

    `temp`: the temp file's name, for a reader that looks for a save cut short (default a
    unique hidden name). `previous`: the replaced file is kept under this name (the last good
    copy) instead of being overwritten. Raises OSError; a failed write removes its temp file.
    """
    os.makedirs(directory, exist_ok=True)
    if temp is None:
        fd, temp_path = tempfile.mkstemp(prefix=".tmp-", dir=directory)
    else:
        temp_path = os.path.join(directory, temp)
        fd = os.open(temp_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    target = os.path.join(directory, name)
    try:
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
            os.fsync(fd)
        finally:
            os.close(fd)
        if previous is not None and os.path.exists(target):
            os.replace(target, os.path.join(directory, previous))
        os.replace(temp_path, target)
    except BaseException:
        try:
            os.unlink(temp_path)
        except OSError:
            pass
        raise
    dir_fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
