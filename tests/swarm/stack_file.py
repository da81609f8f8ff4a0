"""Adapt deploy/docker-stack.yml (or docker-stack-dfsl.yml) to this tier, changing only what a machine without a
registry and without IPVS needs; everything else (ports, networks, the Docker socket
mount, user, environment, health check on the readiness endpoint, update_config,
placement, the go-demo labels) is deployed as shipped.

- images: `pyrun:latest` (docker import, no registry) running the host's Python,
  bind-mounted read-only, on this checkout (proxy) and demo_app.py (go-demo);
- the health check calls that Python by its path;
- the Docker socket's source is the tier's private dockerd socket (target unchanged);
- go-demo: endpoint_mode dnsrr and com.df.discoveryType=DNS (no IPVS here, so a VIP would
  accept nothing); its database is left out (the stand-in needs none).

usage: stack_file.py SRC DST PYTHON PYHOME REPO APPDIR DOCKER_SOCKET
"""
import sys

import yaml


def adapt(stack: dict, python: str, pyhome: str, repo: str, app: str, sock: str) -> dict:
    runtime = ["/usr:/usr:ro"] + ([] if pyhome.startswith("/usr") else [f"{pyhome}:{pyhome}:ro"])
    proxy = stack["services"]["proxy"]
    proxy["image"] = "pyrun:latest"
    proxy["entrypoint"] = [python, "-m", "pyroute"]
    proxy["environment"].append("PYTHONPATH=/src")
    proxy["volumes"] = [f"{sock}:/var/run/docker.sock:ro" if v.startswith("/var/run/docker.sock:") else v
                        for v in proxy["volumes"]] + runtime + [f"{repo}:/src:ro"]
    proxy["healthcheck"]["test"] = [python if part == "python" else part for part in proxy["healthcheck"]["test"]]

    if "go-demo" not in stack["services"]:
        return stack  # docker-stack-dfsl.yml: the proxy service only
    demo = stack["services"]["go-demo"]
    demo["image"] = "pyrun:latest"
    demo["entrypoint"] = [python, "/app/demo_app.py"]
    demo["volumes"] = runtime + [f"{app}:/app:ro"]
    demo["deploy"]["endpoint_mode"] = "dnsrr"
    demo["deploy"]["labels"]["com.df.discoveryType"] = "DNS"
    demo["networks"] = ["proxy"]
    del stack["services"]["go-demo-db"]
    del stack["networks"]["go-demo"]
    return stack


if __name__ == "__main__":
    src, dst, python, pyhome, repo, app, sock = sys.argv[1:8]
    with open(src) as fh:
        stack = yaml.safe_load(fh)
    with open(dst, "w") as fh:
        yaml.safe_dump(adapt(stack, python, pyhome, repo, app, sock), fh, sort_keys=False)
