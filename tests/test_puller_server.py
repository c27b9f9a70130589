"""The reference Puller's gRPC service over a real replay log, on loopback."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from pathlib import Path

import grpc
import pytest
from hypothesis import given
from hypothesis import strategies as st
from service_helpers import until

from streamer.matching.matcher import Matcher
from streamer.node.ingest import Ingest
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc
from streamer.puller.log import Record, ReplayLog
from streamer.puller.server import (
    BATCH_SIZE,
    PullerServicer,
    add_to_server,
    batch,
    heartbeat,
    puller_event,
)


def event(n: int, coll: str = "messages") -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"ev-{n}", database="app", mgo_coll=coll, mgo_doc_id=f"m-{n}",
        op_type="insert", full_doc=b'{"n": %d}' % n,
    )



change_events = st.builds(
    pb.ChangeEvent, event_id=st.text(max_size=30), mgo_coll=st.text(max_size=10),
    full_doc=st.binary(max_size=2000), timestamp=st.integers(0, 2**63 - 1),
)
markers = st.text(max_size=40)


@given(st.lists(st.tuples(change_events, markers), max_size=5), markers)
def test_hand_framed_responses_are_the_protobuf_encoding(
    logged: list[tuple[pb.ChangeEvent, str]], idle_marker: str
) -> None:
    framed = [
        puller_event(Record(n, 0.0, e.SerializeToString(), b""), m)
        for n, (e, m) in enumerate(logged)
    ]
    expected = [pb.PullerEvent(change_event=e, progress=m) for e, m in logged]
    assert framed == [e.SerializeToString() for e in expected]
    assert batch(framed) == pb.PullerEventBatch(events=expected).SerializeToString()
    assert heartbeat(idle_marker) == pb.PullerEvent(progress=idle_marker).SerializeToString()

@contextlib.asynccontextmanager
async def puller(
    tmp_path: Path, **log_options: object
) -> AsyncIterator[tuple[PullerServicer, pb_grpc.PullerServiceStub, str]]:
    heartbeat = float(log_options.pop("heartbeat", 5.0))  # type: ignore[arg-type]
    log = ReplayLog(tmp_path / "log", **log_options)  # type: ignore[arg-type]
    servicer = PullerServicer(log, heartbeat=heartbeat)
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
            yield servicer, pb_grpc.PullerServiceStub(channel), f"127.0.0.1:{port}"
    finally:
        await server.stop(grace=0)
        log.close()


async def append(servicer: PullerServicer, *numbers: int, coll: str = "messages") -> None:
    await servicer.append([(event(n, coll), b"") for n in numbers])


async def take(stream: AsyncIterator[pb.PullerEvent], count: int) -> list[pb.PullerEvent]:
    """``count`` messages after the heartbeat a stream opened with a marker
    begins with (skipped)."""
    out: list[pb.PullerEvent] = []
    first = True
    async with asyncio.timeout(10):
        async for message in stream:
            if first and not message.HasField("change_event"):
                first = False
                continue
            first = False
            out.append(message)
            if len(out) == count:
                break
    return out


def ids(events: list[pb.PullerEvent]) -> list[str]:
    return [e.change_event.event_id for e in events]


def test_after_is_exclusive(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            await append(servicer, *range(1, 11))
            after = servicer.log.marker(4)
            got = await take(stub.Subscribe(pb.SubscribeRequest(after=after)), 6)
            assert ids(got) == [f"ev-{n}" for n in range(5, 11)]
            assert [e.progress for e in got] == [servicer.log.marker(p) for p in range(5, 11)]
            # Resuming after a received marker gives exactly what follows it.
            got = await take(stub.Subscribe(pb.SubscribeRequest(after=got[2].progress)), 3)
            assert ids(got) == ["ev-8", "ev-9", "ev-10"]
            got = await take(stub.Subscribe(pb.SubscribeRequest(after=servicer.log.marker(0))), 1)
            assert ids(got) == ["ev-1"]

    asyncio.run(main())


def test_a_stream_opened_with_a_marker_begins_with_its_heartbeat(tmp_path: Path) -> None:
    # A consumer knows at once that its marker was accepted (the Streamer's
    # catch-up answers resuming subscriptions on it), even with nothing new.
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            await append(servicer, 1, 2, 3)
            for after in (servicer.log.marker(1), servicer.log.marker(3)):
                async with asyncio.timeout(5):
                    call = stub.Subscribe(pb.SubscribeRequest(after=after))
                    assert await call.read() == pb.PullerEvent(progress=after)
                    call.cancel()
                    batches = stub.SubscribeBatch(pb.SubscribeRequest(after=after))
                    batch = await batches.read()
                    assert list(batch.events) == [pb.PullerEvent(progress=after)]
                    batches.cancel()

    asyncio.run(main())


def test_empty_after_is_the_live_head(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            await append(servicer, 1, 2, 3)
            stream = stub.Subscribe(pb.SubscribeRequest(consumer_id="c"))
            await until(lambda: servicer.consumers == 1)
            await asyncio.sleep(0.05)
            await append(servicer, 4, 5)
            assert ids(await take(stream, 2)) == ["ev-4", "ev-5"]

    asyncio.run(main())


def test_catch_up_then_live_without_gap_or_duplicate(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            await append(servicer, *range(1, 3001))

            async def writer() -> None:
                for start in range(3001, 6001, 100):
                    await append(servicer, *range(start, start + 100))
                    await asyncio.sleep(0.001)

            task = asyncio.create_task(writer())
            got = await take(stub.Subscribe(pb.SubscribeRequest(after=servicer.log.marker(0))),
                             6000)
            await task
            assert ids(got) == [f"ev-{n}" for n in range(1, 6001)]

    asyncio.run(main())


def test_batches_carry_the_same_sequence(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            await append(servicer, *range(1, 1001))
            request = pb.SubscribeRequest(after=servicer.log.marker(0))
            batches: list[pb.PullerEventBatch] = []
            async with asyncio.timeout(10):
                async for batch in stub.SubscribeBatch(request):
                    batches.append(batch)
                    if sum(len(b.events) for b in batches) == 1001:
                        break
            # The first: the heartbeat a stream opened with a marker begins with.
            assert batches[0] == pb.PullerEventBatch(
                events=[pb.PullerEvent(progress=servicer.log.marker(0))])
            batches = batches[1:]
            assert all(0 < len(b.events) <= BATCH_SIZE for b in batches)
            assert len(batches) < 1000 // 10
            flat = [e for b in batches for e in b.events]
            single = await take(stub.Subscribe(request), 1000)
            assert flat == single

    asyncio.run(main())


def test_collections_filter_and_heartbeats(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path, heartbeat=0.2) as (servicer, stub, _):
            await append(servicer, 1, 2, coll="users")
            await append(servicer, 3, coll="messages")
            await append(servicer, 4, 5, coll="users")
            request = pb.SubscribeRequest(after=servicer.log.marker(0), collections=["messages"])
            got = await take(stub.Subscribe(request), 3)
            assert ids(got[:1]) == ["ev-3"]
            # Nothing more for this consumer: heartbeats with the log's head.
            assert [e.HasField("change_event") for e in got[1:]] == [False, False]
            assert {e.progress for e in got[1:]} == {servicer.log.marker(5)}
            both = pb.SubscribeRequest(after=servicer.log.marker(0),
                                       collections=["messages", "users"])
            assert ids(await take(stub.Subscribe(both), 5)) == [f"ev-{n}" for n in range(1, 6)]

    asyncio.run(main())


@pytest.mark.parametrize("marker, message", [
    ("garbage", "is not a marker of this Puller"),
    ("v1:000000000000:1", "from another replay log"),
    ("FUTURE", "beyond the last event"),
    ("EXPIRED", "older than the log's retention"),
])
def test_bad_markers_are_invalid_argument(tmp_path: Path, marker: str, message: str) -> None:
    async def main() -> None:
        async with puller(tmp_path, max_bytes=8192, segment_bytes=4096) as (servicer, stub, _):
            for n in range(1, 201):
                await append(servicer, n)
            assert servicer.log.first_position > 2
            after = {"FUTURE": servicer.log.marker(1000), "EXPIRED": servicer.log.marker(0)}
            for call in (stub.Subscribe, stub.SubscribeBatch):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    await take(call(pb.SubscribeRequest(after=after.get(marker, marker))), 1)
                assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
                assert message in str(info.value.details())

    asyncio.run(main())


def test_a_slow_consumer_does_not_hold_a_fast_one(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, stub, _):
            # Subscribed, never read: its stream fills the flow-control window.
            slow = stub.Subscribe(pb.SubscribeRequest(after=servicer.log.marker(0)))
            await slow.initial_metadata()
            fast = stub.SubscribeBatch(pb.SubscribeRequest(after=servicer.log.marker(0)))
            pad = b"x" * 2000
            received = 0

            async def reader() -> None:
                nonlocal received
                async for batch in fast:
                    received += sum(e.HasField("change_event") for e in batch.events)

            task = asyncio.create_task(reader())
            for start in range(1, 20_001, 500):
                await servicer.append([
                    (pb.ChangeEvent(event_id=f"ev-{n}", mgo_coll="m", full_doc=pad), b"")
                    for n in range(start, start + 500)
                ])
            await until(lambda: received == 20_000, timeout=20)
            assert servicer.consumers == 2
            task.cancel()
            slow.cancel()

    asyncio.run(main())


def test_streamer_ingest_consumes_it(tmp_path: Path) -> None:
    async def main() -> None:
        async with puller(tmp_path) as (servicer, _, target):
            await append(servicer, *range(1, 101))
            registry = Sessions(SubscriptionSet(Matcher()))
            progress = ProgressStore(tmp_path / "state")
            progress.advance(servicer.log.marker(50))
            ingest = Ingest(target, registry, StreamerServicer(registry), progress,
                            backoff=(0.01, 0.05))
            task = asyncio.create_task(ingest.run())
            try:
                await until(lambda: ingest.events["unwatched"] == 50)  # no subscriptions
                await append(servicer, *range(101, 151))
                await until(lambda: ingest.events["unwatched"] == 100)
                assert progress.marker == servicer.log.marker(150)
                assert ingest.batched and ingest.reconnects == 0
            finally:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
