"""Ingest end to end over real gRPC: test Puller -> Streamer -> gateway stream."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from puller_double import PullerDouble
from service_helpers import until

from streamer.errors import ResumePointLost
from streamer.matching.matcher import Matcher
from streamer.node.ingest import Ingest
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer, add_to_server
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    StreamerMessage,
    SubscribeRequest,
    Value,
)


def change(
    i: int, op: str = "insert", full: Any = None, before: Any = None, **kw: Any
) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}", op_type=op,
        full_doc=b"" if full is None else (full if isinstance(full, bytes) else orjson.dumps(full)),
        before_doc=b"" if before is None else orjson.dumps(before), timestamp=1000 + i, **kw,
    )


class Pipeline:
    def __init__(self, puller: PullerDouble, ingest: Ingest, stub: sgrpc.StreamerServiceStub):
        self.puller, self.ingest, self.stub = puller, ingest, stub

    async def gateway(self, *subs: tuple[str, str]) -> grpc.aio.StreamStreamCall:
        call = self.stub.Stream()
        for sub_id, chat in subs:
            await call.write(GatewayMessage(subscribe=SubscribeRequest(
                subscription_id=sub_id, database="app", collection="messages",
                filters=[Filter(field="chat", op="==", value=Value(string_value=chat))])))
            response = await call.read()
            assert response.subscribe_response.success
        return call


async def deliveries(call: grpc.aio.StreamStreamCall, n: int) -> list[Any]:
    out = []
    while len(out) < n:
        message: StreamerMessage = await call.read()
        out.append(message.delivery)
    return out


def run(
    tmp_path: Path, scenario: Callable[[Pipeline], Awaitable[None]], batch: bool = True
) -> None:
    async def main() -> None:
        puller = PullerDouble(batch=batch)
        target = await puller.start()
        registry = Sessions(SubscriptionSet(Matcher()))
        servicer = StreamerServicer(registry)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        progress = ProgressStore(tmp_path, interval=0.01)
        ingest = Ingest(target, registry, servicer, progress, backoff=(0.01, 0.05))
        tasks = [asyncio.create_task(ingest.run()), asyncio.create_task(progress.run())]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                pipeline = Pipeline(puller, ingest, sgrpc.StreamerServiceStub(channel))
                await until(lambda: len(puller.subscriptions) > 0)
                await asyncio.wait_for(scenario(pipeline), 30)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop(grace=0)
            await puller.stop()

    asyncio.run(main())


@pytest.mark.parametrize("batch", [True, False], ids=["SubscribeBatch", "Subscribe fallback"])
def test_events_reach_their_gateways_with_every_field(tmp_path: Path, batch: bool) -> None:
    async def scenario(p: Pipeline) -> None:
        one = await p.gateway(("s1", "c1"), ("s2", "c1"))
        two = await p.gateway(("s3", "c2"))
        await p.puller.append(
            change(0, full={"chat": "c1", "n": 1}),
            change(1, full=b"{broken"),
            change(2, full={"chat": "c2"}),
        )
        [first] = await deliveries(one, 1)
        assert sorted(first.subscription_ids) == ["s1", "s2"]
        event = first.event
        assert (event.event_id, event.database, event.collection, event.document_id) == (
            "e0", "app", "messages", "m0")
        assert (event.operation, event.timestamp, event.progress) == (1, 1000, "p0")
        assert orjson.loads(event.document_data) == {"chat": "c1", "n": 1}
        [third] = await deliveries(two, 1)
        assert (list(third.subscription_ids), third.event.event_id) == (["s3"], "e2")
        await until(lambda: ProgressStore(tmp_path).load().marker == "p2")
        assert p.ingest.poison == {"bad_json": 1}
        assert p.ingest.batched is batch
        one.cancel()
        two.cancel()

    run(tmp_path, scenario, batch=batch)


def test_enter_and_leave_with_a_pre_image(tmp_path: Path) -> None:
    async def scenario(p: Pipeline) -> None:
        gw = await p.gateway(("old", "c1"), ("new", "c2"))
        await p.puller.append(change(0, "update", full={"chat": "c2"}, before={"chat": "c1"}))
        got = {d.event.operation: list(d.subscription_ids) for d in await deliveries(gw, 2)}
        assert got == {1: ["new"], 4: ["old"]}  # INSERT (entered), DELETE (left)
        gw.cancel()

    run(tmp_path, scenario)


def test_puller_restart_resumes_after_the_last_marker(tmp_path: Path) -> None:
    async def scenario(p: Pipeline) -> None:
        gw = await p.gateway(("s", "c"))
        await p.puller.append(change(0, full={"chat": "c"}))
        assert [d.event.event_id for d in await deliveries(gw, 1)] == ["e0"]
        await p.puller.stop()
        events = list(p.puller.events)
        restarted = PullerDouble()
        restarted.events = [*events, change(1, full={"chat": "c"})]
        await restarted.start_on(p.puller.port)
        p.puller = restarted
        assert [d.event.event_id for d in await deliveries(gw, 1)] == ["e1"]
        assert restarted.subscriptions[-1].after == "p0"
        assert p.ingest.reconnects >= 1
        gw.cancel()
        await restarted.stop()

    run(tmp_path, scenario)


async def _refusing_ingest(
    tmp_path: Path, **options: Any
) -> tuple[PullerDouble, Ingest, ProgressStore]:
    """An ingest whose saved marker (``p99``) the Puller does not know."""
    puller = PullerDouble()
    target = await puller.start()
    registry = Sessions(SubscriptionSet(Matcher()))
    progress = ProgressStore(tmp_path, interval=0.01)
    progress.advance("p99")
    await progress.flush()
    ingest = Ingest(target, registry, StreamerServicer(registry), progress,
                    backoff=(0.01, 0.05), **options)
    return puller, ingest, progress


def test_a_refused_marker_stops_ingest_by_default(tmp_path: Path) -> None:
    async def main() -> None:
        puller, ingest, progress = await _refusing_ingest(tmp_path)
        try:
            with pytest.raises(ResumePointLost, match=r"refused marker 'p99' \(unknown marker"):
                await asyncio.wait_for(ingest.run(), 30)
            assert ingest.markers_refused == 1
            assert progress.marker == "p99"
        finally:
            await puller.stop()

    asyncio.run(main())
    assert ProgressStore(tmp_path).load().marker == "p99"


def test_resume_from_head_keeps_the_saved_marker_until_an_event_arrives(tmp_path: Path) -> None:
    async def main() -> None:
        puller, ingest, progress = await _refusing_ingest(
            tmp_path, on_marker_refused="resume-from-head")
        saver = asyncio.create_task(progress.run())
        task = asyncio.create_task(ingest.run())
        try:
            await until(lambda: any(not s.after for s in puller.subscriptions))
            assert [s.after for s in puller.subscriptions] == ["p99", ""]
            assert ingest.markers_refused == 1
            # Until an event arrives, a restart must still see the loss.
            await asyncio.sleep(0.1)
            assert ProgressStore(tmp_path).load().marker == "p99"
            await puller.append(change(0, full={"chat": "c"}))
            await until(lambda: ProgressStore(tmp_path).load().marker == "p0")
        finally:
            for t in (task, saver):
                t.cancel()
            await asyncio.gather(task, saver, return_exceptions=True)
            await puller.stop()

    asyncio.run(main())


def test_an_empty_marker_never_replaces_the_saved_one(tmp_path: Path) -> None:
    async def main() -> None:
        registry = Sessions(SubscriptionSet(Matcher()))
        progress = ProgressStore(tmp_path)
        ingest = Ingest("unused:1", registry, StreamerServicer(registry), progress)
        ingest.process(pb.PullerEvent(change_event=change(0, full={"chat": "c"}), progress="p0"))
        ingest.process(pb.PullerEvent(change_event=change(1, full={"chat": "c"}), progress=""))
        ingest.process(pb.PullerEvent(progress=""))  # a heartbeat without a marker
        assert (progress.marker, progress.empty_markers) == ("p0", 2)
        # The events themselves were still processed (counted as unwatched:
        # no subscription is on their collection).
        assert ingest.events["unwatched"] == 2
        await progress.flush()

    asyncio.run(main())
    assert ProgressStore(tmp_path).load().marker == "p0"
