"""HTTP basic auth (RFC 7617): the one check behind the admin API, the stats page and the
per-service userlists (DFP's ``users``, ``usersSecret``, ``USERS``), and the header that
pyroute's own clients send.

Passwords are compared in constant time, and an unknown user costs the same comparison
(or hash computation) as a known one, so neither the timing of an answer nor its status
tells which user names exist.

Hashed passwords (DFP's usersPassEncrypted / USERS_PASS_ENCRYPTED) are crypt(3) strings
that HAProxy verified with the system's crypt(); here libpass (the maintained passlib
fork) verifies them, with the bcrypt package for ``$2*$``, the same on every Python (the
stdlib crypt module is gone in 3.13). A scheme it cannot verify is refused when the
userlist is configured (hash_problem), never at request time.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import secrets
from collections.abc import Iterable

# The $id$ prefixes pyroute verifies, and libpass's hasher for each (passlib.hash.<name>):
# SHA-512/SHA-256-crypt (mkpasswd -m sha-512 / sha-256, openssl passwd -6 / -5), MD5-crypt
# (old glibc and musl default), and bcrypt as htpasswd -B writes it ($2y$) or OpenBSD and
# the bcrypt libraries do ($2b$, $2a$). libpass (~3.8 MiB resident) is imported by the first
# hash that needs it: a proxy without hashed passwords never loads it.
HASHERS = {"$6$": "sha512_crypt", "$5$": "sha256_crypt", "$1$": "md5_crypt",
           "$2y$": "bcrypt", "$2b$": "bcrypt", "$2a$": "bcrypt"}
BCRYPT_MAX = 72
SUPPORTED = "$6$ (mkpasswd -m sha-512), $5$, $1$ or bcrypt $2y$/$2b$/$2a$ (htpasswd -B)"
# Names for the schemes an operator is likely to paste that pyroute does not verify.
UNSUPPORTED_NAMES = {"$y$": "yescrypt, mkpasswd's default", "$gy$": "gost-yescrypt", "$7$": "scrypt",
                     "$apr1$": "Apache MD5, htpasswd's default", "$sha1$": "SHA1-crypt", "$md5$": "Sun MD5",
                     "$argon2id$": "argon2id", "$argon2i$": "argon2i", "$pbkdf2-sha256$": "PBKDF2"}


def authorization(user: str, password: str) -> str:
    """The Authorization header value that carries `user` and `password`."""
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode("ascii")


def hash_scheme(hashed: str) -> str:
    """The $id$ prefix of a crypt(3) string ('$6$'), '' when it has none."""
    if not hashed.startswith("$"):
        return ""
    return "$" + hashed[1:].partition("$")[0] + "$"


def _hasher(scheme: str):
    """libpass's hasher for a $id$ prefix, None for a scheme pyroute does not verify."""
    name = HASHERS.get(scheme)
    if name is None:
        return None
    import passlib.hash  # (lazily: see HASHERS)

    return getattr(passlib.hash, name)


def hash_problem(hashed: str) -> str:
    """'' when `hashed` is a hash pyroute can verify, else why not, naming its scheme."""
    scheme = hash_scheme(hashed)
    hasher = _hasher(scheme)
    if hasher is None:
        if not scheme:
            named = "has no $id$ scheme prefix (traditional DES crypt, or not a hash at all)"
        else:
            named = f"uses scheme {scheme}" + (f" ({UNSUPPORTED_NAMES[scheme]})" if scheme in UNSUPPORTED_NAMES else "")
        return f"the hash {named}, which pyroute cannot verify; use {SUPPORTED}"
    try:
        hasher.from_string(hashed)
    except ValueError as exc:
        return f"the hash is not a well-formed {scheme} hash ({exc})"
    return ""


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


def _hash_check(password: bytes, hashed: str) -> bool:
    """Does `password` hash to `hashed`? False for a hash no hasher takes (the random
    lock-out user's); libpass compares the result in constant time."""
    scheme = hash_scheme(hashed)
    hasher = _hasher(scheme)
    if HASHERS.get(scheme) == "bcrypt":  # bcrypt reads 72 bytes; crypt(3) and htpasswd drop the rest, bcrypt 5 refuses it
        password = password[:BCRYPT_MAX]
    try:
        return hasher is not None and hasher.verify(password, hashed)
    except (ValueError, TypeError):  # malformed hash, or a password past libpass's size limit
        return False


class Userlist:
    """Users and their passwords, or their crypt(3) hashes when `encrypted` (DFP's
    usersPassEncrypted / USERS_PASS_ENCRYPTED, e.g. from ``mkpasswd -m sha-512``)."""

    __slots__ = ("_table", "_check", "_decoy", "_key", "_verified")

    def __init__(self, users: Iterable[tuple[str, str]], encrypted: bool = False):
        # user -> the password's bytes, or the hash as text (what libpass takes)
        self._table = {user.encode(): secret if encrypted else secret.encode() for user, secret in users}
        self._check = _hash_check if encrypted else hmac.compare_digest
        # Hashed lists: a SHA-crypt check costs milliseconds of the event loop (libpass is pure
        # Python), so a password that verified once is remembered as a keyed digest (the key
        # is this process's own, random) and the next request with it costs one HMAC.
        self._key = secrets.token_bytes(32) if encrypted else b""
        self._verified: dict[bytes, bytes] = {}  # user -> HMAC of the password that verified
        self._decoy = next(iter(self._table.values()), "" if encrypted else b"")  # checked for unknown users
        if encrypted:  # libpass's import (and its one-time bcrypt self-test) here, rather than in a request
            for scheme in {hash_scheme(hashed) for hashed in self._table.values()}:
                hasher = _hasher(scheme)
                if HASHERS.get(scheme) == "bcrypt":
                    hasher.get_backend()

    def allows(self, header: bytes | None) -> bool:
        """Does the Authorization header value name a user of the list with its password?"""
        credentials = _credentials(header)
        if credentials is None:
            return False
        user, password = credentials
        secret = self._table.get(user)
        if self._key:
            digest = hmac.digest(self._key, password, "sha256")
            remembered = self._verified.get(user)
            if remembered is not None and hmac.compare_digest(remembered, digest):
                return True
        ok = self._check(password, secret if secret is not None else self._decoy)
        if ok and secret is not None and self._key:
            self._verified[user] = digest
        return ok and secret is not None
