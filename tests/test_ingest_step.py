"""The compiled ingest step (``streamer/_ext/_ingest.pyx``) against the
Python path it short-cuts: the same deliveries, in the same order, and the
same counters, for any sequence of Puller events, well-formed or not."""

from __future__ import annotations

import sys
import tempfile
from functools import partial
from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st
from reentry import BUSY, Reentry

from streamer._ext._ingest import Step
from streamer.errors import IndexBusy
from streamer.matching import Filter, Matcher
from streamer.node.ingest import Ingest, Matching
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb

STATE = tempfile.mkdtemp(prefix="streamer-test-ingest-step-")


def registry(ids: list[str] | None = None) -> Sessions:
    matcher = Matcher()
    subs: list[tuple[list[Filter], int]] = [
        ([Filter("chat", "==", "c1")], 0),
        ([Filter("chat", "==", "c1")], 1),
        ([Filter("chat", "==", "c2")], 70_000),
        ([Filter("_id", "==", "d1")], 1),
        ([Filter("deleted", "==", True)], 2),
        ([], 2),
    ]
    for n, (filters, owner) in enumerate(subs):
        matcher.add(f"s{n}" if ids is None else ids[n], "app", "messages", filters=filters,
                    owner=owner)
    return Sessions(SubscriptionSet(matcher))


REGISTRY = registry()


def ingest(compiled: bool, registry: Sessions = REGISTRY) -> Ingest:
    return Ingest("unused", registry, StreamerServicer(registry), ProgressStore(STATE),
                  compiled=compiled)


def json(value: Any) -> bytes:
    return orjson.dumps(value)


documents = st.one_of(
    st.just(b""),
    st.builds(
        lambda chat, deleted: json({"chat": chat, **deleted}),
        st.sampled_from(["c1", "c2", "c3"]),
        st.sampled_from([{}, {"deleted": True}, {"deleted": False}, {"deleted": 1}]),
    ),
    st.sampled_from([b"{not json", json([1, 2]), json("text"), b"\xff"]),
)
change_events = st.builds(
    pb.ChangeEvent,
    event_id=st.sampled_from(["e1", "e2", "é"]),
    database=st.just("app"),
    mgo_coll=st.sampled_from(["messages", "other"]),
    mgo_doc_id=st.sampled_from(["d1", "d2", ""]),
    op_type=st.sampled_from(["insert", "update", "replace", "delete", "drop"]),
    full_doc=documents,
    before_doc=st.one_of(st.just(b""), documents),
    update_desc=st.sampled_from(
        [b"", json({"updatedFields": {"deleted": False}}), json({"updatedFields": {}}), b"[",
         json([])]),
    timestamp=st.integers(-(2**63), 2**63 - 1),
)
puller_events = st.one_of(
    st.builds(lambda e, p: pb.PullerEvent(change_event=e, progress=p), change_events,
              st.sampled_from(["v1:x:1", ""])),
    st.builds(lambda p: pb.PullerEvent(progress=p), st.sampled_from(["v1:x:2"])),
)


def counters(i: Matching) -> tuple[Any, ...]:
    # Counters: a count of zero equals a missing key (the metrics export both as 0).
    return i.events, i.delivered, i.poison, i.matches


@given(st.lists(st.lists(puller_events, max_size=8), max_size=4))
def test_the_compiled_step_equals_the_python_path(messages: list[list[pb.PullerEvent]]) -> None:
    fast, reference = ingest(compiled=True), ingest(compiled=False)
    for events in messages:
        got, expected = fast.match_batch(events), reference.match_batch(events)
        assert got == expected
        assert list(got[0]) == list(expected[0])  # gateways in the same order
    assert counters(fast) == counters(reference)


def test_the_common_case_takes_the_compiled_step() -> None:
    # Counted by the step, not by the Python path's counters directly: a
    # plain insert never reaches ``_process_one``.
    fast = ingest(compiled=True)
    calls: list[pb.PullerEvent] = []

    def slow(event: pb.PullerEvent, pending: dict[int, list[bytes]]) -> bool:
        calls.append(event)
        return False

    fast._process_one = slow  # type: ignore[method-assign]
    event = pb.PullerEvent(progress="v1:x:1", change_event=pb.ChangeEvent(
        event_id="e", database="app", mgo_coll="messages", mgo_doc_id="d1",
        op_type="insert", full_doc=json({"chat": "c1"})))
    pending, changes = fast.match_batch([event])
    assert changes == 1 and calls == []
    assert sorted(pending) == [0, 1, 2]
    assert fast.events["INSERT"] == 1 and fast.matches == 4


@pytest.mark.parametrize("compiled", [True, False])
def test_events_of_a_collection_without_subscriptions_are_not_decoded(compiled: bool) -> None:
    # Not decoded at all: a document that would be poison is only counted
    # as unwatched, and still a change (its marker counts as one).
    step = ingest(compiled=compiled)
    events = [pb.PullerEvent(progress=f"v1:x:{n}", change_event=pb.ChangeEvent(
        event_id=f"e{n}", database=db, mgo_coll=coll, mgo_doc_id="d1", op_type="insert",
        full_doc=doc)) for n, (db, coll, doc) in enumerate([
            ("app", "other", b"{not json"), ("other", "messages", json({"chat": "c1"})),
            ("app", "messages", json({"chat": "c1"}))])]
    pending, changes = step.match_batch(events)
    assert changes == 3 and sorted(pending) == [0, 1, 2]
    assert (step.events["unwatched"], step.events["INSERT"], sum(step.poison.values())) == (
        2, 1, 0)


def test_the_syntrix_layout_always_takes_the_python_path() -> None:
    # The step knows only the plain layout (its document id is mgo_doc_id,
    # its document full_doc as is); a Syntrix stored document that looks
    # like a plain common case must still be flattened by ``normalize``.
    syntrix = Ingest("unused", REGISTRY, StreamerServicer(REGISTRY), ProgressStore(STATE),
                     layout="syntrix", compiled=True)
    calls: list[pb.PullerEvent] = []

    def slow(event: pb.PullerEvent, pending: dict[int, list[bytes]]) -> bool:
        calls.append(event)
        return True

    syntrix._process_one = slow  # type: ignore[method-assign]
    event = pb.PullerEvent(progress="v1:x:1", change_event=pb.ChangeEvent(
        event_id="e", database="app", mgo_coll="messages", mgo_doc_id="db:hash",
        op_type="update", full_doc=json({"id": "db:hash", "data": {}, "deleted": True})))
    assert syntrix.match_batch([event]) == ({}, 1)
    assert calls == [event]


def test_no_step_exists_without_an_index() -> None:
    # The step calls the fan-out's C entry point with its index unchecked:
    # a Step made without its arguments would hand it None.
    with pytest.raises(TypeError):
        Step.__new__(Step)  # type: ignore[call-arg]
    with pytest.raises(TypeError):
        Step(None, print, "deleted", 1)  # type: ignore[arg-type]


def test_a_finalizer_matching_during_the_compiled_step_gets_index_busy() -> None:
    # The step fans each event out through the index; a finalizer the GC
    # runs inside that fan-out must not use the index (IndexBusy), one that
    # runs between events may. Either way, the same deliveries and counts.
    ids = [f"sub-{n}" for n in range(6)]
    fast = ingest(compiled=True, registry=registry(ids))
    reference = ingest(compiled=False, registry=registry(ids))
    matcher = fast.matcher
    reentry = Reentry(lambda: matcher.match("app", "messages", "d1", {"chat": "c1"}))
    events = [
        pb.PullerEvent(progress=f"v1:x:{n}", change_event=pb.ChangeEvent(
            event_id=f"e{n}", database="app", mgo_coll="messages", mgo_doc_id=f"d{n % 3}",
            op_type=op, full_doc=json({"chat": f"c{n % 3}", "deleted": n % 4 == 0})))
        for n, op in enumerate(["insert", "update", "replace", "insert"] * 3)
    ]
    refcounts = [sys.getrefcount(sub_id) for sub_id in ids]
    for _ in range(10):
        assert reentry.during(partial(fast.match_batch, events)) == reference.match_batch(events)
        assert [sys.getrefcount(sub_id) for sub_id in ids] == refcounts
    assert counters(fast) == counters(reference)
    assert (IndexBusy, BUSY) in reentry.errors
    assert set(reentry.errors) == set(reentry.unraisable) == {(IndexBusy, BUSY)}


@given(st.lists(st.lists(puller_events, max_size=8), max_size=4))
def test_a_matching_over_another_matcher_does_what_ingest_does(
    messages: list[list[pb.PullerEvent]],
) -> None:
    # A catch-up group's Matching over its own matcher holding the same
    # subscriptions: the same deliveries and counters as the live ingest.
    live = ingest(compiled=True)
    group = Matching(registry().subscriptions.matcher)
    for events in messages:
        assert group.match_batch(events) == live.match_batch(events)
    assert counters(group) == counters(live)
