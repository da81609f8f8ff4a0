# pyroute as the `proxy` service of a Docker Swarm (drop-in for dockerflow/docker-flow-proxy).
#
#   docker build -t pyroute:latest .       (BuildKit: Docker 23+, or DOCKER_BUILDKIT=1 before)
#
# Build arguments and secrets, all optional:
#   BASE       an image with python3 (3.11+) and its venv module; default the official slim
#              image. tests/swarm/run.sh builds on a Debian base made with debootstrap
#              where no registry is reachable.
#   pip.conf   (secret) the pip configuration the install uses: a private index or mirror,
#              e.g. --secret id=pip.conf,src=$HOME/.config/pip/pip.conf
#   pip-cert   (secret) a CA bundle for that index, named in pip.conf as
#              cert = /run/secrets/pip-cert
# Secrets stay out of the image's layers and history.
ARG BASE=python:3.11-slim
FROM ${BASE}

# pyroute and its dependencies in a virtualenv of their own (the base's Python may be a
# distribution's, which pip must not change), without pip itself; the sources are read
# from the build context, not copied into the image.
RUN --mount=type=bind,target=/src,rw \
    --mount=type=secret,id=pip.conf,target=/etc/pip.conf \
    --mount=type=secret,id=pip-cert \
    python3 -m venv /opt/pyroute \
 && /opt/pyroute/bin/pip install --no-cache-dir /src \
 && /opt/pyroute/bin/pip uninstall --yes --quiet pip setuptools \
 && useradd --system --no-create-home --shell /usr/sbin/nologin pyroute \
 && mkdir -p /var/lib/pyroute /certs && chown pyroute /var/lib/pyroute /certs

# Every accepted change is fsynced here before it is answered; mount a volume to keep
# routes across container replacement (a new task also copies them from its peers).
VOLUME /var/lib/pyroute

# Docker (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 inside containers, so an
# unprivileged user may bind 80 and 443 there.
USER pyroute

ENV PATH=/opt/pyroute/bin:$PATH \
    SERVICE_NAME=proxy \
    PORT=8080 \
    STATE_DIR=/var/lib/pyroute \
    DEFAULT_PORTS=80,443:ssl \
    PYTHONUNBUFFERED=1

EXPOSE 80 443 8080

# Healthy = ready: the saved state is applied, the peers' state pulled and (with
# LISTENER_ADDRESS) the listener's services fetched, so a rolling update never sends
# traffic to an empty replica. successfulinitreload answers 503 until then.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/docker-flow-proxy/successfulinitreload' % os.environ.get('PORT', '8080'), timeout=2)"]

ENTRYPOINT ["pyroute"]
