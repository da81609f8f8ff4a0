"""The domain model: a Service and its Destinations, parsed from DFP reconfigure params.

Docker Flow Proxy's users drive the proxy with query strings like
``serviceName=go-demo&servicePath=/demo&port=8080`` (or ``servicePath.1=...&port.1=...``).
This module turns such a parameter map into a validated, immutable :class:`Service`,
with DFP's status codes for the errors, and nothing else: no I/O, no routing.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass

from pyroute.basicauth import hash_problem
from pyroute.config import BALANCE_ALGORITHMS, COMPRESSION_ALGOS, DISCOVERY_TYPES, DOMAIN_ALGOS, is_secret_env
from pyroute.dockersecrets import read_secret
from pyroute.patterns import PatternError, compile_pattern, compile_replacement

MAX_INDEX = 10  # DFP scans servicePath.N / port.N for N = 1..10
# A destination exists at index N when any of these carries the ".N" suffix (DFP's rule).
_INDEX_MARKERS = ("servicepath", "port", "servicedomain", "httpsport")
DEFAULT_DOMAIN_ALGO = "hdr_beg"
SNI_DOMAIN_ALGO = "req.ssl_sni"  # serviceDomainAlgo matching the TLS ClientHello's name: tcp/sni services only
REQ_MODES = ("http", "tcp", "sni")
UPSTREAM_PROTOS = ("http1", "h2c", "h2")  # upstreamProto: HTTP/1.1 (default), cleartext HTTP/2, HTTP/2 over TLS
PATH_TYPES = ("path_beg", "path", "path_end", "path_reg", "path_dir", "path_sub", "path_dom", "path_len")
# HAProxy's "-m" match methods on the path fetch, as the path_* fetch each one equals.
_PATH_METHODS = {"beg": "path_beg", "str": "path", "end": "path_end", "reg": "path_reg", "dir": "path_dir",
                 "sub": "path_sub", "dom": "path_dom", "len": "path_len"}
_PATH_LEN = re.compile(r"(?:(eq|ge|gt|le|lt) *)?([0-9]{1,9})\Z|([0-9]{0,9}):([0-9]{0,9})\Z")
REDIRECT_CODES = (301, 302, 303, 307, 308)
# reqMode=sni: HAProxy's SNI fetch and match methods, as DFP's sni-routing tutorial writes
# `pathType=req_ssl_sni -i -m beg` (`-m`: exact, prefix, suffix, substring, regex, dot-delimited run).
SNI_FETCHES = ("req_ssl_sni", "req.ssl_sni")
SNI_MATCHES = ("str", "beg", "end", "sub", "reg", "dom")
# DFP parameters that carry raw HAProxy configuration: pyroute has no HAProxy to hand them to.
RAW_HAPROXY_PARAMS = {"templatefepath": "templateFePath", "templatebepath": "templateBePath",
                      "backendextra": "backendExtra"}
_HEADER_NAME = re.compile(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+\Z")
# Headers pyroute owns on both sides: message framing and hop-by-hop connection handling.
# An edit of one would desync the client or the upstream connection (issue 14, F6).
UNEDITABLE_HEADERS = frozenset({"content-length", "transfer-encoding", "connection", "keep-alive",
                                "proxy-connection", "te", "trailer", "upgrade"})
_METHOD = re.compile(r"[A-Z]+\Z")
_ACL_NAME = re.compile(r"[A-Za-z0-9._-]{1,200}\Z")  # a sort key that /config writes into acl lines
# The %[...] fetches a header template may use (HAProxy sample fetches pyroute evaluates).
FETCH = re.compile(r"%\[([^\]]*)\]")
REQ_HDR = re.compile(r"req\.hdr\(([!#$%&'*+.^_`|~0-9A-Za-z-]+)\)\Z")
ENV = re.compile(r"env\(([A-Za-z_][A-Za-z0-9_]*)\)\Z")
ENV_FETCH = re.compile(r"%\[env\(([A-Za-z_][A-Za-z0-9_]*)\)\]")  # the variables a header template reads
# HAProxy's condition after a header edit's value: "if"/"unless" starts one, as DFP users write
# `X-Forwarded-Ssl on if { ssl_fc }`. pyroute evaluates the TLS flag of the client connection only.
_CONDITION_START = re.compile(r"(?:\A|\s)(if|unless)(?:\s+(.*))?\Z", re.S)
_SSL_FC = re.compile(r"(!?)\s*\{\s*ssl_fc\s*\}\Z")
MAX_HEADER_VALUE = 8192  # characters of one configured header value (templates included)
_HEADER_VALUE = re.compile(r"[\t\x20-\x7e]*\Z")  # RFC 9110 field-value without obs-text


def parse_sni_type(text: str) -> tuple[str, bool]:
    """`req_ssl_sni [-i] [-m METHOD]` (either spelling, flags in any order) -> (method, ignore_case).
    Raises ValueError naming the part pyroute does not take."""
    words = text.split()
    if not words or words[0].lower() not in SNI_FETCHES:
        raise ValueError(f"{text!r} is not an SNI match: with reqMode sni, pathType is "
                         "'req_ssl_sni [-i] [-m str|beg|end|sub|reg|dom]' (or req.ssl_sni), e.g. 'req_ssl_sni -i -m end'")
    method, ignore_case, rest = "str", False, words[1:]
    while rest:
        flag = rest.pop(0)
        if flag == "-i":
            ignore_case = True
        elif flag == "-m" and rest and rest[0].lower() in SNI_MATCHES:
            method = rest.pop(0).lower()
        else:
            raise ValueError(f"{flag + (' ' + rest[0] if flag == '-m' and rest else '')!r} in {text!r} is not "
                             f"supported: pyroute takes -i and -m {'|'.join(SNI_MATCHES)}")
    return method, ignore_case


def sni_type_text(method: str, ignore_case: bool) -> str:
    """The one spelling a parsed SNI pathType is stored and shown in."""
    return f"req_ssl_sni{' -i' if ignore_case else ''} -m {method}"


def split_condition(text: str) -> tuple[str, bool | None]:
    """A header edit's value and its condition: (value, True) for `if { ssl_fc }` (only when
    the client connection is TLS), (value, False) for `unless { ssl_fc }` / `if !{ ssl_fc }`,
    (text, None) without one. Raises ValueError naming any other condition (HAProxy reads a
    standalone if/unless as one; it is never forwarded as text)."""
    match = _CONDITION_START.search(text)
    if match is None:
        return text, None
    keyword, condition = match.group(1), (match.group(2) or "").strip()
    acl = _SSL_FC.match(condition)
    if acl is None:
        raise ValueError(f"the condition {keyword + ' ' + condition!r} is not supported: pyroute evaluates "
                         "'if { ssl_fc }', 'unless { ssl_fc }' and 'if !{ ssl_fc }' only")
    value = text[: match.start()].strip()
    if not value:
        raise ValueError(f"no value before the condition {keyword + ' ' + condition!r}")
    return value, (keyword == "if") != bool(acl.group(1))


def check_header_value(text: str) -> str:
    """'' when a header value is usable, else what is wrong (named for the 400 answer).

    Values go on the wire as bytes: visible ASCII, space and tab only. Non-ASCII (obs-text)
    is refused rather than guessed at: an encoding the upstream or client does not expect
    is worse than a clear 400, and it is what made compiling the route table fail."""
    if len(text) > MAX_HEADER_VALUE:
        return f"the value is longer than {MAX_HEADER_VALUE} characters"
    if not _HEADER_VALUE.match(text):
        bad = next(c for c in text if not (c == "\t" or " " <= c <= "~"))
        kind = "a control character" if bad < " " or bad == "\x7f" else "not ASCII (percent-encode it)"
        return f"header values may hold visible ASCII, spaces and tabs only: {bad!r} is {kind}"
    for match in FETCH.finditer(text):
        fetch = match.group(1)
        if fetch not in ("src", "dst_port") and not REQ_HDR.match(fetch) and not ENV.match(fetch):
            return (f"%[{fetch}] is not supported: pyroute evaluates %[src], %[dst_port], "
                    "%[req.hdr(Name)] and %[env(NAME)] only")
    return ""




@dataclass(frozen=True, slots=True)
class ServiceDefaults:
    """Process-wide settings that shape how parameters are read (DFP's global env vars)."""

    domain_algo: str = DEFAULT_DOMAIN_ALGO  # SERVICE_DOMAIN_ALGO
    https_only: bool = False  # HTTPS_ONLY forces httpsOnly on every destination
    users: str = ""  # USERS: global basic auth, realm defaultRealm
    users_pass_encrypted: bool = False
    compression_algo: str = ""  # COMPRESSION_ALGO / COMPRESSION_TYPE when a service sets none
    compression_type: str = ""
    secrets_dir: str = "/run/secrets"  # where usersSecret files live (dfp_users_<suffix>)
    header_env_allow: frozenset[str] = frozenset()  # HEADER_ENV_ALLOW: what %[env(NAME)] may read
    # The proxy's own ports, which a srcPort may not take: (port, the setting naming it, TLS?)
    proxy_ports: tuple[tuple[int, str, bool], ...] = ()

    @classmethod
    def from_settings(cls, settings) -> ServiceDefaults:
        return cls(
            domain_algo=settings.service_domain_algo, https_only=settings.https_only, users=settings.users,
            users_pass_encrypted=settings.users_pass_encrypted, compression_algo=settings.compression_algo,
            compression_type=settings.compression_type, secrets_dir=settings.secrets_dir,
            header_env_allow=frozenset(settings.header_env_allow),
            proxy_ports=((settings.port, "PORT", False),
                         *((spec.port, "DEFAULT_PORTS", spec.ssl) for spec in settings.default_ports),
                         *((spec.port, "BIND_PORTS", spec.ssl) for spec in settings.bind_ports)),
        )


class ServiceError(Exception):
    """A reconfigure that cannot be applied; `status` is the HTTP code DFP answers."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


@dataclass(frozen=True, slots=True)
class Destination:
    """One routed entry of a service: which requests (paths, domains) go to which port."""

    index: int  # 0 = the non-indexed destination, else N of ".N"
    paths: tuple[str, ...]
    domains: tuple[str, ...]  # lower-case, without the leading "*"
    port: int
    outbound_hostname: str | None  # dial this host instead of the service name
    path_type: str = "path_beg"  # how `paths` match: one of PATH_TYPES
    path_ignore_case: bool = False  # pathType "... -i": paths (stored lower-case) match whatever the case
    path_excludes: tuple[str, ...] = ()  # servicePathExclude: prefixes that never match
    header_match: tuple[tuple[str, str], ...] = ()  # serviceHeader: (lower name, exact value), all must match
    user_agents: tuple[str, ...] = ()  # userAgent: lower-case substrings, any may match
    src_port: int = 0  # only requests arriving on this proxy port (0: any)
    redirect_from: tuple[str, ...] = ()  # redirectFromDomain: hosts sent 301 to the first domain
    path_rewrites: tuple[tuple[str, str], ...] = ()  # reqPathSearchReplace: (regex, replacement)
    https_only: bool = False
    https_redirect_code: int = 302
    deny_http: bool = False
    allowed_methods: tuple[str, ...] = ()
    denied_methods: tuple[str, ...] = ()
    ignore_authorization: bool = False
    allowed_ips: tuple[str, ...] = ()  # CIDR networks, normalised
    denied_ips: tuple[str, ...] = ()
    req_mode: str = "http"  # one of REQ_MODES; tcp/sni destinations are served by tcp.py on src_port
    verify_client_ssl: bool = False  # 403 on TLS without a client certificate verified against CA_FILE
    https_port: int = 0  # requests that arrived over TLS go to this port instead (0 = port)
    src_https_port: int = 0  # srcHttpsPort: the https_port route takes TLS requests of this proxy port only (0: any)
    ssl_verify_none: bool = False  # speak TLS to the upstream, without verifying its certificate
    upstream_proto: str = "http1"  # one of UPSTREAM_PROTOS; h2c/h2 streams go to the tasks as HTTP/2 (gRPC)
    timeout_client: float | None = None  # per-destination overrides of the global timeouts
    timeout_server: float | None = None
    timeout_tunnel: float | None = None

    @property
    def conditional(self) -> bool:
        """Whether matching needs more than a path prefix and the Host."""
        return bool(self.path_type != "path_beg" or self.path_ignore_case or self.path_excludes or self.header_match
                    or self.user_agents or self.src_port)


SESSION_TYPES = ("sticky-server",)
# retryOn conditions, named as HAProxy's retry-on names them ("503": the status an upstream answered).
RETRY_CONDITIONS = ("connect-failure", "empty-response", "503")
DEFAULT_RETRY_ON = frozenset({"connect-failure", "empty-response"})
DEFAULT_RETRIES = 2
RATE_UNITS = {"s": 1.0, "m": 60.0}  # rateLimit=R/s or R/m


@dataclass(frozen=True, slots=True)
class Protection:
    """What protects a service from failures and from its clients: the retry policy and the
    per-service limits. Every limit is per pyroute process (see docs/reference.md)."""

    retries: int = DEFAULT_RETRIES  # tries after the first, on another task where there is one
    retry_on: frozenset[str] = DEFAULT_RETRY_ON  # of RETRY_CONDITIONS
    max_conn: int = 0  # maxConn: requests in flight per task; more wait in a queue (0 = no limit)
    max_in_flight: int = 0  # maxRequestsInFlight: requests in flight for the whole service (0 = no limit)
    rate: float = 0.0  # rateLimit: requests per second per client address (0 = no limit)
    burst: int = 0  # rateLimitBurst: requests a client may send at once before the rate applies

    @property
    def limited(self) -> bool:
        return bool(self.max_conn or self.max_in_flight or self.rate)


@dataclass(frozen=True, slots=True)
class Balancing:
    """How requests spread over the service's tasks; None = the global setting applies.

    ``discovery`` "DNS" (or sticky sessions, which need task addresses) makes pyroute
    balance over ``tasks.<service>`` itself instead of dialing the service name.
    """

    discovery: str | None = None  # "Overlay" | "DNS"
    algorithm: str | None = None  # one of BALANCE_ALGORITHMS
    health_path: str | None = None  # active checks when set
    health_interval: float | None = None
    health_timeout: float | None = None
    health_rise: int | None = None
    health_fall: int | None = None
    sticky_cookie: str | None = None  # cookie name when sessionType=sticky-server
    slow_start: float = 0.0  # slowStart: seconds over which a new task's share ramps up to a full one


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    acl_name: str  # sort key for precedence (DFP: aclName, default serviceName)
    domain_algo: str  # one of DOMAIN_ALGOS, for every destination of the service
    destinations: tuple[Destination, ...]
    params: tuple[tuple[str, str], ...]  # the accepted parameters, as given (for /config and state)
    is_default_backend: bool = False
    req_add: tuple[tuple[str, str], ...] = ()  # (name, value template)
    req_set: tuple[tuple[str, str], ...] = ()
    req_del: tuple[str, ...] = ()
    res_add: tuple[tuple[str, str], ...] = ()
    res_set: tuple[tuple[str, str], ...] = ()
    res_del: tuple[str, ...] = ()
    users: tuple[tuple[str, str], ...] = ()  # (user, password or crypt hash); realm <serviceName>Realm
    users_encrypted: bool = False
    global_users: tuple[tuple[str, str], ...] = ()  # USERS, checked too; realm defaultRealm
    global_users_encrypted: bool = False
    redirect_when_http_proto: bool = False
    redirect_unless_https_proto: bool = False
    compression_algo: str = ""  # space-separated COMPRESSION_ALGOS, in preference order ("" = off)
    compression_types: tuple[str, ...] = ()
    balancing: Balancing = Balancing()
    protection: Protection = Protection()
    max_request_body: int | None = None  # maxRequestBody (bytes, 0 = unlimited): overrides MAX_REQUEST_BODY
    cert: str | None = None  # serviceCert: PEM installed into the certificate store as cert_name
    cert_name: str = ""
    acme_hosts: tuple[str, ...] = ()  # letsencrypt.host: names ACME certificates are ordered for (acme.py)
    acme_email: str = ""  # letsencrypt.email: the ACME account's contact for them (else ACME_EMAIL)

    @property
    def dial_hosts(self) -> tuple[str, ...]:
        return tuple(d.outbound_hostname or self.name for d in self.destinations)

    def to_json(self) -> dict:
        """DFP's JSON shape (the fields of its Service struct that we implement)."""
        return {
            "ServiceName": self.name,
            "AclName": self.acl_name,
            "ServiceDomainAlgo": self.domain_algo if self.domain_algo == SNI_DOMAIN_ALGO else f"{self.domain_algo}(host)",
            "ServiceDest": [
                {
                    "Index": d.index,
                    "ServicePath": list(d.paths),
                    "ServiceDomain": list(d.domains),
                    "Port": str(d.port),
                    "OutboundHostname": d.outbound_hostname or "",
                    "PathType": d.path_type + (" -i" if d.path_ignore_case else ""),
                    "ServicePathExclude": list(d.path_excludes),
                    "ServiceHeader": dict(d.header_match),
                    "UserAgent": {"Value": list(d.user_agents)},
                    "RedirectFromDomain": list(d.redirect_from),
                    "ReqPathSearchReplaceFormatted": [f"{a},{b}" for a, b in d.path_rewrites],
                    "HttpsOnly": d.https_only,
                    "HttpsRedirectCode": str(d.https_redirect_code),
                    "DenyHttp": d.deny_http,
                    "AllowedMethods": list(d.allowed_methods),
                    "DeniedMethods": list(d.denied_methods),
                    "IgnoreAuthorization": d.ignore_authorization,
                    "AllowedIPs": list(d.allowed_ips),
                    "DeniedIPs": list(d.denied_ips),
                    "ReqMode": d.req_mode,
                    "SrcPort": d.src_port,
                    "VerifyClientSsl": d.verify_client_ssl,
                    "HttpsPort": d.https_port,
                    "SrcHttpsPort": d.src_https_port,
                    "SslVerifyNone": d.ssl_verify_none,
                    "UpstreamProto": d.upstream_proto,
                    "TimeoutClient": _shown(d.timeout_client),
                    "TimeoutServer": _shown(d.timeout_server),
                    "TimeoutTunnel": _shown(d.timeout_tunnel),
                }
                for d in self.destinations
            ],
            "IsDefaultBackend": self.is_default_backend,
            "AddReqHeader": [f"{n} {v}" for n, v in self.req_add],
            "SetReqHeader": [f"{n} {v}" for n, v in self.req_set],
            "DelReqHeader": list(self.req_del),
            "AddResHeader": [f"{n} {v}" for n, v in self.res_add],
            "SetResHeader": [f"{n} {v}" for n, v in self.res_set],
            "DelResHeader": list(self.res_del),
            "Users": [{"Username": u, "Password": "***"} for u, _ in self.users],
            "UsersPassEncrypted": self.users_encrypted,
            "UseGlobalUsers": bool(self.global_users),
            "RedirectWhenHttpProto": self.redirect_when_http_proto,
            "RedirectUnlessHttpsProto": self.redirect_unless_https_proto,
            "CompressionAlgo": self.compression_algo,
            "CompressionType": " ".join(self.compression_types),
            "MaxRequestBody": _shown(self.max_request_body),
        }


def _shown(value: float | None) -> str:
    return "" if value is None else f"{value:g}"


def _check_src_port(port: int, mode: str, label: str, defaults: ServiceDefaults) -> None:
    """A srcPort the proxy already listens on would never reach the service (issue 14, F15):
    the admin port for every mode, the public ports for tcp, the public HTTP ports for sni
    (an sni service may share a TLS port). An http srcPort selects requests by the public
    port they came in on, so the public ports are its to name."""
    for taken, setting, tls in defaults.proxy_ports:
        if port != taken or not taken:
            continue
        if setting == "PORT" or mode == "tcp" or (mode == "sni" and not tls):
            what = "the admin port (PORT)" if setting == "PORT" else f"a public port ({setting})"
            raise ServiceError(400, f"{label} {port} is {what}, which a reqMode={mode} service cannot use")


def _check_src_https_port(port: int, https_port: int, mode: str, label: str, defaults: ServiceDefaults) -> None:
    """DFP's srcHttpsPort is the TLS entry port of the httpsPort destination: it needs an httpsPort
    and one of the proxy's :ssl ports (pyroute opens no TLS listener elsewhere)."""
    if mode != "http" or not https_port:
        raise ServiceError(400, f"{label} needs httpsPort (it is the entry port of the httpsPort destination) "
                                "and reqMode http")
    tls_ports = [taken for taken, setting, tls in defaults.proxy_ports if tls]
    if port not in tls_ports:
        raise ServiceError(400, f"{label} {port} is not one of the proxy's TLS ports (DEFAULT_PORTS/BIND_PORTS "
                                f":ssl: {', '.join(map(str, tls_ports)) or 'none'}): no TLS request arrives there")


def _optional_number(params: Mapping[str, str], key: str, name: str, integer: bool) -> float | int | None:
    """A non-negative number parameter (seconds or bytes), None when absent or empty."""
    text = params.get(key, "").strip()
    if not text:
        return None
    try:
        number = int(text) if integer else float(text)
    except ValueError:
        number = -1
    if not number >= 0 or (not integer and not 0 < number < float("inf")):
        kind = "an integer >= 0" if integer else "a number of seconds > 0"
        raise ServiceError(400, f"{name} must be {kind}, got {text!r}")
    return number


def _lower_keys(params: Mapping[str, str]) -> dict[str, str]:
    """DFP matches parameter names case-insensitively; the first spelling given wins."""
    out: dict[str, str] = {}
    for key, value in params.items():
        out.setdefault(key.lower(), value)
    return out


def _split(value: str | None, separator: str) -> tuple[str, ...]:
    if not value:
        return ()
    return tuple(item.strip() for item in value.split(separator) if item.strip())


def _parse_port(value: str, name: str) -> int:
    if not (value.isascii() and value.isdigit()) or not 1 <= int(value) <= 65535:
        raise ServiceError(400, f"{name} must be a port number 1..65535, got {value!r}")
    return int(value)


def _parse_seconds(value: str | None, name: str) -> float | None:
    if value is None or not value.strip():
        return None
    try:
        seconds = float(value)
    except ValueError:
        seconds = -1.0
    if not (0 < seconds < float("inf")):
        raise ServiceError(400, f"{name} must be a number of seconds > 0, got {value!r}")
    return seconds


def _bool(value: str | None, name: str) -> bool:
    text = (value or "").strip().lower()
    if text in ("", "false", "0", "no"):
        return False
    if text in ("true", "1", "yes"):
        return True
    raise ServiceError(400, f"{name} must be true or false, got {value!r}")


def _check_host(value: str, name: str) -> str:
    """A DNS name or an IP literal; anything else would be dialed as garbage later."""
    try:
        ipaddress.ip_address(value)
        return value
    except ValueError:
        pass
    labels = value.rstrip(".").split(".")
    if len(value) > 253 or not all(
        0 < len(label) <= 63 and label.replace("-", "").replace("_", "").isalnum() and label.isascii()
        for label in labels
    ):
        raise ServiceError(400, f"{name} is not a valid host name: {value!r}")
    return value


def _check_path(path: str, name: str) -> str:
    if not path.startswith("/") or any(c.isspace() or ord(c) < 0x20 for c in path):
        raise ServiceError(400, f"{name} entries must start with '/' and hold no spaces, got {path!r}")
    return path


def _parse_balancing(params: Mapping[str, str], name: str) -> Balancing:
    """discoveryType, balance, healthCheck*, sessionType/sessionCookie."""

    def number(key: str, label: str, kind):
        text = params.get(key, "").strip()
        if not text:
            return None
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or not value > 0 or value != value or value == float("inf"):
            raise ServiceError(400, f"{label} must be a number > 0, got {text!r}")
        return value

    discovery = params.get("discoverytype", "").strip() or None
    if discovery is not None:
        match = [d for d in DISCOVERY_TYPES if d.lower() == discovery.lower()]
        if not match:
            raise ServiceError(400, f"discoveryType must be Overlay or DNS, got {discovery!r}")
        discovery = match[0]
    algorithm = params.get("balance", "").strip().lower() or None
    if algorithm is not None and algorithm not in BALANCE_ALGORITHMS:
        raise ServiceError(400, f"balance must be one of {', '.join(BALANCE_ALGORITHMS)}, got {algorithm!r}")
    health_path = params.get("healthcheckpath", "").strip() or None
    if health_path is not None:
        _check_path(health_path, "healthCheckPath")
    session = params.get("sessiontype", "").strip() or None
    if session is not None and session not in SESSION_TYPES:
        raise ServiceError(400, f"sessionType must be sticky-server, got {session!r}")
    cookie = params.get("sessioncookie", "").strip() or name
    if not all(c.isascii() and (c.isalnum() or c in "-_.") for c in cookie):
        raise ServiceError(400, f"sessionCookie must be a cookie name (letters, digits, - _ .), got {cookie!r}")
    return Balancing(
        discovery=discovery,
        algorithm=algorithm,
        health_path=health_path,
        health_interval=number("healthcheckinterval", "healthCheckInterval", float),
        health_timeout=number("healthchecktimeout", "healthCheckTimeout", float),
        health_rise=number("healthcheckrise", "healthCheckRise", int),
        health_fall=number("healthcheckfall", "healthCheckFall", int),
        sticky_cookie=cookie if session else None,
        slow_start=_parse_duration(params.get("slowstart"), "slowStart") or 0.0,
    )


def _parse_duration(value: str | None, name: str) -> float | None:
    """Seconds, as a number or with a unit (`10s`, `500ms`, `1m`); None when absent."""
    text = (value or "").strip().lower()
    if not text:
        return None
    scale = 1.0
    for unit, factor in (("ms", 0.001), ("s", 1.0), ("m", 60.0)):
        if text.endswith(unit):
            text, scale = text[: -len(unit)], factor
            break
    try:
        seconds = float(text) * scale
    except ValueError:
        seconds = -1.0
    if not 0 < seconds < float("inf"):
        raise ServiceError(400, f"{name} must be a duration > 0 (e.g. 10s, 500ms), got {value!r}")
    return seconds


def _count(params: Mapping[str, str], key: str, name: str, default: int = 0) -> int:
    text = params.get(key, "").strip()
    if not text:
        return default
    if not (text.isascii() and text.isdigit()) or int(text) > 1_000_000:
        raise ServiceError(400, f"{name} must be an integer 0..1000000, got {text!r}")
    return int(text)


def _parse_protection(params: Mapping[str, str], separator: str) -> Protection:
    """retries, retryOn, maxConn, maxRequestsInFlight, rateLimit, rateLimitBurst."""
    retries = _count(params, "retries", "retries", DEFAULT_RETRIES)
    if retries > 10:
        raise ServiceError(400, f"retries must be 0..10, got {retries}")
    retry_on = DEFAULT_RETRY_ON
    if params.get("retryon", "").strip():
        retry_on = frozenset(c.lower() for c in _split(params["retryon"], separator))
        unknown = sorted(retry_on - set(RETRY_CONDITIONS) - {"none"})
        if unknown:
            raise ServiceError(400, f"retryOn: {', '.join(unknown)} is not one of {', '.join(RETRY_CONDITIONS)} "
                               "(or none)")
        retry_on -= {"none"}
    rate = 0.0
    rate_text = params.get("ratelimit", "").strip().lower()
    if rate_text:
        number, _, unit = rate_text.partition("/")
        try:
            rate = float(number) / RATE_UNITS[unit or "s"]
        except (ValueError, KeyError):
            rate = -1.0
        if not 0 < rate < float("inf"):
            raise ServiceError(400, f"rateLimit must be requests per second or minute > 0 (e.g. 10/s, 600/m), "
                               f"got {params['ratelimit']!r}")
    burst = _count(params, "ratelimitburst", "rateLimitBurst")
    if burst and not rate:
        raise ServiceError(400, "rateLimitBurst needs a rateLimit")
    if rate and not burst:
        burst = max(1, int(rate + 0.999))  # one second's worth
    return Protection(retries=retries, retry_on=retry_on, max_conn=_count(params, "maxconn", "maxConn"),
                      max_in_flight=_count(params, "maxrequestsinflight", "maxRequestsInFlight"),
                      rate=rate, burst=burst)


def _indexes(params: Mapping[str, str]) -> list[int]:
    """The indexed destinations present: scan 1..10, stop at the first gap (DFP's rule)."""
    found = []
    for n in range(1, MAX_INDEX + 1):
        if not any(f"{marker}.{n}" in params for marker in _INDEX_MARKERS):
            break
        found.append(n)
    return found


def _methods(value: str | None, separator: str, name: str) -> tuple[str, ...]:
    methods = tuple(m.upper() for m in _split(value, separator))
    for method in methods:
        if not _METHOD.match(method):
            raise ServiceError(400, f"{name} holds an invalid method {method!r}")
    return methods


def _networks(value: str | None, separator: str, name: str) -> tuple[str, ...]:
    out = []
    for item in _split(value, separator):
        try:
            out.append(str(ipaddress.ip_network(item, strict=False)))
        except ValueError:
            raise ServiceError(400, f"{name} holds {item!r}, which is not an IP address or CIDR network") from None
    return tuple(out)


def _header_edits(value: str | None, separator: str, name: str, env_allow: frozenset[str]) -> tuple[tuple[str, str], ...]:
    """DFP's "Name value" entries; the value may hold the %[...] fetches pyroute evaluates."""
    out = []
    for item in _split_entries(value, separator):
        header, _, text = item.partition(" ")
        if not _HEADER_NAME.match(header):
            raise ServiceError(400, f"{name}: {header!r} is not a header name (expected 'Name value')")
        _check_editable(header, name)
        try:
            text = " ".join(_condition_text(*split_condition(text.strip())))
        except ValueError as exc:
            raise ServiceError(400, f"{name}: {header}: {exc}") from None
        problem = check_header_value(split_condition(text)[0])
        if problem:
            raise ServiceError(400, f"{name}: {header}: {problem}")
        for variable in ENV_FETCH.findall(text):
            if is_secret_env(variable):
                raise ServiceError(400, f"{name}: {header}: %[env({variable})] is a credential and is never sent")
            if variable not in env_allow:
                raise ServiceError(400, f"{name}: {header}: %[env({variable})] is not allowed: list {variable} in "
                                   "HEADER_ENV_ALLOW to send its value")
        out.append((header, text.strip()))
    return tuple(out)


def _sni_patterns(patterns: tuple[str, ...], method: str, ignore_case: bool, name: str) -> tuple[str, ...]:
    """SNI patterns for an HAProxy match: a regex must compile (RE2, linear time); others are
    one word of visible ASCII. With -i they are stored lower-case (SNI names are matched so)."""
    out = []
    for pattern in patterns:
        if method == "reg":
            try:
                compile_pattern(pattern)
            except PatternError as exc:
                raise ServiceError(400, f"{name}: {pattern!r} is not a usable regex for -m reg: {exc}") from None
        elif any(not "!" <= c <= "~" for c in pattern):
            raise ServiceError(400, f"{name}: {pattern!r} holds a space, control or non-ASCII character")
        out.append(pattern.lower() if ignore_case and method != "reg" else pattern)
    return tuple(out)


def _condition_text(value: str, tls: bool | None) -> tuple[str, ...]:
    """The stored form of a conditional value (one spelling per meaning, as /config shows it)."""
    return (value,) if tls is None else (value, "if { ssl_fc }" if tls else "unless { ssl_fc }")


def _check_editable(header: str, name: str) -> None:
    """Framing and hop-by-hop headers are pyroute's; Host may be replaced (setReqHeader), not added or removed."""
    lower = header.lower()
    if lower in UNEDITABLE_HEADERS:
        raise ServiceError(400, f"{name}: {header} cannot be edited: pyroute sets the framing and hop-by-hop "
                           "headers of each message itself")
    if lower == "host" and name in ("addReqHeader", "delReqHeader"):
        raise ServiceError(400, f"{name}: {header} cannot be added or removed (a request has exactly one); "
                           "setReqHeader=Host <name> replaces it")


def _split_entries(value: str | None, separator: str) -> tuple[str, ...]:
    """Like _split, but a separator inside %[...] (e.g. %[hdr(host),lower]) does not split."""
    text = value or ""
    out, start, depth, i = [], 0, 0, 0
    while i < len(text):
        if depth == 0 and text.startswith(separator, i):
            out.append(text[start:i])
            i = start = i + len(separator)
            continue
        if text.startswith("%[", i):
            depth += 1
        elif text[i] == "]" and depth:
            depth -= 1
        i += 1
    out.append(text[start:])
    return tuple(item.strip() for item in out if item.strip())


def _header_names(value: str | None, separator: str, name: str) -> tuple[str, ...]:
    names = _split(value, separator)
    for header in names:
        if not _HEADER_NAME.match(header):
            raise ServiceError(400, f"{name}: {header!r} is not a header name")
        _check_editable(header, name)
    return names


def _path_rewrites(value: str | None, name: str) -> tuple[tuple[str, str], ...]:
    """'search,replace' pairs joined with ':' (DFP's reqPathSearchReplace)."""
    out = []
    for pair in (value or "").split(":"):
        if not pair.strip():
            continue
        search, comma, replace = pair.partition(",")
        if not comma or not search:
            raise ServiceError(400, f"{name} expects 'search,replace' pairs joined with ':', got {pair!r}")
        try:
            compile_replacement(replace, compile_pattern(search))
        except PatternError as exc:
            raise ServiceError(400, f"{name}: {exc}") from None
        out.append((search, replace))
    return tuple(out)


def _user_list(text: str, separator: str) -> list[tuple[str, str | None]]:
    """'user:pass' entries separated by the separator or new lines; a user may lack a password."""
    out = []
    for line in text.replace("\n", separator).split(separator):
        entry = line.strip()
        if entry:
            user, colon, password = entry.partition(":")
            out.append((user.strip(), password.strip() if colon else None))
    return out


def _read_users_secret(defaults: ServiceDefaults, suffix: str) -> list[tuple[str, str | None]]:
    if not suffix.replace("-", "").replace("_", "").isalnum():
        raise ServiceError(400, f"usersSecret must be a plain secret name suffix, got {suffix!r}")
    path = os.path.join(defaults.secrets_dir, f"dfp_users_{suffix}")
    try:
        text = read_secret(defaults.secrets_dir, f"dfp_users_{suffix}")
    except OSError as exc:
        raise ServiceError(400, f"usersSecret {suffix!r}: cannot read {path}: {exc.strerror or exc}") from None
    if text is None:
        raise ServiceError(400, f"usersSecret {suffix!r}: there is no secret {path}")
    return _user_list(text, ",")


def _auth(params: dict[str, str], separator: str, defaults: ServiceDefaults):
    """(users, encrypted) of the service's own userlist, as DFP builds it."""
    global_users = [(u, p) for u, p in _user_list(defaults.users, ",") if u and p]
    secret = params.get("userssecret", "").strip()
    secret_users = _read_users_secret(defaults, secret) if secret else []
    requested = _user_list(params.get("users", ""), separator) if params.get("users", "").strip() else secret_users
    if not requested and not secret:
        return (), False
    fallback = dict(secret_users)
    fallback_global = dict(global_users)
    users = []
    for user, password in requested:
        if not password:
            password = fallback.get(user) or fallback_global.get(user)
        if user and password:
            users.append((user, password))
    encrypted = _bool(params.get("userspassencrypted"), "usersPassEncrypted")
    if encrypted:
        _check_hashes(users, "usersPassEncrypted")
    if not users:  # DFP: users asked for but none usable -> a random user nobody knows locks everyone out
        users.append((secrets.token_hex(8), secrets.token_hex(16)))
    return tuple(users), encrypted


def _check_hashes(users: list[tuple[str, str]], setting: str) -> None:
    """A hash pyroute cannot verify is a 400 now, naming its scheme, not a silent 401 later."""
    for user, hashed in users:
        problem = hash_problem(hashed)
        if problem:
            raise ServiceError(400, f"{setting}: user {user!r}: {problem}")


def parse_path_type(text: str, label: str) -> tuple[str, bool, bool]:
    """pathType as DFP users write it ("path_beg", "path_reg -i", "path -m sub", "url_beg")
    -> (one of PATH_TYPES, ignore case, written as url_*). What pyroute cannot match the way
    HAProxy would is a 400 naming the value and what to use instead, never dropped."""
    words = text.strip().lower().split()
    if not words:
        return "path_beg", False, False
    fetch, rest = words[0], words[1:]
    ignore_case, method = False, None
    while rest:
        flag = rest.pop(0)
        if flag == "-i":
            ignore_case = True
        elif flag == "-m" and rest and method is None:
            method = rest.pop(0)
        else:
            raise ServiceError(400, f"{label} {text.strip()!r}: {flag!r} is not a flag pyroute takes "
                               f"(-i, -m {'|'.join(_PATH_METHODS)})")
    if method is not None and fetch in ("path", "url"):
        if method not in _PATH_METHODS:
            raise ServiceError(400, f"{label} {text.strip()!r}: -m {method} on {fetch} is not supported: "
                               f"use path -m {'|'.join(_PATH_METHODS)} (or path_beg, path_end, ...)")
        fetch = _PATH_METHODS[method].replace("path", fetch, 1)
    if fetch in PATH_TYPES:
        if method is not None and _PATH_METHODS.get(method) != fetch:
            raise ServiceError(400, f"{label} {text.strip()!r}: -m {method} contradicts {fetch}: use path -m {method}")
        return fetch, ignore_case, False
    if fetch == "url_beg":  # the URL starts with its path: the same test while the pattern holds no '?'
        return "path_beg", ignore_case, True
    if fetch == "url" or fetch.startswith("url_"):
        instead = "path" + fetch[3:]
        raise ServiceError(400, f"{label} {text.strip()!r} matches the query string too, and pyroute routes on the "
                           f"path alone: use {instead if instead in PATH_TYPES else 'path_reg'}")
    if fetch in ("urlp", "url_param") or fetch.startswith(("urlp(", "url_param(", "urlp_", "url_param")):
        raise ServiceError(400, f"{label} {text.strip()!r}: pyroute does not route on query parameters: "
                           "use a path or serviceHeader")
    if fetch.startswith(("hdr", "req.hdr", "req.fhdr", "fhdr")):
        raise ServiceError(400, f"{label} {text.strip()!r} matches a header, not the path: use serviceDomain with "
                           "serviceDomainAlgo (hdr, hdr_beg, hdr_end, hdr_dom) for Host, serviceHeader=Name:value "
                           "for other headers")
    if fetch.startswith(("req_ssl_sni", "req.ssl_sni", "ssl_fc_sni")):
        raise ServiceError(400, f"{label} {text.strip()!r} matches the TLS ClientHello's name, which an http "
                           "service never sees: use it with reqMode=sni")
    raise ServiceError(400, f"{label} must be one of {', '.join(PATH_TYPES)} (optionally with -i), "
                       f"got {text.strip()!r}")


def parse_service(raw: Mapping[str, str], separator: str = ",", defaults: ServiceDefaults | None = None) -> Service:
    """Validate DFP reconfigure parameters into a Service, or raise ServiceError.

    Status codes follow DFP: 400 for a missing serviceName or port (or a malformed
    value), 409 for an http service with neither servicePath nor serviceDomain.
    """
    defaults = defaults or ServiceDefaults()
    params = _lower_keys(raw)
    for key, spelled in RAW_HAPROXY_PARAMS.items():
        if params.get(key, "").strip():
            raise ServiceError(400, f"{spelled} is not supported: pyroute does not take raw HAProxy config "
                               "(see docs/dfp-compatibility.md for the parameters that replace it)")
    name = params.get("servicename", "").strip()
    if not name:
        raise ServiceError(400, "serviceName parameter is mandatory")
    _check_host(name, "serviceName")

    domain_algo = params.get("servicedomainalgo", "").strip().lower() or defaults.domain_algo
    domain_algo = domain_algo.removesuffix("(host)")
    if params.get("servicedomainmatchall", "").lower() == "true":
        domain_algo = "hdr_dom"
    if domain_algo == "req_ssl_sni":
        domain_algo = SNI_DOMAIN_ALGO  # HAProxy's older spelling of the same fetch
    if domain_algo not in (*DOMAIN_ALGOS, SNI_DOMAIN_ALGO):
        raise ServiceError(400, f"serviceDomainAlgo must be one of {', '.join(DOMAIN_ALGOS)} or {SNI_DOMAIN_ALGO}, "
                           f"got {domain_algo!r}")

    def value(key: str, index: int) -> str | None:
        # An indexed value wins; the bare value is the default for every index.
        if index:
            indexed = params.get(f"{key}.{index}")
            if indexed is not None:
                return indexed
        return params.get(key)

    destinations = []
    wildcard = False
    for index in _indexes(params) or [0]:
        suffix = f".{index}" if index else ""
        mode = (value("reqmode", index) or "").strip().lower() or "http"
        if mode not in REQ_MODES:
            raise ServiceError(400, f"reqMode{suffix} must be one of {', '.join(REQ_MODES)}, got {mode!r}")
        src_text = (value("srcport", index) or "").strip()
        port_text = (value("port", index) or "").strip()
        if mode != "http" and (src_text in ("", "0") or not port_text):
            raise ServiceError(400, f"When using reqMode {mode}, srcPort and port parameters are mandatory")
        https_text = (value("httpsport", index) or "").strip()
        if not port_text and not https_text:
            raise ServiceError(400, "The port query is mandatory")
        port = _parse_port(port_text, "port" + suffix) if port_text else 0
        https_port = _parse_port(https_text, "httpsPort" + suffix) if https_text else 0
        ssl_verify_none = _bool(value("sslverifynone", index), "sslVerifyNone" + suffix)
        upstream_proto = (value("upstreamproto", index) or "").strip().lower() or "http1"
        if upstream_proto not in UPSTREAM_PROTOS:
            raise ServiceError(400, f"upstreamProto{suffix} must be one of {', '.join(UPSTREAM_PROTOS)}, "
                                    f"got {upstream_proto!r}")
        if upstream_proto != "http1" and mode != "http":
            raise ServiceError(400, f"upstreamProto{suffix}={upstream_proto} needs reqMode=http, got {mode}")
        if (upstream_proto == "h2") != ssl_verify_none and upstream_proto != "http1":
            raise ServiceError(400, f"upstreamProto{suffix}=h2 speaks TLS to the tasks and needs sslVerifyNone=true"
                                    if upstream_proto == "h2" else
                                    f"upstreamProto{suffix}=h2c is cleartext: sslVerifyNone=true needs upstreamProto=h2")
        src_port = _parse_port(src_text, "srcPort" + suffix) if src_text not in ("", "0") else 0
        if src_port:
            _check_src_port(src_port, mode, "srcPort" + suffix, defaults)
        src_https_text = (value("srchttpsport", index) or "").strip()
        src_https_port = _parse_port(src_https_text, "srcHttpsPort" + suffix) if src_https_text else 0
        if src_https_port:
            _check_src_https_port(src_https_port, https_port, mode, "srcHttpsPort" + suffix, defaults)
        timeouts = {
            key: _parse_seconds(value(key.lower().replace("_", ""), index), key.title().replace("_", "") + suffix)
            for key in ("timeout_client", "timeout_server", "timeout_tunnel")
        }
        verify_client = _bool(value("verifyclientssl", index), "verifyClientSsl" + suffix)
        domains = []
        for domain in _split(value("servicedomain", index), separator):
            if domain.startswith("*"):
                wildcard, domain = True, domain.lstrip("*")
            _check_host(domain.lower().lstrip(".") if wildcard else domain.lower(), "serviceDomain" + suffix)
            domains.append(domain.lower())  # "*.a.com" keeps its dot: a suffix match on ".a.com"
        by_sni = domain_algo == SNI_DOMAIN_ALGO and mode != "http"
        if by_sni and domains:
            mode = "sni"  # DFP: serviceDomain matched by req.ssl_sni routes TLS by its ClientHello name
        elif domain_algo == SNI_DOMAIN_ALGO:
            raise ServiceError(400, f"serviceDomainAlgo={SNI_DOMAIN_ALGO} matches the TLS ClientHello's name: it needs "
                               f"reqMode=tcp or sni with serviceDomain{suffix} (an http service is matched after TLS "
                               "ends: use hdr(host) or hdr_dom(host) there)")
        if mode == "sni":  # servicePath holds the SNI patterns
            sni_names = [*_split(value("servicepath", index), separator),
                         *(_split(value("servicedomain", index), separator) if by_sni else ())]
            sni_type = (value("pathtype", index) or "").strip()
            if sni_type:  # HAProxy's match (DFP's tutorial), each pattern as written
                try:
                    method, ignore_case = parse_sni_type(sni_type)
                except ValueError as exc:
                    raise ServiceError(400, f"pathType{suffix}: {exc}") from None
                patterns = _sni_patterns(sni_names, method, ignore_case, "servicePath" + suffix)
                sni_type = sni_type_text(method, ignore_case)
            else:  # names: exact, "*.example.com" or ".example.com"
                patterns = tuple(_check_host(p.lower().lstrip("*."), "servicePath" + suffix) and p.lower()
                                 for p in sni_names)
            if not patterns:
                raise ServiceError(400, "When using reqMode sni, servicePath must hold the SNI names")
            outbound = (value("outboundhostname", index) or "").strip() or None
            destinations.append(Destination(index, patterns, (), port, outbound, src_port=src_port, req_mode=mode,
                                            path_type=sni_type or "path_beg", **timeouts))
            continue
        if mode == "tcp":
            outbound = (value("outboundhostname", index) or "").strip() or None
            destinations.append(Destination(index, (), (), port, outbound, src_port=src_port, req_mode=mode,
                                            **timeouts))
            continue
        path_type_text = value("pathtype", index) or ""
        path_type, ignore_case, from_url = parse_path_type(path_type_text, "pathType" + suffix)
        paths = _split(value("servicepath", index), separator)
        if from_url and any("?" in p for p in paths):
            raise ServiceError(400, f"pathType{suffix} {path_type_text.strip()!r} with a '?' in servicePath matches the "
                               "query string, which pyroute does not route on: drop the query from servicePath")
        if path_type == "path_len":
            for pattern in paths:
                if not _PATH_LEN.match(pattern.strip()):
                    raise ServiceError(400, f"servicePath{suffix} for path_len is a length: N, N:M, :M, N: or "
                                       f"eq|ge|gt|le|lt N, got {pattern!r}")
        elif path_type not in ("path_beg", "path", "path_dir"):  # suffixes, parts, regexes need no leading "/"
            for pattern in paths:
                if any(c.isspace() or ord(c) < 0x20 for c in pattern):
                    raise ServiceError(400, f"servicePath{suffix} entries hold no spaces, got {pattern!r}")
        else:
            paths = tuple(_check_path(p, "servicePath" + suffix) for p in paths)
        if ignore_case and path_type != "path_reg":
            paths = tuple(p.lower() for p in paths)
        if not paths and not domains:
            raise ServiceError(409, "When using reqMode http, servicePath or serviceDomain or both must be set")
        outbound = (value("outboundhostname", index) or "").strip() or None
        if outbound:
            _check_host(outbound, "outboundHostname" + suffix)
        excludes = tuple(_check_path(p, "servicePathExclude" + suffix)
                         for p in _split(value("servicepathexclude", index), separator))
        if ignore_case and path_type != "path_reg":
            excludes = tuple(p.lower() for p in excludes)
        if path_type == "path_reg":
            for label, patterns in (("servicePath", paths), ("servicePathExclude", excludes)):
                for pattern in patterns:
                    try:
                        compile_pattern(pattern, ignore_case)
                    except PatternError as exc:
                        raise ServiceError(400, f"{label}{suffix} is not a usable regex for path_reg: {exc}") from None
        header_match = []
        for item in _split(value("serviceheader", index), separator):
            header, colon, expected = item.partition(":")
            if not colon or not _HEADER_NAME.match(header.strip()):
                raise ServiceError(400, f"serviceHeader{suffix} expects 'Name:value' entries, got {item!r}")
            problem = check_header_value(expected.strip())
            if problem:
                raise ServiceError(400, f"serviceHeader{suffix}: {header.strip()}: {problem}")
            header_match.append((header.strip().lower(), expected.strip()))
        code_text = (value("httpsredirectcode", index) or "").strip() or "302"
        if not code_text.isdigit() or int(code_text) not in REDIRECT_CODES:
            raise ServiceError(400, f"httpsRedirectCode{suffix} must be one of {REDIRECT_CODES}, got {code_text!r}")
        destinations.append(Destination(
            index, paths or ("/",), tuple(domains), port, outbound,
            path_type=path_type,
            path_ignore_case=ignore_case,
            path_excludes=excludes,
            header_match=tuple(header_match),
            user_agents=tuple(u.lower() for u in _split(value("useragent", index), separator)),
            src_port=src_port,
            redirect_from=tuple(_check_host(d.lower(), "redirectFromDomain" + suffix)
                                for d in _split(value("redirectfromdomain", index), separator)),
            path_rewrites=_path_rewrites(value("reqpathsearchreplace", index), "reqPathSearchReplace" + suffix)
            or _deprecated_rewrite(params),
            https_only=defaults.https_only or _bool(value("httpsonly", index), "httpsOnly" + suffix),
            https_redirect_code=int(code_text),
            deny_http=_bool(value("denyhttp", index), "denyHttp" + suffix),
            allowed_methods=_methods(value("allowedmethods", index), separator, "allowedMethods" + suffix),
            denied_methods=_methods(value("deniedmethods", index), separator, "deniedMethods" + suffix),
            ignore_authorization=_bool(value("ignoreauthorization", index), "ignoreAuthorization" + suffix),
            allowed_ips=_networks(value("allowedips", index), separator, "allowedIPs" + suffix),
            denied_ips=_networks(value("deniedips", index), separator, "deniedIPs" + suffix),
            req_mode=mode,
            verify_client_ssl=verify_client,
            https_port=https_port,
            src_https_port=src_https_port,
            ssl_verify_none=ssl_verify_none,
            upstream_proto=upstream_proto,
            **timeouts,
        ))

    if wildcard and domain_algo != SNI_DOMAIN_ALGO:
        domain_algo = "hdr_end"  # DFP: a leading "*" switches the whole service to suffix matching
    acl_name = params.get("aclname", "").strip() or name
    if not _ACL_NAME.match(acl_name):
        raise ServiceError(400, f"aclName must be letters, digits, '.', '_' or '-' (up to 200), got {acl_name!r}")
    users, users_encrypted = _auth(params, separator, defaults)
    global_users = [(u, p) for u, p in _user_list(defaults.users, ",") if u and p]
    if defaults.users_pass_encrypted:
        _check_hashes(global_users, "USERS (USERS_PASS_ENCRYPTED)")
    compression_algo = " ".join((params.get("compressionalgo", "").strip() or defaults.compression_algo).lower().split())
    for algo in compression_algo.split():
        if algo not in COMPRESSION_ALGOS:
            raise ServiceError(400, f"compressionAlgo {algo!r} is not supported (one of {', '.join(COMPRESSION_ALGOS)})")
    compression_type = params.get("compressiontype", "").strip() or defaults.compression_type
    cert = params.get("servicecert", "").replace("\\n", "\n").strip() or None
    first_domain = next((d.domains[0] for d in destinations if d.domains), "")
    balancing = _parse_balancing(params, name)
    protection = _parse_protection(params, separator)
    if protection.limited and balancing.sticky_cookie is not None:
        raise ServiceError(400, "maxConn, maxRequestsInFlight and rateLimit cannot be combined with "
                           "sessionType=sticky-server yet")
    return Service(
        name=name,
        acl_name=acl_name,
        domain_algo=domain_algo,
        destinations=tuple(destinations),
        params=tuple(raw.items()),
        is_default_backend=_bool(params.get("isdefaultbackend"), "isDefaultBackend"),
        req_add=_header_edits(params.get("addreqheader") or params.get("addheader"), separator, "addReqHeader",
                              defaults.header_env_allow),
        req_set=_header_edits(params.get("setreqheader") or params.get("setheader"), separator, "setReqHeader",
                              defaults.header_env_allow),
        req_del=_header_names(params.get("delreqheader"), separator, "delReqHeader"),
        res_add=_header_edits(params.get("addresheader"), separator, "addResHeader",
                              defaults.header_env_allow),
        res_set=_header_edits(params.get("setresheader"), separator, "setResHeader",
                              defaults.header_env_allow),
        res_del=_header_names(params.get("delresheader"), separator, "delResHeader"),
        users=users,
        users_encrypted=users_encrypted,
        global_users=tuple(global_users),
        global_users_encrypted=defaults.users_pass_encrypted,
        redirect_when_http_proto=_bool(params.get("redirectwhenhttpproto"), "redirectWhenHttpProto"),
        redirect_unless_https_proto=_bool(params.get("redirectunlesshttpsproto"), "redirectUnlessHttpsProto"),
        compression_algo=compression_algo,
        compression_types=tuple(t.lower() for t in compression_type.replace(",", " ").split()) if compression_algo else (),
        balancing=balancing,
        protection=protection,
        max_request_body=_optional_number(params, "maxrequestbody", "maxRequestBody", integer=True),
        cert=cert,
        cert_name=first_domain or name,
        acme_hosts=_acme_hosts(params.get("letsencrypt.host", "")),
        acme_email=_acme_email(params.get("letsencrypt.email", "")),
    )


def _acme_hosts(value: str) -> tuple[str, ...]:
    """letsencrypt.host (the companion's label): a comma list of exact DNS names."""
    hosts = []
    for host in (h.strip().lower().rstrip(".") for h in value.split(",")):
        if not host:
            continue
        if "*" in host:
            raise ServiceError(400, f"letsencrypt.host {host!r}: wildcard names need the dns-01 challenge, "
                                    "which pyroute does not answer")
        _check_host(host, "letsencrypt.host")
        if host not in hosts:
            hosts.append(host)
    return tuple(hosts)


def _acme_email(value: str) -> str:
    email = value.strip()
    if email and (email.count("@") != 1 or any(c.isspace() or c in ",<>" for c in email)):
        raise ServiceError(400, f"letsencrypt.email {email!r} is not an email address")
    return email


def _deprecated_rewrite(params: dict[str, str]) -> tuple[tuple[str, str], ...]:
    """reqPathSearch/reqPathReplace, the pair reqPathSearchReplace replaced."""
    search = params.get("reqpathsearch", "")
    if not search:
        return ()
    return _path_rewrites(f"{search},{params.get('reqpathreplace', '')}", "reqPathSearch")


def is_removal(raw: Mapping[str, str]) -> bool:
    """DFP: replicas=0 on a reconfigure of a non-global service means remove it."""
    return _lower_keys(raw).get("replicas", "").strip() == "0"


def precedence_key(service: Service) -> tuple[int, str, str]:
    """DFP's order: /.well-known services first, "/" last, the rest by aclName (then name,
    so the order is total and does not depend on the order services arrived in)."""
    paths = [p for d in service.destinations for p in d.paths]
    if any(p.startswith("/.well-known") for p in paths):
        group = 0
    elif "/" in paths:
        group = 2
    else:
        group = 1
    return group, service.acl_name, service.name
