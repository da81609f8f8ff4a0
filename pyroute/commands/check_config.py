"""`pyroute check-config [FILE]`: validate a settings file, the environment and the secrets
as pyroute would read them at start, without starting.

Prints every effective setting with where it came from (flag, secret, env, file, default)
and exits 1 listing each problem found: bad values (all of them, not only the first),
unknown keys in the file, unreadable secrets, a STATE_DIR that cannot be written, a
CERTS_DIR or certificate that cannot be used, CA_FILE / ERROR_PAGES_DIR that cannot be
read, and a Docker socket that cannot be opened.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from pyroute.config import _SETTINGS, ListenSpec, Settings, SettingsError, settings_from_args, startup_warnings
from pyroute.controlplane.swarm import listener_enabled, socket_problem
from pyroute.tls import MAX_PEM, SECRET_PREFIXES, load_certificate

MASKED = frozenset({"admin_pass", "stats_pass", "users", "peer_token"})  # shown as *** when set


def show(value) -> str:
    """A setting's value as it would be written in the environment."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, tuple):  # listeners, nameservers, addresses, networks
        return ",".join(" ".join([f"{item.port}{':ssl' if item.ssl else ''}", *item.options])
                        if isinstance(item, ListenSpec) else str(item) for item in value)
    return str(value)


def origin(settings: Settings, f, environ: Mapping[str, str]) -> str:
    """Where setting field `f` came from, e.g. "env TIMEOUT_CONNECT", "file /etc/pyroute.toml"."""
    name = f.name
    source = settings.sources.get(name, "default")
    if source == "env":
        env_name = name.upper()
        if f.metadata["env_indirect"]:
            env_name = environ.get(f"{env_name}_ENV") or env_name
        return f"env {env_name}"
    if source == "file":
        return f"file {settings.config_file}"
    if source == "secret":
        return f"secret {os.path.join(settings.secrets_dir, 'dfp_' + name)}"
    if source == "cli":
        return "flag --" + name.replace("_", "-")
    return "default"


def _directory_problems(settings: Settings) -> list[str]:
    """What would stop or hobble pyroute at start, in the directories and files it reads."""
    problems = []
    secrets = settings.secrets_dir
    if os.path.isdir(secrets):
        for entry in sorted(os.listdir(secrets)):
            path = os.path.join(secrets, entry)
            if entry.startswith("dfp_") and os.path.isfile(path):
                try:
                    with open(path, "rb") as fh:
                        fh.read(1)
                except OSError as exc:
                    problems.append(f"secret {path}: cannot be read ({exc.strerror or exc})")
    if settings.state_dir:
        target = settings.state_dir
        while not os.path.exists(target) and os.path.dirname(target) != target:
            target = os.path.dirname(target)  # the directory pyroute would create it in
        if not os.path.isdir(target) or not os.access(target, os.W_OK | os.X_OK):
            problems.append(f"STATE_DIR {settings.state_dir!r}: {target!r} is not a writable directory "
                            "(mount a writable volume there, or leave STATE_DIR empty for memory only)")
    certs = [(settings.certs_dir, None), (secrets, SECRET_PREFIXES)]
    for directory, prefixes in certs:
        try:
            entries = sorted(os.listdir(directory))
        except FileNotFoundError:
            continue
        except OSError as exc:
            if prefixes is None:
                problems.append(f"CERTS_DIR {directory!r} is not a readable directory ({exc.strerror or exc})")
            continue
        for entry in entries:
            path = os.path.join(directory, entry)
            if entry.startswith(".") or (prefixes and not entry.startswith(prefixes)) or not os.path.isfile(path):
                continue
            try:
                with open(path, "rb") as fh:
                    load_certificate(entry, fh.read(MAX_PEM + 1), settings.ca_file)
            except (OSError, ValueError) as exc:
                problems.append(f"certificate {path}: {getattr(exc, 'strerror', None) or exc} (pyroute would skip it)")
    for name, path, want_dir in (("CA_FILE", settings.ca_file, False), ("ERROR_PAGES_DIR", settings.error_pages_dir, True)):
        if path and not ((os.path.isdir(path) if want_dir else os.path.isfile(path)) and os.access(path, os.R_OK)):
            problems.append(f"{name} {path!r} is not a readable {'directory' if want_dir else 'file'}")
    if (settings.admin_user == "") != (settings.admin_pass == ""):
        problems.append("ADMIN_USER / ADMIN_PASS: only one is set; both are needed, or the admin API stays open")
    if listener_enabled(settings.docker_host, settings.sources.get("docker_host", "default") != "default"):
        problem = socket_problem(settings.docker_host)
        if problem is not None:
            problems.append(problem)
    return problems


def check(config_file: str | None, environ: Mapping[str, str] | None = None) -> tuple[list[str], list[str], list[str]]:
    """-> (lines describing the effective settings, problems, warnings)."""
    environ = os.environ if environ is None else environ
    namespace = argparse.Namespace(config=config_file, **{f.name: None for f in _SETTINGS})
    found: list[SettingsError] = []
    try:
        settings = settings_from_args(namespace, environ, found)
    except SettingsError as exc:  # the file itself cannot be read or parsed
        return [], [str(exc)], []
    problems = [str(e) for e in found] + _directory_problems(settings)
    rows = []
    for f in _SETTINGS:
        value = getattr(settings, f.name)
        text = "***" if f.name in MASKED and value else show(value)
        rows.append((f.name.upper(), text if text else '""', origin(settings, f, environ)))
    width = max(len(r[0]) for r in rows)
    value_width = min(40, max(len(r[1]) for r in rows))
    lines = [f"{'SETTING':<{width}}  {'VALUE':<{value_width}}  FROM"]
    lines += [f"{n:<{width}}  {v:<{value_width}}  {o}" for n, v, o in rows]
    return lines, problems, startup_warnings(settings, environ)


def main(config_file: str | None) -> int:
    lines, problems, warnings = check(config_file)
    for line in lines:
        print(line)
    for warning in warnings:
        print(f"warning: {warning}")
    if problems:
        print(f"pyroute check-config: {len(problems)} problem{'s' if len(problems) > 1 else ''}:", file=sys.stderr)
        for problem in problems:
            print(f"  - {problem}", file=sys.stderr)
        return 1
    print("\npyroute check-config: OK")
    return 0
