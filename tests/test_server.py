"""StreamerService over real gRPC on loopback (docs/protocol.md, Behaviour)."""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Awaitable, Callable

import grpc
import pytest

from streamer.matching.matcher import Matcher
from streamer.node.delivery import delivery_message, event_field, subscription_field
from streamer.node.gateways import GatewayRegistry
from streamer.node.server import StreamerServicer, add_to_server
from streamer.protocol import streamer_v1_pb2_grpc as pb_grpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    StreamerEvent,
    StreamerMessage,
    SubscribeRequest,
    UnsubscribeRequest,
    Value,
)


def subscribe(sub_id: str, chat: str = "c1") -> GatewayMessage:
    return GatewayMessage(subscribe=SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=[Filter(field="chat_id", op="==", value=Value(string_value=chat))],
    ))


def framed(sub_ids: list[str], event: StreamerEvent) -> bytes:
    return delivery_message([subscription_field(s) for s in sub_ids], event_field(event))


def heartbeat(ts: int, gateway_id: str = "gw-1") -> GatewayMessage:
    return GatewayMessage(heartbeat=Heartbeat(gateway_id=gateway_id, timestamp=ts))


Scenario = Callable[[pb_grpc.StreamerServiceStub, StreamerServicer], Awaitable[None]]


def run(scenario: Scenario, **servicer_kw: int) -> None:
    async def main() -> None:
        servicer = StreamerServicer(GatewayRegistry(Matcher()), **servicer_kw)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(scenario(pb_grpc.StreamerServiceStub(channel), servicer), 30)
        finally:
            await server.stop(grace=1)

    asyncio.run(main())


async def end_status(call: grpc.aio.StreamStreamCall) -> grpc.StatusCode | None:
    """Read until the stream ends: the status it ended with (None: OK)."""
    try:
        while await call.read() is not grpc.aio.EOF:
            pass
    except grpc.aio.AioRpcError as exc:
        return exc.code()
    return None


async def read(call: grpc.aio.StreamStreamCall) -> StreamerMessage:
    message = await call.read()
    assert message is not grpc.aio.EOF
    return message  # type: ignore[no-any-return]


def test_subscribe_heartbeat_unsubscribe_and_disconnect() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        first = await read(call)
        assert (first.subscribe_response.subscription_id, first.subscribe_response.success) == (
            "s1", True)
        await call.write(subscribe("s1"))
        dup = await read(call)
        assert dup.subscribe_response.code == "already_exists"
        await call.write(GatewayMessage(unsubscribe=UnsubscribeRequest(subscription_id="nope")))
        await call.write(heartbeat(42))
        ack = await read(call)  # no response to the unknown unsubscribe came first
        assert ack.heartbeat_ack.timestamp == 42
        matcher = servicer.registry.matcher
        assert matcher.match("app", "messages", "m", {"chat_id": "c1"}) == ["s1"]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        for _ in range(500):
            if len(matcher) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(matcher) == 0 and len(servicer.registry) == 0

    run(scenario)


def test_deliveries_plain_and_batched() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        plain, batched = stub.Stream(), stub.Stream()
        await batched.write(GatewayMessage(hello=Hello(gateway_id="gw-b", batch_delivery=True)))
        for call, sub in ((plain, "p"), (batched, "b")):
            await call.write(subscribe(sub))
            assert (await read(call)).subscribe_response.success
        streams = {s.session.gateway_id: s.session for s in servicer.streams.values()}
        plain_session = next(s for name, s in streams.items() if name != "gw-b")
        for i in range(3):
            event = StreamerEvent(event_id=f"e{i}")
            for session, sub in ((plain_session, "p"), (streams["gw-b"], "b")):
                assert servicer.deliver(session, [framed([sub], event)])
        got_plain = [(await read(plain)).delivery.event.event_id for _ in range(3)]
        assert got_plain == ["e0", "e1", "e2"]
        got_batched: list[str] = []
        while len(got_batched) < 3:
            message = await read(batched)
            assert message.HasField("batch")
            got_batched += [d.event.event_id for d in message.batch.deliveries]
        assert got_batched == ["e0", "e1", "e2"]
        plain.cancel()
        batched.cancel()

    run(scenario)


def test_a_lagging_gateway_is_cut_off_with_resource_exhausted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        session = next(iter(servicer.streams.values())).session
        big = StreamerEvent(event_id="e", document_data=b"x" * 100_000)
        # The client reads nothing: the transport fills, then the queue.
        accepted = 0
        for _ in range(10_000):
            if not servicer.deliver(session, [framed(["s1"], big)]):
                break
            accepted += 1
            await asyncio.sleep(0)
        assert servicer.lagging_cut_offs == 1
        assert await end_status(call) == grpc.StatusCode.RESOURCE_EXHAUSTED
        for _ in range(500):
            if len(servicer.registry.matcher) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(servicer.registry.matcher) == 0

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        run(scenario, queue_capacity=8)
    [end] = [r for r in caplog.records if " ended " in r.getMessage()]
    assert end.levelno == logging.WARNING  # it went with messages still queued
    assert re.fullmatch(
        r"gateway stream \d+ ended \(ipv4:127\.0\.0\.1:\d+, plain\): RESOURCE_EXHAUSTED: "
        r"gateway lagging: more than 8 messages queued; 1 subscription\(s\) dropped, "
        r"\d+ queued message\(s\) unsent", end.getMessage()), end.getMessage()




def test_an_expired_session_is_closed() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        registry = servicer.registry
        registry.session_ttl = 0  # everything is silent for longer than that
        [session] = registry.expired()
        servicer.close(session)
        assert await end_status(call) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(registry.matcher) == 0

    run(scenario)


def test_a_gateways_new_stream_supersedes_its_stale_one() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        stale = stub.Stream()
        await stale.write(GatewayMessage(hello=Hello(gateway_id="gw-1", batch_delivery=True)))
        await stale.write(subscribe("s1"))
        assert (await read(stale)).subscribe_response.success
        fresh = stub.Stream()
        await fresh.write(GatewayMessage(hello=Hello(gateway_id="gw-1", batch_delivery=True)))
        await fresh.write(subscribe("s1"))
        assert (await read(fresh)).subscribe_response.success
        assert await end_status(stale) == grpc.StatusCode.ABORTED
        fresh.cancel()

    run(scenario)


def ends(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if " ended " in r.getMessage()]


def test_each_stream_is_logged_when_it_opens_and_ends(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        batching, plain = stub.Stream(), stub.Stream()
        await batching.write(GatewayMessage(hello=Hello(gateway_id="gw-b", batch_delivery=True)))
        for call, subs in ((batching, ["b1", "b2"]), (plain, ["p"])):
            for sub in subs:
                await call.write(subscribe(sub))
                assert (await read(call)).subscribe_response.success
        await batching.done_writing()
        assert await end_status(batching) is None
        plain.cancel()
        for _ in range(500):
            if not servicer.streams:
                break
            await asyncio.sleep(0.01)

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        run(scenario)
    opened = [r.getMessage() for r in caplog.records if " opened " in r.getMessage()]
    assert len(opened) == 2
    [hello] = [r.getMessage() for r in caplog.records if " is gateway " in r.getMessage()]
    assert re.fullmatch(r"gateway stream \d+ is gateway gw-b \(batches of 256\)", hello), hello
    assert all(re.fullmatch(r"gateway stream \d+ opened by ipv4:127\.0\.0\.1:\d+", m)
               for m in opened), opened
    first, second = ends(caplog)
    assert re.fullmatch(
        r"gateway stream \d+ ended \(gw-b at ipv4:127\.0\.0\.1:\d+, batching\): "
        r"closed by the gateway; 2 subscription\(s\) dropped", first), first
    assert re.fullmatch(
        r"gateway stream \d+ ended \(ipv4:127\.0\.0\.1:\d+, plain\): cancelled by the "
        r"gateway, or its connection was lost; 1 subscription\(s\) dropped", second), second
    assert all(r.levelno == logging.INFO for r in caplog.records)
    record = next(r for r in caplog.records if " ended " in r.getMessage())
    assert (record.gateway, record.delivery, record.dropped, record.unsent) == (  # type: ignore[attr-defined]
        "gw-b", "batching", 2, 0)


def test_a_superseded_stream_logs_the_subscriptions_it_took_along(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        stale, fresh = stub.Stream(), stub.Stream()
        await stale.write(GatewayMessage(hello=Hello(gateway_id="gw-1")))
        await stale.write(subscribe("s1"))
        assert (await read(stale)).subscribe_response.success
        await fresh.write(GatewayMessage(hello=Hello(gateway_id="gw-1")))
        assert await end_status(stale) == grpc.StatusCode.ABORTED
        fresh.cancel()

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        run(scenario)
    assert re.fullmatch(
        r"gateway stream \d+ ended \(gw-1 at ipv4:127\.0\.0\.1:\d+, plain\): ABORTED: "
        r"superseded by a newer stream of gateway gw-1; 1 subscription\(s\) dropped",
        ends(caplog)[0]), ends(caplog)


def test_shutdown_ends_each_stream_once_its_queue_is_written(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        [stream] = servicer.streams.values()
        events = [StreamerEvent(event_id=f"e{i}") for i in range(3)]
        assert servicer.deliver(stream.session, [framed(["s1"], e) for e in events])
        servicer.shutdown()
        # Nothing more is taken, and a refusal now is not a lagging gateway.
        assert not servicer.deliver(stream.session, [framed(["s1"], events[0])])
        await call.write(heartbeat(7))
        code, received = grpc.StatusCode.OK, []
        try:
            while (message := await call.read()) is not grpc.aio.EOF:
                received.append(message.delivery.event.event_id)
        except grpc.aio.AioRpcError as exc:
            code = exc.code()
            assert exc.details() == "the Streamer is shutting down"
        assert code == grpc.StatusCode.UNAVAILABLE
        assert received == ["e0", "e1", "e2"]
        assert servicer.lagging_cut_offs == 0
        late = stub.Stream()  # opened during the drain: ended at once
        assert await end_status(late) == grpc.StatusCode.UNAVAILABLE
        assert await servicer.wait_closed(5)

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        run(scenario)
    first, late = ends(caplog)
    assert first.endswith("plain): UNAVAILABLE: the Streamer is shutting down; "
                          "1 subscription(s) dropped"), first
    assert late.endswith("plain): UNAVAILABLE: the Streamer is shutting down; "
                         "0 subscription(s) dropped"), late
