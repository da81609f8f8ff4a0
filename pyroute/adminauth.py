"""Who may use the admin API: HTTP basic auth against ADMIN_USER / ADMIN_PASS.

DFP left its admin port open to anyone who reached it. pyroute requires credentials on
every admin endpoint once they are set, from the Docker secrets ``dfp_admin_user`` /
``dfp_admin_pass`` (in SECRETS_DIR) or else the settings. Replicas calling each other
use the same credentials.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import logging
import os

log = logging.getLogger("pyroute.admin")


def _secret(directory: str, name: str) -> str | None:
    try:
        with open(os.path.join(directory, name), encoding="utf-8") as fh:
            return fh.read().strip() or None
    except FileNotFoundError:
        return None
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


def allowed(header: bytes | None, credentials: tuple[str, str] | None) -> bool:
    """Does the Authorization header carry `credentials`? Always True when there are none."""
    if credentials is None:
        return True
    if not header or header[:6].lower() != b"basic ":
        return False
    try:
        decoded = base64.b64decode(header[6:].strip(), validate=True)
    except (binascii.Error, ValueError):
        return False
    expected = f"{credentials[0]}:{credentials[1]}".encode()
    return hmac.compare_digest(decoded, expected)
