"""pyroute/basicauth.py as pure code: the one basic-auth check behind the admin API, the
stats page and the per-service userlists (their end-to-end behaviour is in
test_admin_auth.py, test_observability.py and test_dfp_features.py)."""
from __future__ import annotations

import base64

import bcrypt
import pytest

from pyroute.basicauth import Userlist, authorization, hash_problem
from pyroute.services import ServiceDefaults, ServiceError, parse_service


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


# Made by other implementations than the verifier's: `openssl passwd -6/-5/-1 -salt ...`.
OPENSSL_SHA512 = ("$6$openssl6salt$mByPdQ/03pj7tyDyiFvrwyPYxW2bv3UVSuQCy6HVMOu79imGUnZyrKjGHOhxxsMjgk/Sd6oGL8ygLmORAz"
                  "3n0.")
OPENSSL_SHA256 = "$5$openssl5salt$FR/OZc4hmiuVtfwtpGCdQj8KdL5I/f4yVCJQ/Gis.M1"
OPENSSL_MD5 = "$1$md5salt$VDFURUoXB6mq6nD.suBz//"
# glibc/libxcrypt crypt("yes-secret", "$y$j9T$abcdefghijklmnopqrstu."): mkpasswd's default scheme
YESCRYPT = "$y$j9T$abcdefghijklmnopqrstu.$hxgrxUGwUw/9fYD40dgSPIShXjgaoUy2A6BpdxqOAA4"


def htpasswd_bcrypt(password: str) -> str:
    """What `htpasswd -B` writes: bcrypt with Apache's $2y$ prefix (same algorithm as $2b$)."""
    return bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)


@pytest.mark.parametrize("hashed,password", [
    (OPENSSL_SHA512, "openssl-secret"), (OPENSSL_SHA256, "openssl-secret"), (OPENSSL_MD5, "md5-secret"),
    (htpasswd_bcrypt("bcrypt-secret"), "bcrypt-secret"),
    (bcrypt.hashpw(b"bcrypt-secret", bcrypt.gensalt(rounds=4)).decode(), "bcrypt-secret"),  # $2b$
    (bcrypt.hashpw(b"bcrypt-secret", bcrypt.gensalt(rounds=4, prefix=b"2a")).decode(), "bcrypt-secret"),
])
def test_each_supported_scheme_checks_the_password(hashed, password):
    assert hash_problem(hashed) == ""
    users = Userlist([("ann", hashed), ("bob", OPENSSL_SHA256)], encrypted=True)
    assert users.allows(header(f"ann:{password}"))
    assert not users.allows(header(f"ann:{password}x"))
    assert not users.allows(header("ann:" + hashed))  # the hash itself is not the password
    assert not users.allows(header(f"eve:{password}"))


def test_a_remembered_password_is_the_only_one_let_through_without_the_hash():
    """After a password verified, later requests with it skip the hash; a wrong password,
    another user's password, or a user that verified nothing still run the full check."""
    users = Userlist([("ann", OPENSSL_SHA512), ("bob", OPENSSL_SHA256)], encrypted=True)
    for _ in range(3):
        assert users.allows(header("ann:openssl-secret"))
    assert not users.allows(header("ann:openssl-secretx"))
    assert not users.allows(header("bob:openssl-secretx"))
    assert not users.allows(header("eve:openssl-secret"))
    assert users.allows(header("bob:openssl-secret")) and users.allows(header("ann:openssl-secret"))


def test_bcrypt_past_72_bytes_behaves_as_crypt_does():
    """crypt(3) bcrypt reads the first 72 bytes only; bcrypt 5 refuses longer input
    instead: the check must neither crash nor differ from what htpasswd users expect."""
    long = "x" * 80
    users = Userlist([("ann", htpasswd_bcrypt(long[:72]))], encrypted=True)  # what htpasswd -B stores for it
    assert users.allows(header("ann:" + long)) and users.allows(header("ann:" + long[:72] + "yz"))
    assert not users.allows(header("ann:" + long[:71]))


@pytest.mark.parametrize("hashed,named", [
    (YESCRYPT, "$y$ (yescrypt"),
    ("$apr1$abcdefgh$0123456789abcdefghijkl", "$apr1$ (Apache MD5"),
    ("$argon2id$v=19$m=65536,t=3,p=4$c2FsdA$aGFzaA", "$argon2id$"),
    ("$9$whatever", "$9$"),
    ("abJnggxhB/yWI", "no $id$ scheme prefix"),  # traditional DES crypt
    ("plain-password", "no $id$ scheme prefix"),
    ("$6$salt$tooshort", "not a well-formed $6$ hash"),
    ("$2y$04$short", "not a well-formed $2y$ hash"),
])
def test_a_hash_it_cannot_verify_is_named_and_never_allows(hashed, named):
    assert named in hash_problem(hashed)
    users = Userlist([("ann", hashed)], encrypted=True)  # what a lock-out entry looks like at run time
    assert not users.allows(header("ann:yes-secret")) and not users.allows(header("ann:" + hashed))


@pytest.mark.parametrize("params,defaults,named", [
    ({"users": f"erin:{YESCRYPT}", "usersPassEncrypted": "true"}, ServiceDefaults(), "usersPassEncrypted"),
    ({}, ServiceDefaults(users=f"ops:{YESCRYPT}", users_pass_encrypted=True), "USERS"),
])
def test_reconfigure_refuses_a_hash_it_cannot_verify(params, defaults, named):
    with pytest.raises(ServiceError) as caught:
        parse_service({"serviceName": "s", "servicePath": "/s", "port": "80", **params}, defaults=defaults)
    assert caught.value.status == 400 and named in caught.value.message and "$y$ (yescrypt" in caught.value.message
    assert YESCRYPT not in caught.value.message


def test_authorization_is_what_allows_reads_back():
    assert Userlist([("peer", "pa:ss")]).allows(authorization("peer", "pa:ss").encode())
