"""Certificates from an ACME CA (Let's Encrypt), shared by every replica.

What is ordered: for each service, the names in ``letsencrypt.host`` (one certificate,
named after the first), and with ACME_DOMAINS=auto every exact ``serviceDomain`` of a
service served over HTTPS (httpsOnly or a :ssl listener).

How replicas share it: everything lives in the replicated state (registry kind
``acme``, saved with the state file and pushed to every peer at once after each change),
so the CA's validation request may reach any replica:

- ``account <id>``: the account key (JWK, private) and URL, one per directory + email;
- ``lease <cert>``: which replica is ordering, until when (a replica that dies
  mid-order blocks the name for ACME_LEASE at most);
- ``http-01 <token>`` / ``tls-alpn-01 <name>``: the challenge answers while an order runs;
- ``order <cert>``: the names, the last result, why it failed and when to try again.

Only one replica orders: the lowest address among the replicas answering on
``tasks.<SERVICE_NAME>`` (this one alone without Swarm DNS), and only when no other
replica holds a live lease on the name. The certificate goes in through the same path
as ``PUT /cert`` (certificate store, replicated state, state file, peers).

The protocol is the ``acme`` library (certbot's, with josepy), which is synchronous: each
call runs in a thread, and it is imported only once something is to be ordered.
"""

from __future__ import annotations

import asyncio
import datetime
import functools
import hashlib
import ipaddress
import logging
import ssl
import threading
import time
from collections.abc import Awaitable, Callable

import orjson

from pyroute.controlplane.admin import PREFIX
from pyroute.controlplane.registry import ServiceRegistry
from pyroute.resolver import ResolveError
from pyroute.tls import CertStore, file_name

log = logging.getLogger("pyroute.controlplane.acme")

DAY = 86400.0
MAX_SLEEP = 3600.0  # a round at least this often: expiry and leases move with the clock
ORDER_DEADLINE = 120.0  # seconds for the CA to validate and issue once the challenges are answered
USER_AGENT = "pyroute-acme"
TLS_ALPN_PROTOCOL = "acme-tls/1"
ACME_IDENTIFIER_OID = "1.3.6.1.5.5.7.1.31"  # RFC 8737's acmeIdentifier extension
RESULTS = ("valid", "failed")


class OrderFailed(Exception):
    """An order that did not end in a certificate: why, and the CA's Retry-After (seconds)."""

    def __init__(self, why: str, retry_after: float = 0.0, rate_limited: bool = False):
        super().__init__(why)
        self.retry_after = retry_after
        self.rate_limited = rate_limited


def wanted_certificates(services, settings) -> dict[str, tuple[tuple[str, ...], str]]:
    """Certificate name -> (DNS names, contact email) for every certificate ACME should keep."""
    wanted: dict[str, tuple[tuple[str, ...], str]] = {}
    ssl_listener = any(spec.ssl for spec in settings.default_ports)
    for service in services:
        email = service.acme_email or settings.acme_email
        if service.acme_hosts:
            wanted.setdefault(service.acme_hosts[0], (service.acme_hosts, email))
        if settings.acme_domains == "auto":
            for destination in service.destinations:
                if not (destination.https_only or ssl_listener) or destination.req_mode != "http":
                    continue
                for domain in destination.domains:
                    if domain and not domain.startswith(".") and "*" not in domain and not _is_ip(domain):
                        wanted.setdefault(domain, ((domain,), email))
    return wanted


def _is_ip(name: str) -> bool:
    try:
        ipaddress.ip_address(name)
        return True
    except ValueError:
        return False


def _seconds(openssl_time: str) -> float:
    return float(ssl.cert_time_to_seconds(openssl_time)) if openssl_time else 0.0


class AcmeManager:
    """Orders and renews; answers what /certs, /metrics and the challenge paths show."""

    def __init__(self, settings, registry: ServiceRegistry, certs: CertStore, replication,
                 wait_certs: Callable[[], Awaitable[list[str]]]):
        self.settings = settings
        self.registry = registry
        self.certs = certs
        self.replication = replication
        self.wait_certs = wait_certs
        self.orders = dict.fromkeys(RESULTS, 0)  # pyroute_acme_orders_total{result}, this replica's
        self.wake = asyncio.Event()
        self._task: asyncio.Task | None = None
        registry.subscribe(self._changed)

    def _changed(self, snapshot) -> None:
        """Any change may make an order due; TLS-ALPN-01 answers go to the certificate store."""
        self.wake.set()
        prefix = "tls-alpn-01 "
        self.certs.set_challenges({name[len(prefix):]: record["pem"] for name, record in self.registry.acme().items()
                                   if name.startswith(prefix)})

    def start(self) -> None:
        self._task = asyncio.ensure_future(self._run())

    def close(self) -> None:
        if self._task is not None:
            self._task.cancel()

    # -- what the admin listener shows -------------------------------------------------
    def http01_answer(self, token: str) -> str | None:
        record = self.registry.acme().get(f"http-01 {token}")
        return record["key_authorization"] if record else None

    def status(self) -> list[dict]:
        """Each ordered certificate's last result, as /certs lists it (no key material)."""
        out = []
        for name, record in sorted(self.registry.acme().items()):
            if name.startswith("order "):
                out.append({"Name": name[6:], "DnsNames": record["names"], "Status": record["status"],
                            "Error": record.get("error", ""), "Failures": record.get("failures", 0),
                            "NextAttempt": record.get("next_attempt", 0.0), "Updated": record.get("at", 0.0)})
        return out

    def ordered(self, cert_name: str) -> bool:
        return f"order {cert_name.removesuffix('.pem')}" in self.registry.acme()

    # -- the loop -----------------------------------------------------------------------
    async def _run(self) -> None:
        while True:
            self.wake.clear()
            try:
                delay = await self._round()
            except Exception:
                log.exception("ACME round failed")
                delay = self.settings.acme_retry
            if delay > 0:
                try:
                    await asyncio.wait_for(self.wake.wait(), delay)
                except asyncio.TimeoutError:
                    pass

    async def _round(self) -> float:
        """Order what is due, if this replica leads; -> seconds until something may be due."""
        now = time.time()
        records = self.registry.acme()
        wanted = wanted_certificates(self.registry.services(), self.settings)
        installed = {c["Name"]: c for c in self.certs.list()} if wanted else {}
        due, sleep = [], MAX_SLEEP
        for cert_name, (names, email) in wanted.items():
            wait = self._due_in(installed.get(file_name(cert_name)), names, records.get(f"order {cert_name}"), now)
            lease = records.get(f"lease {cert_name}")
            if lease is not None and lease["holder"] != self.registry.replica_id:
                wait = max(wait, lease["expires"] - now)
            if wait > 0:
                sleep = min(sleep, wait)
            else:
                due.append((cert_name, names, email))
        if not due:
            return sleep
        if not await self._leading():
            return min(sleep, self.settings.acme_lease, 10.0)  # the leader may die: look again
        for cert_name, names, email in due:
            await self._order(cert_name, names, email)
        return 0.0

    def _due_in(self, cert: dict | None, names: tuple[str, ...], record: dict | None, now: float) -> float:
        """Seconds until the certificate for `names` (`cert` installed now, `record` its
        last order) should be ordered (<= 0: now)."""
        earliest = 0.0
        if record is not None and record["names"] == list(names):
            if record["status"] == "failed":
                earliest = record["next_attempt"]
            elif record["status"] == "valid":
                earliest = record["at"] + self.settings.acme_retry  # never two orders in a row
        if cert is None or not set(names) <= set(cert["DnsNames"]):
            return earliest - now
        not_after, not_before = _seconds(cert["NotAfter"]), _seconds(cert["NotBefore"])
        before = self.settings.acme_renew_before or (not_after - not_before) / 3
        if record is not None and record.get("renew_at") and not self.settings.acme_renew_before:
            renew_at = record["renew_at"]  # the CA's renewalInfo window
        else:
            renew_at = not_after - before
        return max(renew_at, earliest) - now

    async def _leading(self) -> bool:
        """Is this replica the one that orders: the lowest address answering among
        tasks.<SERVICE_NAME> (or the only one, without Swarm DNS)?"""
        peers = self.replication.peers
        try:
            addresses = await peers.addresses()
        except ResolveError:
            return True
        pings = await asyncio.gather(*(peers.request(a, "GET", PREFIX + "ping") for a in addresses))
        alive = []
        for ping in pings:
            if ping.ok:
                try:
                    alive.append((ipaddress.ip_address(ping.address), orjson.loads(ping.body).get("Replica")))
                except (ValueError, AttributeError):
                    continue
        return not alive or min(alive)[1] == self.registry.replica_id

    # -- one order ------------------------------------------------------------------------
    async def _share(self, changes: dict[str, dict | None]) -> None:
        """Store ACME records, save them, and push them to every replica before going on."""
        for name, value in changes.items():
            self.registry.put_acme(name, value)
        await self.replication.commit()
        await self.replication.push()

    async def _order(self, cert_name: str, names: tuple[str, ...], email: str) -> None:
        previous = self.registry.acme().get(f"order {cert_name}") or {}
        lease = {"holder": self.registry.replica_id, "expires": time.time() + self.settings.acme_lease}
        await self._share({f"lease {cert_name}": lease})
        log.info("ACME: ordering %s for %s from %s", cert_name, ", ".join(names), self.settings.acme_directory)
        answers: list[str] = []
        try:
            pem, renew_at = await self._issue(cert_name, names, email, answers)
            self.certs.install(cert_name, pem)
            await self.wait_certs()
            self.registry.put_cert(file_name(cert_name), pem.decode("ascii"))
            record = {"names": list(names), "status": "valid", "at": time.time(), "failures": 0,
                      "renew_at": renew_at}
            self.orders["valid"] += 1
            log.info("ACME: certificate %s installed for %s", cert_name, ", ".join(names))
        except Exception as exc:  # whatever went wrong, the old certificate stays and the name backs off
            failures = previous.get("failures", 0) + 1 if previous.get("names") == list(names) else 1
            retry_after = getattr(exc, "retry_after", 0.0)
            delay = min(self.settings.acme_retry * 2 ** (failures - 1), DAY)
            if getattr(exc, "rate_limited", False):
                delay = max(delay, 3600.0)
            delay = max(delay, retry_after)
            why = str(exc) or type(exc).__name__
            record = {"names": list(names), "status": "failed", "error": why, "failures": failures,
                      "at": time.time(), "next_attempt": time.time() + delay}
            self.orders["failed"] += 1
            log.error("ACME: order for %s failed (%d in a row), next attempt in %.0f s: %s",
                      ", ".join(names), failures, delay, why)
        await self._share({f"order {cert_name}": record, f"lease {cert_name}": None,
                           **{answer: None for answer in answers}})

    async def _issue(self, cert_name: str, names: tuple[str, ...], email: str,
                     answers: list[str]) -> tuple[bytes, float]:
        """Run one order: account, order, challenges published to every replica, then
        answered, finalised; -> (chain + key PEM, renewal time from renewalInfo or 0)."""
        account_name = "account " + hashlib.sha256(f"{self.settings.acme_directory}|{email}".encode()).hexdigest()[:16]
        account = self.registry.acme().get(account_name)
        if account is None:
            account = {"directory": self.settings.acme_directory, "email": email,
                       "key": await in_thread(_new_account_key), "uri": ""}
        session = await in_thread(_Session, self.settings, account)
        if session.account_uri != account["uri"]:
            await self._share({account_name: {**account, "uri": session.account_uri}})
        order, key_pem = await in_thread(session.new_order, names)
        pending = await in_thread(session.challenges, order, self.settings.acme_challenge)
        records = {}
        for name, challenge, answer in pending:
            if self.settings.acme_challenge == "http-01":
                record_name = f"http-01 {challenge_token(challenge)}"
                records[record_name] = {"cert": cert_name, "key_authorization": answer}
            else:
                record_name = f"tls-alpn-01 {name}"
                records[record_name] = {"cert": cert_name, "pem": answer}
            answers.append(record_name)
        if records:
            await self._share(records)  # every replica can answer before the CA is told to look
            await self.wait_certs()
        for _, challenge, _ in pending:
            await in_thread(session.answer, challenge)
        fullchain = await in_thread(session.finalize, order)
        renew_at = await in_thread(session.renewal_time, fullchain)
        return fullchain + key_pem, renew_at


async def in_thread(function, *args):
    """Run a blocking call of the acme library in a daemon thread of its own: the loop goes
    on, and a SIGTERM does not wait for an order that is still polling the CA (the default
    executor's threads are joined at exit)."""
    loop = asyncio.get_running_loop()
    future = loop.create_future()

    def settle(result, error) -> None:
        if future.done():
            return
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)

    def run() -> None:
        result = error = None
        try:
            result = function(*args)
        except Exception as exc:
            error = exc
        try:
            loop.call_soon_threadsafe(settle, result, error)
        except RuntimeError:
            pass  # the loop closed meanwhile: nobody waits for the answer

    threading.Thread(target=run, name="pyroute-acme", daemon=True).start()
    return await future


def _new_account_key() -> str:
    import josepy
    from cryptography.hazmat.primitives.asymmetric import ec
    return josepy.JWKEC(key=ec.generate_private_key(ec.SECP256R1())).json_dumps()


class _Session:
    """The synchronous side (the acme library), run in a thread: one directory, one account."""

    def __init__(self, settings, account: dict):
        import josepy
        from acme import client, errors, messages

        self.messages, self.errors = messages, errors
        self.key = josepy.JWK.json_loads(account["key"])
        net = _network_class()(self.key, alg=josepy.ES256, verify_ssl=settings.acme_ca_file or True,
                               user_agent=USER_AGENT)
        self.net = net
        with _Failures(self):
            self.client = client.ClientV2(client.ClientV2.get_directory(settings.acme_directory, net), net)
            registration = messages.NewRegistration.from_data(
                email=account["email"] or None, terms_of_service_agreed=True)
            try:
                self.account_uri = self.client.new_account(registration).uri
            except errors.ConflictError as exists:  # the key's account exists: use it
                self.account_uri = exists.location
                net.account = messages.RegistrationResource(uri=exists.location, body=messages.Registration())

    def new_order(self, names: tuple[str, ...]):
        from acme import crypto_util
        from cryptography.hazmat.primitives import serialization
        from cryptography.hazmat.primitives.asymmetric import ec

        key = ec.generate_private_key(ec.SECP256R1())
        key_pem = key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                    serialization.NoEncryption())
        with _Failures(self):
            return self.client.new_order(crypto_util.make_csr(key_pem, list(names))), key_pem

    def challenges(self, order, kind: str) -> list[tuple[str, object, str]]:
        """(name, challenge, answer) for each authorization still pending: the HTTP-01 key
        authorization, or the TLS-ALPN-01 validation certificate (PEM, chain + key)."""
        pending = []
        for authz in order.authorizations:
            if authz.body.status == self.messages.STATUS_VALID:
                continue
            name = authz.body.identifier.value
            challenge = next((c for c in authz.body.challenges if _kind(c) == kind), None)
            if challenge is None:
                raise OrderFailed(f"the CA offers no {kind} challenge for {name}")
            key_authorization = f"{challenge_token(challenge)}.{self._thumbprint()}"
            answer = key_authorization if kind == "http-01" else _alpn_certificate(name, key_authorization)
            pending.append((name, challenge, answer))
        return pending

    def _thumbprint(self) -> str:
        import josepy
        return josepy.b64encode(self.key.thumbprint()).decode()

    def answer(self, challenge) -> None:
        from acme import challenges
        with _Failures(self):
            self.client.answer_challenge(challenge, challenges.HTTP01Response()
                                         if _kind(challenge) == "http-01" else _EmptyResponse())

    def finalize(self, order) -> bytes:
        deadline = datetime.datetime.now() + datetime.timedelta(seconds=ORDER_DEADLINE)
        with _Failures(self):
            return self.client.poll_and_finalize(order, deadline).fullchain_pem.encode("ascii")

    def renewal_time(self, fullchain: bytes) -> float:
        """When the CA's renewalInfo (RFC 9773) suggests renewing; 0 without it."""
        try:
            self.client.directory["renewalInfo"]
        except KeyError:
            return 0.0
        try:
            when, _ = self.client.renewal_time(fullchain)
        except self.errors.ARIError as exc:
            log.warning("ACME: renewalInfo not available: %s", exc)
            return 0.0
        return when.timestamp() if when is not None else 0.0


def _kind(challenge) -> str:
    chall = challenge.chall
    if hasattr(chall, "jobj"):  # a challenge the library does not know (tls-alpn-01)
        return chall.jobj.get("type", "")
    return chall.typ


def challenge_token(challenge) -> str:
    """The challenge's token as it appears in URLs (base64url)."""
    chall = challenge.chall
    if hasattr(chall, "token"):
        return chall.encode("token")
    return chall.jobj["token"]


class _Failures:
    """Turn the library's errors into OrderFailed with a readable reason and the CA's Retry-After."""

    def __init__(self, session: _Session):
        self.session = session

    def __enter__(self):
        return self

    def __exit__(self, kind, exc, tb):
        if exc is None or isinstance(exc, OrderFailed):
            return False
        messages, errors = self.session.messages, self.session.errors
        retry_after = self.session.net.retry_after
        if isinstance(exc, messages.Error):
            raise OrderFailed(f"{exc.code or exc.typ}: {exc.detail}", retry_after,
                              exc.code == "rateLimited") from exc
        if isinstance(exc, errors.ValidationError):
            details = [f"{a.body.identifier.value}: {c.error.detail}" for a in exc.failed_authzrs
                       for c in a.body.challenges if c.error is not None]
            raise OrderFailed("validation failed: " + "; ".join(details), retry_after) from exc
        if isinstance(exc, errors.TimeoutError):
            raise OrderFailed("the CA did not finish the order in time", retry_after) from exc
        raise OrderFailed(f"{type(exc).__name__}: {exc}", retry_after) from exc


@functools.cache
def _network_class():
    from acme import client

    class Network(client.ClientNetwork):
        """The library's network client, remembering the CA's last Retry-After."""

        retry_after = 0.0

        def _send_request(self, method, url, *args, **kwargs):
            response = super()._send_request(method, url, *args, **kwargs)
            value = response.headers.get("Retry-After", "")
            self.retry_after = float(value) if value.isdigit() else 0.0
            return response

    return Network


def _EmptyResponse():
    """The payload that tells the CA to validate (RFC 8555: an empty object)."""
    from acme import challenges
    return challenges.KeyAuthorizationChallengeResponse()


def _alpn_certificate(name: str, key_authorization: str) -> str:
    """RFC 8737's validation certificate for `name`: self-signed, the SHA-256 of the key
    authorization in a critical acmeIdentifier extension; -> PEM (certificate + key)."""
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    digest = hashlib.sha256(key_authorization.encode("ascii")).digest()
    cert = (x509.CertificateBuilder().subject_name(subject).issuer_name(subject).public_key(key.public_key())
            .serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=7))
            .add_extension(x509.SubjectAlternativeName([x509.DNSName(name)]), critical=False)
            .add_extension(x509.UnrecognizedExtension(x509.ObjectIdentifier(ACME_IDENTIFIER_OID),
                                                      b"\x04\x20" + digest), critical=True)
            .sign(key, hashes.SHA256()))
    return (cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())).decode("ascii")
