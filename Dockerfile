# pyroute as the `proxy` service of a Docker Swarm (drop-in for dockerflow/docker-flow-proxy).
FROM python:3.11-slim

WORKDIR /app
COPY pyproject.toml README.md ./
COPY pyroute ./pyroute
RUN pip install --no-cache-dir . \
 && useradd --system --no-create-home --shell /usr/sbin/nologin pyroute \
 && mkdir -p /var/lib/pyroute /certs && chown pyroute /var/lib/pyroute /certs

# Every accepted change is fsynced here before it is answered; mount a volume to keep
# routes across container replacement (a new task also copies them from its peers).
VOLUME /var/lib/pyroute

# Docker (20.10+) sets net.ipv4.ip_unprivileged_port_start=0 inside containers, so an
# unprivileged user may bind 80 and 443 there.
USER pyroute

ENV SERVICE_NAME=proxy \
    PORT=8080 \
    STATE_DIR=/var/lib/pyroute \
    DEFAULT_PORTS=80,443:ssl \
    PYTHONUNBUFFERED=1

EXPOSE 80 443 8080

# Healthy = ready: the saved state is applied, the peers' state pulled and (with
# LISTENER_ADDRESS) the listener's services fetched, so a rolling update never sends
# traffic to an empty replica. successfulinitreload answers 500 until then.
HEALTHCHECK --interval=5s --timeout=3s --start-period=5s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/v1/docker-flow-proxy/successfulinitreload' % os.environ.get('PORT', '8080'), timeout=2)"]

ENTRYPOINT ["pyroute"]
