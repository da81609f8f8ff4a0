"""Reading a running pyroute's admin API from a command (`pyroute routes`, `pyroute top`).

The address defaults to http://127.0.0.1:$PORT; credentials: --user/--password, else
ADMIN_USER/ADMIN_PASS, else the secrets dfp_admin_user / dfp_admin_pass in SECRETS_DIR.
Every failure is a RuntimeError whose message says what to do.
"""

from __future__ import annotations

import os
import urllib.error
import urllib.request

from pyroute.basicauth import authorization
from pyroute.dockersecrets import read_secret


def default_admin_url(environ=os.environ) -> str:
    return f"http://127.0.0.1:{environ.get('PORT') or 8080}"


def credentials(user: str | None, password: str | None, environ=os.environ) -> tuple[str, str] | None:
    secrets = environ.get("SECRETS_DIR") or "/run/secrets"

    def secret(name: str) -> str | None:
        try:
            return read_secret(secrets, name) or None
        except OSError:
            return None

    user = user or environ.get("ADMIN_USER") or secret("dfp_admin_user")
    password = password or environ.get("ADMIN_PASS") or secret("dfp_admin_pass")
    return (user, password) if user and password else None


def get(admin_url: str, path: str, auth: tuple[str, str] | None, timeout: float = 10.0) -> bytes:
    """The body of GET admin_url + path."""
    request = urllib.request.Request(admin_url.rstrip("/") + path)
    if auth is not None:
        request.add_header("Authorization", authorization(*auth))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return response.read()
    except urllib.error.HTTPError as exc:
        if exc.code == 401:
            raise RuntimeError(f"{admin_url}: the admin API needs credentials: set ADMIN_USER and ADMIN_PASS "
                               "(or --user/--password)") from None
        raise RuntimeError(f"{admin_url}{path} answered {exc.code}") from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise RuntimeError(f"cannot reach the admin API at {admin_url} ({reason}): is pyroute running? "
                           "Give its address with --admin http://HOST:PORT") from None
