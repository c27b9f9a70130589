"""The compiled registration (``streamer/_ext/_subscribe.pyx``) against the
Python path it short-cuts (``SubscriptionSet(compiled=False)``): the same
answers, byte for byte, the same index and the same books, for any
sequence of batches, well-formed or not, within limits or past them, read
from protobuf's objects or from the bytes they came in, plainly encoded or
not."""

from __future__ import annotations

import math
import struct
import uuid
from typing import Any
from unittest import mock

from google.protobuf.message import DecodeError
from hypothesis import given
from hypothesis import strategies as st

from streamer._ext._subscribe import batch_requests, batch_response, response_entry
from streamer.matching import Matcher
from streamer.node import subscriptions as subscriptions_module
from streamer.node.subscriptions import Limits, SubscriptionSet
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    ListValue,
    StreamerMessage,
    SubscribeBatch,
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


def field(number: int, body: bytes) -> bytes:
    """A length-delimited field (bodies here are under 128 bytes)."""
    assert len(body) < 128
    return bytes((number << 3 | 2, len(body))) + body


def chat_filter(value: bytes) -> bytes:
    return field(3, field(1, b"chat") + field(2, b"==") + field(3, value))


# Fields added to a request's encoding: what protobuf reads its own way (a
# field twice, an unknown one, empty strings written out, a value with two
# members or a list in a list, non-minimal varints, every scalar's wire type).
odd_fields = st.sampled_from([
    field(1, b"s2"), field(5, b""), field(2, b"users"), field(4, b""), b"\x48\x01",
    b"\x0a\x80\x00", chat_filter(field(1, b"c1")), chat_filter(b"\x10\x85\x80\x00"),
    chat_filter(b"\x20\x02"), chat_filter(b"\x19" + struct.pack("<d", 1.5)),
    chat_filter(field(1, b"a") + b"\x10\x01"), chat_filter(field(5, field(1, field(1, b"")))),
    chat_filter(field(5, field(1, field(5, b"")))), chat_filter(b""),
    field(3, field(1, b"_id") + field(2, b"in") + field(3, field(5, field(1, b"\x10\x07")))),
    field(3, field(2, b"==") + field(1, b"n") + field(3, b"\x10\xff\xff\xff\xff\xff"
                                                        b"\xff\xff\xff\xff\x01")),
])
encodings = st.tuples(requests, st.lists(odd_fields, max_size=3), st.booleans()).map(
    lambda t: t[0].SerializeToString() + b"".join(t[1]) if t[2]
    else b"".join(t[1]) + t[0].SerializeToString())


def registered(
    compiled: bool, script: list[tuple[Any, ...]], wire: bool = False
) -> tuple[Any, ...]:
    """Run ``script`` on a fresh set (the compiled path reading the batches'
    bytes if ``wire``); everything the two paths must agree on."""
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
                encoded = batch_requests(GatewayMessage(
                    subscribe_batch=SubscribeBatch(requests=what)).SerializeToString())
                answers += subs.subscribe_batch(owner, what, encoded if wire else None)
            elif kind == "encoded":
                answers += subs.subscribe_batch(
                    owner, [SubscribeRequest.FromString(raw) for raw in what],
                    list(what) if wire else None)
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
    reference = registered(False, script)
    assert registered(True, script) == reference
    assert registered(True, script, wire=True) == reference


def parses(raw: bytes) -> bool:
    try:
        SubscribeRequest.FromString(raw)
    except DecodeError:
        return False
    return True


@given(st.lists(st.tuples(st.integers(1, 2), st.lists(encodings.filter(parses), max_size=5)),
                max_size=4))
def test_requests_read_from_their_bytes_as_protobuf_reads_them(
    batches: list[tuple[int, list[bytes]]],
) -> None:
    script = [("encoded", owner, raws) for owner, raws in batches]
    assert registered(True, script, wire=True) == registered(False, script)


def test_only_a_plain_subscribe_batch_is_split_into_its_requests() -> None:
    batch = [SubscribeRequest(subscription_id=f"s{i}", collection="c") for i in range(3)]
    raw = GatewayMessage(subscribe_batch=SubscribeBatch(requests=batch)).SerializeToString()
    assert batch_requests(raw) == [r.SerializeToString() for r in batch]
    assert batch_requests(GatewayMessage(subscribe_batch=SubscribeBatch()).SerializeToString()
                          ) == []
    for other in (raw + raw, raw + b"\x48\x01", raw[:-1], b"",
                  GatewayMessage(subscribe=batch[0]).SerializeToString()):
        assert batch_requests(other) is None


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
