"""The compiled registration (``streamer/_ext/_subscribe.pyx``) against the
Python path it short-cuts (``SubscriptionSet(compiled=False)``): the same
answers, byte for byte, the same index and the same books, for any
sequence of batches, well-formed or not, within limits or past them."""

from __future__ import annotations

import math
import uuid
from typing import Any
from unittest import mock

from hypothesis import given
from hypothesis import strategies as st

from streamer._ext._subscribe import batch_response, response_entry
from streamer.matching import Matcher
from streamer.node import subscriptions as subscriptions_module
from streamer.node.subscriptions import Limits, SubscriptionSet
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    ListValue,
    StreamerMessage,
    SubscribeRequest,
    SubscribeResponse,
    Value,
)

# Small, so that every limit is met and passed in a few requests.
LIMITS = Limits(
    max_subscriptions=6, max_filters=3, max_expression_length=40, max_request_bytes=120,
    max_list_values=5, max_scan_clauses=2, max_node_scan_clauses=3, max_gateway_bytes=500,
    max_node_bytes=800,
)

scalars = st.one_of(
    st.text(alphabet="abc_1.", max_size=3).map(lambda s: Value(string_value=s)),
    st.sampled_from([0, 1, -1, 2**53, 2**53 + 1, 2**63 - 1, -(2**63)]).map(
        lambda n: Value(int_value=n)),
    st.sampled_from([0.0, 1.0, -0.0, 0.5, 2.0**53, math.inf, math.nan]).map(
        lambda x: Value(double_value=x)),
    st.booleans().map(lambda b: Value(bool_value=b)),
    st.just(Value()),
)
values = st.one_of(
    scalars,
    st.lists(st.one_of(scalars, st.lists(scalars, max_size=2).map(
        lambda vs: Value(list_value=ListValue(values=vs)))), max_size=4).map(
        lambda vs: Value(list_value=ListValue(values=vs))),
)
filters = st.builds(
    Filter,
    field=st.sampled_from(["chat", "n", "a.b", "_id", "", "a..b", "tags", "brand-new"]),
    op=st.sampled_from(["==", "eq", "!=", "<", ">=", "gt", "in", "contains", "~=", ""]),
    value=values,
)
requests = st.builds(
    SubscribeRequest,
    subscription_id=st.sampled_from(["", "s1", "s2", "s3", "s4", "taken"]),
    database=st.sampled_from(["app", ""]),
    collection=st.sampled_from(["messages", "users"]),
    filters=st.lists(filters, max_size=4),
    expression=st.sampled_from([
        "", "doc.n > 1", "doc.chat == 'c1' && doc.n >= 3", "doc.chat ==", "true", "false",
        "doc.n != 2", "doc.a == 1 || doc.b == 2", "doc.t.startsWith('a')",
        "doc.chat in ['a', 'b', 'c', 'd', 'e', 'f', 'g', 'h']",
    ]),
    resume_after=st.sampled_from(["", "p1"]),
)
# Per step: register a batch for an owner, or remove one of its subscriptions.
steps = st.lists(st.one_of(
    st.tuples(st.just("batch"), st.integers(1, 2), st.lists(requests, max_size=6)),
    st.tuples(st.just("unsubscribe"), st.integers(1, 2),
              st.sampled_from(["s1", "s2", "s3", "taken"])),
), max_size=6)
documents = [
    {"chat": "c1", "n": 3, "a": {"b": "a"}, "_id": "1", "tags": ["a"], "t": "ab"},
    {"chat": "a", "n": 2**53, "a": 1, "b": 2, "brand-new": True},
    {"n": 0.5, "chat": "", "_id": "s1"},
]


def registered(compiled: bool, script: list[tuple[Any, ...]]) -> tuple[Any, ...]:
    """Run ``script`` on a fresh set; everything the two paths must agree on."""
    matcher = Matcher()
    # An id the index holds outside the set's books.
    matcher.add("taken", "app", "messages")
    subs = SubscriptionSet(matcher, LIMITS, compiled=compiled)
    drawn = iter(range(1000))
    answers: list[bytes] = []
    with mock.patch.object(subscriptions_module.uuid, "uuid4",
                           lambda: uuid.UUID(int=next(drawn))):
        for kind, owner, what in script:
            if kind == "batch":
                answers += subs.subscribe_batch(owner, what)
            else:
                subs.unsubscribe(owner, what)
    matches = [sorted(matcher.match(db, coll, doc.get("_id"), doc))  # type: ignore[arg-type]
               for doc in documents for db in ("app", "") for coll in ("messages", "users")]
    books = (subs._held, subs._owned, subs._bytes, subs.bytes, subs._scan, subs._scan_of,
             subs.scan_clauses)
    return answers, matcher.stats(), matches, books


@given(steps)
def test_the_compiled_registration_does_what_the_python_path_does(
    script: list[tuple[Any, ...]],
) -> None:
    assert registered(True, script) == registered(False, script)


@given(st.lists(requests, max_size=6))
def test_the_answers_are_the_protobuf_encoding_in_order(batch: list[SubscribeRequest]) -> None:
    subs = SubscriptionSet(Matcher(), LIMITS)
    message = StreamerMessage.FromString(batch_response(subs.subscribe_batch(1, batch)))
    responses = list(message.subscribe_batch_response.responses)
    assert len(responses) == len(batch)
    for request, response in zip(batch, responses, strict=True):
        assert response.subscription_id == request.subscription_id or not request.subscription_id


def test_an_accepted_answer_is_what_protobuf_writes() -> None:
    def request(sub_id: str) -> SubscribeRequest:
        return SubscribeRequest(subscription_id=sub_id, collection="c", filters=[
            Filter(field="k", op="==", value=Value(int_value=1))])

    for sub_id in ("s", "é" * 70, "x" * 200):
        subs = SubscriptionSet(Matcher())
        subs.subscribe_batch(3, [request("first")])  # "k" is a known field from now on
        [entry] = subs.subscribe_batch(3, [request(sub_id)])
        expected = SubscribeResponse(subscription_id=sub_id, success=True).SerializeToString()
        assert entry == response_entry(expected)
        assert batch_response([entry]) == StreamerMessage(
            subscribe_batch_response={"responses": [{"subscription_id": sub_id, "success": True}]}
        ).SerializeToString()
