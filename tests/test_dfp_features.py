"""DFP per-service features: rewrites, redirects, header edits, basic auth, method/IP/denyHttp
rules and gzip -- each configured with the reconfigure parameters DFP users send, observed
through real clients (http.client, curl) against real upstreams (the echo shows what arrived)."""
import base64
import gzip
import json
import os
import subprocess
import tempfile

import bcrypt
import pytest
from passlib.hash import sha256_crypt, sha512_crypt

from support.proxy import register
from support.upstream import generated_sha256

SECRETS = tempfile.mkdtemp(prefix="pyroute-secrets-")
with open(os.path.join(SECRETS, "dfp_users_team"), "w") as fh:
    fh.write("carol:from-secret\ndave:dave-pw\n")
PYROUTE_ENV = {"SECRETS_DIR": SECRETS, "PYROUTE_TEST_REGION": "eu-1", "HEADER_ENV_ALLOW": "PYROUTE_TEST_REGION"}


def basic(user, password):
    return {"Authorization": "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()}


@pytest.fixture
def up(dns, replicas):
    return replicas[0]


def echo(proxy, path, headers=None, method="GET"):
    st, h, body = proxy.get(path, headers=headers, method=method)
    assert st == 200, (st, body)
    return json.loads(body)


def received(data, name):
    return [v for k, v in data["headers"] if k.lower() == name.lower()]


# -- rewriting and redirects ---------------------------------------------------------------
def test_req_path_search_replace_several_pairs(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-rw", reqPathSearchReplace="/f-rw/,/api/:/api/old/,/api/new/")
    assert echo(proxy, "/f-rw/old/x?q=1")["target"] == "/api/new/x?q=1"
    assert echo(proxy, "/f-rw/other")["target"] == "/api/other"


def test_deprecated_req_path_search_replace(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-rwold", reqPathSearch="^/f-rwold", reqPathReplace="/v2")
    assert echo(proxy, "/f-rwold/items")["target"] == "/v2/items"


def test_redirect_from_domain(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-rfd", serviceDomain="new.example", redirectFromDomain="old.example",
             serviceDomainAlgo="hdr")  # the redirect matches hdr_beg(host) whatever the algo (DFP's template)
    st, h, _ = proxy.get("/page?a=1", headers={"Host": "old.example"})
    assert st == 301 and h["Location"] == "http://new.example/page?a=1"
    assert echo(proxy, "/f-rfd/page", {"Host": "new.example"})["target"] == "/f-rfd/page"
    st, h, _ = proxy.get("/any/other/path", headers={"Host": "old.example:80"})  # a frontend rule: any path
    assert st == 301 and h["Location"] == "http://new.example/any/other/path"


@pytest.mark.parametrize("code", [None, "301", "308"])
def test_https_only(proxy, dns, up, code):
    params = {"serviceName": "f-https", "httpsOnly": "true"}
    if code:
        params["httpsRedirectCode"] = code
    register(proxy, dns, up, **params)
    st, h, _ = proxy.get("/f-https/x?y=2", headers={"Host": "shop.example"})
    assert st == int(code or 302) and h["Location"] == "https://shop.example/f-https/x?y=2"


def test_https_only_with_curl(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-curl", httpsOnly="true", httpsRedirectCode="301")
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{redirect_url}",
                          "-H", "Host: c.example", proxy.url("/f-curl/a")], capture_output=True, text=True, timeout=10)
    assert out.stdout == "301 https://c.example/f-curl/a"


def test_redirect_when_http_proto(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-rwhp", redirectWhenHttpProto="true")
    st, h, _ = proxy.get("/f-rwhp", headers={"Host": "p.example", "X-Forwarded-Proto": "http"})
    assert st == 302 and h["Location"] == "https://p.example/f-rwhp"
    assert echo(proxy, "/f-rwhp", {"X-Forwarded-Proto": "https"})["target"] == "/f-rwhp"
    assert echo(proxy, "/f-rwhp")["target"] == "/f-rwhp"


def test_redirect_unless_https_proto(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-ruhp", redirectUnlessHttpsProto="true")
    st, h, _ = proxy.get("/f-ruhp", headers={"Host": "p.example"})
    assert st == 302 and h["Location"] == "https://p.example/f-ruhp"
    assert echo(proxy, "/f-ruhp", {"X-Forwarded-Proto": "https"})["target"] == "/f-ruhp"


def test_https_only_global(make_pyroute, dns, replicas):
    p = make_pyroute(HTTPS_ONLY="true")
    dns.set_service("f-glob-https", replicas[0].ip)
    p.reconfigure(serviceName="f-glob-https", servicePath="/f-glob-https", port=replicas[0].port)
    st, h, _ = p.get("/f-glob-https", headers={"Host": "g.example"})
    assert st == 302 and h["Location"] == "https://g.example/f-glob-https"


# -- headers ---------------------------------------------------------------------------------
def test_request_header_edits_and_fetches(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-hdr",
             addReqHeader="X-Added first,X-Client %[src],X-Port %[dst_port],X-Copy was-%[req.hdr(X-In)],"
                          "X-Region %[env(PYROUTE_TEST_REGION)]",
             setReqHeader="X-Set forced", delReqHeader="X-Drop")
    data = echo(proxy, "/f-hdr", {"X-In": "abc", "X-Drop": "gone", "X-Set": "client-value"})
    assert received(data, "X-Added") == ["first"]
    assert received(data, "X-Client") == ["127.0.0.1"]
    assert received(data, "X-Port") == [str(proxy.http_port)]
    assert received(data, "X-Copy") == ["was-abc"]
    assert received(data, "X-Region") == ["eu-1"]
    assert received(data, "X-Set") == ["forced"]
    assert received(data, "X-Drop") == []


def test_old_add_header_and_set_header(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-oldhdr", addHeader="X-Old added", setHeader="X-Old-Set set")
    data = echo(proxy, "/f-oldhdr", {"X-Old-Set": "client"})
    assert received(data, "X-Old") == ["added"] and received(data, "X-Old-Set") == ["set"]


def test_response_header_edits(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-res", addResHeader="X-Res-Added yes,X-Res-Client %[src]",
             setResHeader="Content-Type text/x-test", delResHeader="X-Upstream")
    st, h, body = proxy.get("/f-res/hello")
    assert st == 200 and body == b"hello, world!"
    assert h["X-Res-Added"] == "yes" and h["X-Res-Client"] == "127.0.0.1"
    assert h.get_all("Content-Type") == ["text/x-test"]
    assert h.get("X-Upstream") is None


def test_response_header_edits_on_keep_alive_connection(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-res-ka", addResHeader="X-Seen 1")
    c = proxy.conn()
    try:
        for _ in range(3):
            c.request("GET", "/f-res-ka/hello")
            r = c.getresponse()
            assert r.read() == b"hello, world!" and r.headers["X-Seen"] == "1"
    finally:
        c.close()


@pytest.mark.parametrize("param,value", [
    ("addReqHeader", "X-A %[ssl_fc]"), ("setResHeader", "X-B %[hdr(host),lower]"), ("addResHeader", "X-C %[rand]"),
])
def test_unsupported_fetch_is_400_naming_it(proxy, up, param, value):
    st, body = proxy.admin("reconfigure", {"serviceName": "f-badfetch", "servicePath": "/f-badfetch",
                                           "port": up.port, param: value})
    fetch = value.split("%[")[1].rstrip("]")
    assert st == 400 and body["Status"] == "NOK" and f"%[{fetch}]" in body["Message"], body
    assert proxy.get("/f-badfetch")[0] == 503


# -- auth and access control ------------------------------------------------------------------
def test_users_plain(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-auth", users="alice:s3cret,bob:pw2")
    st, h, body = proxy.get("/f-auth")
    assert st == 401 and h["WWW-Authenticate"] == 'Basic realm="f-authRealm"' and b"401" in body
    assert proxy.get("/f-auth", headers=basic("alice", "wrong"))[0] == 401
    assert proxy.get("/f-auth", headers=basic("mallory", "s3cret"))[0] == 401
    data = echo(proxy, "/f-auth", basic("alice", "s3cret"))
    assert received(data, "Authorization") == []  # never forwarded
    assert echo(proxy, "/f-auth", basic("bob", "pw2"))["target"] == "/f-auth"


@pytest.mark.parametrize("name,hashed", [
    ("f-crypt6", sha512_crypt.hash("open-sesame")),  # what mkpasswd -m sha-512 / openssl passwd -6 print
    ("f-crypt5", sha256_crypt.hash("open-sesame")),  # mkpasswd -m sha-256 / openssl passwd -5
    # htpasswd -B: bcrypt under Apache's $2y$ prefix (the same algorithm as $2b$)
    ("f-crypt2y", bcrypt.hashpw(b"open-sesame", bcrypt.gensalt(rounds=4)).decode().replace("$2b$", "$2y$", 1)),
])
def test_users_pass_encrypted(proxy, dns, up, name, hashed):
    assert hashed.startswith("$" + name.removeprefix("f-crypt") + "$")
    register(proxy, dns, up, serviceName=name, users=f"erin:{hashed}", usersPassEncrypted="true")
    assert proxy.get(f"/{name}", headers=basic("erin", "open-sesame"))[0] == 200
    assert proxy.get(f"/{name}", headers=basic("erin", hashed))[0] == 401
    assert proxy.get(f"/{name}", headers=basic("erin", "wrong"))[0] == 401
    assert proxy.get(f"/{name}", headers=basic("mallory", "open-sesame"))[0] == 401


@pytest.mark.parametrize("hashed,scheme", [
    ("$y$j9T$abcdefghijklmnopqrstu.$hxgrxUGwUw/9fYD40dgSPIShXjgaoUy2A6BpdxqOAA4", "$y$"),  # mkpasswd's default
    ("$apr1$abcdefgh$0123456789abcdefghijkl", "$apr1$"),  # htpasswd without -B
])
def test_users_pass_encrypted_unknown_scheme_is_400_naming_it(proxy, up, hashed, scheme):
    st, body = proxy.admin("reconfigure", serviceName="f-badhash", servicePath="/f-badhash", port=up.port,
                           users=f"erin:{hashed}", usersPassEncrypted="true")
    assert st == 400 and scheme in body["Message"] and "erin" in body["Message"], body
    assert hashed not in body["Message"]  # the hash is not echoed back
    assert proxy.get("/f-badhash")[0] == 503  # nothing was applied


# Made with `mkpasswd -m sha-512 -S saltsaltsalt12 mkpasswd-secret` (Debian package whois)
MKPASSWD_SHA512 = "$6$saltsaltsalt12$RBfZBFEguV35zVSiSrLLD/qM63UKI9lZTeakVQHktmgHBdg9ls40qgtKJpGdOA3H13PaKK7i5rcNocKtD7s8x/"


def test_users_pass_encrypted_mkpasswd_vector(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-mkpw", users=f"frank:{MKPASSWD_SHA512}", usersPassEncrypted="true")
    assert proxy.get("/f-mkpw", headers=basic("frank", "mkpasswd-secret"))[0] == 200
    assert proxy.get("/f-mkpw", headers=basic("frank", "mkpasswd-secreT"))[0] == 401


def test_users_secret_and_ignore_authorization_index(proxy, dns, replicas, alt):
    dns.set_service("f-secret", "127.0.0.11")
    proxy.reconfigure({"serviceName": "f-secret", "usersSecret": "team", "users": "carol,dave",
                       "servicePath.1": "/f-secret/private", "port.1": replicas[0].port,
                       "servicePath.2": "/f-secret/public", "port.2": alt[0].port, "ignoreAuthorization.2": "true"})
    assert proxy.get("/f-secret/private")[0] == 401
    assert proxy.get("/f-secret/private", headers=basic("carol", "from-secret"))[0] == 200
    assert proxy.get("/f-secret/private", headers=basic("dave", "dave-pw"))[0] == 200
    assert proxy.get("/f-secret/public")[0] == 200


def test_users_secret_missing_is_400(proxy, up):
    st, body = proxy.admin("reconfigure", serviceName="f-nosecret", servicePath="/f-nosecret", port=up.port,
                           usersSecret="absent")
    assert st == 400 and "absent" in body["Message"], body


def test_global_users(make_pyroute, dns, replicas):
    p = make_pyroute(USERS="root:toor")
    dns.set_service("f-gusers", replicas[0].ip)
    p.reconfigure(serviceName="f-gusers", servicePath="/f-gusers", port=replicas[0].port)
    dns.set_service("f-gfree", replicas[0].ip)
    p.reconfigure(serviceName="f-gfree", servicePath="/f-gfree", port=replicas[0].port, ignoreAuthorization="true")
    st, h, _ = p.get("/f-gusers")
    assert st == 401 and h["WWW-Authenticate"] == 'Basic realm="defaultRealm"'
    assert p.get("/f-gusers", headers=basic("root", "toor"))[0] == 200
    assert p.get("/f-gfree")[0] == 200


def test_global_users_encrypted(make_pyroute, dns, replicas):
    hashed = sha512_crypt.hash("pw")
    p = make_pyroute(USERS=f"ops:{hashed}", USERS_PASS_ENCRYPTED="true")
    dns.set_service("f-genc", replicas[0].ip)
    p.reconfigure(serviceName="f-genc", servicePath="/f-genc", port=replicas[0].port)
    assert p.get("/f-genc", headers=basic("ops", "pw"))[0] == 200
    assert p.get("/f-genc", headers=basic("ops", "nope"))[0] == 401


def test_allowed_and_denied_methods(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-allow", allowedMethods="GET,HEAD")
    register(proxy, dns, up, serviceName="f-deny", deniedMethods="DELETE,PUT")
    assert proxy.get("/f-allow")[0] == 200
    assert proxy.get("/f-allow", method="POST", body=b"x")[0] == 403
    assert proxy.get("/f-deny", method="POST", body=b"x")[0] == 200
    assert proxy.get("/f-deny", method="DELETE")[0] == 403


def test_deny_http(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-denyhttp", denyHttp="true")
    st, _, body = proxy.get("/f-denyhttp")
    assert st == 403 and b"403 Forbidden" in body


@pytest.mark.parametrize("params,status", [
    ({"allowedIPs": "10.0.0.0/8"}, 403),
    ({"allowedIPs": "10.0.0.0/8,127.0.0.0/8"}, 200),
    ({"deniedIPs": "127.0.0.1/32"}, 403),
    ({"deniedIPs": "192.168.0.0/16"}, 200),
])
def test_ip_lists(proxy, dns, up, params, status):
    register(proxy, dns, up, serviceName="f-ips", **params)
    assert proxy.get("/f-ips")[0] == status


def test_bad_ip_list_is_400(proxy, up):
    st, body = proxy.admin("reconfigure", serviceName="f-badip", servicePath="/f-badip", port=up.port,
                           allowedIPs="10.0.0.0/33")
    assert st == 400 and "allowedIPs" in body["Message"], body


def test_local_answer_keeps_connection_usable(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-ka", users="u:p")
    c = proxy.conn()
    try:
        c.request("GET", "/f-ka")
        r = c.getresponse()
        assert r.status == 401
        r.read()
        c.request("GET", "/f-ka", headers=basic("u", "p"))
        r = c.getresponse()
        assert r.status == 200
        r.read()
    finally:
        c.close()


# -- compression --------------------------------------------------------------------------------
def get_gzip(proxy, path, accept="gzip"):
    headers = {"Accept-Encoding": accept} if accept else {}
    return proxy.get(path, headers=headers)


def test_compression_of_matching_types(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz", compressionAlgo="gzip", compressionType="application/json text/plain")
    st, h, body = get_gzip(proxy, "/f-gz/echo")
    assert st == 200 and h["Content-Encoding"] == "gzip" and h["Vary"] == "Accept-Encoding"
    assert h["Transfer-Encoding"] == "chunked" and h.get("Content-Length") is None
    assert json.loads(gzip.decompress(body))["target"] == "/f-gz/echo"
    st, h, body = get_gzip(proxy, "/f-gz/hello")
    assert gzip.decompress(body) == b"hello, world!"


def test_compression_respects_accept_encoding(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz-ae", compressionAlgo="gzip", compressionType="application/json")
    for accept in (None, "identity", "gzip;q=0", "br"):
        st, h, body = get_gzip(proxy, "/f-gz-ae/echo", accept)
        assert st == 200 and h.get("Content-Encoding") is None and h["Vary"] == "Accept-Encoding", accept
        assert json.loads(body)["target"] == "/f-gz-ae/echo"
    assert get_gzip(proxy, "/f-gz-ae/echo", "deflate, gzip;q=0.5")[1]["Content-Encoding"] == "gzip"


def test_compression_skips_other_types_and_encoded_bodies(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz-skip", compressionAlgo="gzip", compressionType="application/json")
    st, h, body = get_gzip(proxy, "/f-gz-skip/hello")  # text/plain is not in the list
    assert h.get("Content-Encoding") is None and body == b"hello, world!"
    st, h, body = get_gzip(proxy, "/f-gz-skip/encoded")  # the upstream compressed it already
    assert h["Content-Encoding"] == "gzip" and gzip.decompress(body) == b'{"already": "compressed"}'


def test_compression_streams_chunked_and_large_bodies(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz-big", compressionAlgo="gzip", compressionType="application/octet-stream")
    import hashlib
    for path in ("/f-gz-big/bytes/3000000", "/f-gz-big/chunked/3000000"):
        st, h, body = get_gzip(proxy, path)
        assert st == 200 and h["Content-Encoding"] == "gzip", path
        assert hashlib.sha256(gzip.decompress(body)).hexdigest() == generated_sha256(3000000), path


def test_compression_keep_alive_and_curl(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz-ka", compressionAlgo="gzip")  # no type list: every type
    c = proxy.conn()
    try:
        for _ in range(3):
            c.request("GET", "/f-gz-ka/hello", headers={"Accept-Encoding": "gzip"})
            r = c.getresponse()
            assert r.headers["Content-Encoding"] == "gzip" and gzip.decompress(r.read()) == b"hello, world!"
    finally:
        c.close()
    out = subprocess.run(["curl", "-s", "--compressed", proxy.url("/f-gz-ka/hello")], capture_output=True, timeout=10)
    assert out.stdout == b"hello, world!"


def test_compression_global(make_pyroute, dns, replicas):
    p = make_pyroute(COMPRESSION_ALGO="gzip", COMPRESSION_TYPE="text/plain")
    dns.set_service("f-gz-glob", replicas[0].ip)
    p.reconfigure(serviceName="f-gz-glob", servicePath="/f-gz-glob", port=replicas[0].port)
    st, h, body = get_gzip(p, "/f-gz-glob/hello")
    assert h["Content-Encoding"] == "gzip" and gzip.decompress(body) == b"hello, world!"
    st, h, body = get_gzip(p, "/f-gz-glob/echo")  # application/json is not in COMPRESSION_TYPE
    assert h.get("Content-Encoding") is None


def test_service_and_global_users_both_apply(make_pyroute, dns, replicas):
    # DFP's backend template checks the service userlist, then the global one, in turn
    p = make_pyroute(USERS="same:pw")
    dns.set_service("f-both", replicas[0].ip)
    p.reconfigure(serviceName="f-both", servicePath="/f-both", port=replicas[0].port, users="same:pw,solo:pw")
    assert p.get("/f-both", headers=basic("same", "pw"))[0] == 200
    st, h, _ = p.get("/f-both", headers=basic("solo", "pw"))
    assert st == 401 and h["WWW-Authenticate"] == 'Basic realm="defaultRealm"'


def test_header_edits_run_in_dfp_order(proxy, dns, up):
    # add-header, then set-header, then del-header, as DFP's template writes them
    register(proxy, dns, up, serviceName="f-order", addReqHeader="X-Gone a,X-Kept b", setReqHeader="X-Kept c",
             delReqHeader="X-Gone")
    data = echo(proxy, "/f-order")
    assert received(data, "X-Gone") == [] and received(data, "X-Kept") == ["c"]


def test_compression_deflate_and_preference_order(proxy, dns, up):
    import zlib
    register(proxy, dns, up, serviceName="f-defl", compressionAlgo="deflate gzip", compressionType="text/plain")
    st, h, body = get_gzip(proxy, "/f-defl/hello", "gzip, deflate")
    assert h["Content-Encoding"] == "deflate" and zlib.decompress(body) == b"hello, world!"
    st, h, body = get_gzip(proxy, "/f-defl/hello", "gzip")
    assert h["Content-Encoding"] == "gzip" and gzip.decompress(body) == b"hello, world!"


def test_compression_raw_deflate_as_haproxy_sends_it(proxy, dns, up):
    """DFP's compressionAlgo takes HAProxy's raw-deflate: a deflate stream without the zlib
    wrapper, sent as Content-Encoding: deflate (issue 17)."""
    import zlib
    register(proxy, dns, up, serviceName="f-rawdefl", compressionAlgo="raw-deflate", compressionType="text/plain")
    st, h, body = get_gzip(proxy, "/f-rawdefl/hello", "deflate")
    assert st == 200 and h["Content-Encoding"] == "deflate" and h["Vary"] == "Accept-Encoding"
    assert zlib.decompress(body, -15) == b"hello, world!"
    with pytest.raises(zlib.error):
        zlib.decompress(body)  # no zlib header: raw, as HAProxy's raw-deflate
    st, h, body = get_gzip(proxy, "/f-rawdefl/hello", "gzip")
    assert st == 200 and "Content-Encoding" not in h and body == b"hello, world!"


def test_compression_of_empty_body(proxy, dns, up):
    register(proxy, dns, up, serviceName="f-gz-empty", compressionAlgo="gzip")
    st, h, body = get_gzip(proxy, "/f-gz-empty/bytes/0")
    assert st == 200 and h["Content-Encoding"] == "gzip" and gzip.decompress(body) == b""
    assert gzip.decompress(get_gzip(proxy, "/f-gz-empty/hello")[2]) == b"hello, world!"
