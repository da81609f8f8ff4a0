"""DFP's statically defined services: ``DFP_SERVICE_<PARAM>`` (the first service) and
``DFP_SERVICE_<n>_<PARAM>``, with ``_<N>`` after the parameter for indexed values
(``DFP_SERVICE_SERVICE_PATH_1`` -> ``servicePath.1``). They are applied at start.

Reconfigure parameter names are case-insensitive, so ``ACL_NAME`` only has to lose
its underscores to become ``aclname``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

PREFIX = "DFP_SERVICE_"
_NUMBERED = re.compile(r"(\d+)_(.+)\Z")
_INDEXED = re.compile(r"(.+?)_(\d+)\Z")
# DFP does not read these from the environment (secrets belong in usersSecret files).
UNSUPPORTED = frozenset({"users", "userssecret", "userspassencrypted"})


def env_services(environ: Mapping[str, str]) -> list[dict[str, str]]:
    """The parameter maps of every DFP_SERVICE_* service, in service-number order."""
    services: dict[int, dict[str, str]] = {}
    for key, value in environ.items():
        if not key.startswith(PREFIX):
            continue
        rest = key[len(PREFIX):]
        number = 0
        if m := _NUMBERED.match(rest):
            number, rest = int(m.group(1)), m.group(2)
        index = ""
        if m := _INDEXED.match(rest):
            rest, index = m.group(1), "." + m.group(2)
        name = rest.replace("_", "").lower()
        if name in UNSUPPORTED:
            continue
        services.setdefault(number, {})[name + index] = value
    return [services[n] for n in sorted(services)]
