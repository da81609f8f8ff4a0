"""The one line pyroute logs once it serves: what an operator checks first.

Listeners, the admin address (and whether it is open), the DNS servers, what state was
restored, and where routes come from.
"""

from __future__ import annotations

from pyroute.config import Settings


def discovery(settings: Settings, docker_labels: bool) -> str:
    """Where routes come from: Docker labels, a Swarm Listener, the admin API (always)."""
    sources = []
    if docker_labels:
        sources.append(f"Docker labels com.df.* via {settings.docker_host}")
    if settings.listener_address:
        sources.append(f"Swarm Listener at {','.join(settings.listener_address)}")
    sources.append("admin API")
    return " + ".join(sources)


def ready_summary(settings: Settings, listeners: str, admin: str, control) -> str:
    """`control` is the server.ControlPlane that started (its restored state, listener, credentials)."""
    services, revision = control.restored
    if settings.state_dir:
        state = f"{services} services at revision {revision} restored from {settings.state_dir}"
    else:
        state = "in memory only (STATE_DIR is empty)"
    auth = "basic auth" if control.api.credentials is not None else "open, no ADMIN_USER/ADMIN_PASS"
    return (f"pyroute ready: listeners {listeners}; admin API {admin} ({auth}); "
            f"DNS {','.join(settings.dns_nameservers)}; state {state}; "
            f"discovery {discovery(settings, control.listener is not None)}")
