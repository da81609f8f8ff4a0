"""HTTP basic auth (RFC 7617): the one check behind the admin API, the stats page and the
per-service userlists (DFP's ``users``, ``usersSecret``, ``USERS``), and the header that
pyroute's own clients send.

Passwords are compared in constant time, and an unknown user costs the same comparison
(or crypt(3) run) as a known one, so neither the timing of an answer nor its status
tells which user names exist.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import warnings
from collections.abc import Iterable

with warnings.catch_warnings():  # deprecated in 3.11, still the system's crypt(3) (SHA-512 "$6$")
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt


def authorization(user: str, password: str) -> str:
    """The Authorization header value that carries `user` and `password`."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def _credentials(header: bytes | None) -> tuple[bytes, bytes] | None:
    """(user, password) from an Authorization header value; None when it is absent, not
    Basic, not base64, or lacks the colon."""
    if not header or header[:6].lower() != b"basic ":
        return None
    try:
        user, colon, password = base64.b64decode(header[6:].strip(), validate=True).partition(b":")
    except (binascii.Error, ValueError):
        return None
    return (user, password) if colon else None


class Userlist:
    """Users and their passwords, or their crypt(3) hashes when `encrypted` (DFP's
    usersPassEncrypted / USERS_PASS_ENCRYPTED, e.g. from ``mkpasswd -m sha-512``)."""

    __slots__ = ("_table", "_encrypted", "_decoy")

    def __init__(self, users: Iterable[tuple[str, str]], encrypted: bool = False):
        self._table = {user.encode(): password.encode() for user, password in users}
        self._encrypted = encrypted
        self._decoy = next(iter(self._table.values()), b"")  # what an unknown user is compared with

    def allows(self, header: bytes | None) -> bool:
        """Does the Authorization header value name a user of the list with its password?"""
        credentials = _credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        secret = self._table.get(user)
        ok = self._verify(password, secret if secret is not None else self._decoy)
        return ok and secret is not None

    def _verify(self, password: bytes, secret: bytes) -> bool:
        if not self._encrypted:
            return hmac.compare_digest(password, secret)
        try:
            hashed = crypt.crypt(password.decode("utf-8", "replace"), secret.decode("latin-1")) or ""
        except (ValueError, OSError):
            return False
        return hmac.compare_digest(hashed.encode(), secret)
