"""Keeping this replica's state durable and equal to its peers'.

- At start the state file is merged into the (empty) registry before anything subscribes,
  so the first route table already holds every change that was acknowledged.
- Then, before the replica reports ready, it pulls the state of every peer that
  `tasks.<SERVICE_NAME>` lists and whose hash differs, and merges it (a last-writer-wins
  merge, see state.py, so it gets the newest entry of each service from whichever peer
  has it, the one with the newest revision included).
- Every REPAIR_INTERVAL seconds it compares hashes with the peers again and pulls from
  those that differ: a replica that was down or cut off during a change heals without
  a restart, and every peer heals from it in turn. Drift and repairs are counted.
Swarm's DNS is the membership service; there is no consensus protocol here.

Corrupt state (no usable copy of the state file, see durable.py): with STATE_CORRUPT=wait
(the default) the replica serves what it has (nothing) but is not ready until state is
supplied again: a peer's state merged, or a peer found with the same content, or a state
change accepted through the admin API. STATE_CORRUPT=start-empty starts ready and empty.
"""

from __future__ import annotations

import asyncio
import logging

import orjson

from pyroute.controlplane.admin import PREFIX
from pyroute.controlplane.adminauth import admin_credentials
from pyroute.config import Settings
from pyroute.controlplane.statefile import StateFile
from pyroute.controlplane.dfsl import ListenerClient
from pyroute.controlplane.peers import PeerResult, Peers
from pyroute.resolver import Resolver, ResolveError
from pyroute.controlplane.registry import ServiceRegistry, StateError

log = logging.getLogger("pyroute.controlplane.replication")


class Replication:
    def __init__(self, settings: Settings, registry: ServiceRegistry):
        self.settings = settings
        self.registry = registry
        self.resolver = Resolver(settings.dns_nameservers, settings.dns_ttl_cap, settings.dns_timeout)
        self.peers = Peers(settings.service_name, settings.port, self.resolver,
                           credentials=admin_credentials(settings), peer_token=settings.peer_token)
        self.store = StateFile(settings.state_dir) if settings.state_dir else None
        self.listener = ListenerClient(settings, registry, self.resolver, self.commit) \
            if settings.listener_address else None
        self.joined = False  # the first pull from the peers is done
        self.corrupt = ""  # why readiness waits for state to be supplied (STATE_CORRUPT=wait), else ""
        self.drift = 0  # times a peer was found with a different hash
        self.repairs = 0  # pulls that changed this replica's state
        self._tasks: list[asyncio.Task] = []

    def load(self) -> None:
        """Merge the saved state into the registry. OSError: STATE_DIR is unusable."""
        if self.store is None:
            log.warning("STATE_DIR is not set: accepted changes live in memory only")
            return
        self.store.prepare()
        document, corrupt = self.store.load()
        if corrupt and self.settings.state_corrupt == "start-empty":
            log.warning("%s; starting with an empty state as STATE_CORRUPT=start-empty asks", corrupt)
        elif corrupt:
            self.corrupt = (f"{corrupt}; not ready until a peer supplies its state or an admin change is accepted "
                            "(STATE_CORRUPT=start-empty starts empty instead)")
            log.error("%s", self.corrupt)
        if document is not None:
            self.registry.merge(document, f"state file in {self.store.directory}")
            log.info("restored revision %d (%d services) from %s", self.registry.revision,
                     len(self.registry.services()), self.store.directory)

    async def commit(self) -> None:
        """Make the registry's current state durable (raises OSError when the disk fails)."""
        if self.store is not None:
            await self.store.save(self.registry.export_json)

    async def push(self) -> list[str]:
        """Send this replica's state to every peer now (each merges it), instead of waiting
        for their next repair: what ACME challenges need. -> the peers that did not take it."""
        try:
            addresses = await self.peers.addresses()
        except ResolveError:
            return []  # no Swarm DNS: no peers to tell
        body = self.registry.export_json()
        results = await asyncio.gather(*(self.peers.request(a, "POST", PREFIX + "state", body) for a in addresses))
        failed = [f"{r.address} ({r.error or r.status})" for r in results if not r.ok]
        if failed:
            log.warning("push: peers did not take the state: %s (their repair pulls it later)", ", ".join(failed))
        return failed

    def state_supplied(self, by: str) -> None:
        """State came from outside (a peer, an operator): corrupt files no longer hold readiness."""
        if self.corrupt:
            self.corrupt = ""
            log.warning("state supplied by %s after the state files were found corrupt: ready", by)

    def waiting_for(self) -> list[str]:
        """What this replica still waits for before it is ready (empty: nothing)."""
        reasons = [self.corrupt] if self.corrupt else []
        if not self.joined:
            reasons.append("not joined with its peers yet")
        if self.listener is not None and not self.listener.fetched:
            reasons.append("the Swarm Listener's services are not fetched yet")
        return reasons

    def counters(self) -> dict:
        return {"Drift": self.drift, "Repairs": self.repairs, "Joined": self.joined,
                "StateWrites": self.store.writes if self.store is not None else 0}

    def start(self) -> None:
        self._tasks.append(asyncio.ensure_future(self._join_then_repair()))
        if self.listener is not None:
            self._tasks.append(asyncio.ensure_future(self.listener.run()))

    def close(self) -> None:
        for task in self._tasks:
            task.cancel()

    async def _join_then_repair(self) -> None:
        await self.pull_from_peers(joining=True)
        self.joined = True
        log.info("joined: revision %d, hash %s", self.registry.revision, self.registry.hash[:12])
        while True:
            await asyncio.sleep(self.settings.repair_interval)
            try:
                await self.pull_from_peers(joining=False)
            except Exception:
                log.exception("repair round failed")

    async def pull_from_peers(self, joining: bool) -> int:
        """Merge the state of every peer whose hash differs from ours; -> entries adopted."""
        try:
            addresses = await self.peers.addresses()
        except ResolveError as exc:
            (log.info if joining else log.debug)("no peers to compare with: %s", exc)
            return 0
        pings = await asyncio.gather(*(self.peers.request(a, "GET", PREFIX + "ping") for a in addresses))
        others = [p for p in pings if not p.ok or _field(p, "Replica") != self.registry.replica_id]
        differing = [p.address for p in others if p.ok and _field(p, "Hash") not in (None, self.registry.hash)]
        agreeing = [p.address for p in others if p.ok and _field(p, "Hash") == self.registry.hash]
        if agreeing:
            self.state_supplied(f"peer {agreeing[0]} (same content)")
        unreachable = [p.address for p in others if not p.ok]
        if unreachable and not joining:
            log.warning("repair: peers not answering: %s", ", ".join(unreachable))
        if not differing:
            return 0
        if not joining:
            self.drift += len(differing)
            log.warning("drift: %s differ from this replica (revision %d, hash %s)", ", ".join(differing),
                        self.registry.revision, self.registry.hash[:12])
        adopted = 0
        for result in await asyncio.gather(*(self.peers.request(a, "GET", PREFIX + "state") for a in differing)):
            if not result.ok:
                log.warning("could not pull the state of %s: %s", result.address, result.error or result.status)
                continue
            try:
                got = self.registry.merge(orjson.loads(result.body), f"peer {result.address}")
            except (orjson.JSONDecodeError, StateError) as exc:
                log.error("peer %s sent an unusable state: %s", result.address, exc)
                continue
            adopted += got
            self.state_supplied(f"peer {result.address}")
        if adopted:
            if not joining:
                self.repairs += 1
            log.info("%s: adopted %d entries, now revision %d hash %s", "join" if joining else "repair",
                     adopted, self.registry.revision, self.registry.hash[:12])
            try:
                await self.commit()
            except OSError as exc:
                log.error("could not save the state pulled from peers: %s", exc)
        return adopted


def _field(result: PeerResult, name: str):
    try:
        return orjson.loads(result.body).get(name)
    except (orjson.JSONDecodeError, AttributeError):
        return None
