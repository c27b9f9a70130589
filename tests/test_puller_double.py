"""The test Puller speaks puller.v1 as the Streamer will rely on (real gRPC)."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from puller_double import PullerDouble

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc


def change(i: int, coll: str = "messages") -> pb.ChangeEvent:
    return pb.ChangeEvent(event_id=f"e{i}", database="app", mgo_coll=coll, op_type="insert")


async def first(stream: grpc.aio.UnaryStreamCall, n: int) -> list[tuple[str, str]]:
    out: list[tuple[str, str]] = []
    async for message in stream:
        events = message.events if isinstance(message, pb.PullerEventBatch) else [message]
        out += [(e.change_event.event_id, e.progress) for e in events]
        if len(out) >= n:
            stream.cancel()
            break
    return out


def test_after_is_exclusive_and_batches_carry_the_same_events() -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        try:
            await puller.append(*(change(i) for i in range(3)))
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.PullerServiceStub(channel)
                plain = await first(stub.Subscribe(pb.SubscribeRequest(after="p0")), 2)
                batched = await first(stub.SubscribeBatch(pb.SubscribeRequest(after="p0")), 2)
                assert plain == batched == [("e1", "p1"), ("e2", "p2")]
                live = stub.Subscribe(pb.SubscribeRequest())
                reader = asyncio.create_task(first(live, 1))
                while len(puller.subscriptions) < 3:
                    await asyncio.sleep(0.01)
                await puller.append(change(3, "users"))
                assert await asyncio.wait_for(reader, 10) == [("e3", "p3")]
        finally:
            await puller.stop()

    asyncio.run(main())


@pytest.mark.parametrize(
    ("batch", "method", "request_", "code"),
    [
        (False, "SubscribeBatch", pb.SubscribeRequest(), grpc.StatusCode.UNIMPLEMENTED),
        (True, "Subscribe", pb.SubscribeRequest(after="p99"), grpc.StatusCode.INVALID_ARGUMENT),
        (True, "Subscribe", pb.SubscribeRequest(after="zz"), grpc.StatusCode.INVALID_ARGUMENT),
    ],
)
def test_refusals(batch: bool, method: str, request_: pb.SubscribeRequest, code: object) -> None:
    async def main() -> None:
        puller = PullerDouble(batch=batch)
        target = await puller.start()
        try:
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.PullerServiceStub(channel)
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async for _ in getattr(stub, method)(request_):
                        pass
                assert info.value.code() == code
        finally:
            await puller.stop()

    asyncio.run(main())


def test_a_held_consumer_gets_nothing_until_released_and_old_markers_are_refused() -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        try:
            await puller.append(*(change(i) for i in range(3)))
            puller.hold("slow")
            async with grpc.aio.insecure_channel(target) as channel:
                stub = pb_grpc.PullerServiceStub(channel)
                held = asyncio.create_task(
                    first(stub.Subscribe(pb.SubscribeRequest(consumer_id="slow", after="p0")), 2))
                other = stub.Subscribe(pb.SubscribeRequest(consumer_id="fast", after="p0"))
                assert await asyncio.wait_for(first(other, 2), 10) == [("e1", "p1"), ("e2", "p2")]
                await asyncio.sleep(0.1)
                assert not held.done()
                puller.release("slow")
                assert await asyncio.wait_for(held, 10) == [("e1", "p1"), ("e2", "p2")]
                puller.forgotten = 2
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await first(stub.Subscribe(pb.SubscribeRequest(after="p0")), 1)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert "too old" in str(info.value.details())
                assert await first(stub.Subscribe(pb.SubscribeRequest(after="p1")), 1) == [
                    ("e2", "p2")]
        finally:
            await puller.stop()

    asyncio.run(main())
