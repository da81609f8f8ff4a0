"""Adversarial tier: third-party smuggling and framing vectors through a real pyroute.

The vectors are data in tests/corpus/ (each file names its source, the commit read and the
license): defparam/smuggler's Transfer-Encoding mutations, PortSwigger's
http-request-smuggler permutations, the HTTP Garden's trophy payloads, issue 14's
reproductions, and malformed upstream responses built from the same mutations. Behind
pyroute is `support.rawlog.RawLogBackend`: it keeps every raw byte, parses strictly and
answers each request with `X-Seen: <method> <target> #<n>`.

Request side, per case: the attack goes on its own connection and pyroute's answers are
read strictly; then a victim `GET /victim-<n>` goes on a new connection (pooled upstream
connections are reused, so a poisoned pool answers it). A case fails when the backend saw
a request the test did not send as a top-level request (a /SMUGGLED-<n> target or any
other), a body framed otherwise than the client framed it, a message its strict parse
refused, when a request the backend ran was not answered to the attacker, when anyone got
someone else's response, or when pyroute's log gained a traceback.

A mutated header line (smuggler, PortSwigger) is sent in three framings: `clte` (the
line, Content-Length covering `0 CRLF CRLF` and a hidden request: a parser that takes
the line as chunked finds the hidden request after the body), `tecl` (the line and a
chunk holding the hidden request, no Content-Length: a parser that ignores the line reads
no body and then garbage) and, for Content-Length permutations, `cl` (the mutated
length covering the hidden request).

Response side, per case: the backend answers `GET /resp-<n>` with the case's bytes; the
client must get 502/504 or a response a strict parser accepts, the same connection must
then answer its next request with its own response, and so must a victim on a new
connection.

The default run takes seconds; ADVERSARIAL_FULL=1 adds smuggler's exhaustive and doubles
configs (about 1,600 more mutations, three framings each).
"""
from __future__ import annotations

import codecs
import json
import os
import re
import socket
from dataclasses import dataclass, field
from pathlib import Path

import h11
import pytest

from support.rawlog import RawLogBackend

CORPUS = Path(__file__).parent / "corpus"
FULL = os.environ.get("ADVERSARIAL_FULL") == "1"
PYROUTE_ENV = {"TIMEOUT_SERVER": "2"}
ANSWER_TIMEOUT = 3.0  # longer than TIMEOUT_SERVER: pyroute always says something first
MAX_RESPONSE_HEAD = 64 * 1024  # pyroute refuses a larger upstream response head (502)
POISON = b"HTTP/1.1 200 OK\r\nX-Seen: POISON\r\nContent-Length: 6\r\n\r\nPOISON"

# Cases known to fail, each with the finding it is (an issue number and F-number), marked
# strict xfail so that the fix shows as an XPASS until its line here is removed. Issue 14's
# F1, F5, F10, F11 and F13 were here until their fixes landed; none fails today.
KNOWN_FAILING: dict[str, str] = {}


@dataclass
class Case:
    id: str
    n: int
    payload: bytes
    methods: tuple[str, ...] = ("POST",)
    bodies: frozenset[int] | None = None  # body lengths the backend may see on /adv-<n>


@dataclass
class ResponseCase:
    id: str
    n: int
    response: bytes
    close: bool


@dataclass
class Exchange:
    """What a client read: (status, X-Seen or None) per response, and how it ended."""
    responses: list[tuple[int, str | None]] = field(default_factory=list)
    closed: bool = False
    error: str | None = None


# -- the corpus ------------------------------------------------------------------------------
def _latin1(s: str) -> bytes:
    return s.encode("latin-1")


def _smuggled(n: int) -> bytes:
    return b"GET /SMUGGLED-%d HTTP/1.1\r\nHost: adv\r\n\r\n" % n


def _clte(n, line: bytes, method="POST", version="HTTP/1.1") -> Case:
    body = b"0\r\n\r\n" + _smuggled(n)
    head = b"%s /adv-%d %s\r\n%s\r\nHost: adv\r\nContent-Length: %d\r\n\r\n" % (
        method.encode(), n, version.encode(), line, len(body))
    return Case("", n, head + body, (method,), frozenset({len(body)}))


def _tecl(n, line: bytes, method="POST", version="HTTP/1.1") -> Case:
    inner = _smuggled(n)
    head = b"%s /adv-%d %s\r\n%s\r\nHost: adv\r\n\r\n" % (method.encode(), n, version.encode(), line)
    return Case("", n, head + b"%x\r\n" % len(inner) + inner + b"\r\n0\r\n\r\n", (method,),
                frozenset({len(inner), 0}))


def _cl(n, line: str) -> Case:
    body = _smuggled(n)
    head = b"POST /adv-%d HTTP/1.1\r\nHost: adv\r\n%s\r\n\r\n" % (n, _latin1(line.replace("{n}", str(len(body)))))
    return Case("", n, head + body, ("POST",), frozenset({len(body)}))


def _load_json(name: str) -> dict:
    return json.loads((CORPUS / name).read_text())


def _smuggler():
    for line in (CORPUS / "smuggler_te_mutations.txt").read_text().splitlines():
        if line.startswith("#") or not line:
            continue
        name, escaped = line.split("\t", 1)
        if FULL or name.startswith("default/"):
            gadget = codecs.escape_decode(escaped.encode("ascii"))[0]
            yield f"smuggler/{name}", [("clte", lambda n, g=gadget: _clte(n, g)),
                                        ("tecl", lambda n, g=gadget: _tecl(n, g))]


def _portswigger():
    for c in _load_json("portswigger_permutations.json")["cases"]:
        if c["targets"] == "CL":
            yield f"portswigger/{c['name']}", [("cl", lambda n, c=c: _cl(n, c["line"]))]
        else:
            kw = {k: c[k] for k in ("method", "version") if k in c}
            line = _latin1(c["line"])
            yield f"portswigger/{c['name']}", [("clte", lambda n, l=line, kw=kw: _clte(n, l, **kw)),
                                               ("tecl", lambda n, l=line, kw=kw: _tecl(n, l, **kw))]


def _payloads(file: str, corpus: str):
    for c in _load_json(file)["cases"]:
        yield f"{corpus}/{c['name']}", [("", lambda n, c=c: Case(
            "", n, _latin1(c["payload"]).replace(b"{t}", b"/adv-%d" % n), tuple(c["methods"])))]


def request_cases() -> list[Case]:
    cases = []
    sources = [_smuggler(), _portswigger(), _payloads("http_garden_cases.json", "http_garden"),
               _payloads("issue14_reproductions.json", "issue14")]
    for source in sources:
        for name, framings in source:
            for framing, build in framings:
                case = build(len(cases) + 1)
                case.id = f"{name}/{framing}" if framing else name
                cases.append(case)
    return cases


def response_cases() -> list[ResponseCase]:
    cases = []
    for i, c in enumerate(_load_json("response_cases.json")["cases"], start=100001):
        data = _latin1(c["response"]).replace(b"{poison}", POISON).replace(b"{poisonhex}", b"%x" % len(POISON))
        if b"{len}" in data:
            data = data.replace(b"{len}", b"%d" % (len(data) - data.index(b"\r\n\r\n") - 4))
        cases.append(ResponseCase(f"response/{c['name']}", i, data, c["close"]))
    return cases


def _marked(case_id: str):
    if finding := KNOWN_FAILING.get(case_id):
        return pytest.param(case_id, id=case_id,
                            marks=pytest.mark.xfail(strict=True, reason=f"{finding}: known to fail until its fix lands"))
    return pytest.param(case_id, id=case_id)


REQUEST_CASES = {c.id: c for c in request_cases()}
RESPONSE_CASES = {c.id: c for c in response_cases()}


# -- the rig ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def backend():
    b = RawLogBackend("127.0.0.51")
    yield b
    b.close()


@pytest.fixture(scope="module")
def routed(_module_proxy, dns, backend):
    """pyroute with every path routed to the raw backend."""
    dns.set_service("adv", backend.ip)
    _module_proxy.reconfigure(serviceName="adv", servicePath="/", port=backend.port)
    return _module_proxy


class LogWatch:
    """New 'Traceback' lines in pyroute's log since the last look."""

    def __init__(self, proxy):
        self.path, self.offset = Path(proxy.stderr_path), 0

    def new_tracebacks(self) -> str | None:
        data = self.path.read_bytes()
        new, self.offset = data[self.offset:], len(data)
        i = new.find(b"Traceback")
        return new[i:i + 1500].decode(errors="replace") if i >= 0 else None


@pytest.fixture(scope="module")
def logwatch(routed):
    return LogWatch(routed)


def read_answers(sock: socket.socket, methods: tuple[str, ...]) -> Exchange:
    """Parse up to len(methods) responses strictly (h11, plus: no framing header on a 1xx,
    never both framing headers, no head over pyroute's limit), stopping early when the
    proxy closes."""
    ex, pending = Exchange(), b""
    for method in methods:
        conn = h11.Connection(h11.CLIENT, max_incomplete_event_size=2 * MAX_RESPONSE_HEAD)
        conn.send(h11.Request(method=method, target="/", headers=[("Host", "a")]))
        conn.send(h11.EndOfMessage())
        if pending:
            conn.receive_data(pending)  # (an empty call would mean EOF)
        status = seen = None
        try:
            while True:
                ev = conn.next_event()
                if ev is h11.NEED_DATA:
                    try:
                        data = sock.recv(65536)
                    except (socket.timeout, TimeoutError):
                        ex.error = f"no complete answer within {ANSWER_TIMEOUT}s"
                        return ex
                    except ConnectionResetError:
                        data = b""
                    conn.receive_data(data)
                elif isinstance(ev, h11.ConnectionClosed):
                    ex.closed = True
                    return ex
                elif isinstance(ev, (h11.InformationalResponse, h11.Response)):
                    names = {k for k, _ in ev.headers}
                    if sum(len(k) + len(v) + 4 for k, v in ev.headers) > MAX_RESPONSE_HEAD:
                        ex.error = f"a response head over {MAX_RESPONSE_HEAD} bytes reached the client"
                        return ex
                    if isinstance(ev, h11.InformationalResponse) and names & {b"content-length", b"transfer-encoding"}:
                        ex.error = f"a {ev.status_code} carrying a framing header reached the client"
                        return ex
                    if {b"content-length", b"transfer-encoding"} <= names:
                        ex.error = "a response with both Content-Length and Transfer-Encoding reached the client"
                        return ex
                    if isinstance(ev, h11.Response):
                        status = ev.status_code
                        seen = next((v.decode("latin-1") for k, v in ev.headers if k == b"x-seen"), None)
                elif isinstance(ev, h11.EndOfMessage):
                    ex.responses.append((status, seen))
                    pending, eof = conn.trailing_data
                    if conn.their_state is h11.MUST_CLOSE or eof:
                        ex.closed = True
                        return ex
                    break
        except h11.RemoteProtocolError as e:
            ex.error = f"malformed answer: {e}"
            return ex
    return ex


def exchange(proxy, data: bytes, methods: tuple[str, ...]) -> Exchange:
    with socket.create_connection(("127.0.0.1", proxy.http_port), timeout=ANSWER_TIMEOUT) as s:
        s.sendall(data)
        return read_answers(s, methods)


def names(ex: Exchange, target: str) -> bool:
    return any(seen and seen.startswith(f"GET {target} #") for _, seen in ex.responses)


def victim_problems(proxy, n: int) -> list[str]:
    """A fresh client's GET must get its own answer (a poisoned pool answers it otherwise)."""
    target = f"/victim-{n}"
    ex = exchange(proxy, b"GET %s HTTP/1.1\r\nHost: adv\r\n\r\n" % target.encode(), ("GET",))
    if ex.responses[:1] and ex.responses[0][0] == 200 and names(ex, target):
        return []
    return [f"victim {target} got {ex.responses or ex.error or 'nothing'} instead of its own response"]


def backend_problems(backend, since: int, errors_since: int, allowed: set[tuple[str, str]],
                     adv: str, bodies: frozenset[int] | None) -> list[str]:
    problems = []
    for r in backend.received[since:]:
        if "SMUGGLED" in r.target:
            problems.append(f"backend ran a smuggled request: {r.method} {r.target} (conn {r.conn_id})")
        elif (r.method, r.target) not in allowed:
            problems.append(f"backend saw {r.method} {r.target!r}, not a request the test sent as such")
        elif r.target == adv and r.complete and bodies is not None and r.body_len not in bodies:
            problems.append(f"backend saw a {r.body_len}-byte body on {adv}; the client framed one of {sorted(bodies)}")
    for e in backend.protocol_errors[errors_since:]:
        problems.append(f"backend's strict parse refused what pyroute forwarded: {e.message}; "
                        f"raw bytes on conn {e.conn_id}: {e.raw[:600]!r}")
    return problems


# -- request side ----------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", [_marked(i) for i in REQUEST_CASES])
def test_request_vector(routed, backend, logwatch, case_id):
    case = REQUEST_CASES[case_id]
    adv = f"/adv-{case.n}"
    since, errors_since = len(backend.received), len(backend.protocol_errors)
    ex = exchange(routed, case.payload, case.methods)
    problems = [f"attacker: {ex.error}"] if ex.error else []
    for status, seen in ex.responses:
        if seen and not any(seen.startswith(f"{m} {adv} #") for m in case.methods):
            problems.append(f"attacker got someone else's response: X-Seen {seen}")
    problems += victim_problems(routed, case.n)
    ran = [r for r in backend.received[since:] if r.target == adv and r.complete]
    answered = sum(1 for _, seen in ex.responses if seen and f" {adv} #" in seen)
    if len(ran) > answered:
        problems.append(f"backend ran {len(ran)} request(s) on {adv}, the attacker got {answered} answer(s) "
                        f"from it: {ex.responses}")
    allowed = {(m, adv) for m in case.methods} | {("GET", f"/victim-{case.n}")}
    problems += backend_problems(backend, since, errors_since, allowed, adv, case.bodies)
    if tb := logwatch.new_tracebacks():
        problems.append(f"pyroute logged a traceback:\n{tb}")
    assert not problems, f"{case_id} (sent {case.payload[:400]!r}):\n  " + "\n  ".join(problems)


# -- response side ---------------------------------------------------------------------------
@pytest.mark.parametrize("case_id", [_marked(i) for i in RESPONSE_CASES])
def test_response_vector(routed, backend, logwatch, case_id):
    case = RESPONSE_CASES[case_id]
    target, again = f"/resp-{case.n}", f"/again-{case.n}"
    backend.canned[target] = (case.response, case.close)
    since, errors_since = len(backend.received), len(backend.protocol_errors)
    problems = []
    with socket.create_connection(("127.0.0.1", routed.http_port), timeout=ANSWER_TIMEOUT) as s:
        s.sendall(b"GET %s HTTP/1.1\r\nHost: adv\r\n\r\n" % target.encode())
        ex = read_answers(s, ("GET",))
        if ex.error:
            problems.append(f"client: {ex.error}")
        elif ex.responses and ex.responses[0][1] == "POISON":
            problems.append("client got the poison response")
        elif not ex.closed:
            # the same client connection must still be in step
            s.sendall(b"GET %s HTTP/1.1\r\nHost: adv\r\n\r\n" % again.encode())
            nxt = read_answers(s, ("GET",))
            if nxt.error or not names(nxt, again):
                problems.append(f"the next request on that connection got {nxt.responses or nxt.error or 'nothing'}")
    problems += victim_problems(routed, case.n)
    allowed = {("GET", target), ("GET", again), ("GET", f"/victim-{case.n}")}
    problems += backend_problems(backend, since, errors_since, allowed, target, None)
    if tb := logwatch.new_tracebacks():
        problems.append(f"pyroute logged a traceback:\n{tb}")
    assert not problems, f"{case_id} (upstream sent {case.response[:300]!r}):\n  " + "\n  ".join(problems)


def test_backend_saw_only_what_the_cases_sent(routed, backend, logwatch):
    """A late sweep: bytes forwarded on a connection no later request reused have been
    parsed by now. Every target must be one a case sent on its own and no strict parse may
    have failed, except for the cases known to fail (each stray is traced to its case)."""
    by_number = {c.n: c.id for c in [*REQUEST_CASES.values(), *RESPONSE_CASES.values()]}
    numbered = re.compile(r"/(?:adv|victim|resp|again|SMUGGLED)-(\d+)")
    last_case_on_conn: dict[int, str] = {}
    unexplained = []
    for r in backend.received:
        m = numbered.search(r.target)
        if m and not r.target.startswith("/SMUGGLED"):
            last_case_on_conn[r.conn_id] = by_number[int(m.group(1))]
            continue
        case_id = by_number[int(m.group(1))] if m else last_case_on_conn.get(r.conn_id)
        if case_id not in KNOWN_FAILING:
            unexplained.append((case_id, r.method, r.target))
    for e in backend.protocol_errors:
        found = numbered.findall(e.raw.decode("latin-1"))
        case_id = by_number[int(found[-1])] if found else None
        if case_id not in KNOWN_FAILING:
            unexplained.append((case_id, e.message, e.raw[-300:]))
    assert not unexplained, unexplained
    assert not logwatch.new_tracebacks()
