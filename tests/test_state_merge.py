"""The replicated state as a last-writer-wins map (pyroute/state.py), checked as pure
code: whatever order replicas receive changes and merge each other's state in, they end
with the same content; tombstones beat older writes; malformed documents are refused."""
from __future__ import annotations

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pyroute.services import ServiceError
from pyroute.controlplane.registry import ServiceRegistry, StateError

NAMES = ["a", "b", "c"]


def params(name: str, path: str) -> dict[str, str]:
    return {"serviceName": name, "servicePath": f"/{path}", "port": "80"}


# a change: (replica that originates it, op, service name, path)
changes = st.lists(st.tuples(st.integers(0, 2), st.sampled_from(["put", "del"]), st.sampled_from(NAMES),
                             st.sampled_from(["x", "y", "z"])), max_size=12)


def originate(origin: ServiceRegistry, op: str, name: str, path: str):
    stamp = origin.new_stamp()
    return (op, name, path, stamp)


def apply(reg: ServiceRegistry, change) -> None:
    op, name, path, stamp = change
    if op == "put":
        reg.reconfigure(params(name, path), stamp)
    else:
        reg.remove(name, stamp)


@settings(max_examples=150, deadline=None)
@given(changes, st.randoms(use_true_random=False))
def test_any_delivery_order_and_merges_converge(plan, rnd):
    regs = [ServiceRegistry() for _ in range(3)]
    stamped = []
    for origin, op, name, path in plan:
        change = originate(regs[origin], op, name, path)
        apply(regs[origin], change)  # the originating replica applies it at once
        stamped.append((origin, change))
    # every other replica gets every change, in its own shuffled order, some twice,
    # with merges of random peers' states interleaved
    for i, reg in enumerate(regs):
        deliveries = [c for o, c in stamped if o != i] * 2
        rnd.shuffle(deliveries)
        for change in deliveries:
            apply(reg, change)
            if rnd.random() < 0.2:
                reg.merge(regs[rnd.randrange(3)].export(), "peer")
    assert len({r.hash for r in regs}) == 1
    assert regs[0].export()["services"] == regs[1].export()["services"] == regs[2].export()["services"]
    assert [sorted(s.name for s in r.services()) for r in regs] == [sorted(s.name for s in regs[0].services())] * 3


def test_a_tombstone_beats_an_older_reconfigure_arriving_late():
    a, b = ServiceRegistry(), ServiceRegistry()
    old = a.new_stamp()
    a.reconfigure(params("svc", "p"), old)
    a.remove("svc")  # newer stamp
    tombstone = tuple(a.export()["services"]["svc"]["stamp"])
    b.remove("svc", tombstone)
    b.reconfigure(params("svc", "p"), old)  # the late duplicate
    assert b.get("svc") is None and a.hash == b.hash


def test_merge_adopts_only_newer_entries_and_keeps_revision_monotonic():
    a, b = ServiceRegistry(), ServiceRegistry()
    for n in range(5):
        a.reconfigure(params(f"s{n}", "p"))
    assert b.merge(a.export(), "a") == 5 and b.hash == a.hash and b.revision == a.revision
    before = b.revision
    assert b.merge(a.export(), "a") == 0 and b.revision == before  # nothing new: no publication
    b.reconfigure(params("s0", "q"))
    assert a.merge(b.export(), "b") == 1 and a.get("s0").destinations[0].paths == ("/q",)


def test_export_round_trips_through_json_and_certs_merge():
    a, b = ServiceRegistry(), ServiceRegistry()
    a.put_cert("example.com", "-----BEGIN CERTIFICATE-----\n...")
    a.reconfigure(params("svc", "p"))
    b.merge(orjson.loads(orjson.dumps(a.export())), "a")
    assert b.certs() == {"example.com": "-----BEGIN CERTIFICATE-----\n..."} and b.hash == a.hash
    assert a.remove_cert("example.com") and a.certs() == {}
    b.merge(a.export(), "a")
    assert b.certs() == {}


@pytest.mark.parametrize("mutate", [
    lambda d: d.update(hash="0" * 64),
    lambda d: d.update(format=99),
    lambda d: d.update(revision=-1),
    lambda d: d["services"].update(svc={"stamp": "nope", "value": None}),
    lambda d: d["services"]["svc"]["value"].append(["servicePath", "/changed"]),
], ids=["hash", "format", "revision", "stamp", "content-vs-hash"])
def test_malformed_documents_are_refused_whole(mutate):
    a, b = ServiceRegistry(), ServiceRegistry()
    a.reconfigure(params("svc", "p"))
    doc = orjson.loads(orjson.dumps(a.export()))
    mutate(doc)
    with pytest.raises(StateError):
        b.merge(doc, "peer")
    assert b.services() == () and b.revision == 0


def test_bad_stamp_parameter_is_a_400():
    from pyroute.controlplane.admin import Request, _stamp
    with pytest.raises(ServiceError) as exc:
        _stamp(Request("GET", "/x?pyrouteStamp=abc", b""))
    assert exc.value.status == 400
