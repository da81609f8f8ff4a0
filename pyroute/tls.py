"""The certificate store: PEM certificates, their SSLContexts, and the SNI choice.

Certificates come from CERTS_DIR (one PEM file each: chain + key), Docker secrets named
``cert-*``/``cert_*``, and the admin API (``install``). Every certificate gets its own
server SSLContext (TLS 1.2+, modern ciphers, ALPN h2 then http/1.1 or http/1.1 alone
with ENABLE_H2=false, narrowed by SSL_BIND_OPTIONS / SSL_BIND_CIPHERS: `TlsPolicy`). A
listener holds one *dispatch* context whose SNI callback swaps in the chosen certificate's context: exact name, then wildcard (``*.example.com``),
then the default. PREFERRED_CERTIFICATE is DFP's list of globs over certificate file
names: matching certificates come first, in list order, so the first is the default and
they win a name two certificates share. Hot add/replace replaces the name -> context maps in one assignment, so
handshakes in progress keep the context they picked and open connections are untouched.

API-installed certificates are written with files.atomic_write so a restart serves them again.
"""

from __future__ import annotations

import dataclasses
import fnmatch
import logging
import os
import re
import ssl
import tempfile
from collections.abc import Callable
from dataclasses import dataclass

from pyroute.files import atomic_write

log = logging.getLogger("pyroute.tls")

CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"  # TLS 1.2 suites; TLS 1.3 suites are OpenSSL's defaults
SECRET_PREFIXES = ("cert-", "cert_")
MAX_PEM = 1024 * 1024
ALPN_HTTP1 = ("http/1.1",)
ALPN_H2 = ("h2", "http/1.1")  # ENABLE_H2: HTTP/2 first, as DFP's `alpn h2,http/1.1`


_VERSIONS = {"tlsv1.2": ssl.TLSVersion.TLSv1_2, "tlsv1.3": ssl.TLSVersion.TLSv1_3}
_BELOW_1_2 = ("sslv3", "tlsv1.0", "tlsv1.1", "tlsv10", "tlsv11")
# HAProxy bind options that only refuse versions pyroute never offers (DFP's default is no-sslv3).
_ALREADY_OFF = ("no-sslv3", "no-tlsv10", "no-tlsv11")


@dataclass(frozen=True, slots=True)
class TlsPolicy:
    """What every server context of the TLS listeners allows (SSL_BIND_OPTIONS, SSL_BIND_CIPHERS)."""

    minimum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2
    maximum: ssl.TLSVersion = ssl.TLSVersion.TLSv1_3
    ciphers: str = CIPHERS  # TLS 1.2 cipher list (OpenSSL syntax)
    no_tickets: bool = False  # no-tls-tickets
    client_order: bool = False  # prefer-client-ciphers
    alpn: tuple[str, ...] = ALPN_HTTP1  # the protocols offered, in order (ENABLE_H2 puts h2 first)


def bind_options(text: str, ciphers: str = "") -> TlsPolicy:
    """SSL_BIND_OPTIONS in HAProxy's words (``no-tlsv12 no-tls-tickets``, ``ssl-min-ver TLSv1.3``,
    ``force-tlsv13`` ...) and SSL_BIND_CIPHERS -> TlsPolicy. Raises ValueError naming the word
    pyroute cannot honour (versions below TLS 1.2, options that are not about TLS versions,
    tickets or cipher order), never ignoring one."""
    words = text.lower().split()
    minimum, maximum = ssl.TLSVersion.TLSv1_2, ssl.TLSVersion.TLSv1_3
    no_tickets = client_order = False
    while words:
        word = words.pop(0)
        if word in _ALREADY_OFF:
            continue
        if word == "no-tlsv12":
            minimum = max(minimum, ssl.TLSVersion.TLSv1_3)
        elif word == "no-tlsv13":
            maximum = min(maximum, ssl.TLSVersion.TLSv1_2)
        elif word in ("force-tlsv12", "force-tlsv13"):
            minimum = maximum = _VERSIONS[f"tlsv1.{word[-1]}"]
        elif word in ("ssl-min-ver", "ssl-max-ver"):
            version = words.pop(0) if words else ""
            if version in _BELOW_1_2:
                raise ValueError(f"{word} {version}: pyroute offers TLS 1.2 and 1.3 only")
            if version not in _VERSIONS:
                raise ValueError(f"{word} expects TLSv1.2 or TLSv1.3, got {version or 'nothing'!r}")
            if word == "ssl-min-ver":
                minimum = _VERSIONS[version]
            else:
                maximum = _VERSIONS[version]
        elif word == "no-tls-tickets":
            no_tickets = True
        elif word == "prefer-client-ciphers":
            client_order = True
        elif word.startswith("force-"):
            raise ValueError(f"{word}: pyroute offers TLS 1.2 and 1.3 only (force-tlsv12 or force-tlsv13)")
        else:
            raise ValueError(f"{word!r} is not supported: pyroute takes no-sslv3, no-tlsv10, no-tlsv11, no-tlsv12, "
                             "no-tlsv13, force-tlsv12, force-tlsv13, ssl-min-ver/ssl-max-ver TLSv1.2|TLSv1.3, "
                             "no-tls-tickets and prefer-client-ciphers")
    if minimum > maximum:
        raise ValueError(f"{text!r} leaves no TLS version to offer (pyroute has TLS 1.2 and 1.3)")
    policy = TlsPolicy(minimum, maximum, ciphers or CIPHERS, no_tickets, client_order)
    if ciphers and minimum <= ssl.TLSVersion.TLSv1_2:
        try:
            ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).set_ciphers(ciphers)
        except ssl.SSLError:
            raise ValueError(f"SSL_BIND_CIPHERS {ciphers!r} selects no cipher OpenSSL knows") from None
    return policy


def tls13_suites() -> tuple[str, ...]:
    """The TLS 1.3 cipher suites this process's OpenSSL offers. Python's ssl module cannot set
    them; OpenSSL reads them from its configuration (OPENSSL_CONF, `Ciphersuites =`)."""
    return tuple(c["name"] for c in ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER).get_ciphers()
                 if c["protocol"] == "TLSv1.3")


@dataclass(frozen=True, slots=True)
class Certificate:
    name: str
    pem: bytes
    names: tuple[str, ...]  # DNS names it serves (SAN, else CN), lower-case; "*.x" for wildcards
    context: ssl.SSLContext
    not_after: str
    secret: bool = False  # from a Docker secret: never written to CERTS_DIR, not listed for peers
    not_before: str = ""
    issuer: str = ""  # the issuer's commonName (else organizationName), for /certs


_CERT_NAME = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,199}\Z")


def _check_name(name: str) -> str:
    """certName becomes a file in CERTS_DIR and appears in log lines: letters, digits, '.', '_'
    and '-' only, not starting with '.' (no path, no '..', no CR/LF forging a log line)."""
    name = name.strip()
    if not _CERT_NAME.match(name) or ".." in name:
        raise ValueError(f"certName {name!r} is not a valid file name (letters, digits, '.', '_', '-'; "
                         "up to 200, not starting with '.')")
    return name


def file_name(name: str) -> str:
    return name if name.endswith(".pem") else name + ".pem"


def _refuse_pass_phrase() -> bytes:
    """The pass phrase callback: without one OpenSSL prompts on the terminal (and blocks
    the whole proxy under `docker run -it`); asked at all means the key is encrypted."""
    raise ValueError("the private key is encrypted; pyroute needs an unencrypted key")


def server_context(pem_path: str | None = None, ca_file: str = "", policy: TlsPolicy = TlsPolicy()) -> ssl.SSLContext:
    """A server context with pyroute's TLS policy; loads `pem_path` (chain + key) if given."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = policy.minimum
    ctx.maximum_version = policy.maximum
    if policy.minimum <= ssl.TLSVersion.TLSv1_2:
        ctx.set_ciphers(policy.ciphers)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    if not policy.client_order:
        ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    if policy.no_tickets:
        ctx.options |= ssl.OP_NO_TICKET
    ctx.set_alpn_protocols(list(policy.alpn))
    if ca_file:
        ctx.load_verify_locations(ca_file)
        ctx.verify_mode = ssl.CERT_OPTIONAL  # a bad certificate fails the handshake; none is allowed
    if pem_path is not None:
        ctx.load_cert_chain(pem_path, password=_refuse_pass_phrase)
    return ctx


def load_certificate(name: str, pem: bytes, ca_file: str = "", secret: bool = False,
                     policy: TlsPolicy = TlsPolicy()) -> Certificate:
    """Validate PEM text (certificate chain + matching private key) into a Certificate.

    Raises ValueError saying what is wrong (an encrypted key included: never a prompt).
    """
    if len(pem) > MAX_PEM:
        raise ValueError("the PEM is larger than 1 MiB")
    if b"-----BEGIN CERTIFICATE-----" not in pem:
        raise ValueError("no PEM certificate (-----BEGIN CERTIFICATE-----) found")
    if b"PRIVATE KEY-----" not in pem:
        raise ValueError("no private key found: the PEM must hold the certificate chain and its key")
    fd, path = tempfile.mkstemp(prefix="pyroute-cert-", suffix=".pem")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(pem)
        try:
            ctx = server_context(path, ca_file, policy)
            decoded = ssl._ssl._test_decode_cert(path)  # the first certificate of the chain
        except ssl.SSLError as exc:
            reason = exc.reason or str(exc)
            if "KEY_VALUES_MISMATCH" in reason.upper():
                raise ValueError("the private key does not match the certificate") from None
            raise ValueError(f"invalid certificate or key: {reason}") from None
    finally:
        os.unlink(path)
    names = [v.lower() for k, v in decoded.get("subjectAltName", ()) if k == "DNS"]
    if not names:
        names = [v.lower() for rdn in decoded.get("subject", ()) for k, v in rdn if k == "commonName"]
    issuer = {k: v for rdn in decoded.get("issuer", ()) for k, v in rdn}
    return Certificate(name, pem, tuple(names), ctx, decoded.get("notAfter", ""), secret,
                       decoded.get("notBefore", ""), issuer.get("commonName") or issuer.get("organizationName", ""))


class CertStore:
    """The certificates in use; `install`/`remove`/`list` are the API other modules call."""

    def __init__(self, certs_dir: str, secrets_dir: str = "", preferred: tuple[str, ...] = (), ca_file: str = "",
                 persist: bool = True, policy: TlsPolicy = TlsPolicy()):
        self.certs_dir = certs_dir
        self.secrets_dir = secrets_dir
        self.preferred = preferred  # globs over file names, in order (PREFERRED_CERTIFICATE)
        self.ca_file = ca_file
        self.policy = policy
        self.persist = persist  # False in worker processes: the control process writes the files
        self._certs: dict[str, Certificate] = {}
        self._exact: dict[str, ssl.SSLContext] = {}
        self._wildcard: dict[str, ssl.SSLContext] = {}  # "example.com" for "*.example.com"
        self._default: ssl.SSLContext | None = None
        self.challenges: dict[str, ssl.SSLContext] = {}  # ACME TLS-ALPN-01: name -> validation context
        self._challenge_pems: dict[str, str] = {}
        self._subscribers: list[Callable[[CertStore], None]] = []
        self.dispatch = server_context(None, ca_file, policy)
        self.dispatch.sni_callback = self._choose

    # -- loading ------------------------------------------------------------------------
    def load(self) -> None:
        """Read CERTS_DIR and the cert-* secrets; unreadable or invalid files are logged and skipped."""
        found: list[tuple[str, str, bool]] = []
        for directory, wanted in ((self.certs_dir, None), (self.secrets_dir, SECRET_PREFIXES)):
            try:
                entries = sorted(os.listdir(directory)) if directory else []
            except FileNotFoundError:
                continue  # no certificates yet: the TLS ports wait for the first one
            except OSError as exc:
                if wanted is None:
                    log.error("CERTS_DIR %s is not a readable directory (%s): its certificates are not served. "
                              "Make it readable by uid %d (the image's user is pyroute), or point CERTS_DIR at "
                              "another directory", directory, exc.strerror or exc, os.getuid())
                continue
            for entry in entries:
                if entry.startswith(".") or (wanted and not entry.startswith(wanted)):
                    continue
                path = os.path.join(directory, entry)
                if os.path.isfile(path):
                    found.append((entry, path, wanted is not None))
        for entry, path, secret in found:
            try:
                with open(path, "rb") as fh:
                    cert = load_certificate(entry, fh.read(MAX_PEM + 1), self.ca_file, secret, self.policy)
            except (OSError, ValueError) as exc:
                log.error("certificate %s skipped: %s", path, exc)
                continue
            self._certs[entry] = cert
            log.info("certificate %s loaded for %s", entry, ", ".join(cert.names) or "(no names)")
        self._rebuild()

    def subscribe(self, callback: Callable[["CertStore"], None]) -> None:
        self._subscribers.append(callback)

    # -- the API ------------------------------------------------------------------------
    def install(self, name: str, pem: bytes) -> Certificate:
        """Add or replace certificate `name`; raises ValueError (and changes nothing) if invalid."""
        name = file_name(_check_name(name))
        cert = load_certificate(name, pem, self.ca_file, policy=self.policy)
        if self.persist:
            try:
                atomic_write(self.certs_dir, name, pem)
            except OSError as exc:
                raise OSError(f"cannot save {name} in {self.certs_dir}: {exc.strerror or exc}") from None
        self._certs[name] = cert
        log.info("certificate %s installed for %s", name, ", ".join(cert.names) or "(no names)")
        self._rebuild()
        return cert

    def remove(self, name: str) -> bool:
        name = file_name(_check_name(name))
        if self._certs.pop(name, None) is None:
            return False
        if self.persist:
            try:
                os.unlink(os.path.join(self.certs_dir, name))
            except FileNotFoundError:
                pass
        self._rebuild()
        return True

    def replace_all(self, pems: dict[str, str]) -> None:
        """Take exactly these certificates (a worker following the control process)."""
        certs = {}
        for name, pem in pems.items():
            try:
                certs[name] = load_certificate(name, pem.encode("ascii"), self.ca_file, policy=self.policy)
            except ValueError as exc:
                log.error("certificate %s skipped: %s", name, exc)
        self._certs = certs
        self._rebuild()

    def list(self) -> list[dict]:
        return [
            {"Name": c.name, "DnsNames": list(c.names), "NotAfter": c.not_after, "NotBefore": c.not_before,
             "Issuer": c.issuer, "Secret": c.secret, "Pem": c.pem.decode("ascii", "replace")}
            for c in self._certs.values()
        ]

    def set_challenges(self, pems: dict[str, str]) -> None:
        """Take these TLS-ALPN-01 validation certificates (name -> PEM, chain + key): the TLS
        listeners serve them to clients offering only ALPN acme-tls/1 for that name."""
        if pems == self._challenge_pems:
            return
        contexts = {}
        for name, pem in pems.items():
            try:
                contexts[name] = load_certificate(name, pem.encode("ascii"), policy=self.policy).context
            except ValueError as exc:
                log.error("ACME validation certificate for %s skipped: %s", name, exc)
                continue
            contexts[name].set_alpn_protocols(["acme-tls/1"])
        self._challenge_pems, self.challenges = dict(pems), contexts
        for callback in self._subscribers:
            callback(self)

    def challenge_pems(self) -> dict[str, str]:
        return dict(self._challenge_pems)

    def pems(self) -> dict[str, str]:
        return {c.name: c.pem.decode("ascii", "replace") for c in self._certs.values()}

    def __len__(self) -> int:
        return len(self._certs)

    # -- SNI ----------------------------------------------------------------------------
    def ordered(self) -> list[Certificate]:
        """The certificates in DFP's crt-list order: those matching PREFERRED_CERTIFICATE's globs
        first (in list order; a glob also matches the name without .pem), then the rest."""
        def rank(cert: Certificate) -> int:
            bare = cert.name[:-4] if cert.name.endswith(".pem") else cert.name
            return next((i for i, glob in enumerate(self.preferred)
                         if fnmatch.fnmatchcase(cert.name, glob) or fnmatch.fnmatchcase(bare, glob)),
                        len(self.preferred))
        return sorted(self._certs.values(), key=rank)  # (stable: load order within a rank)

    def _rebuild(self) -> None:
        exact: dict[str, ssl.SSLContext] = {}
        wildcard: dict[str, ssl.SSLContext] = {}
        ordered = self.ordered()
        for cert in ordered:
            for dns in cert.names:
                if dns.startswith("*."):
                    wildcard.setdefault(dns[2:], cert.context)
                else:
                    exact.setdefault(dns, cert.context)
        default = ordered[0].context if ordered else None
        self._exact, self._wildcard, self._default = exact, wildcard, default
        for callback in self._subscribers:
            callback(self)

    def context_for(self, server_name: str | None) -> ssl.SSLContext | None:
        if server_name:
            name = server_name.lower().rstrip(".")
            ctx = self._exact.get(name)
            if ctx is not None:
                return ctx
            dot = name.find(".")
            if dot > 0:
                ctx = self._wildcard.get(name[dot + 1 :])
                if ctx is not None:
                    return ctx
        return self._default

    def _choose(self, ssl_object, server_name: str | None, _ctx) -> int | None:
        ctx = self.context_for(server_name)
        if ctx is None:
            return ssl.ALERT_DESCRIPTION_UNRECOGNIZED_NAME
        ssl_object.context = ctx
        return None


def cert_store(settings, persist: bool = True) -> CertStore:
    """The certificate store the settings describe (CERTS_DIR, secrets, PREFERRED_CERTIFICATE,
    CA_FILE, SSL_BIND_OPTIONS/SSL_BIND_CIPHERS); `persist` False for a worker, whose control
    process writes the files."""
    return CertStore(settings.certs_dir, settings.secrets_dir, settings.preferred_certificate, settings.ca_file,
                     persist=persist, policy=dataclasses.replace(
                         bind_options(settings.ssl_bind_options, settings.ssl_bind_ciphers),
                         alpn=ALPN_H2 if settings.enable_h2 else ALPN_HTTP1))
