"""Fuzz target: gateway messages through the session logic.

An input is a script for three gateway streams: steps that each send
arbitrary bytes on one stream, close one (the gateway goes away), let time
pass (the session TTL), or match a document. The bytes are decoded as a ``GatewayMessage``
and handled with the calls ``streamer/node/server.py``'s ``_read`` and
``_hello`` make on ``Sessions``, the ``SubscriptionSet`` and the stream's
``GatewayQueue``; what the server answers with a gRPC status (a message
that does not decode: ``INVALID_ARGUMENT``; a Hello for a gateway id held
by another process: ``ALREADY_EXISTS``; a full queue:
``RESOURCE_EXHAUSTED``; a newer stream of the same gateway: ``ABORTED``;
expiry: ``DEADLINE_EXCEEDED``) ends that stream here too, and the gateway
reconnects. Nothing else may raise.

After every step: every subscribe got one well-formed answer, never a
success for an id that is live (ids are global); an unsubscribe removed
exactly the stream's own subscription; a Hello was refused only for an id
that a live stream of another gateway process holds, and replaced exactly
the same gateway's older streams; the subscriptions are those a model of
docs/protocol.md says each stream holds, and exactly those in the index;
each session's owner number maps back to it. A match step matches a
document (JSON, or a value JSON cannot spell) in the collection of one of
the live subscriptions: the index, churned by every subscribe, unsubscribe
and departure before it, gives the (id, owner) pairs ``ReferenceMatcher``
gives for the same subscriptions. A subscribe refused as
``invalid_argument`` is refused by the reference too; one accepted is
accepted by it. After every stream ends: no
session, no subscription, and an index whose tables are all empty.

    python fuzz/fuzz_gateway.py [libFuzzer options] CORPUS_DIR...
"""

from __future__ import annotations

import logging
from array import array

import atheris
from common import blob, document, main, pick, text
from google.protobuf.message import DecodeError

from streamer._ext._subscribe import batch_requests, batch_response

with atheris.instrument_imports(include=["streamer"]):
    from streamer.errors import InvalidSubscription
    from streamer.matching import Filter, Matcher
    from streamer.matching.reference import ReferenceMatcher
    from streamer.node.delivery import GatewayQueue
    from streamer.node.sessions import (
        IdentityTaken,
        KnownGateways,
        RestartWindow,
        Session,
        Sessions,
        proof_of,
    )
    from streamer.node.subscriptions import (
        ALREADY_EXISTS,
        INVALID_ARGUMENT,
        RESOURCE_EXHAUSTED,
        Limits,
        SubscriptionSet,
    )
    from streamer.protocol.streamer_v1_pb2 import (
        GatewayMessage,
        HeartbeatAck,
        StreamerMessage,
        SubscribeRequest,
        SubscribeResponse,
        Value,
    )

STREAMS = 3
MESSAGE_LIMIT = 2048
SESSION_TTL = 90
# Small enough that a few kilobytes of input reach every limit (and far
# below RECLAIM_CHUNK, so a departed gateway's subscriptions leave the
# index at once and the invariants can be checked after every step).
LIMITS = Limits(
    max_subscriptions=12, max_filters=4, max_expression_length=256, max_request_bytes=1024,
    max_list_values=16, max_scan_clauses=3, max_node_scan_clauses=5,
)
QUEUE_CAPACITY = 24
QUEUE_BYTES = 8192
CODES = {INVALID_ARGUMENT, ALREADY_EXISTS, RESOURCE_EXHAUSTED}
# What the node knew before a restart: one gateway with its Hello proof.
KNOWN = KnownGateways(frozenset({"gw-1"}), 1, frozenset({("gw-1", proof_of("instance-1"))}))

MESSAGE, CLOSE, WAIT, MATCH = 0, 1, 2, 3
DOCUMENT_LIMIT = 1024
DOCUMENT_IDS = (None, "d1", "42")


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


async def _unsent(message: bytes) -> None:
    raise AssertionError("nothing drains the queues here")


class Stream:
    """One gateway stream: its session and outbound queue."""

    def __init__(self, sessions: Sessions) -> None:
        self.session = sessions.connect()
        self.queue = GatewayQueue(_unsent, capacity=QUEUE_CAPACITY, max_bytes=QUEUE_BYTES)


class Gateways:
    def __init__(self) -> None:
        self.clock = Clock()
        self.matcher = Matcher()
        self.subscriptions = SubscriptionSet(self.matcher, LIMITS)
        self.sessions = Sessions(self.subscriptions, session_ttl=SESSION_TTL, clock=self.clock)
        self.sessions.window = RestartWindow(KNOWN)
        self.streams = [Stream(self.sessions) for _ in range(STREAMS)]
        # The protocol's model of who holds which subscription
        # (docs/protocol.md, Subscribing and Unsubscribing), and the same
        # subscriptions in the reference matcher.
        self.model: dict[str, Session] = {}
        self.reference = ReferenceMatcher()
        self.where: dict[str, tuple[str, str]] = {}

    def end(self, session: Session) -> None:
        """A stream ended (with a status, or by the gateway): the server's
        handler disconnects its session; the gateway connects again."""
        for index, stream in enumerate(self.streams):
            if stream.session is session:
                stream.queue.discard()
                self.sessions.disconnect(session)
                self.streams[index] = Stream(self.sessions)
        for sub_id in [i for i, s in self.model.items() if s is session]:
            del self.model[sub_id]
            self.reference.remove(sub_id)

    def send(self, stream: Stream, message: StreamerMessage) -> None:
        if not stream.queue.offer(message.SerializeToString()) and not stream.queue.closed:
            self.end(stream.session)  # cut off: RESOURCE_EXHAUSTED

    def receive(self, stream: Stream, raw: bytes) -> None:
        sessions, subscriptions, session = self.sessions, self.subscriptions, stream.session
        try:
            message = GatewayMessage.FromString(raw)
        except DecodeError:
            self.end(session)  # INVALID_ARGUMENT
            return
        kind = message.WhichOneof("payload")
        if kind == "subscribe":
            sessions.subscribed(session)
            self.send(stream, StreamerMessage(
                subscribe_response=self.subscribe(session, message.subscribe)))
        elif kind == "subscribe_batch":
            # Registered as the server does (its compiled common case
            # included); each answer must be what a single subscribe's would
            # be, in order.
            sessions.subscribed(session)
            requests = message.subscribe_batch.requests
            answer = StreamerMessage.FromString(batch_response(
                subscriptions.subscribe_batch(session.owner, requests, batch_requests(raw))))
            responses = answer.subscribe_batch_response.responses
            assert len(responses) == len(requests), (len(responses), len(requests))
            for request, response in zip(requests, responses, strict=True):
                self.answered(session, request, response)
            self.send(stream, answer)
        elif kind == "unsubscribe":
            sessions.touch(session)
            sub_id = message.unsubscribe.subscription_id
            removed = subscriptions.unsubscribe(session.owner, sub_id)
            assert removed == (self.model.get(sub_id) is session), (sub_id, removed)
            if removed:
                del self.model[sub_id]
                self.reference.remove(sub_id)
        elif kind == "heartbeat":
            sessions.heartbeat(session, message.heartbeat.gateway_id)
            ack = HeartbeatAck(timestamp=message.heartbeat.timestamp)
            self.send(stream, StreamerMessage(heartbeat_ack=ack))
        elif kind == "hello":
            hello = message.hello
            holders = [
                s.session for s in self.streams if s.session is not session
                and s.session.hello and s.session.gateway_id == hello.gateway_id
            ] if hello.gateway_id else []
            proof = proof_of(hello.instance)
            try:
                replaced = sessions.hello(session, hello.gateway_id, hello.instance)
            except IdentityTaken:
                # Only a live stream of another gateway process holds an id.
                assert any(not proof or h.proof != proof for h in holders), holders
                self.end(session)  # ALREADY_EXISTS
                return
            assert set(replaced) == set(holders), (replaced, holders)
            assert session.hello and session.gateway_id == hello.gateway_id, session
            for old in replaced:
                self.end(old)  # ABORTED
            if hello.batch_delivery:
                stream.queue.enable_batches(hello.max_batch)
            if hello.max_message_bytes:
                stream.queue.max_message = hello.max_message_bytes
        else:
            sessions.touch(session)

    def subscribe(self, session: Session, request: SubscribeRequest) -> SubscribeResponse:
        response = self.subscriptions.subscribe(session.owner, request)
        self.answered(session, request, response)
        return response

    def answered(
        self, session: Session, request: SubscribeRequest, response: SubscribeResponse
    ) -> None:
        check_response(self, session, request, response)
        if response.success:
            self.accepted(session, response.subscription_id, request)

    def accepted(self, session: Session, sub_id: str, request: SubscribeRequest) -> None:
        self.model[sub_id] = session
        self.where[sub_id] = (request.database, request.collection)
        try:
            self.reference.add(
                sub_id, request.database, request.collection, filters=filters_of(request),
                expression=request.expression or None, owner=session.owner,
            )
        except InvalidSubscription as exc:
            raise AssertionError(f"accepted, but the reference refuses it: {exc}") from None

    def match(self, pick: int, document_id: str | None, doc: object) -> None:
        """Match a document in the collection of one of the live
        subscriptions (picked by ``pick``): the index, churned by every
        step so far, and the reference give the same (id, owner) pairs."""
        live = sorted(self.model)
        database, collection = self.where[live[pick % len(live)]] if live else ("", "")
        ids, owners = self.matcher.match_owned(database, collection, document_id, doc)
        got = list(zip(ids, array("I", owners), strict=True))
        ref_ids, ref_owners = self.reference.match_owned(database, collection, document_id, doc)
        want = set(zip(ref_ids, array("I", ref_owners), strict=True))
        assert len(got) == len(set(got)) and set(got) == want, (
            f"{database!r}/{collection!r}, id {document_id!r}, {doc!r}: "
            f"index {sorted(got)}, reference {sorted(want)}"
        )

    def wait(self, seconds: int) -> None:
        self.clock.now += seconds
        for session in self.sessions.expired():
            self.end(session)  # DEADLINE_EXCEEDED

    def check(self) -> None:
        sessions, subscriptions = self.sessions, self.subscriptions
        assert len(sessions) == STREAMS, len(sessions)
        held: set[str] = set()
        for stream in self.streams:
            session = stream.session
            assert sessions.by_owner[session.owner] is session, session
            owned = subscriptions.owned(session.owner)
            assert held.isdisjoint(owned), (held, owned)
            held |= owned
            for sub_id in owned:
                assert subscriptions.owner_of(sub_id) == session.owner, sub_id
        assert subscriptions.ids() == held, (subscriptions.ids(), held)
        assert {i: s.owner for i, s in self.model.items()} == {
            i: subscriptions.owner_of(i) for i in held
        }, (self.model, held)
        assert len(self.matcher) == len(held), (len(self.matcher), held)
        assert all(sub_id in self.matcher for sub_id in held), held

    def close_all(self) -> None:
        for stream in self.streams:
            stream.queue.discard()
            self.sessions.disconnect(stream.session)
        assert len(self.sessions) == 0
        assert not self.subscriptions.ids() and len(self.subscriptions) == 0
        assert len(self.matcher) == 0
        stats = self.matcher.stats()
        assert not any(stats.values()), stats
        assert self.sessions.known == KnownGateways(), self.sessions.known


def check_response(
    gateways: Gateways, session: Session, request: SubscribeRequest, response: SubscribeResponse
) -> None:
    assert isinstance(response, SubscribeResponse), response
    assert response.subscription_id, response
    assert not request.subscription_id or response.subscription_id == request.subscription_id
    # Ids are global across gateways: a live one is never granted again.
    taken = response.subscription_id in gateways.model
    assert not (taken and response.success), (response, gateways.model)
    if response.code == INVALID_ARGUMENT:
        try:
            ReferenceMatcher().add(
                "s", request.database, request.collection, filters=filters_of(request),
                expression=request.expression or None,
            )
        except InvalidSubscription:
            pass
        else:
            raise AssertionError(f"refused as invalid, but the reference takes it: {response}")
    if response.success:
        assert not response.code and not response.error, response
        assert response.subscription_id in gateways.subscriptions.owned(session.owner)
        assert response.subscription_id in gateways.matcher
    else:
        assert response.code in CODES and response.error, response


def filters_of(request: SubscribeRequest) -> list[Filter]:
    return [Filter(f.field, f.op, value_of(f.value)) for f in request.filters]


def value_of(value: Value) -> object:
    """A protocol ``Value`` as the matcher takes it (unset: None, a null)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        return [value_of(v) for v in value.list_value.values]
    return getattr(value, kind)


Step = tuple[int, int, bytes | int | tuple[int, str | None, object] | None]


def decode(data: bytes) -> list[Step]:
    """The steps an input stands for: (stream, action, message or seconds)."""
    fdp = atheris.FuzzedDataProvider(data)
    steps: list[Step] = []
    while fdp.remaining_bytes():
        stream = fdp.ConsumeIntInRange(0, STREAMS - 1)
        action = fdp.ConsumeIntInRange(MESSAGE, MATCH)
        if action == MESSAGE:
            steps.append((stream, action, blob(fdp, MESSAGE_LIMIT)))
        elif action == WAIT:
            steps.append((stream, action, fdp.ConsumeIntInRange(0, 2 * SESSION_TTL)))
        elif action == MATCH:
            pick_sub = fdp.ConsumeIntInRange(0, 255)
            document_id = pick(fdp, DOCUMENT_IDS, lambda: text(fdp, 16))
            steps.append((stream, action, (pick_sub, document_id, document(fdp, DOCUMENT_LIMIT))))
        else:
            steps.append((stream, action, None))
    return steps


def test_one_input(data: bytes) -> None:
    gateways = Gateways()
    for index, action, argument in decode(data):
        stream = gateways.streams[index]
        if action == MESSAGE:
            assert isinstance(argument, bytes)
            gateways.receive(stream, argument)
        elif action == WAIT:
            assert isinstance(argument, int)
            gateways.wait(argument)
        elif action == MATCH:
            assert isinstance(argument, tuple)
            gateways.match(*argument)
        else:
            gateways.end(stream.session)
        gateways.check()
    gateways.close_all()


if __name__ == "__main__":
    logging.disable(logging.CRITICAL)
    main(test_one_input)
