"""Fuzz target: Puller change events through the event transformation and
the ingest step.

An input is a Puller message: up to four ``PullerEvent``s (heartbeats, or
``ChangeEvent``s with arbitrary bytes in ``full_doc``, ``before_doc`` and
``update_desc`` and arbitrary text everywhere else, ``op_type``
included), and a soft-delete field name. What must hold:

- ``normalize``, in both layouts, raises nothing but ``PoisonEvent``, and
  what it returns follows docs/semantics.md (an insert is an ``INSERT``, a
  delete a ``DELETE``, only an ``UPDATE`` keeps a pre-image, only a
  ``DELETE`` may lack a document);
- the compiled ingest step (``streamer/_ext/_ingest.pyx``) and the Python
  path (``Ingest(compiled=False)``) produce the same deliveries, gateways in
  the same order, and the same counters (as tests/test_ingest_step.py
  compares them), over a matcher holding subscriptions of three gateways;
- in both layouts, each event's deliveries are what docs/semantics.md says,
  worked out independently of the index: ``normalize``'s operation and
  document matched by ``ReferenceMatcher`` (twice for enter/leave; a change
  without a document reaches only id and whole-collection subscriptions),
  one delivery per gateway and operation, each carrying the event's id,
  names, ``document_data``, timestamp and marker;
- ``process_batch`` never raises, in either layout.

    python fuzz/fuzz_events.py [libFuzzer options] CORPUS_DIR...
"""

from __future__ import annotations

import asyncio
import logging
import tempfile
import time
from pathlib import Path
from typing import Any

import atheris
from common import blob, main, pick, text

with atheris.instrument_imports(include=["streamer"]):
    from streamer.matching import Filter, Matcher
    from streamer.matching.reference import ReferenceMatcher
    from streamer.node.events import LAYOUTS, Layout, Op, PoisonEvent, normalize
    from streamer.node.ingest import Ingest
    from streamer.node.progress import ProgressStore
    from streamer.node.server import StreamerServicer
    from streamer.node.sessions import Sessions
    from streamer.node.subscriptions import SubscriptionSet
    from streamer.protocol import puller_v1_pb2 as pb
    from streamer.protocol.streamer_v1_pb2 import Filter as PbFilter
    from streamer.protocol.streamer_v1_pb2 import StreamerMessage, SubscribeRequest, Value

MAX_EVENTS = 4
DOCUMENT_LIMIT = 4096
TEXT_LIMIT = 32
DATABASES = ("app",)
COLLECTIONS = ("messages", "users")
DOCUMENT_IDS = ("d1", "d2", "42", "")
OP_TYPES = ("insert", "update", "replace", "delete")
SOFT_DELETE_FIELDS = ("deleted",)
INT64 = (-(2**63), 2**63 - 1)


def decode(data: bytes) -> tuple[str, list[pb.PullerEvent]]:
    """The soft-delete field and the Puller message an input stands for."""
    fdp = atheris.FuzzedDataProvider(data)
    soft_delete_field = pick(fdp, SOFT_DELETE_FIELDS, lambda: text(fdp, TEXT_LIMIT))
    events = []
    for _ in range(fdp.ConsumeIntInRange(1, MAX_EVENTS)):
        heartbeat = fdp.ConsumeIntInRange(0, 1) == 0
        progress = text(fdp, TEXT_LIMIT)
        if heartbeat:
            events.append(pb.PullerEvent(progress=progress))
            continue
        change = pb.ChangeEvent(
            event_id=text(fdp, TEXT_LIMIT),
            database=pick(fdp, DATABASES, lambda: text(fdp, TEXT_LIMIT)),
            mgo_coll=pick(fdp, COLLECTIONS, lambda: text(fdp, TEXT_LIMIT)),
            mgo_doc_id=pick(fdp, DOCUMENT_IDS, lambda: text(fdp, TEXT_LIMIT)),
            op_type=pick(fdp, OP_TYPES, lambda: text(fdp, TEXT_LIMIT)),
            full_doc=blob(fdp, DOCUMENT_LIMIT),
            before_doc=blob(fdp, DOCUMENT_LIMIT),
            update_desc=blob(fdp, DOCUMENT_LIMIT),
            timestamp=fdp.ConsumeIntInRange(*INT64),
        )
        events.append(pb.PullerEvent(change_event=change, progress=progress))
    return soft_delete_field, events


def check_normalize(event: pb.ChangeEvent, soft_delete_field: str) -> None:
    for layout in LAYOUTS:
        try:
            change = normalize(event, layout=layout, soft_delete_field=soft_delete_field)
        except PoisonEvent:
            continue
        where = f"{layout} layout, {event!r}: {change!r}"
        assert isinstance(change.op, Op), where
        assert event.op_type != "insert" or change.op is Op.INSERT, where
        assert event.op_type != "delete" or change.op is Op.DELETE, where
        assert change.before is None or change.op is Op.UPDATE, where
        assert change.document is not None or change.op is Op.DELETE, where
        assert isinstance(change.document_data, bytes), where
        assert (change.document is None) == (change.document_data == b""), where


def proto_value(v: object) -> Value:
    if isinstance(v, list):
        return Value(list_value={"values": [proto_value(item) for item in v]})
    kind = {bool: "bool_value", int: "int_value", str: "string_value"}[type(v)]
    return Value(**{kind: v})


# By gateway: (collection, filters, expression, whether a change without a
# document reaches it). Indexed, id, scan and whole-collection
# subscriptions, so every kind of posting the fan-out walks is there.
Subscription = tuple[str, tuple[tuple[str, str, object], ...], str, bool]
SUBSCRIPTIONS: tuple[tuple[Subscription, ...], ...] = (
    (
        ("messages", (("chat", "==", "c1"),), "", False),
        ("messages", (("_id", "==", "d1"),), "", True),
        ("messages", (), "doc.n > 2 || 'x' in doc.tags", False),
    ),
    (
        ("messages", (("chat", "==", "c1"),), "", False),
        ("messages", (("deleted", "==", True),), "", False),
        ("users", (), "", True),
    ),
    (
        ("messages", (), "", True),
        ("messages", (), "doc.text.contains('a') && !has(doc.deleted)", False),
        ("users", (("_id", "in", ["d2", 42]),), "", True),
    ),
)


def registry() -> tuple[Sessions, ReferenceMatcher, dict[str, int], set[str]]:
    """The sessions holding ``SUBSCRIPTIONS``; the reference matcher holding
    them too; the owner of each; those a change without a document reaches."""
    sessions, reference = Sessions(SubscriptionSet(Matcher())), ReferenceMatcher()
    owners: dict[str, int] = {}
    documentless: set[str] = set()
    for gateway in SUBSCRIPTIONS:
        owner = sessions.connect().owner
        for n, (collection, filters, expression, without_document) in enumerate(gateway):
            sub_id = f"g{owner}-{n}"
            response = sessions.subscriptions.subscribe(owner, SubscribeRequest(
                subscription_id=sub_id, database="app", collection=collection,
                filters=[PbFilter(field=f, op=op, value=proto_value(v)) for f, op, v in filters],
                expression=expression,
            ))
            assert response.success, response
            reference.add(sub_id, "app", collection, expression=expression or None,
                          filters=[Filter(*f) for f in filters], owner=owner)
            owners[sub_id] = owner
            if without_document:
                documentless.add(sub_id)
    return sessions, reference, owners, documentless


Deliveries = dict[int, set[tuple[int, frozenset[str]]]]


def expected_deliveries(
    event: pb.PullerEvent, layout: Layout, soft_delete_field: str
) -> Deliveries:
    """What docs/semantics.md says one event delivers, by the reference
    matcher: (operation, subscription ids) by gateway owner."""
    try:
        change = normalize(event.change_event, layout=layout, soft_delete_field=soft_delete_field)
    except PoisonEvent:
        return {}
    where = (change.database, change.collection, change.document_id)
    if change.op is Op.UPDATE and change.before is not None:
        after = set(REFERENCE.match(*where, change.document))
        before = set(REFERENCE.match(*where, change.before))
        groups = {Op.UPDATE: after & before, Op.INSERT: after - before, Op.DELETE: before - after}
    elif change.document is None:
        groups = {change.op: set(REFERENCE.match(*where, {})) & DOCUMENTLESS}
    else:
        groups = {change.op: set(REFERENCE.match(*where, change.document))}
    out: Deliveries = {}
    for op, ids in groups.items():
        for owner in {OWNERS[i] for i in ids}:
            mine = frozenset(i for i in ids if OWNERS[i] == owner)
            out.setdefault(owner, set()).add((op.value, mine))
    return out


def delivered(
    event: pb.PullerEvent, layout: Layout, soft_delete_field: str,
    pending: dict[int, list[bytes]],
) -> Deliveries:
    """The deliveries ``pending`` holds for one event, each checked against
    the event it must carry."""
    out: Deliveries = {}
    ce = event.change_event
    try:
        change = normalize(ce, layout=layout, soft_delete_field=soft_delete_field)
    except PoisonEvent:
        change = None
    for owner, messages in pending.items():
        for message in messages:
            delivery = StreamerMessage.FromString(message).delivery
            sent, ids = delivery.event, frozenset(delivery.subscription_ids)
            assert change is not None, f"{event!r} is poison, yet delivered {delivery!r}"
            assert len(ids) == len(delivery.subscription_ids), delivery
            assert all(OWNERS[i] == owner for i in ids), (owner, delivery)
            assert (sent.event_id, sent.database, sent.collection, sent.document_id,
                    sent.document_data, sent.timestamp, sent.progress) == (
                ce.event_id, change.database, change.collection, change.document_id,
                change.document_data, ce.timestamp, event.progress), (change, delivery)
            out.setdefault(owner, set()).add((sent.operation, ids))
    return out


def counters(ingest: Ingest) -> tuple[Any, ...]:
    return ingest.events, ingest.delivered, ingest.poison, ingest.matches


STATE = tempfile.mkdtemp(prefix="streamer-fuzz-events-")
SESSIONS, REFERENCE, OWNERS, DOCUMENTLESS = registry()
SERVICER = StreamerServicer(SESSIONS)


def ingest(layout: Layout, soft_delete_field: str, compiled: bool) -> Ingest:
    return Ingest(
        "unused", SESSIONS, SERVICER, ProgressStore(Path(STATE)),
        layout=layout, soft_delete_field=soft_delete_field, compiled=compiled,
    )


async def check_ingest(soft_delete_field: str, events: list[pb.PullerEvent]) -> None:
    # The marker store needs a running loop, as in the service.
    fast = ingest("plain", soft_delete_field, compiled=True)
    reference = ingest("plain", soft_delete_field, compiled=False)
    got, expected = fast.match_batch(events), reference.match_batch(events)
    assert got == expected, (got, expected)
    assert list(got[0]) == list(expected[0]), "gateways in another order"
    assert counters(fast) == counters(reference), (counters(fast), counters(reference))
    for event in events:
        if not event.HasField("change_event"):
            continue
        for layout in LAYOUTS:
            # One event at a time: a delivery does not say which event of
            # the batch it belongs to.
            pending, _ = ingest(layout, soft_delete_field, compiled=False).match_batch([event])
            got = delivered(event, layout, soft_delete_field, pending)
            want = expected_deliveries(event, layout, soft_delete_field)
            assert got == want, f"{layout} layout, {event!r}: delivered {got}, expected {want}"
    received = time.perf_counter()
    for each in (fast, reference, ingest("syntrix", soft_delete_field, compiled=True)):
        each.process_batch(events, received)
    assert counters(fast) == counters(reference), (counters(fast), counters(reference))


LOOP = asyncio.new_event_loop()


def test_one_input(data: bytes) -> None:
    soft_delete_field, events = decode(data)
    for event in events:
        if event.HasField("change_event"):
            check_normalize(event.change_event, soft_delete_field)
    LOOP.run_until_complete(check_ingest(soft_delete_field, events))


if __name__ == "__main__":
    # Poison events are logged one by one; at fuzzing rates that is noise.
    logging.disable(logging.CRITICAL)
    main(test_one_input)
