"""StreamerService over real gRPC on loopback (docs/protocol.md, Behaviour)."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import grpc
import pytest

from streamer.matching.matcher import Matcher
from streamer.node.delivery import delivery_message, event_field, subscription_field
from streamer.node.server import (
    REGISTRATION_BACKLOG,
    REGISTRATION_BACKLOG_BYTES,
    StreamerServicer,
    _Backlog,
    add_to_server,
)
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import streamer_v1_pb2_grpc as pb_grpc
from streamer.protocol.streamer_v1_pb2 import (
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    StreamerEvent,
    StreamerMessage,
    SubscribeBatch,
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


@contextlib.asynccontextmanager
async def serving(
    channel_options: list[tuple[str, int]] | None = None, **servicer_kw: Any
) -> AsyncIterator[tuple[grpc.aio.Channel, StreamerServicer]]:
    """A ``StreamerServicer`` on a real gRPC server, and a channel to it."""
    servicer = StreamerServicer(Sessions(SubscriptionSet(Matcher())), **servicer_kw)
    server = grpc.aio.server()
    add_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    try:
        async with grpc.aio.insecure_channel(
            f"127.0.0.1:{port}", options=channel_options
        ) as channel:
            yield channel, servicer
    finally:
        await server.stop(grace=1)


def run(
    scenario: Scenario, channel_options: list[tuple[str, int]] | None = None, **servicer_kw: Any
) -> None:
    async def main() -> None:
        async with serving(channel_options, **servicer_kw) as (channel, servicer):
            await asyncio.wait_for(scenario(pb_grpc.StreamerServiceStub(channel), servicer), 30)

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
        matcher = servicer.subscriptions.matcher
        assert matcher.match("app", "messages", "m", {"chat_id": "c1"}) == ["s1"]
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        for _ in range(500):
            if len(matcher) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(matcher) == 0 and len(servicer.sessions) == 0

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
            if len(servicer.subscriptions.matcher) == 0:
                break
            await asyncio.sleep(0.01)
        assert len(servicer.subscriptions.matcher) == 0

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        run(scenario, queue_capacity=8)
    [end] = [r for r in caplog.records if " ended " in r.getMessage()]
    assert end.levelno == logging.WARNING  # it went with messages still queued
    assert re.fullmatch(
        r"gateway stream \d+ ended \(ipv4:127\.0\.0\.1:\d+, plain\): RESOURCE_EXHAUSTED: "
        r"gateway lagging: more than 8 messages or 67108864 bytes queued; "
        r"1 subscription\(s\) dropped, "
        r"\d+ queued message\(s\) unsent", end.getMessage()), end.getMessage()




def batch(*requests: GatewayMessage) -> GatewayMessage:
    return GatewayMessage(subscribe_batch=SubscribeBatch(requests=[r.subscribe for r in requests]))


def test_a_subscribe_batch_is_answered_in_order_as_single_subscribes_would_be() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("taken"))
        assert (await read(call)).subscribe_response.success
        bad = subscribe("bad")
        bad.subscribe.filters[0].op = "~="
        generated = subscribe("")
        await call.write(batch(subscribe("a"), subscribe("taken"), bad, subscribe("a"),
                               generated, subscribe("b", chat="c2")))
        message = await read(call)
        assert message.WhichOneof("payload") == "subscribe_batch_response"
        got = [(r.subscription_id, r.success, r.code)
               for r in message.subscribe_batch_response.responses]
        assert got[:4] == [("a", True, ""), ("taken", False, "already_exists"),
                           ("bad", False, "invalid_argument"), ("a", False, "already_exists")]
        assert got[4][1:] == (True, "") and got[4][0]
        assert got[5] == ("b", True, "")
        assert "~=" in message.subscribe_batch_response.responses[2].error
        matcher = servicer.subscriptions.matcher
        assert sorted(matcher.match("app", "messages", "m", {"chat_id": "c1"})) == sorted(
            ["taken", "a", got[4][0]])
        await call.write(batch())  # empty: one empty answer
        assert not (await read(call)).subscribe_batch_response.responses
        await call.write(heartbeat(7))
        assert (await read(call)).heartbeat_ack.timestamp == 7  # the stream stays open
        assert servicer.batch_subscribes == 6
        call.cancel()

    run(scenario)


def test_a_large_batch_is_registered_in_chunks_and_its_answer_split_to_fit() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        # A gateway that receives at most 16 KiB: the answer to 5000
        # requests (about 60 KB) comes in several messages, in order.
        await call.write(GatewayMessage(hello=Hello(
            gateway_id="gw", batch_delivery=True, max_message_bytes=16 << 10)))
        ids = [f"sub-{i:05d}" for i in range(5000)]
        await call.write(batch(*(subscribe(i, chat=f"c{n % 7}") for n, i in enumerate(ids))))
        answered: list[str] = []
        messages = 0
        while len(answered) < len(ids):
            message = await read(call)
            assert message.WhichOneof("payload") == "subscribe_batch_response"
            assert message.ByteSize() <= 16 << 10
            messages += 1
            answered += [r.subscription_id for r in message.subscribe_batch_response.responses
                         if r.success]
        assert answered == ids and messages > 3
        assert len(servicer.subscriptions.matcher) == 5000
        call.cancel()

    run(scenario)


def test_an_expired_session_is_closed() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        registry = servicer.sessions
        registry.session_ttl = 0  # everything is silent for longer than that
        [session] = registry.expired()
        servicer.close(session)
        assert await end_status(call) == grpc.StatusCode.DEADLINE_EXCEEDED
        assert len(registry.subscriptions.matcher) == 0

    run(scenario)


def test_a_gateways_new_stream_supersedes_its_stale_one() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        stale = stub.Stream()
        await stale.write(GatewayMessage(hello=Hello(
            gateway_id="gw-1", batch_delivery=True, instance="i1")))
        await stale.write(subscribe("s1"))
        assert (await read(stale)).subscribe_response.success
        fresh = stub.Stream()
        await fresh.write(GatewayMessage(hello=Hello(
            gateway_id="gw-1", batch_delivery=True, instance="i1")))
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
    # A cancelled call may reach the handler as its request stream ending
    # first: either way the gateway ended it.
    assert re.fullmatch(
        r"gateway stream \d+ ended \(ipv4:127\.0\.0\.1:\d+, plain\): (cancelled by the "
        r"gateway, or its connection was lost|closed by the gateway); 1 subscription\(s\) "
        r"dropped", second), second
    assert all(r.levelno == logging.INFO for r in caplog.records)
    record = next(r for r in caplog.records if " ended " in r.getMessage())
    assert (record.gateway, record.delivery, record.dropped, record.unsent) == (  # type: ignore[attr-defined]
        "gw-b", "batching", 2, 0)


def test_a_superseded_stream_logs_the_subscriptions_it_took_along(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        stale, fresh = stub.Stream(), stub.Stream()
        await stale.write(GatewayMessage(hello=Hello(gateway_id="gw-1", instance="i1")))
        await stale.write(subscribe("s1"))
        assert (await read(stale)).subscribe_response.success
        await fresh.write(GatewayMessage(hello=Hello(gateway_id="gw-1", instance="i1")))
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


def test_another_gateway_cannot_take_over_a_live_stream() -> None:
    """A stranger's Hello with the victim's gateway id is refused; the
    victim's stream and subscriptions carry on."""

    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        victim = stub.Stream()
        await victim.write(GatewayMessage(hello=Hello(gateway_id="gw-1", instance="mine")))
        await victim.write(subscribe("s1"))
        assert (await read(victim)).subscribe_response.success
        stranger = stub.Stream()
        await stranger.write(GatewayMessage(hello=Hello(gateway_id="gw-1", instance="other")))
        assert await end_status(stranger) == grpc.StatusCode.ALREADY_EXISTS
        # A Heartbeat naming the victim renames nothing either.
        await victim.write(heartbeat(7, gateway_id="gw-evil"))
        assert (await read(victim)).heartbeat_ack.timestamp == 7
        [stream] = servicer.streams.values()
        assert stream.session.gateway_id == "gw-1"
        assert servicer.subscriptions.owner_of("s1") == stream.session.owner
        victim.cancel()

    run(scenario)


def test_a_message_that_does_not_decode_ends_the_stream_with_invalid_argument(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def main() -> None:
        async with serving() as (channel, servicer):
            # A raw call, as a hostile or broken client sends bytes.
            raw = channel.stream_stream(
                "/syntrix.streamer.v1.StreamerService/Stream",
                request_serializer=None, response_deserializer=None)()
            await raw.write(subscribe("s1").SerializeToString())
            assert StreamerMessage.FromString(await raw.read()).subscribe_response.success
            await raw.write(b"\x0a\xff\xff\xff\xff\x0f")  # a length far past the end
            with pytest.raises(grpc.aio.AioRpcError) as ended:
                while await raw.read() is not grpc.aio.EOF:
                    pass
            assert ended.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "message 2 is not a GatewayMessage" in (ended.value.details() or "")
            assert servicer.undecodable == 1

    with caplog.at_level(logging.INFO, logger="streamer.node.server"):
        asyncio.run(asyncio.wait_for(main(), 30))
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "message 2 does not decode" in warnings[0].getMessage()
    assert all(r.exc_info is None for r in caplog.records)


def test_a_cut_off_frees_the_queue_at_once_though_a_write_is_blocked() -> None:
    """The gateway reads nothing: its transport is full and a write is
    blocked. The cut-off must not wait behind that write."""

    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        [stream] = servicer.streams.values()
        big = framed(["s1"], StreamerEvent(event_id="e", document_data=b"x" * 50_000))
        while servicer.deliver(stream.session, [big]):
            await asyncio.sleep(0)
        assert servicer.lagging_cut_offs == 1
        for _ in range(100):  # the handler ends without the client reading anything
            if not servicer.streams:
                break
            await asyncio.sleep(0.01)
        assert not servicer.streams and stream.queue.bytes == 0 and len(stream.queue) == 0
        assert await end_status(call) == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(scenario, queue_bytes=2 << 20)


def test_a_gateway_that_stops_reading_is_cut_off_by_the_watchdog() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        await call.done_writing()  # half-closed, and never reads again
        [stream] = servicer.streams.values()
        big = framed(["s1"], StreamerEvent(event_id="e", document_data=b"x" * 50_000))
        for _ in range(200):  # far below the queue's bounds, beyond the transport's
            assert servicer.deliver(stream.session, [big])
        for _ in range(300):
            servicer.watch()
            if not servicer.streams:
                break
            await asyncio.sleep(0.01)
        assert servicer.stalled_cut_offs == 1 and not servicer.streams
        assert await end_status(call) == grpc.StatusCode.RESOURCE_EXHAUSTED

    run(scenario, stall_seconds=0.2)


def test_a_delivery_larger_than_the_gateway_receives_goes_without_its_document() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        plain = stub.Stream()  # a Syntrix gateway: gRPC's 4 MiB receive limit
        await plain.write(subscribe("s1"))
        assert (await read(plain)).subscribe_response.success
        [stream] = servicer.streams.values()
        huge = StreamerEvent(event_id="big", document_id="d1", progress="p9",
                             document_data=b'{"x":"' + b"y" * (5 << 20) + b'"}')
        small = StreamerEvent(event_id="small", document_data=b"{}")
        assert servicer.deliver(stream.session, [framed(["s1"], huge), framed(["s1"], small)])
        first, second = (await read(plain)).delivery, (await read(plain)).delivery
        assert (first.event.event_id, first.event.document_id, first.event.progress) == (
            "big", "d1", "p9")
        assert first.event.document_data == b"" and first.event.document_omitted
        assert second.event.event_id == "small" and not second.event.document_omitted
        assert servicer.documents_omitted == 1
        plain.cancel()

    run(scenario)


def test_a_gateway_that_receives_more_gets_the_whole_document() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(GatewayMessage(hello=Hello(
            gateway_id="gw-big", batch_delivery=True, instance="i", max_message_bytes=8 << 20)))
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        [stream] = servicer.streams.values()
        data = b'{"x":"' + b"y" * (5 << 20) + b'"}'
        assert servicer.deliver(stream.session, [framed(["s1"], StreamerEvent(
            event_id="big", document_data=data)) for _ in range(3)])
        got = []
        while len(got) < 3:  # batches stop short of the gateway's limit
            got += (await read(call)).batch.deliveries
        assert [d.event.document_data == data for d in got] == [True] * 3
        assert servicer.documents_omitted == 0
        call.cancel()

    run(scenario, channel_options=[("grpc.max_receive_message_length", 8 << 20)])


def test_a_delivery_too_large_even_without_its_document_is_split_by_ids() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        call = stub.Stream()
        await call.write(GatewayMessage(hello=Hello(
            gateway_id="gw", instance="i", max_message_bytes=4096)))
        await call.write(subscribe("s1"))
        assert (await read(call)).subscribe_response.success
        [stream] = servicer.streams.values()
        ids = [f"subscription-{n:04}" for n in range(1000)]  # ~23 KB of ids
        assert servicer.deliver(stream.session, [framed(ids, StreamerEvent(event_id="e"))])
        got: list[str] = []
        while len(got) < len(ids):
            delivery = (await read(call)).delivery
            assert delivery.event.event_id == "e" and delivery.event.document_omitted
            got += delivery.subscription_ids
        assert got == ids and servicer.deliveries_split == 1
        call.cancel()

    run(scenario)


def test_all_queues_together_are_bounded_the_largest_is_cut_off() -> None:
    async def scenario(stub: pb_grpc.StreamerServiceStub, servicer: StreamerServicer) -> None:
        small, large = stub.Stream(), stub.Stream()
        for call, sub in ((small, "s"), (large, "l")):
            await call.write(subscribe(sub))
            assert (await read(call)).subscribe_response.success
        by_sub = {servicer.subscriptions.owner_of(s): s for s in ("s", "l")}
        sessions = {by_sub[st.session.owner]: st.session for st in servicer.streams.values()}
        event = StreamerEvent(event_id="e", document_data=b"x" * 100_000)
        # Neither gateway reads; each queue is far from its own bound.
        for _ in range(30):
            servicer.deliver(sessions["l"], [framed(["l"], event)])
        for _ in range(10):
            servicer.deliver(sessions["s"], [framed(["s"], event)])
        assert servicer.budget_cut_offs == 1
        assert await end_status(large) == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert servicer.queue_budget.used <= servicer.queue_budget.limit
        assert [s.session for s in servicer.streams.values()] == [sessions["s"]]
        small.cancel()

    run(scenario, node_queue_bytes=3_500_000)


def test_the_registration_backlog_is_bounded_by_count_and_bytes() -> None:
    # What a stream reads ahead of its registrar: a gateway that sends more
    # waits for it, by messages and by bytes; one message always fits.
    async def scenario() -> None:
        backlog = _Backlog()
        message = GatewayMessage(heartbeat=Heartbeat(gateway_id="gw"))
        large = bytes(REGISTRATION_BACKLOG_BYTES * 2)
        await backlog.put(message, large)  # alone: admitted
        blocked = asyncio.create_task(backlog.put(message, b"x"))
        await asyncio.sleep(0.01)
        assert not blocked.done()
        assert await backlog.get() == (message, large)
        await asyncio.wait_for(blocked, 1)
        for _ in range(REGISTRATION_BACKLOG - 1):
            await backlog.put(message, b"x")
        blocked = asyncio.create_task(backlog.put(None, b""))
        await asyncio.sleep(0.01)
        assert not blocked.done() and backlog.bytes == REGISTRATION_BACKLOG
        for _ in range(REGISTRATION_BACKLOG):
            assert await backlog.get() == (message, b"x")
        await asyncio.wait_for(blocked, 1)
        assert await backlog.get() == (None, b"") and backlog.bytes == 0

    asyncio.run(scenario())
