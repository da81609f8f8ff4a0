"""Who may use the admin API: HTTP basic auth against ADMIN_USER / ADMIN_PASS.

DFP left its admin port open to anyone who reached it. pyroute requires credentials on
every admin endpoint once they are set, from the Docker secrets ``dfp_admin_user`` /
``dfp_admin_pass`` (in SECRETS_DIR) or else the settings. Replicas calling each other
use the same credentials, and PEER_TOKEN (secret ``dfp_peer_token``) when it is set: a
request carrying it is a replica's, which may also receive certificate keys.
"""

from __future__ import annotations

import hmac
import logging

from pyroute.basicauth import Userlist
from pyroute.dockersecrets import read_secret

log = logging.getLogger("pyroute.controlplane.admin")


def _secret(directory: str, name: str) -> str | None:
    try:
        return read_secret(directory, name) or None
    except OSError as exc:
        log.error("cannot read the secret %s in %s: %s", name, directory, exc.strerror or exc)
        return None


def admin_credentials(settings) -> tuple[str, str] | None:
    """(user, password) the admin API requires, or None when it is open."""
    user = _secret(settings.secrets_dir, "dfp_admin_user") or settings.admin_user
    password = _secret(settings.secrets_dir, "dfp_admin_pass") or settings.admin_pass
    if user and password:
        return user, password
    if user or password:
        log.error("only one of the admin user and password is set: both are needed, the admin API stays open")
    return None


PEER_HEADER = b"x-pyroute-peer-token"  # peers.PEER_TOKEN_HEADER, lower-case as the admin parser sees it


def is_peer(presented: bytes | None, token: str) -> bool:
    """Does a request carry this replica set's PEER_TOKEN (compared in constant time)?"""
    return bool(token) and presented is not None and hmac.compare_digest(presented, token.encode())


def allowed(header: bytes | None, credentials: tuple[str, str] | None) -> bool:
    """Does the Authorization header carry `credentials`? Always True when there are none."""
    return credentials is None or Userlist([credentials]).allows(header)


# Cross-site requests (CSRF). A browser that once authenticated to the admin API sends the
# cached basic credentials with any request another site makes it send (<img src>, a form
# POST), and DFP's state changes are plain GETs. Requiring a custom header or POST would
# break Docker Flow Swarm Listener and every curl script, which send GETs with basic auth
# and none of the headers below. So the rule looks at what only browsers send: the Fetch
# metadata header Sec-Fetch-Site, Origin and Referer. A change whose request names
# another site in any of them is refused; reads are left alone (a cross-site page cannot
# read the answer). Browsers without Fetch metadata (before 2023 for Safari) that also
# strip Referer are the gap; admin credentials should not live in a browser at all.
STATE_CHANGING = frozenset({"reconfigure", "remove", "reload", "cert", "state"})  # state: POST merges
BROWSER_HEADERS = frozenset({b"origin", b"referer", b"sec-fetch-site", b"host"})
SAME_ORIGIN_FETCH = frozenset({"same-origin", "none"})  # "none": typed in the address bar, a bookmark


def cross_site(headers: dict[bytes, str]) -> str | None:
    """Why a request (BROWSER_HEADERS, lower-case names) comes from another site, or None."""
    fetch_site = headers.get(b"sec-fetch-site")
    if fetch_site is not None and fetch_site.strip().lower() not in SAME_ORIGIN_FETCH:
        return f"Sec-Fetch-Site: {fetch_site}"
    host = headers.get(b"host", "").strip().lower()
    for name in (b"origin", b"referer"):
        value = headers.get(name)
        if value is not None and _authority(value) != host:
            return f"{name.decode().capitalize()}: {value}"
    return None


def _authority(url: str) -> str | None:
    """"https://Host:8080/path" -> "host:8080"; None for "null" and anything else."""
    scheme, sep, rest = url.strip().partition("://")
    if not sep or scheme.lower() not in ("http", "https"):
        return None
    return rest.split("/", 1)[0].split("?", 1)[0].lower()
