"""Docker secrets: one file per value in SECRETS_DIR (``/run/secrets`` in a Swarm task).

DFP reads ``dfp_<setting>`` files there in place of environment variables (and
``dfp_users_<name>`` for usersSecret); a file's value is its text without the trailing
newline that ``echo ... | docker secret create`` leaves.
"""

from __future__ import annotations

import os


def read_secret(directory: str, name: str) -> str | None:
    """The value of secret `name` in `directory`, stripped; None when there is no such file.

    Raises OSError when the file exists but cannot be read: whether that is worth a log
    line, a refusal or silence is the caller's to decide."""
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as fh:
            return fh.read().strip()
    except FileNotFoundError:
        return None
