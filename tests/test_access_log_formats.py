"""ACCESS_LOG_FORMAT: a real pyroute's access log lines, from curl's requests, parsed with a
regex that follows each format's specification: CLF and combined as Apache's mod_log_config
defines them (`%h %l %u %t "%r" %>s %b` [`"%{Referer}i" "%{User-agent}i"`]), HAProxy's HTTP
log format as its configuration manual (section 8.2.3, `option httplog`) lays it out."""
import json
import re
import subprocess

import pytest

from support.upstream import wait_until

CLF = r'(?P<host>\S+) (?P<ident>\S+) (?P<user>\S+) \[(?P<time>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2} [+-]\d{4})\] ' \
      r'"(?P<request>[^"]*)" (?P<status>\d{3}) (?P<bytes>\d+|-)'
FORMATS = {
    "clf": re.compile(rf"^{CLF}$"),
    "combined": re.compile(rf'^{CLF} "(?P<referer>[^"]*)" "(?P<agent>[^"]*)"$'),
    "haproxy": re.compile(
        r"^(?P<client_ip>[\d.]+):(?P<client_port>\d+) \[(?P<accept_date>\d{2}/[A-Z][a-z]{2}/\d{4}:\d{2}:\d{2}:\d{2}\.\d{3})\] "
        r"(?P<frontend>\S+) (?P<backend>[^/\s]+)/(?P<server>\S+) "
        r"(?P<TR>-?\d+)/(?P<Tw>-?\d+)/(?P<Tc>-?\d+)/(?P<Tr>-?\d+)/(?P<Ta>\+?\d+) "
        r"(?P<status>-?\d+) (?P<bytes>\+?\d+) (?P<cookie_req>\S+) (?P<cookie_resp>\S+) (?P<termination>[\w-]{4}) "
        r"(?P<actconn>\d+)/(?P<feconn>\d+)/(?P<beconn>\d+)/(?P<srv_conn>\d+)/(?P<retries>\+?\d+) "
        r"(?P<srv_queue>\d+)/(?P<backend_queue>\d+)(?: \{(?P<request_headers>[^}]*)\})?(?: \{(?P<response_headers>[^}]*)\})? "
        r'"(?P<request>[^"]*)"$'),
}
SLOW = 0.05


def logged(p, needle: str) -> dict:
    """The fields of the access log line holding `needle`, parsed by its format's regex."""
    fmt = p.env.get("ACCESS_LOG_FORMAT", "json")
    found = []

    def written():
        found[:] = [line for line in open(p.stderr_path, errors="replace").read().splitlines() if needle in line
                    and (line.startswith("{") if fmt == "json" else FORMATS[fmt].match(line))]
        return found
    wait_until(written, what=f"a {fmt} access log line with {needle}")
    return json.loads(found[-1]) if fmt == "json" else FORMATS[fmt].match(found[-1]).groupdict()


def curl(p, path, *args):
    out = subprocess.run(["curl", "-s", "-o", "/dev/null", "-w", "%{http_code} %{size_download}", *args, p.url(path)],
                         capture_output=True, check=True).stdout.decode().split()
    return int(out[0]), int(out[1])


@pytest.mark.parametrize("fmt", ["json", "clf", "combined", "haproxy"])
def test_access_log_format(make_pyroute, dns, replicas, fmt):
    up = replicas[0]
    service = f"alf-{fmt}"
    dns.set_service(service, up.ip)
    p = make_pyroute(DEBUG="true", ACCESS_LOG_FORMAT=fmt)
    p.reconfigure(serviceName=service, servicePath="/alf", port=up.port)
    status, size = curl(p, "/alf/bytes/321?q=1", "-e", "http://ref.example/page", "-A", 'agent "quoted"/1.0')
    assert (status, size) == (200, 321)
    line = logged(p, "/alf/bytes/321?q=1")
    slow = logged(p, f"/alf/slow/{SLOW}") if curl(p, f"/alf/slow/{SLOW}")[0] == 200 else None
    no_route = logged(p, "/nowhere") if curl(p, "/nowhere")[0] == 503 else None
    if fmt == "json":
        assert line["status"] == 200 and line["service"] == service and line["request_id"]
        assert slow["total_ms"] >= SLOW * 1000 and no_route["termination"] == "NR"
        return
    assert line["request"] == "GET /alf/bytes/321?q=1 HTTP/1.1" and int(line["status"]) == 200
    assert no_route["request"] == "GET /nowhere HTTP/1.1" and int(no_route["status"]) == 503
    if fmt in ("clf", "combined"):
        assert line["host"] == "127.0.0.1" and int(line["bytes"]) > 321  # the head counts too (%b: bytes sent)
        if fmt == "combined":
            assert line["referer"] == "http://ref.example/page" and line["agent"] == r"agent \x22quoted\x22/1.0"
        return
    assert line["frontend"] == "services" and line["backend"] == service and line["server"] == f"{up.ip}:{up.port}"
    assert line["termination"] == "----" and int(line["bytes"]) > 321 and line["request_headers"]  # the request ID
    assert int(slow["Tr"]) >= SLOW * 1000 and int(slow["Ta"]) >= int(slow["Tr"])
    assert no_route["server"] == "<NOSRV>" and no_route["termination"] == "NR--" and no_route["Tc"] == "-1"
