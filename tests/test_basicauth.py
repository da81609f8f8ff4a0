"""pyroute/basicauth.py as pure code: the one basic-auth check behind the admin API, the
stats page and the per-service userlists (their end-to-end behaviour is in
test_admin_auth.py, test_observability.py and test_dfp_features.py)."""
from __future__ import annotations

import base64
import warnings

import pytest

from pyroute.basicauth import Userlist, authorization

with warnings.catch_warnings():  # deprecated in 3.11, still the system's crypt(3)
    warnings.simplefilter("ignore", DeprecationWarning)
    import crypt


def header(text: str) -> bytes:
    return b"Basic " + base64.b64encode(text.encode())


USERS = Userlist([("ann", "pw1"), ("bob", "pä2")])


@pytest.mark.parametrize("value", [header("ann:pw1"), header("bob:pä2"), b"bAsIc  " + header("ann:pw1")[6:] + b" "])
def test_a_listed_user_with_its_password_passes(value):
    assert USERS.allows(value)


@pytest.mark.parametrize("value", [
    None, b"", header("ann:pw2"), header("ann:"), header("ann"), header("eve:pw1"), header(":pw1"),
    b"Bearer " + header("ann:pw1")[6:], b"Basic not*base64", b"Basic " + "ä".encode(), header("ann:pw1")[:-2],
])
def test_anything_else_is_refused(value):
    assert not USERS.allows(value)


def test_a_password_may_hold_colons_and_the_user_ends_at_the_first():
    assert Userlist([("ops", "a:b")]).allows(header("ops:a:b"))
    assert not Userlist([("ops", "a:b")]).allows(header("ops:a"))


def test_crypt_hashes_are_checked_with_crypt():
    hashed = crypt.crypt("s3cret", crypt.mksalt(crypt.METHOD_SHA512))
    users = Userlist([("ann", hashed)], encrypted=True)
    assert users.allows(header("ann:s3cret"))
    assert not users.allows(header("ann:" + hashed))  # the hash itself is not the password
    assert not users.allows(header("eve:s3cret"))


def test_authorization_is_what_allows_reads_back():
    assert Userlist([("peer", "pa:ss")]).allows(authorization("peer", "pa:ss").encode())
