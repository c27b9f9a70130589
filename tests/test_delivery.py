"""Per-gateway queues: order, batching, bounded size, single writer."""

from __future__ import annotations

import asyncio

import pytest

from streamer.delivery import GatewayQueue
from streamer.protocol.streamer_v1_pb2 import (
    EventDelivery,
    HeartbeatAck,
    StreamerEvent,
    StreamerMessage,
    SubscribeResponse,
)


def delivery(i: int) -> EventDelivery:
    return EventDelivery(subscription_ids=[f"s{i}"], event=StreamerEvent(event_id=f"e{i}"))


class Sink:
    """Collects what the writer sends; can be made slow to build a backlog."""

    def __init__(self) -> None:
        self.messages: list[StreamerMessage] = []
        self.writers = 0
        self.gate = asyncio.Event()
        self.gate.set()

    async def __call__(self, message: StreamerMessage) -> None:
        self.writers += 1
        assert self.writers == 1, "two writers on one stream"
        await self.gate.wait()
        self.messages.append(message)
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


def test_plain_deliveries_in_order_with_control_messages_interleaved() -> None:
    async def main() -> Sink:
        sink = Sink()
        queue = GatewayQueue(sink)
        assert queue.offer(StreamerMessage(subscribe_response=SubscribeResponse(success=True)))
        for i in range(5):
            assert queue.offer(delivery(i))
        assert queue.offer(StreamerMessage(heartbeat_ack=HeartbeatAck(timestamp=7)))
        await drain(queue)
        return sink

    sink = asyncio.run(main())
    kinds = [m.WhichOneof("payload") for m in sink.messages]
    assert kinds == ["subscribe_response"] + ["delivery"] * 5 + ["heartbeat_ack"]
    assert sink.event_ids() == [f"e{i}" for i in range(5)]


def test_batches_pack_what_is_ready_and_stop_at_control_messages() -> None:
    async def main() -> Sink:
        sink = Sink()
        queue = GatewayQueue(sink)
        queue.enable_batches(3)
        for i in range(7):
            queue.offer(delivery(i))
        queue.offer(StreamerMessage(heartbeat_ack=HeartbeatAck(timestamp=1)))
        queue.offer(delivery(7))
        await drain(queue)
        return sink

    sink = asyncio.run(main())
    shape = [
        len(m.batch.deliveries) if m.HasField("batch") else m.WhichOneof("payload")
        for m in sink.messages
    ]
    assert shape == [3, 3, 1, "heartbeat_ack", 1]
    assert sink.event_ids() == [f"e{i}" for i in range(8)]


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
