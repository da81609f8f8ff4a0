"""Runtime settings.

Precedence, per setting: CLI flag > environment variable > TOML file
(``--config FILE`` or ``PYROUTE_CONFIG``) > built-in default.

The environment names are Docker Flow Proxy's, so an existing DFP service
definition keeps working when the image is swapped. Every setting is declared
once, as a field of :class:`Settings` whose metadata holds its parser and help
text; the env name (UPPER_CASE), TOML key (lower_case) and flag (--kebab-case)
all derive from the field name, so they cannot drift apart.
"""

from __future__ import annotations

import argparse
import difflib
import ipaddress
import math
import os
import re
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, fields
from types import MappingProxyType
from typing import Any

from pyroute import tls
from pyroute.dockersecrets import read_secret

RESOLV_CONF = "/etc/resolv.conf"  # module constant so tests can point it elsewhere
DOCKER_DNS = "127.0.0.11"  # Docker's embedded resolver, present on every user network
CONFIG_ENV = "PYROUTE_CONFIG"
LOG_LEVELS = ("debug", "info", "warning", "error")
STATE_CORRUPT_CHOICES = ("wait", "start-empty")  # what a replica does when no state file copy is usable
DISCOVERY_TYPES = ("Overlay", "DNS")  # DFP's discoveryType values
ACCESS_LOG_FORMATS = ("json", "clf", "combined", "haproxy")  # ACCESS_LOG_FORMAT
TRACEPARENT_MODES = ("pass", "generate")  # TRACEPARENT
BALANCE_ALGORITHMS = ("roundrobin", "leastconn", "p2c")  # DFP's balance values, plus p2c
DOMAIN_ALGOS = ("hdr", "hdr_beg", "hdr_dom", "hdr_end")  # DFP's serviceDomainAlgo values
COMPRESSION_ALGOS = ("gzip", "deflate", "raw-deflate", "identity")  # HAProxy's
ACME_CHALLENGES = ("http-01", "tls-alpn-01")  # the ACME challenges pyroute answers itself
ACME_DOMAINS_CHOICES = ("", "auto")  # auto: every exact serviceDomain of an HTTPS service too
LETS_ENCRYPT = "https://acme-v02.api.letsencrypt.org/directory"


class SettingsError(Exception):
    """A bad setting; the message is one line naming the setting and the problem,
    e.g. "TIMEOUT_CONNECT: expected a number of seconds > 0, got 'abc'"."""


@dataclass(frozen=True, slots=True)
class ListenSpec:
    """One public listener in DFP's DEFAULT_PORTS syntax: ``PORT[:ssl] [option ...]``."""

    port: int
    ssl: bool = False
    options: tuple[str, ...] = ()  # extra bind words, e.g. "80 accept-proxy" -> ("accept-proxy",)


# --- parsers: (raw value, setting label) -> typed value ---------------------
# Raw values are strings from the environment and the CLI, or native TOML
# types from the file; each parser accepts both so all sources validate alike.

Parser = Callable[[Any, str], Any]


def _bad(setting: str, expected: str, value: Any) -> SettingsError:
    return SettingsError(f"{setting}: expected {expected}, got {value!r}")


def _port_number(text: str, lowest: int = 0) -> int | None:
    """The port in `text`, or None; plain ASCII digits only (int() would take "+8" or "8_0")."""
    if text.isascii() and text.isdigit() and lowest <= int(text) <= 65535:
        return int(text)
    return None


def _integer(lowest: int, highest: int | None = None) -> Parser:
    expected = f"an integer {lowest}..{highest}" if highest is not None else f"an integer >= {lowest}"

    def parse(value: Any, setting: str) -> int:
        number: int | None = None
        if isinstance(value, str):
            try:
                number = int(value)
            except ValueError:
                pass
        elif isinstance(value, int) and not isinstance(value, bool):
            number = value
        if number is None or number < lowest or (highest is not None and number > highest):
            raise _bad(setting, expected, value)
        return number

    return parse


def _float(value: Any) -> float | None:
    """A number from the environment (text) or TOML (int or float, never a bool); None if not one."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return None
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return float(value)
    return None


def _seconds(value: Any, setting: str) -> float:
    number = _float(value)
    if number is None or not (math.isfinite(number) and number > 0):
        raise _bad(setting, "a number of seconds > 0", value)
    return number


def _non_negative_seconds(value: Any, setting: str) -> float:
    number = _float(value)
    if number is None or not (math.isfinite(number) and number >= 0):
        raise _bad(setting, "a number of seconds >= 0", value)
    return number


def _text(value: Any, setting: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise _bad(setting, "a non-empty string", value)
    return value.strip()


def _boolean(value: Any, setting: str) -> bool:
    if isinstance(value, bool):
        return value
    text = value.strip().lower() if isinstance(value, str) else None
    if text in ("true", "1", "yes", "on"):
        return True
    if text in ("false", "0", "no", "off", ""):
        return False
    raise _bad(setting, "true or false", value)


def _fraction(value: Any, setting: str) -> float:
    number = _float(value)
    if number is None or not (0 < number <= 1):
        raise _bad(setting, "a fraction > 0 and <= 1", value)
    return number


def _stats_uri(value: Any, setting: str) -> str:
    """The stats route takes every path under this one: it may not cover the admin API's own paths."""
    if not isinstance(value, str) or not value.strip().startswith("/"):
        raise _bad(setting, "a path starting with /", value)
    path = value.strip().split("?", 1)[0]
    for reserved in ("/v1/docker-flow-proxy/", "/metrics"):
        if reserved.startswith(path) or path.startswith(reserved):
            raise _bad(setting, f"a path that does not overlap {reserved}", value)
    return value.strip()


def _separator(value: Any, setting: str) -> str:
    """Not stripped: the separator is used verbatim to split reconfigure parameters."""
    if not isinstance(value, str) or not value:
        raise _bad(setting, "a non-empty string", value)
    return value


def _optional_text(value: Any, setting: str) -> str:
    """A string that may be empty (empty = the feature is off / automatic, e.g. STATS_USER)."""
    if not isinstance(value, str):
        raise _bad(setting, "a string", value)
    return value.strip()


MIN_PEER_TOKEN = 16  # characters: a shared secret short enough to guess is no secret


def _peer_token(value: Any, setting: str) -> str:
    token = _optional_text(value, setting)
    if token and (len(token) < MIN_PEER_TOKEN or not token.isascii() or not token.isprintable() or " " in token):
        raise SettingsError(f"{setting}: expected at least {MIN_PEER_TOKEN} visible ASCII characters without spaces "
                            f"(e.g. the output of `openssl rand -hex 32`), got {len(token)} characters")
    return token


def _globs(value: Any, setting: str) -> tuple[str, ...]:
    """A comma list (or TOML list) of file-name globs, in order; "" for none."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise _bad(setting, "a comma list of certificate file names or globs", value)
    return tuple(g.strip() for g in value.split(",") if g.strip())


def _ssl_bind_options(value: Any, setting: str) -> str:
    text = _optional_text(value, setting)
    try:
        tls.bind_options(text)
    except ValueError as exc:
        raise SettingsError(f"{setting}: {exc}") from None
    return " ".join(text.split())


def _ssl_bind_ciphers(value: Any, setting: str) -> str:
    text = _optional_text(value, setting)
    try:
        tls.bind_options("", text)
    except ValueError:
        raise _bad(setting, "an OpenSSL cipher list selecting at least one cipher", text) from None
    return text


def _ssl_bind_ciphersuites(value: Any, setting: str) -> str:
    """TLS 1.3 suites: Python's ssl cannot set them, OpenSSL's configuration can. The value is
    checked against what this process's OpenSSL offers, so it is honoured or pyroute stops."""
    text = _optional_text(value, setting)
    wanted = [s for s in text.split(":") if s]
    offered = tls.tls13_suites()
    if wanted and set(wanted) != set(offered):
        raise SettingsError(
            f"{setting}: {text!r} cannot be applied by pyroute itself (Python's ssl module has no call for TLS 1.3 "
            f"suites; this OpenSSL offers {':'.join(offered)}). Write an OpenSSL config with "
            f"'Ciphersuites = {text}' in its system_default section, point OPENSSL_CONF at it, and start again "
            "(docs/reference.md shows the file); or restrict versions with SSL_BIND_OPTIONS")
    return text


def _domain_algo(value: Any, setting: str) -> str:
    algo = value.strip().lower().removesuffix("(host)") if isinstance(value, str) else None
    if algo not in DOMAIN_ALGOS:
        raise _bad(setting, f"one of {', '.join(DOMAIN_ALGOS)} (optionally with '(host)')", value)
    return algo


def _compression_algo(value: Any, setting: str) -> str:
    algos = value.lower().split() if isinstance(value, str) else None
    if algos is None or any(a not in COMPRESSION_ALGOS for a in algos):
        raise _bad(setting, f"a space-separated list of {', '.join(COMPRESSION_ALGOS)} (or empty)", value)
    return " ".join(algos)


def _address_list(value: Any, setting: str) -> tuple[str, ...]:
    """A comma list (or TOML list) of host[:port]; empty for none."""
    if isinstance(value, list) and all(isinstance(e, str) for e in value):
        entries = [e.strip() for e in value]
    elif isinstance(value, str):
        entries = [e.strip() for e in value.split(",")] if value.strip() else []
    else:
        raise _bad(setting, "a comma list of host[:port]", value)
    for entry in entries:
        if not entry:
            raise _bad(setting, "a comma list of host[:port] without empty entries", value)
        _check_nameserver(entry, setting)
    return tuple(entries)


def _networks(value: Any, setting: str) -> tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...]:
    """A comma list (or TOML list) of CIDRs; "" for none."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise _bad(setting, "a comma list of CIDRs like '10.0.0.0/8'", value)
    networks = []
    for entry in (e.strip() for e in value.split(",")):
        if not entry:
            continue
        try:
            networks.append(ipaddress.ip_network(entry, strict=False))
        except ValueError:
            raise _bad(setting, "a comma list of CIDRs like '10.0.0.0/8'", entry) from None
    return tuple(networks)


_PRIVATE_NETS = "10.0.0.0/8,172.16.0.0/12,192.168.0.0/16,127.0.0.0/8,fc00::/7,::1/128"


# Environment variables whose value is a credential: never sent in a header by %[env(NAME)],
# even when listed in HEADER_ENV_ALLOW (which is then refused at start).
SECRET_ENV = frozenset({"ADMIN_USER", "ADMIN_PASS", "STATS_USER", "STATS_PASS", "USERS"})
SECRET_ENV_WORDS = ("PASS", "PWD", "SECRET", "TOKEN", "KEY", "CREDENTIAL")


def is_secret_env(name: str) -> bool:
    """Whether an environment variable's name says it holds a credential."""
    upper = name.upper()
    return upper in SECRET_ENV or any(word in upper for word in SECRET_ENV_WORDS)


def _env_names(value: Any, setting: str) -> tuple[str, ...]:
    """HEADER_ENV_ALLOW: a comma list (or TOML list) of variable names, none of them a secret."""
    if isinstance(value, list) and all(isinstance(v, str) for v in value):
        value = ",".join(value)
    if not isinstance(value, str):
        raise _bad(setting, "a comma list of environment variable names", value)
    names = tuple(n.strip() for n in value.split(",") if n.strip())
    for name in names:
        if not (name.isascii() and name.replace("_", "a").isalnum() and not name[0].isdigit()):
            raise _bad(setting, "a comma list of environment variable names", name)
        if is_secret_env(name):
            raise SettingsError(f"{setting}: {name} holds a credential (admin or stats user/password, USERS, or "
                                f"a name with {', '.join(SECRET_ENV_WORDS)}) and is never sent in a header")
    return names


def _log_level(value: Any, setting: str) -> str:
    level = value.strip().lower() if isinstance(value, str) else None
    if level not in LOG_LEVELS:
        raise _bad(setting, "one of " + ", ".join(LOG_LEVELS), value)
    return level


def _header_name(value: Any, setting: str) -> str:
    """An HTTP field name (RFC 9110 token)."""
    if not isinstance(value, str) or not re.fullmatch(r"[!#$%&'*+.^_`|~0-9A-Za-z-]+", value.strip()):
        raise _bad(setting, "an HTTP header name", value)
    return value.strip()


def _choice(options: tuple[str, ...]) -> Parser:
    """One of `options`, matched case-insensitively, returned as spelled in `options`."""

    def parse(value: Any, setting: str) -> str:
        for option in options:
            if isinstance(value, str) and value.strip().lower() == option.lower():
                return option
        raise _bad(setting, "one of " + ", ".join(options), value)

    return parse


def parse_listen_specs(text: str, setting: str) -> tuple[ListenSpec, ...]:
    """Parse DFP's port list: "80,443:ssl", "8080 accept-proxy", or "" for none.

    Port 0 is accepted (an ephemeral port, for tests) and may repeat; any other
    port listed twice is an error because the second bind would fail anyway.
    """
    if not text.strip():
        return ()
    specs: list[ListenSpec] = []
    for item in text.split(","):
        words = item.split()
        if not words:
            raise SettingsError(f"{setting}: empty entry in {text!r}")
        port_text, colon, suffix = words[0].partition(":")
        if colon and suffix != "ssl":
            raise SettingsError(f"{setting}: unknown suffix ':{suffix}' in {item.strip()!r} (only ':ssl' is known)")
        port = _port_number(port_text)
        if port is None:
            raise SettingsError(f"{setting}: {port_text!r} is not a port number 0..65535")
        if port and any(spec.port == port for spec in specs):
            raise SettingsError(f"{setting}: port {port} is listed twice")
        specs.append(ListenSpec(port, ssl=bool(colon), options=tuple(words[1:])))
    return tuple(specs)


def _listen_specs(value: Any, setting: str) -> tuple[ListenSpec, ...]:
    """TOML may give "80,443:ssl", a bare port number, or a list of entries."""
    if isinstance(value, list) and all(isinstance(v, (str, int)) and not isinstance(v, bool) for v in value):
        value = ",".join(str(v) for v in value) if value else ""
    elif isinstance(value, int) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise _bad(setting, "a port list like '80,443:ssl'", value)
    return parse_listen_specs(value, setting)


def _check_nameserver(entry: str, setting: str) -> None:
    """host, host:port, or [ipv6]:port; a bare IPv6 address (several colons) has no port."""
    port_text: str | None = None
    if entry.startswith("["):
        host, bracket, rest = entry[1:].partition("]")
        if not bracket or (rest and not rest.startswith(":")):
            raise SettingsError(f"{setting}: malformed entry {entry!r}, expected host[:port]")
        port_text = rest[1:] if rest else None
    elif entry.count(":") == 1:
        host, _, port_text = entry.partition(":")
    else:
        host = entry
    if not host or any(c.isspace() for c in host):
        raise SettingsError(f"{setting}: malformed host in {entry!r}, expected host[:port]")
    if port_text is not None and _port_number(port_text, lowest=1) is None:
        raise SettingsError(f"{setting}: {port_text!r} in {entry!r} is not a port number 1..65535")


def _nameservers(value: Any, setting: str) -> tuple[str, ...]:
    if isinstance(value, str):
        entries = [e.strip() for e in value.split(",")]
    elif isinstance(value, list) and all(isinstance(e, str) for e in value):
        entries = [e.strip() for e in value]
    else:
        entries = []
    if not entries or not all(entries):
        raise _bad(setting, "a comma list of host[:port]", value)
    for entry in entries:
        _check_nameserver(entry, setting)
    return tuple(entries)


# --- defaults computed at load time -----------------------------------------


def _resolv_conf_nameservers() -> tuple[str, ...]:
    """The container's own resolvers (Docker writes 127.0.0.11 there on user
    networks); Docker's resolver if the file is unreadable or lists none."""
    try:
        with open(RESOLV_CONF, encoding="utf-8", errors="replace") as fh:
            lines = fh.read().splitlines()
    except OSError:
        return (DOCKER_DNS,)
    found = tuple(words[1] for line in lines if len(words := line.split()) > 1 and words[0] == "nameserver")
    return found or (DOCKER_DNS,)


DFP_ERROR_PAGES = "/errorfiles"  # where DFP's image reads its <code>.http pages from


def _dfp_error_pages() -> str:
    """ERROR_PAGES_DIR's default: DFP's /errorfiles when that directory exists (DFP loads it
    unconditionally, so a migrated stack mounting pages there keeps them), else none."""
    return DFP_ERROR_PAGES if os.path.isdir(DFP_ERROR_PAGES) else ""


def _cpu_count() -> int:
    return os.cpu_count() or 1


def _setting(default: Any = None, *, parse: Parser, help: str, factory: Callable[[], Any] | None = None,
             shown: str | None = None, env_indirect: bool = False) -> Any:
    """A Settings field carrying its parser, help text and the default as shown to users.

    env_indirect: as DFP's STATS_USER_ENV, the env var NAME_ENV may name the variable to read instead.
    """
    if shown is None:
        shown = f"{default:g}" if isinstance(default, float) else str(default)
    metadata = {"parse": parse, "help": help, "shown": shown, "env_indirect": env_indirect}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


_PORT = _integer(0, 65535)


@dataclass(frozen=True, slots=True)
class Settings:
    """Every runtime setting. Field = TOML key; ENV NAME = field upper-cased; flag = --kebab-case."""

    port: int = _setting(8080, parse=_PORT, help="admin API port")
    ip: str = _setting("0.0.0.0", parse=_text, help="admin API bind address")
    bind_address: str = _setting("0.0.0.0", parse=_text, help="address the public listeners bind to")
    default_ports: tuple[ListenSpec, ...] = _setting(
        (ListenSpec(80), ListenSpec(443, ssl=True)), parse=_listen_specs, shown="80,443:ssl",
        help="public listeners: PORT[:ssl] [option ...], comma separated")
    bind_ports: tuple[ListenSpec, ...] = _setting(
        (), parse=_listen_specs, shown='""', help="extra public HTTP listeners, same syntax as DEFAULT_PORTS")
    service_name: str = _setting("proxy", parse=_text,
                                 help="this proxy's own Swarm service name; peers are found as tasks.<name>")
    separator: str = _setting(",", parse=_separator, shown='","', help="list separator inside reconfigure parameters")
    timeout_connect: float = _setting(5.0, parse=_seconds, help="seconds to establish an upstream connection")
    timeout_client: float = _setting(20.0, parse=_seconds, help="seconds of client inactivity allowed")
    timeout_server: float = _setting(20.0, parse=_seconds, help="seconds of upstream inactivity allowed")
    timeout_queue: float = _setting(30.0, parse=_seconds,
                                    help="DFP's queue timeout; accepted for compatibility, no effect yet (no server queue)")
    timeout_tunnel: float = _setting(3600.0, parse=_seconds,
                                     help="seconds of inactivity on a tunnel (WebSocket, CONNECT)")
    timeout_http_request: float = _setting(5.0, parse=_seconds, help="seconds to receive a full request head")
    timeout_http_keep_alive: float = _setting(15.0, parse=_seconds,
                                              help="seconds an idle client keep-alive connection stays open")
    dns_nameservers: tuple[str, ...] = _setting(
        parse=_nameservers, factory=_resolv_conf_nameservers, shown=f"nameservers in {RESOLV_CONF}, else {DOCKER_DNS}",
        help="DNS servers for service lookups, comma list of host[:port]")
    dns_ttl_cap: float = _setting(5.0, parse=_seconds,
                                  help="cache DNS answers at most this many seconds (Docker's DNS says 600)")
    dns_timeout: float = _setting(2.0, parse=_seconds, help="seconds per DNS lookup")
    upstream_max_idle: int = _setting(64, parse=_integer(0),
                                      help="idle keep-alive connections kept per upstream address")
    upstream_idle_timeout: float = _setting(30.0, parse=_seconds,
                                            help="seconds before an idle pooled upstream connection is closed")
    workers: int = _setting(parse=_integer(1), factory=_cpu_count, shown="number of CPUs",
                            help="processes serving the public listeners")
    state_dir: str = _setting("", parse=_optional_text, shown='""',
                              help="directory for the durable state file; empty keeps state in memory only")
    state_corrupt: str = _setting("wait", parse=_choice(STATE_CORRUPT_CHOICES),
                                  help="no usable state file at start: wait (not ready until a peer or an admin "
                                       "change supplies state) or start-empty")
    repair_interval: float = _setting(10.0, parse=_seconds,
                                      help="seconds between comparisons of this replica's state with its peers")
    listener_address: tuple[str, ...] = _setting((), parse=_address_list, shown='""',
                                                 help="Swarm Listener address(es) host[:port] (port 8080 if omitted), comma list")
    reload_interval: int = _setting(5000, parse=_integer(1),
                                    help="milliseconds between fetches from the Swarm Listener")
    repeat_reload: bool = _setting(False, parse=_boolean,
                                   help="keep fetching from the Swarm Listener every RELOAD_INTERVAL")
    certs_dir: str = _setting("/certs", parse=_text,
                              help="directory of PEM certificates (chain + key per file); API-installed ones are saved here")
    preferred_certificate: tuple[str, ...] = _setting(
        (), parse=_globs, shown='""',
        help="certificate file names or globs, comma list, in preference order (DFP's crt-list order): the first "
             "match is served when SNI matches none, and matches win names they share with others")
    ssl_bind_options: str = _setting("no-sslv3", parse=_ssl_bind_options,
                                     help="TLS versions and options of the TLS listeners in HAProxy's words: no-tlsv12, "
                                          "no-tlsv13, force-tlsv12, force-tlsv13, ssl-min-ver/ssl-max-ver TLSv1.2|TLSv1.3, "
                                          "no-tls-tickets, prefer-client-ciphers (TLS 1.2 is the lowest offered)")
    ssl_bind_ciphers: str = _setting("", parse=_ssl_bind_ciphers, shown='""',
                                     help="TLS 1.2 cipher list (OpenSSL syntax); empty: ECDHE with AES-GCM or ChaCha20")
    ssl_bind_ciphersuites: str = _setting("", parse=_ssl_bind_ciphersuites, shown='""',
                                          help="TLS 1.3 cipher suites, colon list: checked at start against what OpenSSL "
                                               "offers (set them through OPENSSL_CONF); empty: OpenSSL's")
    ca_file: str = _setting("", parse=_optional_text, shown='""',
                            help="PEM CA bundle that client certificates are checked against (verifyClientSsl)")
    proxy_protocol_trusted: tuple = _setting(
        _networks(_PRIVATE_NETS, "default"), parse=_networks, shown=_PRIVATE_NETS,
        help="CIDRs allowed to send a PROXY protocol header on accept-proxy listeners")
    trusted_proxies: tuple = _setting(
        (), parse=_networks, shown='""',
        help="CIDRs of load balancers in front: only they may set X-Forwarded-For/-Proto, and behind them the "
             "client address (allowedIPs, %[src], access log) is the rightmost X-Forwarded-For address outside "
             "this list; empty: DFP's behaviour (X-Forwarded-Proto passed from anyone, the TCP peer is the client)")
    log_level: str = _setting("info", parse=_log_level, help="one of " + ", ".join(LOG_LEVELS))
    service_domain_algo: str = _setting("hdr_beg", parse=_domain_algo,
                                        help="default serviceDomainAlgo: " + ", ".join(DOMAIN_ALGOS))
    longest_match: bool = _setting(False, parse=_boolean,
                                   help="route by longest matching path first instead of DFP's aclName order")
    https_only: bool = _setting(False, parse=_boolean, help="redirect every service's plain HTTP to HTTPS")
    users: str = _setting("", parse=_optional_text, shown='""',
                          help="global basic auth for every service, user:pass comma list (realm defaultRealm)")
    users_pass_encrypted: bool = _setting(False, parse=_boolean,
                                          help="USERS passwords are crypt(3) hashes (mkpasswd -m sha-512)")
    compression_algo: str = _setting("", parse=_compression_algo, shown='""',
                                     help="compress every service's responses: gzip and/or deflate (unless a service sets its own)")
    compression_type: str = _setting("", parse=_optional_text, shown='""',
                                     help="MIME types COMPRESSION_ALGO applies to, space separated (empty: all)")
    header_env_allow: tuple[str, ...] = _setting(
        (), parse=_env_names, shown='""',
        help="environment variables %[env(NAME)] may put into header edits, comma list (credentials never; "
             "read at start)")
    filter_proxy_instance_name: bool = _setting(False, parse=_boolean,
                                                help="only accept services whose proxyInstanceName is PROXY_INSTANCE_NAME")
    proxy_instance_name: str = _setting("docker-flow", parse=_text, help="this proxy's instance name")
    secrets_dir: str = _setting("/run/secrets", parse=_text,
                                help="Docker secrets directory: dfp_<setting> files override env (e.g. dfp_admin_user), "
                                     "dfp_users_<x> for usersSecret, cert-*/cert_* are certificates")
    debug: bool = _setting(False, parse=_boolean, help="access log: one JSON line per request on stdout")
    debug_errors_only: bool = _setting(False, parse=_boolean,
                                       help="with DEBUG: log only errors (status >= 400, aborted requests)")
    access_log_sample: float = _setting(1.0, parse=_fraction,
                                        help="with DEBUG: the fraction of requests logged (0 < x <= 1)")
    access_log_format: str = _setting("json", parse=_choice(ACCESS_LOG_FORMATS),
                                      help="with DEBUG: json (pyroute's fields), clf, combined (Apache/nginx), "
                                           "haproxy (HAProxy's HTTP log format, as DFP's DEBUG printed)")
    request_id: bool = _setting(True, parse=_boolean,
                                help="a request ID on every routed request, its response and its access log line")
    request_id_header: str = _setting("X-Request-ID", parse=_header_name, help="the request ID's header")
    traceparent: str = _setting("pass", parse=_choice(TRACEPARENT_MODES),
                                help="W3C traceparent: pass (untouched), generate (start one where absent)")
    stats_user: str = _setting("", parse=_optional_text, shown='""', env_indirect=True,
                               help="stats page user; the page is off unless user and password are set "
                                    "(none/none: no authentication)")
    stats_pass: str = _setting("", parse=_optional_text, shown='""', env_indirect=True, help="stats page password")
    stats_port: int = _setting(0, parse=_PORT, shown="0 (every public port)",
                               help="serve the stats page on this port only (an HTTP listener opened for it unless "
                                    "DEFAULT_PORTS/BIND_PORTS has it; not the admin PORT)")
    stats_uri: str = _setting("/admin?stats", parse=_stats_uri, env_indirect=True,
                              help="where the stats page is served on the public ports")
    docker_host: str = _setting("unix:///var/run/docker.sock", parse=_text,
                                help="Docker Engine API for the built-in Swarm listener (on when set or the socket exists)")
    swarm_poll_interval: float = _setting(5.0, parse=_seconds,
                                          help="seconds between service listings while the Docker event stream is down")
    discovery_type: str = _setting("Overlay", parse=_choice(DISCOVERY_TYPES),
                                   help="Overlay: dial the service name (Swarm VIP); DNS: balance over tasks.<service>")
    balance: str = _setting("roundrobin", parse=_choice(BALANCE_ALGORITHMS),
                            help="task balancing with DNS discovery: " + ", ".join(BALANCE_ALGORITHMS))
    task_refresh_interval: float = _setting(1.0, parse=_seconds,
                                            help="seconds between lookups of tasks.<service> with DNS discovery")
    health_check_interval: float = _setting(2.0, parse=_seconds, help="seconds between health probes of a task")
    health_check_timeout: float = _setting(1.0, parse=_seconds, help="seconds a health probe may take")
    health_rise: int = _setting(2, parse=_integer(1), help="passed probes that bring an ejected task back")
    health_fall: int = _setting(3, parse=_integer(1),
                                help="failed probes, connect failures or 5xx in a row that eject a task")
    max_uri_size: int = _setting(8192, parse=_integer(64), help="longest request target in bytes (longer: 414)")
    max_header_size: int = _setting(65536, parse=_integer(256),
                                     help="largest request header block in bytes (larger: 431)")
    max_headers: int = _setting(100, parse=_integer(1), help="most request header lines (more: 431)")
    max_request_body: int = _setting(0, parse=_integer(0),
                                     help="largest request body in bytes, 0 = unlimited (larger: 413); "
                                          "per service: maxRequestBody")
    maxconn: int = _setting(5000, parse=_integer(1),
                            help="concurrent client connections per process; above it new ones wait in the backlog")
    maxconn_per_ip: int = _setting(0, parse=_integer(0),
                                   help="concurrent client connections per client address (after PROXY protocol), "
                                        "0 = no limit; over it a new connection is closed at once")
    enable_h2: bool = _setting(True, parse=_boolean,
                               help="offer HTTP/2 on the TLS listeners (ALPN h2, then http/1.1); false: HTTP/1.1 only")
    h2c: bool = _setting(False, parse=_boolean,
                         help="accept HTTP/2 with prior knowledge (cleartext, h2c) on the plain HTTP listeners")
    h2_max_concurrent_streams: int = _setting(100, parse=_integer(1),
                                              help="SETTINGS_MAX_CONCURRENT_STREAMS: HTTP/2 streams a client may "
                                                   "have open on one connection")
    min_body_rate: int = _setting(500, parse=_integer(0),
                                  help="bytes/s a request body must average: it must arrive within TIMEOUT_CLIENT "
                                       "plus 1 s per MIN_BODY_RATE bytes (slower: 408), 0 = off")
    drain_grace: float = _setting(10.0, parse=_seconds,
                                  help="seconds requests in flight may take to finish after SIGTERM")
    error_pages_dir: str = _setting(parse=_optional_text, factory=_dfp_error_pages,
                                    shown=f'{DFP_ERROR_PAGES} when that directory exists, else ""',
                                    help="directory of <code>.http or <code>.html files replacing pyroute's error "
                                         "pages (\"\" = none)")
    admin_user: str = _setting("", parse=_optional_text, shown='""',
                               help="admin API user; with ADMIN_PASS every admin call needs them (basic auth)")
    admin_pass: str = _setting("", parse=_optional_text, shown='""', help="admin API password")
    peer_token: str = _setting("", parse=_peer_token, shown='""',
                               help="shared secret replicas present to each other (Docker secret dfp_peer_token): "
                                    "certificate keys travel between replicas, with or without ADMIN_USER/ADMIN_PASS, "
                                    "and to nobody else")
    timeout_admin: float = _setting(30.0, parse=_seconds,
                                    help="seconds an admin API connection may stay idle or take to send a request")
    acme_email: str = _setting("", parse=_optional_text, shown='""',
                               help="turns ACME on: the account contact for certificates ordered for "
                                    "letsencrypt.host (a service's letsencrypt.email wins) and ACME_DOMAINS")
    acme_domains: str = _setting("", parse=_choice(ACME_DOMAINS_CHOICES), shown='""',
                                 help="auto: also order for every exact serviceDomain of a service with "
                                      "httpsOnly or a :ssl listener (turns ACME on too)")
    acme_directory: str = _setting(LETS_ENCRYPT, parse=_text,
                                   help="ACME directory URL (Let's Encrypt's production one by default; "
                                        "try its staging directory first)")
    acme_ca_file: str = _setting("", parse=_optional_text, shown='""',
                                 help="extra PEM CA bundle trusted for the ACME directory (a private CA, a test server)")
    acme_challenge: str = _setting("http-01", parse=_choice(ACME_CHALLENGES),
                                   help="http-01 (answered on the plain listeners) or tls-alpn-01 (the :ssl listeners)")
    acme_renew_before: float = _setting(0.0, parse=_non_negative_seconds, shown="0",
                                        help="renew this many seconds before expiry; 0: the CA's renewalInfo "
                                             "window where offered, else a third of the lifetime")
    acme_lease: float = _setting(300.0, parse=_seconds,
                                 help="seconds a replica's claim on an order lasts (a replica that dies "
                                      "mid-order blocks that name this long at most)")
    acme_retry: float = _setting(60.0, parse=_seconds,
                                 help="seconds before the first retry of a failed order; doubled per failure "
                                      "up to a day, never sooner than the CA's Retry-After")
    config_file: str | None = None  # where the TOML came from, for display only
    # field name -> "default" | "file" | "env" | "cli"; filled by settings_from_args
    sources: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}), compare=False, repr=False)

    @property
    def acme_enabled(self) -> bool:
        """ACME runs (and the challenge paths are answered) once ACME_EMAIL or ACME_DOMAINS is set."""
        return bool(self.acme_email or self.acme_domains)

    @property
    def stats_enabled(self) -> bool:
        """The stats page is served once STATS_USER and STATS_PASS are both set ("none" included)."""
        return bool(self.stats_user and self.stats_pass)

    @property
    def stats_path(self) -> str:
        """The path part of STATS_URI: what the stats route matches on (as a path prefix)."""
        return self.stats_uri.split("?", 1)[0]


_SETTINGS = tuple(f for f in fields(Settings) if "parse" in f.metadata)
_NAMES = frozenset(f.name for f in _SETTINGS)


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_setting_flags(parser: argparse.ArgumentParser) -> None:
    """Add --config and a --kebab-name flag per setting (dest = field name).

    Flags default to None so "not given" is distinguishable, and keep their
    string value so settings_from_args validates them like env values.
    """
    parser.add_argument("--config", metavar="FILE", default=None,
                        help=f"TOML settings file (env {CONFIG_ENV})")
    for f in _SETTINGS:
        parser.add_argument(_flag(f.name), dest=f.name, default=None,
                            help=f"{f.metadata['help']} (env {f.name.upper()}, default {f.metadata['shown']})"
                            .replace("%", "%%"))


def _read_toml(path: str, label: str, problems: list[SettingsError] | None = None) -> dict[str, Any]:
    """The file's settings; with `problems`, unknown keys are collected there (all of them)
    instead of raising at the first."""
    try:
        with open(path, "rb") as fh:
            data = tomllib.load(fh)
    except OSError as exc:
        raise SettingsError(f"{label}: cannot read {path!r}: {exc.strerror or exc}") from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError(f"{label}: {path!r} is not valid TOML: {exc}") from None
    for key in sorted(data):
        if key not in _NAMES:
            close = difflib.get_close_matches(key.lower().replace("-", "_"), _NAMES, n=1)
            hint = f", did you mean {close[0]!r}?" if close else ""
            error = SettingsError(f"{key} (in {path}): unknown setting{hint}")
            if problems is None:
                raise error
            problems.append(error)
            del data[key]
    return data


def settings_from_args(namespace: argparse.Namespace, environ: Mapping[str, str] | None = None,
                       problems: list[SettingsError] | None = None) -> Settings:
    """Build Settings from flags added by add_setting_flags, the environment
    (default os.environ) and the TOML file named by --config or PYROUTE_CONFIG.

    With `problems` (``pyroute check-config``), every bad value is appended there and that
    setting keeps its default, instead of raising at the first one; an unreadable or
    invalid file still raises."""
    environ = os.environ if environ is None else environ
    config_file = getattr(namespace, "config", None)
    label = "--config"
    if not config_file:
        config_file, label = environ.get(CONFIG_ENV) or None, CONFIG_ENV
    file_values = _read_toml(config_file, label, problems) if config_file else {}

    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    secrets = _secrets(namespace, environ, file_values)
    for f in _SETTINGS:
        env_name = f.name.upper()
        if f.metadata["env_indirect"]:
            env_name = environ.get(f"{env_name}_ENV") or env_name
        if getattr(namespace, f.name, None) is not None:
            raw, source, where = getattr(namespace, f.name), "cli", _flag(f.name)
        elif f.name in secrets:
            raw, source, where = secrets[f.name], "secret", f"secret dfp_{f.name}"
        elif env_name in environ:
            raw, source, where = environ[env_name], "env", env_name
        elif f.name in file_values:
            raw, source, where = file_values[f.name], "file", f"{f.name} (in {config_file})"
        else:
            sources[f.name] = "default"
            continue
        try:
            values[f.name] = f.metadata["parse"](raw, where)
        except SettingsError as exc:
            if problems is None:
                raise
            problems.append(exc)
            sources[f.name] = "default"
            continue
        sources[f.name] = source
    _check_indirect_secrets(values, environ, problems)
    _check_stats_port(values, problems)
    return Settings(**values, config_file=config_file, sources=MappingProxyType(sources))


def _check_stats_port(values: dict[str, Any], problems: list[SettingsError] | None) -> None:
    """STATS_PORT names a public port for the stats page: the admin PORT is not one."""
    stats_port = values.get("stats_port", 0)
    admin_port = values.get("port", next(f.default for f in _SETTINGS if f.name == "port"))
    if stats_port and stats_port == admin_port:
        error = SettingsError(f"STATS_PORT: {stats_port} is the admin PORT, which serves STATS_URI already; name a "
                              "public port, or 0 for every public port")
        if problems is None:
            raise error
        problems.append(error)
        values.pop("stats_port")


def _check_indirect_secrets(values: dict[str, Any], environ: Mapping[str, str],
                            problems: list[SettingsError] | None) -> None:
    """STATS_USER_ENV / STATS_PASS_ENV name the variables holding the stats credentials:
    those are secrets whatever their names, so HEADER_ENV_ALLOW may not list them either."""
    allowed = values.get("header_env_allow", ())
    for pointer in ("STATS_USER_ENV", "STATS_PASS_ENV"):
        target = environ.get(pointer, "")
        if target and target in allowed:
            error = SettingsError(f"HEADER_ENV_ALLOW: {target} holds the stats credentials ({pointer}) and is "
                                  "never sent in a header")
            if problems is None:
                raise error
            problems.append(error)
            values["header_env_allow"] = tuple(n for n in allowed if n != target)


# DFP reads these from the environment only, never from a dfp_<name> secret.
SECRET_EXEMPT = frozenset({"compression_algo", "compression_type", "https_only", "separator", "secrets_dir"})


def _secrets(namespace: argparse.Namespace, environ: Mapping[str, str], file_values: Mapping[str, Any]) -> dict[str, str]:
    """Docker secrets /run/secrets/dfp_<lower-case name>: each wins over its env var (DFP's rule)."""
    directory = (getattr(namespace, "secrets_dir", None) or environ.get("SECRETS_DIR")
                 or file_values.get("secrets_dir") or "/run/secrets")
    found = {}
    for f in _SETTINGS:
        if f.name in SECRET_EXEMPT:
            continue
        try:
            value = read_secret(str(directory), f"dfp_{f.name}")
        except OSError:
            continue  # unreadable: the env var or the file applies, and check-config names the secret
        if value is not None:
            found[f.name] = value
    return found


# DFP env vars that carry raw HAProxy configuration: pyroute cannot use them and says so at start.
RAW_HAPROXY_ENV = ("EXTRA_GLOBAL", "EXTRA_FRONTEND", "CFG_TEMPLATE_PATH", "CAPTURE_REQUEST_HEADER",
                   "DEBUG_HTTP_FORMAT", "DEBUG_TCP_FORMAT", "RESOLVERS")


# DFP settings pyroute accepts, so a DFP service definition keeps starting, but does not act on
# yet: setting one draws a warning saying why.
NO_EFFECT_YET = {
    "timeout_queue": "pyroute has no server queue yet: a request goes straight to an upstream connection, "
                     "bounded by TIMEOUT_CONNECT",
}


def startup_warnings(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """One warning per raw-HAProxy env var that is set and per set setting that has no effect yet
    (logged at start, printed by check-config)."""
    environ = os.environ if environ is None else environ
    return ([f"{name} is set but ignored: pyroute does not take raw HAProxy config (see docs/dfp-compatibility.md)"
             for name in RAW_HAPROXY_ENV if environ.get(name, "").strip()]
            + [f"{name.upper()} is set but has no effect: {why} (see docs/dfp-compatibility.md)"
               for name, why in NO_EFFECT_YET.items() if settings.sources.get(name, "default") != "default"])


def load_settings(argv: Sequence[str] = (), environ: Mapping[str, str] | None = None) -> Settings:
    """Settings from option flags only (e.g. ["--port", "9000", "--config", "x.toml"]);
    environ defaults to os.environ. Bad or unknown flags raise SettingsError, not SystemExit."""
    parser = argparse.ArgumentParser(prog="pyroute", add_help=False, allow_abbrev=False, exit_on_error=False)
    add_setting_flags(parser)
    try:
        namespace, extra = parser.parse_known_args(list(argv))
    except argparse.ArgumentError as exc:
        raise SettingsError(str(exc)) from None
    if extra:
        raise SettingsError(f"{extra[0]}: unknown option")
    return settings_from_args(namespace, environ)
