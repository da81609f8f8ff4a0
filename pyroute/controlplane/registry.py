"""The accepted configuration: the one place it changes, what it publishes, how it merges.

Every change builds a new immutable snapshot (revision, services) and hands it to the
subscribers (the data plane), which compile their own route table from it.

Replicas converge without a consensus protocol because the state is a last-writer-wins
map: each entry (a service's reconfigure params, a certificate's PEM, or a tombstone for
a removal) carries a stamp ``(counter, tag)``. A change only replaces an entry with an
older stamp, so applying the same changes in any order, any number of times, and merging
another replica's state (:meth:`ServiceRegistry.merge`) all end in the same content.
A distributed change is stamped once by the replica that fans it out, so every replica
stores it identically. ``revision`` is a Lamport clock: it grows with every change and
jumps to a peer's when a newer stamp arrives, so it orders replicas roughly by freshness;
``hash`` is a digest of the content alone, equal on two replicas exactly when they agree.

A change must cost the event loop in proportion to the change, not to the state (issue 14,
F9), so the registry keeps per entry what whole-state operations need: the entry's digest
(``hash`` is their sum, updated by taking the old entry's out and putting the new one's in)
and its serialised form (the state document is those pieces joined). Format 1 documents
(a whole-content sha256, written by earlier releases) are still read.
"""

from __future__ import annotations

import hashlib
import logging
import secrets
from collections.abc import Callable, Mapping

import orjson

from pyroute.eventlog import event
from pyroute.dataplane.routing import CompileError, check_compiles
from pyroute.services import Service, ServiceDefaults, ServiceError, is_removal, parse_service

log = logging.getLogger("pyroute.controlplane.registry")

Snapshot = tuple[int, tuple[Service, ...]]
Stamp = tuple[int, str]  # (Lamport counter, "<replica id>.<sequence>"): unique per change
KINDS = ("services", "certs", "acme")  # services: name -> params pairs; certs: name -> PEM;
# acme: ACME records (account keys, leases, challenge answers, order status; acme.py) -> JSON object; None = removed
KINDS_V1 = ("services", "certs")  # what format-1 documents held
SECRET_KINDS = ("certs", "acme")  # entries holding private keys: only replicas and admins get them
STATE_FORMAT = 2  # 2: hash = sum of per-entry digests; 1: sha256 of the whole content (read only)
READABLE_FORMATS = (1, 2)
HASH_MODULUS = 2 ** 256
NOT_STORED = ("distribute", "pyroutestamp")  # request-only parameters, never part of a service


class StateError(ValueError):
    """A state document (file or peer answer) that is malformed."""


def entry_digest(kind: str, name: str, stamp: Stamp, value: object) -> int:
    """sha256 of one entry's canonical JSON ``[kind, name, stamp, value]``, as an integer."""
    return int.from_bytes(hashlib.sha256(orjson.dumps([kind, name, stamp, value])).digest(), "big")


def format_hash(total: int) -> str:
    return f"{total % HASH_MODULUS:064x}"


def content_hash(entries: Mapping[str, Mapping[str, tuple[Stamp, object]]]) -> str:
    """The format-2 hash computed from scratch: every entry's digest summed modulo 2**256
    (order-independent, so the registry can keep it up to date one entry at a time)."""
    return format_hash(sum(entry_digest(kind, name, stamp, value)
                           for kind in KINDS for name, (stamp, value) in entries.get(kind, {}).items()))


def content_hash_v1(entries: Mapping[str, Mapping[str, tuple[Stamp, object]]]) -> str:
    """The format-1 hash: sha256 over the canonical JSON of the whole content."""
    canonical = {kind: {name: [list(stamp), value] for name, (stamp, value) in entries.get(kind, {}).items()}
                 for kind in KINDS_V1}
    return hashlib.sha256(orjson.dumps(canonical, option=orjson.OPT_SORT_KEYS)).hexdigest()


def stored_params(params: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple((k, v) for k, v in params.items() if k.lower() not in NOT_STORED)


def parse_stamp(text: str) -> Stamp:
    """"<counter>-<tag>" as sent between replicas (the pyrouteStamp parameter)."""
    counter, dash, tag = text.partition("-")
    if not dash or not counter.isdigit() or not tag:
        raise ServiceError(400, f"malformed pyrouteStamp {text!r}")
    return int(counter), tag


def format_stamp(stamp: Stamp) -> str:
    return f"{stamp[0]}-{stamp[1]}"


class ServiceRegistry:
    def __init__(self, separator: str = ",", defaults: ServiceDefaults | None = None, instance: str | None = None):
        self.separator = separator
        self.defaults = defaults or ServiceDefaults()
        self.instance = instance  # FILTER_PROXY_INSTANCE_NAME: only services naming this instance apply
        self.revision = 0
        self.replica_id = secrets.token_hex(6)  # fresh per process: stamps never repeat
        self._sequence = 0
        self._services: dict[str, Service] = {}
        self._entries: dict[str, dict[str, tuple[Stamp, object]]] = {kind: {} for kind in KINDS}
        self._digests: dict[str, dict[str, int]] = {kind: {} for kind in KINDS}  # entry_digest per entry
        self._digest_sum = 0  # of every entry's digest, modulo HASH_MODULUS
        self._exported: dict[str, dict[str, bytes]] = {kind: {} for kind in KINDS}  # '"name":{entry}' per entry
        self.hash = format_hash(self._digest_sum)
        self._subscribers: list[Callable[[Snapshot], None]] = []
        # Labelled services refused on their way in (Swarm labels, the Swarm Listener's list or
        # its reconfigure calls): name -> {"ServiceName", "Source", "Status", "Reason"}. This
        # replica's own view, not replicated; an entry goes when the name is stored or removed.
        self.rejected: dict[str, dict] = {}

    def subscribe(self, callback: Callable[[Snapshot], None]) -> None:
        self._subscribers.append(callback)
        callback(self.snapshot())

    def snapshot(self) -> Snapshot:
        return self.revision, tuple(self._services.values())

    def get(self, name: str) -> Service | None:
        return self._services.get(name)

    def services(self) -> tuple[Service, ...]:
        return tuple(self._services.values())

    def certs(self) -> dict[str, str]:
        """Certificate name -> PEM (cert + key), for the TLS side."""
        return {name: pem for name, (_, pem) in self._entries["certs"].items() if pem is not None}

    def acme(self) -> dict[str, dict]:
        """The ACME records (controlplane/acme.py), removed ones left out."""
        return {name: value for name, (_, value) in self._entries["acme"].items() if value is not None}

    def new_stamp(self) -> Stamp:
        """A stamp newer than everything this replica has seen."""
        self._sequence += 1
        return self.revision + 1, f"{self.replica_id}.{self._sequence:010d}"

    # -- changes --------------------------------------------------------------------------
    def reconfigure(self, params: Mapping[str, str], stamp: Stamp | None = None) -> Service | None:
        """Add or replace the service the params describe (None: it was a replicas=0 removal).

        Raises services.ServiceError, leaving everything as it was. A change whose stamp is
        older than the stored entry's (a late duplicate of a distributed call) is a no-op.
        """
        if self.instance is not None and _param(params, "proxyinstancename").strip() != self.instance:
            log.info("ignored %s: proxyInstanceName is not %s", _param(params, "servicename"), self.instance)
            return None
        if is_removal(params):
            self.remove(_param(params, "servicename"), stamp)
            return None
        service = self._parse(params)
        self._change("services", service.name, stored_params(params), stamp or self.new_stamp(), service)
        return service

    def remove(self, name: str, stamp: Stamp | None = None) -> bool:
        """Remove a service; True if it was configured. The tombstone is kept so that an
        older reconfigure arriving later (or from a peer) cannot bring it back."""
        existed = name in self._services
        self._change("services", name, None, stamp or self.new_stamp(), None)
        return existed

    def put_cert(self, name: str, pem: str, stamp: Stamp | None = None) -> None:
        self._change("certs", name, pem, stamp or self.new_stamp(), None)

    def remove_cert(self, name: str, stamp: Stamp | None = None) -> bool:
        existed = name in self.certs()
        self._change("certs", name, None, stamp or self.new_stamp(), None)
        return existed

    def put_acme(self, name: str, value: dict | None) -> None:
        """Store (None: remove) an ACME record; published and saved like every other change."""
        self._change("acme", name, value, self.new_stamp(), None)

    def upsert_many(self, items: list[Mapping[str, str]], source: str = "") -> tuple[int, list[str]]:
        """Apply a whole list of reconfigure params as one publication (one table swap).

        Entries equal to what is stored are skipped, so an unchanged list publishes
        nothing. Returns (entries changed, error messages of the entries refused); with a
        `source` the refused ones are kept as rejections and that source's earlier
        rejections of services the list no longer holds are dropped.
        """
        changed, errors = 0, []
        if source:
            self.forget_rejected(source, {_param(p, "servicename").strip() for p in items})
        for params in items:
            if self.instance is not None and _param(params, "proxyinstancename").strip() != self.instance:
                continue
            try:
                if is_removal(params):
                    name = next((v for k, v in params.items() if k.lower() == "servicename"), "")
                    if name in self._services and self._store("services", name, None, self.new_stamp(), None):
                        changed += 1
                    continue
                value = stored_params(params)
                current = self._entries["services"].get(_param(params, "servicename").strip())
                if current is not None and current[1] is not None and dict(current[1]) == dict(value):
                    continue  # unchanged: already parsed and compiled when it was stored
                service = self._parse(params)
            except ServiceError as exc:
                errors.append(f"{dict(params).get('serviceName', '?')}: {exc.message}")
                if source:
                    self.reject(_param(params, "servicename").strip() or "?", source, exc)
                continue
            changed += self._store("services", service.name, value, self.new_stamp(), service)
        if changed:
            self._publish("apply-list", changed=changed)
        return changed, errors

    def reject(self, name: str, source: str, error: ServiceError) -> None:
        """Keep why a labelled service was refused, for /rejected and pyroute_rejected_services."""
        self.rejected[name] = {"ServiceName": name, "Source": source, "Status": error.status, "Reason": error.message}

    def forget_rejected(self, source: str, keep: set[str] = frozenset()) -> None:
        """Drop `source`'s rejections except the names in `keep` (the services it still lists)."""
        for name in [n for n, r in self.rejected.items() if r["Source"] == source and n not in keep]:
            del self.rejected[name]

    def republish(self, why: str) -> None:
        """Hand the same services out again as a new revision (reload?recreate=true)."""
        self.revision += 1
        self._publish("republish", why=why)

    def validate(self, params: Mapping[str, str]) -> Service:
        """The service `params` describe, parsed and compiled as the data plane will, without
        storing it. Raises ServiceError (400 when it does not compile)."""
        service = parse_service(params, self.separator, self.defaults)
        try:
            check_compiles(service)
        except CompileError as exc:
            raise ServiceError(400, str(exc)) from None
        return service

    _parse = validate  # every entry is checked on its way in: API, listeners, env, state file, peers

    def _change(self, kind: str, name: str, value: object, stamp: Stamp, service: Service | None) -> None:
        if self._store(kind, name, value, stamp, service):
            if kind == "services":
                self._publish("remove" if value is None else "reconfigure", service=name)
            elif kind == "acme":
                self._publish("acme-remove" if value is None else "acme-store", record=name.split(" ", 1)[0])
            else:
                self._publish("cert-remove" if value is None else "cert-store", cert=name)

    def _store(self, kind: str, name: str, value: object, stamp: Stamp, service: Service | None,
               bump: bool = True) -> bool:
        current = self._entries[kind].get(name)
        if current is not None and current[0] >= stamp:
            return False
        self._entries[kind][name] = (stamp, value)
        if kind == "services":
            self.rejected.pop(name, None)  # stored or removed: whatever was refused before is moot
            if value is None:
                self._services.pop(name, None)
            else:
                self._services[name] = service or self._parse(dict(value))
        digest = entry_digest(kind, name, stamp, value)
        self._digest_sum = (self._digest_sum - self._digests[kind].get(name, 0) + digest) % HASH_MODULUS
        self._digests[kind][name] = digest
        self._exported[kind][name] = orjson.dumps(name) + b":" + orjson.dumps({"stamp": stamp, "value": value})
        if bump:
            self.revision = max(self.revision + 1, stamp[0])
        return True

    def _publish(self, what: str, **fields) -> None:
        """Log the change as one structured event with the revision it produced, then hand
        the new snapshot to the data planes."""
        self.hash = format_hash(self._digest_sum)
        event(log, what, **fields, revision=self.revision, services=len(self._services), hash=self.hash[:12])
        snapshot = self.snapshot()
        for callback in self._subscribers:
            callback(snapshot)

    # -- whole-state exchange (state file, peers) --------------------------------------
    def export_json(self, secrets: bool = True) -> bytes:
        """The state document, serialised: what the state file holds and what peers pull
        (`secrets=False`: without the certificates, whose PEMs hold private keys, and the
        ACME records, which hold the account key).

        Joined from each entry's stored serialisation, so the event loop pays a copy of the
        bytes, not a walk over every entry."""
        left_out = () if secrets else SECRET_KINDS
        total = (self._digest_sum - sum(sum(self._digests[k].values()) for k in left_out)) % HASH_MODULUS
        head = orjson.dumps({"format": STATE_FORMAT, "revision": self.revision, "hash": format_hash(total)})
        parts = [head[:-1]]
        for kind in KINDS:
            entries = self._exported[kind].values() if kind not in left_out else ()
            parts += (b',"', kind.encode(), b'":{', b",".join(entries), b"}")
        parts.append(b"}")
        return b"".join(parts)

    def export(self) -> dict:
        """The state document as a dict (export_json parsed)."""
        return orjson.loads(self.export_json())

    def merge(self, document: Mapping, origin: str) -> int:
        """Adopt every entry of `document` newer than ours (one publication); -> entries adopted.

        Raises StateError if the document is malformed or its hash does not match its
        content; entries whose service no longer parses are skipped and logged.
        """
        entries = read_document(document)
        adopted, newest = 0, 0
        for kind in KINDS:
            mine = self._entries[kind]
            for name, (stamp, value) in entries[kind].items():
                if name in mine and mine[name][0] >= stamp:
                    continue  # not newer: skipped before parsing, so an equal document costs no parse
                service = None
                if kind == "services" and value is not None:
                    try:
                        service = self._parse(dict(value))
                    except ServiceError as exc:
                        log.error("%s: skipping service %s: %s", origin, name, exc.message)
                        continue
                if self._store(kind, name, value, stamp, service, bump=False):
                    adopted += 1
                    newest = max(newest, stamp[0])
        if adopted:  # one step for the whole merge, so a restored file keeps its revision
            self.revision = max(self.revision + 1, newest, document["revision"])
            self._publish("replica-sync", adopted=adopted, origin=origin)
        return adopted


def read_document(document: Mapping) -> dict[str, dict[str, tuple[Stamp, object]]]:
    """Validate a state document (format 1 or 2); -> its entries. Raises StateError.

    Checking the hash walks every entry: this runs when a document is read (state file at
    start, a peer's state), never per change."""
    try:
        layout = document.get("format")
        if type(layout) is not int or layout not in READABLE_FORMATS:
            raise StateError(f"unknown state format {layout!r}")
        if not isinstance(document.get("revision"), int) or document["revision"] < 0:
            raise StateError("revision is missing or not a non-negative integer")
        entries: dict[str, dict[str, tuple[Stamp, object]]] = {}
        for kind in KINDS:
            entries[kind] = {}
            for name, entry in document.get(kind, {}).items():
                counter, tag = entry["stamp"]
                value = entry["value"]
                if not (isinstance(counter, int) and isinstance(tag, str) and isinstance(name, str)):
                    raise StateError(f"{kind}/{name}: malformed stamp")
                if kind == "services" and value is not None:
                    value = tuple((str(k), str(v)) for k, v in value)
                elif kind == "certs" and value is not None and not isinstance(value, str):
                    raise StateError(f"certs/{name}: PEM is not a string")
                elif kind == "acme" and value is not None and not isinstance(value, dict):
                    raise StateError(f"acme/{name}: not a JSON object")
                entries[kind][name] = ((counter, tag), value)
    except StateError:
        raise
    except (AttributeError, KeyError, TypeError, ValueError) as exc:
        raise StateError(f"malformed state document: {exc!r}") from None
    expected = content_hash(entries) if layout == 2 else content_hash_v1(entries)
    if expected != document.get("hash"):
        raise StateError("content does not match its hash (partial or corrupt)")
    return entries


def _param(params: Mapping[str, str], lname: str) -> str:
    return next((v for k, v in params.items() if k.lower() == lname), "")
