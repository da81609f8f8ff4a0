"""The host's pip configuration, as a pip.conf a `docker build` can use (stdlib only).

Reads what pip here is configured with (`python3 -m pip config list`: the files and the
PIP_* environment, merged as pip merges them) and writes DST with what means the same
inside the build: index URLs, trusted hosts, timeouts and proxies as they are; the CA
bundle (``cert``) as the build secret ``pip-cert`` (its host path is printed for
``--secret id=pip-cert,src=...``); local paths and ``file:`` URLs (find-links, constraint
files, on-disk indexes) are left out and named on stderr, since the build cannot read
this machine's disk.

usage: pip_conf.py DST   -> prints the CA bundle's path, or nothing
"""
import subprocess
import sys

KEPT = {"index-url", "extra-index-url", "find-links", "trusted-host", "timeout", "default-timeout", "retries",
        "proxy", "disable-pip-version-check"}
URL_LISTS = {"index-url", "extra-index-url", "find-links"}
SECRET_CERT = "/run/secrets/pip-cert"


def host_config() -> dict[str, str]:
    """key -> value as pip resolves it here; later sources (env) override earlier (files)."""
    try:
        listed = subprocess.run([sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True,
                                timeout=60).stdout
    except OSError:
        return {}
    files, env = {}, {}
    for line in listed.splitlines():
        name, _, value = line.partition("=")
        section, _, key = name.rpartition(".")
        if not key or section not in (":env:", "global", "install"):
            continue
        value = value.strip().strip("'\"")
        (env if section == ":env:" else files)[key] = value
    return {**files, **env}


def build_config(config: dict[str, str]) -> tuple[dict[str, str], str | None, list[str]]:
    """(pip.conf [global] entries, CA bundle path or None, what was left out)."""
    kept, dropped = {}, []
    cert = config.get("cert")
    for key, value in config.items():
        if key == "cert":
            continue
        if key not in KEPT:
            dropped.append(f"{key}={value}")
            continue
        if key in URL_LISTS:
            urls = value.split()
            remote = [u for u in urls if u.startswith(("http://", "https://"))]
            dropped += [f"{key}={u}" for u in urls if u not in remote]
            if not remote:
                continue
            value = " ".join(remote)
        kept[key] = value
    if cert:
        kept["cert"] = SECRET_CERT
    return kept, cert, dropped


if __name__ == "__main__":
    kept, cert, dropped = build_config(host_config())
    with open(sys.argv[1], "w") as fh:
        fh.write("[global]\n" + "".join(f"{k} = {v}\n" for k, v in kept.items()))
    if dropped:
        print(f"pip configuration not usable inside the build (this machine's disk): {', '.join(dropped)}",
              file=sys.stderr)
    if cert:
        print(cert)
