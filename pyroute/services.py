"""The domain model: a Service and its Destinations, parsed from DFP reconfigure params.

Docker Flow Proxy's users drive the proxy with query strings like
``serviceName=go-demo&servicePath=/demo&port=8080`` (or ``servicePath.1=...&port.1=...``).
This module turns such a parameter map into a validated, immutable :class:`Service`,
with DFP's status codes for the errors, and nothing else: no I/O, no routing.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping
from dataclasses import dataclass

MAX_INDEX = 10  # DFP scans servicePath.N / port.N for N = 1..10
# A destination exists at index N when any of these carries the ".N" suffix (DFP's rule).
_INDEX_MARKERS = ("servicepath", "port", "servicedomain", "httpsport")
DOMAIN_ALGOS = ("hdr", "hdr_beg", "hdr_dom", "hdr_end")
DEFAULT_DOMAIN_ALGO = "hdr_beg"
REQ_MODES = ("http", "tcp", "sni")


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
    req_mode: str = "http"  # one of REQ_MODES; tcp/sni destinations are served by tcp.py on src_port
    src_port: int = 0
    verify_client_ssl: bool = False  # 403 on TLS without a client certificate verified against CA_FILE
    https_port: int = 0  # requests that arrived over TLS go to this port instead (0 = port)
    ssl_verify_none: bool = False  # speak TLS to the upstream, without verifying its certificate
    timeout_client: float | None = None  # per-destination overrides of the global timeouts
    timeout_server: float | None = None
    timeout_tunnel: float | None = None


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    acl_name: str  # sort key for precedence (DFP: aclName, default serviceName)
    domain_algo: str  # one of DOMAIN_ALGOS, for every destination of the service
    destinations: tuple[Destination, ...]
    params: tuple[tuple[str, str], ...]  # the accepted parameters, as given (for /config and state)
    cert: str | None = None  # serviceCert: PEM installed into the certificate store as cert_name
    cert_name: str = ""

    @property
    def dial_hosts(self) -> tuple[str, ...]:
        return tuple(d.outbound_hostname or self.name for d in self.destinations)

    def to_json(self) -> dict:
        """DFP's JSON shape (the fields of its Service struct that we implement)."""
        return {
            "ServiceName": self.name,
            "AclName": self.acl_name,
            "ServiceDomainAlgo": f"{self.domain_algo}(host)",
            "ServiceDest": [
                {
                    "Index": d.index,
                    "ServicePath": list(d.paths),
                    "ServiceDomain": list(d.domains),
                    "Port": str(d.port),
                    "OutboundHostname": d.outbound_hostname or "",
                    "ReqMode": d.req_mode,
                    "SrcPort": d.src_port,
                    "VerifyClientSsl": d.verify_client_ssl,
                    "HttpsPort": d.https_port,
                    "SslVerifyNone": d.ssl_verify_none,
                }
                for d in self.destinations
            ],
        }


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


def _parse_bool(value: str | None, name: str) -> bool:
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


def _indexes(params: Mapping[str, str]) -> list[int]:
    """The indexed destinations present: scan 1..10, stop at the first gap (DFP's rule)."""
    found = []
    for n in range(1, MAX_INDEX + 1):
        if not any(f"{marker}.{n}" in params for marker in _INDEX_MARKERS):
            break
        found.append(n)
    return found


def parse_service(raw: Mapping[str, str], separator: str = ",") -> Service:
    """Validate DFP reconfigure parameters into a Service, or raise ServiceError.

    Status codes follow DFP: 400 for a missing serviceName or port (or a malformed
    value), 409 for an http service with neither servicePath nor serviceDomain.
    """
    params = _lower_keys(raw)
    name = params.get("servicename", "").strip()
    if not name:
        raise ServiceError(400, "serviceName parameter is mandatory")
    _check_host(name, "serviceName")

    domain_algo = params.get("servicedomainalgo", "").strip().lower() or DEFAULT_DOMAIN_ALGO
    domain_algo = domain_algo.removesuffix("(host)")
    if params.get("servicedomainmatchall", "").lower() == "true":
        domain_algo = "hdr_dom"
    if domain_algo not in DOMAIN_ALGOS:
        raise ServiceError(400, f"serviceDomainAlgo must be one of {', '.join(DOMAIN_ALGOS)}, got {domain_algo!r}")

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
        if mode != "http" and (not src_text or not port_text):
            raise ServiceError(400, f"When using reqMode {mode}, srcPort and port parameters are mandatory")
        https_text = (value("httpsport", index) or "").strip()
        if not port_text and not https_text:
            raise ServiceError(400, "The port query is mandatory")
        port = _parse_port(port_text, "port" + suffix) if port_text else 0
        https_port = _parse_port(https_text, "httpsPort" + suffix) if https_text else 0
        ssl_verify_none = _parse_bool(value("sslverifynone", index), "sslVerifyNone" + suffix)
        src_port = _parse_port(src_text, "srcPort" + suffix) if src_text else 0
        timeouts = {
            key: _parse_seconds(value(key.lower().replace("_", ""), index), key.title().replace("_", "") + suffix)
            for key in ("timeout_client", "timeout_server", "timeout_tunnel")
        }
        verify_client = _parse_bool(value("verifyclientssl", index), "verifyClientSsl" + suffix)
        domains = []
        for domain in _split(value("servicedomain", index), separator):
            if domain.startswith("*"):
                wildcard, domain = True, domain.lstrip("*")
            domains.append(_check_host(domain.lower(), "serviceDomain" + suffix))
        if mode == "sni":  # servicePath holds the SNI patterns
            patterns = tuple(_check_host(p.lower().lstrip("*."), "servicePath" + suffix) and p.lower()
                             for p in _split(value("servicepath", index), separator))
            if not patterns:
                raise ServiceError(400, "When using reqMode sni, servicePath must hold the SNI names")
            outbound = (value("outboundhostname", index) or "").strip() or None
            destinations.append(Destination(index, patterns, (), port, outbound, mode, src_port, False, **timeouts))
            continue
        paths = tuple(_check_path(p, "servicePath" + suffix) for p in _split(value("servicepath", index), separator))
        if mode == "tcp":
            outbound = (value("outboundhostname", index) or "").strip() or None
            destinations.append(Destination(index, (), (), port, outbound, mode, src_port, False, **timeouts))
            continue
        if not paths and not domains:
            raise ServiceError(409, "When using reqMode http, servicePath or serviceDomain or both must be set")
        outbound = (value("outboundhostname", index) or "").strip() or None
        if outbound:
            _check_host(outbound, "outboundHostname" + suffix)
        destinations.append(Destination(index, paths or ("/",), tuple(domains), port, outbound, mode, src_port,
                                        verify_client, https_port, ssl_verify_none, **timeouts))

    if wildcard:
        domain_algo = "hdr_end"  # DFP: a leading "*" switches the whole service to suffix matching
    acl_name = params.get("aclname", "").strip() or name
    cert = params.get("servicecert", "").replace("\\n", "\n").strip() or None
    first_domain = next((d.domains[0] for d in destinations if d.domains), "")
    return Service(
        name=name,
        acl_name=acl_name,
        domain_algo=domain_algo,
        destinations=tuple(destinations),
        params=tuple(raw.items()),
        cert=cert,
        cert_name=first_domain or name,
    )


def is_removal(raw: Mapping[str, str]) -> bool:
    """DFP: replicas=0 on a reconfigure of a non-global service means remove it."""
    return _lower_keys(raw).get("replicas", "").strip() == "0"
