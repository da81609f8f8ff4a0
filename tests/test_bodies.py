"""50 MiB streamed through pyroute both ways, generated and hashed on the fly, with
pyroute's RSS (process tree, from /proc) growing by no more than 8 MiB."""
import hashlib
import json

import pytest

from support.upstream import generated, generated_sha256

N = 50 * 1024 * 1024
RSS_BUDGET_KIB = 8 * 1024
PYROUTE_ENV = {}  # default TIMEOUT_SERVER: a 50 MiB upload may take longer than 1 s


@pytest.fixture
def up(proxy, dns, replicas):
    u = replicas[1]
    dns.set_service("big", u.ip)
    proxy.reconfigure(serviceName="big", servicePath="/big", port=u.port)
    # warm up the code paths (and the pools) before the baseline
    for _ in range(3):
        assert proxy.get("/big/bytes/1000000")[0] == 200
        assert proxy.get("/big/upload", method="POST", body=b"w" * 1000000)[0] == 200
    return u


def test_download_50mib(proxy, up):
    before = proxy.rss_kib()
    peak = before
    c = proxy.conn(timeout=60)
    try:
        c.request("GET", f"/big/bytes/{N}")
        r = c.getresponse()
        assert r.status == 200 and r.getheader("Content-Length") == str(N)
        h, total, i = hashlib.sha256(), 0, 0
        while chunk := r.read(256 * 1024):
            h.update(chunk)
            total += len(chunk)
            i += 1
            if i % 4 == 0:
                peak = max(peak, proxy.rss_kib())
    finally:
        c.close()
    peak = max(peak, proxy.rss_kib())
    assert total == N and h.hexdigest() == generated_sha256(N)
    assert peak - before <= RSS_BUDGET_KIB, f"RSS grew {peak - before} KiB (before {before} KiB)"


class _Sampler:
    """Yields the upload body and samples pyroute's RSS while it is sent."""
    def __init__(self, proxy, n):
        self.proxy, self.n = proxy, n
        self.before = proxy.rss_kib()
        self.peak = self.before

    def __iter__(self):
        for i, b in enumerate(generated(self.n, 256 * 1024)):
            if i % 4 == 0:
                self.peak = max(self.peak, self.proxy.rss_kib())
            yield b


@pytest.mark.parametrize("framing", ["content-length", "chunked"])
def test_upload_50mib(proxy, up, framing):
    body = _Sampler(proxy, N)
    c = proxy.conn(timeout=60)
    try:
        if framing == "chunked":
            c.request("POST", "/big/upload", body=iter(body), encode_chunked=True,
                      headers={"Transfer-Encoding": "chunked"})
        else:
            c.request("POST", "/big/upload", body=iter(body), headers={"Content-Length": str(N)})
        r = c.getresponse()
        data = r.read()
    finally:
        c.close()
    peak = max(body.peak, proxy.rss_kib())
    assert r.status == 200, data
    got = json.loads(data)
    assert got["len"] == N and got["sha256"] == generated_sha256(N)
    rec = up.requests("/big/upload")[-1]
    assert rec.complete and rec.body_len == N
    assert peak - body.before <= RSS_BUDGET_KIB, f"RSS grew {peak - body.before} KiB (before {body.before} KiB)"
