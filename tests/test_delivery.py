"""Per-gateway queues and wire framing: order, batching, bounded size, single
writer, and bytes identical to what protobuf would encode."""

from __future__ import annotations

import asyncio
import sys
from array import array
from functools import partial

import pytest
from hypothesis import given
from hypothesis import strategies as st
from reentry import BUSY, Reentry

from streamer.errors import IndexBusy
from streamer.matching import Filter, Matcher
from streamer.node.delivery import (
    GatewayQueue,
    delivery_message,
    event_field,
    fan_out,
    fan_out_reference,
    frame_deliveries,
    frame_deliveries_reference,
    frame_event,
    subscription_field,
)
from streamer.protocol.streamer_v1_pb2 import (
    DeliveryBatch,
    EventDelivery,
    HeartbeatAck,
    StreamerEvent,
    StreamerMessage,
    SubscribeResponse,
)


def delivery(i: int) -> bytes:
    event = event_field(StreamerEvent(event_id=f"e{i}"))
    return delivery_message([subscription_field(f"s{i}")], event)


def control(message: StreamerMessage) -> bytes:
    return message.SerializeToString()


class Sink:
    """Collects what the writer sends; can be made slow to build a backlog."""

    def __init__(self) -> None:
        self.messages: list[StreamerMessage] = []
        self.writers = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, data: bytes) -> None:
        self.writers += 1
        assert self.writers == 1, "two writers on one stream"
        await self.gate.wait()
        self.messages.append(StreamerMessage.FromString(data))
        self.writers -= 1

    def event_ids(self) -> list[str]:
        out = []
        for m in self.messages:
            if m.HasField("delivery"):
                out.append(m.delivery.event.event_id)
            elif m.HasField("batch"):
                out.extend(d.event.event_id for d in m.batch.deliveries)
        return out


async def drain(queue: GatewayQueue) -> None:
    queue.close()
    await asyncio.wait_for(queue.run(), 10)


events = st.builds(
    StreamerEvent,
    event_id=st.text(max_size=40),
    database=st.text(max_size=10),
    collection=st.text(max_size=10),
    document_id=st.text(max_size=40),
    operation=st.sampled_from([1, 2, 4]),
    document_data=st.binary(max_size=20_000),
    timestamp=st.integers(-(2**63), 2**63 - 1),
    progress=st.text(max_size=20),
)
id_lists = st.lists(st.text(max_size=300), min_size=1, max_size=5)


@given(id_lists, events)
def test_a_framed_delivery_is_the_protobuf_encoding(ids: list[str], event: StreamerEvent) -> None:
    expected = StreamerMessage(delivery=EventDelivery(subscription_ids=ids, event=event))
    data = delivery_message([subscription_field(i) for i in ids], event_field(event))
    assert data == expected.SerializeToString()
    assert StreamerMessage.FromString(data) == expected


@given(st.lists(st.tuples(id_lists, events), min_size=1, max_size=6))
def test_a_batch_of_framed_deliveries_is_the_protobuf_encoding(
    deliveries: list[tuple[list[str], StreamerEvent]],
) -> None:
    async def main() -> list[bytes]:
        sent: list[bytes] = []

        async def send(data: bytes) -> None:
            sent.append(data)

        queue = GatewayQueue(send)
        queue.enable_batches(len(deliveries))
        for ids, event in deliveries:
            queue.offer(delivery_message([subscription_field(i) for i in ids], event_field(event)))
        await drain(queue)
        return sent

    expected = StreamerMessage(batch=DeliveryBatch(deliveries=[
        EventDelivery(subscription_ids=ids, event=event) for ids, event in deliveries
    ]))
    assert asyncio.run(main()) == [expected.SerializeToString()]


def test_plain_deliveries_in_order_with_control_messages_interleaved() -> None:
    async def main() -> tuple[Sink, GatewayQueue]:
        sink = Sink()
        queue = GatewayQueue(sink)
        response = SubscribeResponse(success=True)
        assert queue.offer(control(StreamerMessage(subscribe_response=response)))
        for i in range(5):
            assert queue.offer(delivery(i))
        assert queue.offer(control(StreamerMessage(heartbeat_ack=HeartbeatAck(timestamp=7))))
        await drain(queue)
        return sink, queue

    sink, queue = asyncio.run(main())
    kinds = [m.WhichOneof("payload") for m in sink.messages]
    assert kinds == ["subscribe_response"] + ["delivery"] * 5 + ["heartbeat_ack"]
    assert sink.event_ids() == [f"e{i}" for i in range(5)]
    assert (queue.sent_messages, queue.sent_deliveries) == (7, 5)


def test_batches_pack_what_is_ready_and_stop_at_control_messages() -> None:
    async def main() -> tuple[Sink, GatewayQueue]:
        sink = Sink()
        queue = GatewayQueue(sink)
        queue.enable_batches(3)
        for i in range(7):
            queue.offer(delivery(i))
        queue.offer(control(StreamerMessage(heartbeat_ack=HeartbeatAck(timestamp=0))))
        queue.offer(delivery(7))
        await drain(queue)
        return sink, queue

    sink, queue = asyncio.run(main())
    shape = [
        len(m.batch.deliveries) if m.HasField("batch") else m.WhichOneof("payload")
        for m in sink.messages
    ]
    assert shape == [3, 3, 1, "heartbeat_ack", 1]
    assert sink.event_ids() == [f"e{i}" for i in range(8)]
    assert (queue.sent_messages, queue.sent_deliveries) == (5, 8)


def test_full_queue_refuses_without_waiting() -> None:
    async def main() -> tuple[list[bool], Sink, GatewayQueue]:
        sink = Sink()
        sink.gate.clear()  # the gateway stops reading
        queue = GatewayQueue(sink, capacity=3)
        writer = asyncio.create_task(queue.run())
        accepted = [queue.offer(delivery(0))]
        await asyncio.sleep(0)  # the writer takes e0 and blocks in send
        accepted += [queue.offer(delivery(i)) for i in range(1, 6)]
        sink.gate.set()
        queue.close()
        await asyncio.wait_for(writer, 10)
        return accepted, sink, queue

    accepted, sink, queue = asyncio.run(main())
    assert accepted == [True, True, True, True, False, False]
    assert sink.event_ids() == ["e0", "e1", "e2", "e3"]
    assert not queue.offer(delivery(9))  # closed


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity must be at least 1"):
        GatewayQueue(Sink(), capacity=0)


matches = st.lists(
    st.tuples(st.text(max_size=200), st.sampled_from([0, 1, 5, 70_000, 2**32 - 1])), max_size=20
)


@given(matches, st.binary(max_size=300), st.booleans())
def test_compiled_framing_equals_the_reference(
    matched: list[tuple[str, int]], event_bytes: bytes, queued_before: bool
) -> None:
    ids = [i for i, _ in matched]
    owners = array("I", [o for _, o in matched]).tobytes()
    event = event_field(StreamerEvent(document_data=event_bytes))
    # Deliveries append to what earlier events already queued for the owner.
    start = {0: [b"earlier"], 5: [b"earlier"]} if queued_before else {}
    got = {o: list(q) for o, q in start.items()}
    expected = {o: list(q) for o, q in start.items()}
    assert frame_deliveries(ids, owners, event, got) == frame_deliveries_reference(
        ids, owners, event, expected)
    assert got == expected
    assert list(got) == list(expected)


@given(matches)
def test_framing_groups_every_id_once_per_owner(matched: list[tuple[str, int]]) -> None:
    event = event_field(StreamerEvent(event_id="e"))
    owners = array("I", [o for _, o in matched]).tobytes()
    pending: dict[int, list[bytes]] = {}
    count = frame_deliveries([i for i, _ in matched], owners, event, pending)
    assert count == len(pending)
    assert list(pending) == list(dict.fromkeys(o for _, o in matched))
    for owner, (data,) in pending.items():
        delivery = StreamerMessage.FromString(data).delivery
        assert list(delivery.subscription_ids) == [i for i, o in matched if o == owner]
        assert delivery.event.event_id == "e"


def test_framing_checks_its_arguments() -> None:
    with pytest.raises(ValueError, match="4 bytes of owners for 2 subscription ids"):
        frame_deliveries(["a", "b"], bytes(4), b"", {})


def test_framing_refuses_ids_that_are_not_strings() -> None:
    with pytest.raises(TypeError, match="subscription ids must be str, got int"):
        frame_deliveries([1], bytes(4), b"", {})  # type: ignore[list-item]


def test_framing_refuses_ids_that_are_not_utf8_and_leaves_pending_alone() -> None:
    pending: dict[int, list[bytes]] = {}
    with pytest.raises(UnicodeEncodeError):
        frame_deliveries(["ok", "\ud800"], bytes(8), b"", pending)
    assert pending == {}


# Subscriptions over three chat ids and three owners (one above the 16 bits
# the index keeps inside an entry), some on the document id, some on the
# whole collection; documents from the same small space.
subscriptions = st.lists(
    st.tuples(
        st.sampled_from([("chat_id", "c1"), ("chat_id", "c2"), ("_id", "d1"), None]),
        st.sampled_from([0, 3, 70_000]),
    ),
    max_size=30,
)
documents = st.one_of(
    st.none(), st.fixed_dictionaries({"chat_id": st.sampled_from(["c1", "c2", "c3"])}))


@given(subscriptions, st.lists(st.tuples(st.sampled_from(["d1", "d2"]), documents), max_size=8))
def test_index_fan_out_equals_the_reference(
    subs: list[tuple[tuple[str, str] | None, int]],
    changes: list[tuple[str, dict[str, str] | None]],
) -> None:
    matcher = Matcher()
    for n, (test, owner) in enumerate(subs):
        filters = [Filter(test[0], "==", test[1])] if test else []
        matcher.add(f"s{n}", "db", "messages", filters=filters, owner=owner)
    got: dict[int, list[bytes]] = {}
    expected: dict[int, list[bytes]] = {}
    for n, (document_id, document) in enumerate(changes):
        event = event_field(StreamerEvent(event_id=f"e{n}"))
        for collection in ("messages", "elsewhere"):
            change = ("db", collection, document_id, document, event)
            assert fan_out(matcher.index, *change, got) == fan_out_reference(
                matcher, *change, expected)
    assert got == expected
    assert list(got) == list(expected)


@given(events, st.sampled_from([0, 1, 2, 4]))
def test_the_compiled_event_framing_is_the_protobuf_encoding(
    event: StreamerEvent, operation: int
) -> None:
    event.operation = operation  # type: ignore[assignment]
    assert frame_event(
        event.event_id, event.database, event.collection, event.document_id,
        event.operation, event.document_data, event.timestamp, event.progress,
    ) == event_field(event)


def test_event_framing_refuses_an_operation_outside_int32() -> None:
    with pytest.raises(ValueError, match="operation must be a non-negative int32, got -1"):
        frame_event("e", "", "", "", -1, b"", 0, "")


def test_a_finalizer_matching_during_the_fan_out_gets_index_busy() -> None:
    # Framing allocates, so the GC can run a finalizer in the middle of it;
    # one that matched there overwrote the index's match buffer while the
    # fan-out still held those ids, and the fan-out then released the wrong
    # ones (other ids' counts dropped until they were freed: a crash).
    matcher = Matcher()
    small = [f"small{i}" for i in range(10)]
    big = [f"big{i}" for i in range(40)]
    for n, sub_id in enumerate(small + big):
        chat = "c1" if sub_id in small else "c2"
        matcher.add(sub_id, "db", "messages", filters=[Filter("chat_id", "==", chat)], owner=n % 3)
    reentry = Reentry(lambda: matcher.match("db", "messages", "d2", {"chat_id": "c2"}))
    event = event_field(StreamerEvent(event_id="e"))
    change = ("db", "messages", "d1", {"chat_id": "c1"}, event)
    expected: dict[int, list[bytes]] = {}
    fan_out_reference(matcher, *change, expected)
    refcounts = [sys.getrefcount(sub_id) for sub_id in small + big]
    for _ in range(20):
        got: dict[int, list[bytes]] = {}
        # partial: nothing allocates between the call and the fan-out.
        assert reentry.during(partial(fan_out, matcher.index, *change, got)) == (10, 3)
        assert got == expected
        assert [sys.getrefcount(sub_id) for sub_id in small + big] == refcounts
    assert reentry.calls > 0
    assert reentry.errors == reentry.unraisable == [(IndexBusy, BUSY)] * reentry.calls


def test_framing_holds_its_ids_while_a_finalizer_empties_their_list() -> None:
    # The ids are borrowed from the caller's list; a finalizer run by an
    # allocation inside the framing may change that list (use after free,
    # seen by the sanitizer build).
    ids = [f"s{i}" for i in range(10)]
    owners = array("I", [i % 3 for i in range(10)]).tobytes()
    event = event_field(StreamerEvent(event_id="e"))
    expected: dict[int, list[bytes]] = {}
    frame_deliveries_reference(list(ids), owners, event, expected)
    got: dict[int, list[bytes]] = {}
    reentry = Reentry(ids.clear)
    assert reentry.during(partial(frame_deliveries, ids, owners, event, got)) == 3
    assert got == expected and ids == [] and reentry.calls > 0
