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
    from streamer.matching import Matcher
    from streamer.node.events import LAYOUTS, Layout, Op, PoisonEvent, normalize
    from streamer.node.ingest import Ingest
    from streamer.node.progress import ProgressStore
    from streamer.node.server import StreamerServicer
    from streamer.node.sessions import Sessions
    from streamer.node.subscriptions import SubscriptionSet
    from streamer.protocol import puller_v1_pb2 as pb
    from streamer.protocol.streamer_v1_pb2 import Filter, SubscribeRequest, Value

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


def value(kind: str, v: object) -> Value:
    return Value(**{kind: v})


# (collection, filters, expression), by gateway: indexed, id, range, scan and
# whole-collection subscriptions, so every kind of posting the step's fan-out
# walks is there.
SUBSCRIPTIONS: tuple[tuple[tuple[str, tuple[Filter, ...], str], ...], ...] = (
    (
        ("messages", (Filter(field="chat", op="==", value=value("string_value", "c1")),), ""),
        ("messages", (Filter(field="_id", op="==", value=value("string_value", "d1")),), ""),
        ("messages", (), "doc.n > 2 || 'x' in doc.tags"),
    ),
    (
        ("messages", (Filter(field="chat", op="==", value=value("string_value", "c1")),), ""),
        ("messages", (Filter(field="deleted", op="==", value=value("bool_value", True)),), ""),
        ("users", (), ""),
    ),
    (
        ("messages", (), ""),
        ("messages", (), "doc.text.contains('a') && !has(doc.deleted)"),
        ("users", (Filter(field="_id", op="in", value=Value(list_value={"values": [
            value("string_value", "d2"), value("int_value", 42)]})),), ""),
    ),
)


def registry() -> Sessions:
    sessions = Sessions(SubscriptionSet(Matcher()))
    for gateway in SUBSCRIPTIONS:
        owner = sessions.connect().owner
        for n, (collection, filters, expression) in enumerate(gateway):
            response = sessions.subscriptions.subscribe(owner, SubscribeRequest(
                subscription_id=f"g{owner}-{n}", database="app", collection=collection,
                filters=filters, expression=expression,
            ))
            assert response.success, response
    return sessions


def counters(ingest: Ingest) -> tuple[Any, ...]:
    return ingest.events, ingest.delivered, ingest.poison, ingest.matches


STATE = tempfile.mkdtemp(prefix="streamer-fuzz-events-")
SESSIONS = registry()
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
