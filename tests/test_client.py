"""StreamerClient against a real Streamer on loopback (``service_helpers``),
events flowing end to end from a test Puller, and against a raw peer that
stops acknowledging heartbeats."""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import subprocess
import sys
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import grpc
import orjson
import pytest
from service_helpers import Service, free_port, serving, until

from streamer.client import DEFAULT_CONNECT_TIMEOUT, StreamerClient, Subscription
from streamer.errors import (
    AccessDenied,
    CannotConnect,
    StreamClosed,
    StreamerError,
    SubscriptionRejected,
)
from streamer.matching.matcher import Filter
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import (
    CatchUpProgress,
    CaughtUp,
    EventDelivery,
    GatewayMessage,
    HeartbeatAck,
    StreamerEvent,
    StreamerMessage,
    SubscribeBatchResponse,
    SubscribeRequest,
    SubscribeResponse,
)

FAST = {"heartbeat_interval": 0.1, "ack_timeout": 1.0, "backoff": (0.01, 0.05)}


def run(scenario: Callable[[], Awaitable[None]]) -> None:
    asyncio.run(asyncio.wait_for(scenario(), 30))


def change(i: int, **doc: Any) -> pb.ChangeEvent:
    return pb.ChangeEvent(
        event_id=f"e{i}", database="app", mgo_coll="messages", mgo_doc_id=f"m{i}",
        op_type="insert", full_doc=orjson.dumps(doc), timestamp=1000 + i,
    )


async def take(client: StreamerClient, n: int) -> list[EventDelivery]:
    out: list[EventDelivery] = []

    async def collect() -> None:
        async for delivery in client.deliveries():
            out.append(delivery)
            if len(out) == n:
                return

    await asyncio.wait_for(collect(), 5)
    return out


def chat(name: str) -> list[tuple[str, str, Any]]:
    return [("chat", "==", name)]


def test_subscribe_returns_the_given_or_a_generated_id(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            given = await client.subscribe(
                "messages", database="app", filters=chat("c1"), subscription_id="mine"
            )
            generated = await client.subscribe("messages", database="app", filters=chat("c2"))
            assert given == "mine" and len(generated) == 36 and generated.count("-") == 4
            assert client.live_subscriptions == ["mine", generated]
            assert svc.subscriptions.ids() == {"mine", generated}
            await svc.puller.append(change(0, chat="c2"), change(1, chat="c1"))
            got = await take(client, 2)
            assert [(d.event.event_id, list(d.subscription_ids)) for d in got] == [
                ("e0", [generated]), ("e1", ["mine"])]

    run(scenario)


def test_filter_values_and_filter_objects_reach_the_matcher(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            await client.subscribe("messages", database="app", subscription_id="s", filters=[
                Filter("n", ">=", 2), ("flag", "==", True), ("tag", "in", ["x", "y"]),
                ("score", "<", 1.5),
            ])
            await svc.puller.append(
                change(0, n=3, flag=1, tag="x", score=1.0),  # 1 is not true: bool sent as bool
                change(1, n=3, flag=True, tag="z", score=1.0),
                change(2, n=3, flag=True, tag="y", score=1.0),
            )
            [delivery] = await take(client, 1)
            assert delivery.event.event_id == "e2"
            with pytest.raises(TypeError, match=r"filter 2 \(meta\): cannot send a dict value"):
                await client.subscribe("messages", filters=[("a", "==", 1), ("meta", "==", {})])
            with pytest.raises(TypeError, match="filter 1: expected a Filter or a"):
                await client.subscribe("messages", filters=[("a", "==")])  # type: ignore[list-item]
            with pytest.raises(ValueError, match=r"filter 1 \(a\): 18446744073709551616 does not"):
                await client.subscribe("messages", filters=[("a", "==", [2**64])])
            assert client.live_subscriptions == ["s"]

    run(scenario)


def test_rejections_raise_with_the_server_code(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw-1", **FAST
        ) as one, StreamerClient(svc.target, gateway_id="gw-2", **FAST) as two:
            with pytest.raises(SubscriptionRejected) as bad:
                await one.subscribe("messages", filters=[("chat", "like", "c%")])
            assert bad.value.code == "invalid_argument" and "like" in bad.value.error
            assert isinstance(bad.value, ValueError) and isinstance(bad.value, StreamerError)
            await one.subscribe("messages", filters=chat("c1"), subscription_id="taken")
            with pytest.raises(SubscriptionRejected) as dup:
                await two.subscribe("messages", filters=chat("c2"), subscription_id="taken")
            assert (dup.value.code, dup.value.subscription_id) == ("already_exists", "taken")
            with pytest.raises(SubscriptionRejected, match="already subscribed by this client"):
                await one.subscribe("messages", subscription_id="taken")
            assert one.live_subscriptions == ["taken"] and two.live_subscriptions == []
            taken = svc.holder("taken")
            assert taken is not None and taken.gateway_id == "gw-1"

    run(scenario)


def test_unsubscribe_stops_deliveries(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            await client.subscribe("messages", database="app", filters=chat("c1"),
                                   subscription_id="gone")
            await client.subscribe("messages", database="app", filters=chat("c2"),
                                   subscription_id="kept")
            await client.unsubscribe("gone")
            await client.unsubscribe("never-was")
            assert client.live_subscriptions == ["kept"]
            await until(lambda: "gone" not in svc.subscriptions.ids())
            await svc.puller.append(change(0, chat="c1"), change(1, chat="c2"))
            # Deliveries keep the Puller's order: e0 would have come first.
            [delivery] = await take(client, 1)
            assert (delivery.event.event_id, list(delivery.subscription_ids)) == ("e1", ["kept"])

    run(scenario)


@pytest.mark.parametrize("batch", [True, False], ids=["batch", "plain"])
def test_deliveries_are_flattened_in_order(tmp_path: Path, batch: bool) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", batch=batch, max_batch=8, **FAST
        ) as client:
            await client.subscribe("messages", database="app", filters=chat("c"),
                                   subscription_id="s")
            await svc.puller.append(*(change(i, chat="c") for i in range(50)))
            got = await take(client, 50)
            assert [d.event.event_id for d in got] == [f"e{i}" for i in range(50)]
            assert all(list(d.subscription_ids) == ["s"] for d in got)
            [stream] = svc.servicer.streams.values()
            queue = stream.queue
            assert stream.session.gateway_id == "gw"
            if batch:
                assert queue.max_batch == 8
                assert queue.sent_messages < queue.sent_deliveries  # several per message
            else:
                assert queue.max_batch is None

    run(scenario)


def test_heartbeats_keep_the_session_alive(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path, session_ttl=0.5) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client, grpc.aio.insecure_channel(svc.target) as channel:
            await client.subscribe("messages", database="app", filters=chat("c"),
                                   subscription_id="beating")
            silent = sgrpc.StreamerServiceStub(channel).Stream()
            await silent.write(GatewayMessage(subscribe=SubscribeRequest(
                subscription_id="silent", database="app", collection="messages")))
            assert (await silent.read()).subscribe_response.success
            with pytest.raises(grpc.aio.AioRpcError) as expired:
                while await silent.read() is not grpc.aio.EOF:
                    pass
            assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
            assert svc.subscriptions.ids() == {"beating"}
            assert client.connected and client.reconnects == 0
            await svc.puller.append(change(0, chat="c"))
            [delivery] = await take(client, 1)
            assert delivery.event.event_id == "e0"

    run(scenario)


def test_a_restarted_streamer_gets_every_subscription_back(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            a = await client.subscribe("messages", database="app", filters=chat("a"))
            await client.subscribe("messages", database="app", filters=chat("b"),
                                   subscription_id="b")
            await svc.puller.append(change(0, chat="a"))
            assert [d.event.event_id for d in await take(client, 1)] == ["e0"]
            await svc.stop()
            await until(lambda: not client.connected)
            await svc.start()  # same port, empty index
            await until(lambda: client.connected)
            assert client.reconnects == 1
            assert client.live_subscriptions == [a, "b"]
            assert svc.subscriptions.ids() == {a, "b"}
            await svc.puller.append(change(1, chat="b"), change(2, chat="a"))
            got = await take(client, 2)
            assert [(d.event.event_id, list(d.subscription_ids)) for d in got] == [
                ("e1", ["b"]), ("e2", [a])]

    run(scenario)


@pytest.mark.parametrize("batch", [True, False])
def test_subscribe_many_answers_each_in_order_and_reconnects_register_in_batches(
    tmp_path: Path, batch: bool,
) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", batch=batch, **FAST
        ) as client:
            await client.subscribe("messages", database="app", subscription_id="taken",
                                   filters=chat("x"))
            # Single subscribes take a round of messages each: fewer of them,
            # so that re-subscribing them fits in the FAST ack timeout.
            n = 12_000 if batch else 1200
            many = [Subscription("messages", database="app", filters=chat(f"c{i % 3}"),
                                 subscription_id=f"s{i}") for i in range(n)]
            results = await client.subscribe_many([
                *many[:n // 2], Subscription("messages", filters=[("chat", "~=", "c")]),
                *many[n // 2:]])
            assert results[:n // 2] == [f"s{i}" for i in range(n // 2)]
            assert results[n // 2 + 1:] == [f"s{i}" for i in range(n // 2, n)]
            refused = results[n // 2]
            assert isinstance(refused, SubscriptionRejected) and refused.code == "invalid_argument"
            with pytest.raises(SubscriptionRejected, match="already subscribed"):
                await client.subscribe_many([Subscription("messages", subscription_id="taken")])
            assert await client.subscribe_many([]) == []
            # Batches of BATCH_REQUESTS when batching, else one by one.
            assert svc.servicer.batch_subscribes == (n + 1 if batch else 0)
            await svc.stop()
            await until(lambda: not client.connected)
            await svc.start()  # same port, empty index
            await until(lambda: client.connected)
            assert svc.subscriptions.ids() == {"taken", *(f"s{i}" for i in range(n))}
            assert svc.servicer.batch_subscribes == (n + 1 if batch else 0)
            await svc.puller.append(change(0, chat="c1"))
            [got] = await take(client, 1)
            assert len(got.subscription_ids) == n // 3

    run(scenario)


def test_subscribe_many_with_a_malformed_subscription_keeps_none_of_them(
    tmp_path: Path,
) -> None:
    # Batches go out as they are built: those sent before the malformed one
    # was reached are withdrawn again.
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            await until(lambda: client.connected)
            many = [Subscription("messages", database="app", filters=chat(f"c{i}"),
                                 subscription_id=f"s{i}") for i in range(2500)]
            many[2200] = Subscription("messages", filters=[("chat", "==", object())])
            with pytest.raises(TypeError, match="filter 1 \\(chat\\): cannot send a object value"):
                await client.subscribe_many(many)
            assert client.live_subscriptions == []
            await until(lambda: not svc.subscriptions.ids())
            assert await client.subscribe_many(many[:3]) == ["s0", "s1", "s2"]

    run(scenario)


def test_a_resuming_client_gets_every_event_across_a_streamer_restart(tmp_path: Path) -> None:
    # Events appended while the Streamer is down, and those it replays after
    # its saved marker, reach each subscription exactly once and in order:
    # the client re-subscribes after the last delivery it received.
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", **FAST
        ) as client:
            got: dict[str, list[str]] = {"a": [], "b": []}

            async def collect() -> None:
                async for delivery in client.deliveries():
                    for sub_id in delivery.subscription_ids:
                        got[sub_id].append(delivery.event.event_id)

            collector = asyncio.create_task(collect())
            assert await client.subscribe_many([
                Subscription("messages", database="app", filters=chat(c), subscription_id=c)
                for c in ("a", "b")]) == ["a", "b"]
            chats = ["a", "b", "a", "a", "b", "a", "b", "b", "a", "b", "a", "a"]
            await svc.puller.append(*(change(i, chat=c) for i, c in enumerate(chats[:4])))
            await until(lambda: len(got["a"]) == 3)
            await svc.stop()
            await until(lambda: not client.connected)
            await svc.puller.append(*(change(i, chat=c) for i, c in enumerate(chats[4:8], 4)))
            await svc.start()  # same port, empty index
            await until(lambda: client.connected)
            await svc.puller.append(*(change(i, chat=c) for i, c in enumerate(chats[8:], 8)))
            expected = {c: [f"e{i}" for i, x in enumerate(chats) if x == c] for c in got}
            await until(lambda: all(len(got[c]) >= len(expected[c]) for c in got))
            await asyncio.sleep(0.1)  # a duplicate would come by now
            assert got == expected
            assert client.marker("a") == "p11"  # the double's marker of event 11
            collector.cancel()

    run(scenario)


def test_subscribe_waits_for_the_connection(tmp_path: Path) -> None:
    async def scenario() -> None:
        svc = Service(tmp_path)
        async with svc:
            await svc.stop()  # keeps its port, which is now closed
            async with StreamerClient(svc.target, gateway_id="gw", **FAST) as client:
                with pytest.raises(TimeoutError):
                    await client.subscribe("messages", subscription_id="late", timeout=0.2)
                assert client.live_subscriptions == []
                waiting = asyncio.create_task(client.subscribe(
                    "messages", database="app", filters=chat("c"), subscription_id="w"))
                regretted = asyncio.create_task(client.subscribe("messages", subscription_id="r"))
                await asyncio.sleep(0.2)
                dropping = asyncio.create_task(client.unsubscribe("r"))  # waits for the answer
                await asyncio.sleep(0.05)
                assert not waiting.done() and not dropping.done() and not client.connected
                await svc.start()
                assert await asyncio.wait_for(waiting, 5) == "w"
                assert await asyncio.wait_for(regretted, 5) == "r"
                await asyncio.wait_for(dropping, 5)
                assert client.live_subscriptions == ["w"]
                await until(lambda: svc.subscriptions.ids() == {"w"})

    run(scenario)


def test_wrong_token_fails_loudly_instead_of_retrying(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path, token=b"s3cret") as svc:
            async with StreamerClient(
                svc.target, gateway_id="gw", token="s3cret", **FAST
            ) as client:
                assert await client.subscribe("messages", subscription_id="in") == "in"
            for token in ("nope", None):
                async with StreamerClient(
                    svc.target, gateway_id="gw", token=token, **FAST
                ) as client:
                    with pytest.raises(AccessDenied) as denied:
                        await client.subscribe("messages", subscription_id="out")
                    assert denied.value.code == "UNAUTHENTICATED"
                    assert isinstance(denied.value, PermissionError)
                    with pytest.raises(AccessDenied):
                        await take(client, 1)
                    with pytest.raises(AccessDenied):
                        await client.unsubscribe("out")
                    assert client.reconnects == 0 and not client.connected

    run(scenario)


def test_a_wrong_address_fails_with_cannot_connect(caplog: pytest.LogCaptureFixture) -> None:
    target = f"127.0.0.1:{free_port()}"  # nothing listens there

    async def scenario() -> None:
        loop = asyncio.get_running_loop()
        async with StreamerClient(
            target, gateway_id="gw", connect_timeout=0.5, backoff=(0.01, 0.05)
        ) as client:
            started = loop.time()
            with pytest.raises(CannotConnect) as failed:
                await client.subscribe("messages", subscription_id="s")  # no timeout of its own
            assert loop.time() - started < 10  # it gave up: it did not wait forever
            error = failed.value
            assert isinstance(error, ConnectionError) and isinstance(error, StreamerError)
            assert (error.target, error.timeout) == (target, 0.5)
            assert str(error).startswith(f"cannot connect to {target} within 0.5 s: UNAVAILABLE")
            assert "Connection refused" in error.reason  # why, in gRPC's words
            with pytest.raises(CannotConnect):
                await take(client, 1)
            with pytest.raises(CannotConnect):
                await client.subscribe("messages")
            assert not client.connected and client.live_subscriptions == []

    with caplog.at_level(logging.WARNING, logger="streamer.client"):
        run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert not any("lost" in m for m in messages), messages
    assert any(m.startswith(f"cannot connect to streamer {target}: UNAVAILABLE") for m in messages)
    assert messages[-1].startswith(f"giving up: cannot connect to {target} within 0.5 s")
    assert StreamerClient(target, gateway_id="gw").connect_timeout == DEFAULT_CONNECT_TIMEOUT == 10
    with pytest.raises(ValueError, match="connect_timeout must be positive or None"):
        StreamerClient(target, gateway_id="gw", connect_timeout=0)


def test_once_a_stream_opened_reconnects_outlast_the_connect_timeout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc, StreamerClient(
            svc.target, gateway_id="gw", connect_timeout=0.2, **FAST
        ) as client:
            await client.subscribe("messages", subscription_id="s")
            await svc.stop()
            await until(lambda: not client.connected)
            await asyncio.sleep(1.0)  # the server stays away for five connect timeouts
            await svc.start()
            await until(lambda: client.connected)
            assert client.reconnects == 1 and client.live_subscriptions == ["s"]

    with caplog.at_level(logging.WARNING, logger="streamer.client"):
        run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert len([m for m in messages if m.startswith("stream to streamer")]) == 1, messages
    assert any(m.startswith("cannot connect to streamer") for m in messages)
    assert not any(m.startswith("giving up") for m in messages)


def test_cancelling_the_consumer_closes_the_client_and_chains_nothing(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc:
            client = StreamerClient(svc.target, gateway_id="gw", **FAST)
            subscribed = asyncio.Event()
            seen: list[BaseException] = []

            async def consume() -> None:
                try:
                    async with client:
                        await client.subscribe("messages", subscription_id="s")
                        subscribed.set()
                        async for _ in client.deliveries():
                            pass
                except BaseException as exc:
                    seen.append(exc)
                    raise

            consumer = asyncio.create_task(consume())
            await asyncio.wait_for(subscribed.wait(), 5)
            consumer.cancel()
            with pytest.raises(asyncio.CancelledError):
                await consumer
            [error] = seen
            assert type(error) is asyncio.CancelledError
            assert error.__context__ is None and error.__cause__ is None
            with pytest.raises(StreamClosed):
                await client.subscribe("messages")
            await until(lambda: svc.subscriptions.ids() == set())

    run(scenario)


def test_close_lets_a_cancellation_of_its_caller_through(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc:
            client = StreamerClient(svc.target, gateway_id="gw", **FAST)
            client.start()
            await client.subscribe("messages", subscription_id="s")
            closing = asyncio.create_task(client.close())
            await asyncio.sleep(0)  # it now waits for the client's task to end
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
            # Closed all the same.
            with pytest.raises(StreamClosed):
                await client.subscribe("messages")
            assert [d async for d in client.deliveries()] == []

    run(scenario)


def test_close_right_after_the_handshake_returns_at_once(tmp_path: Path) -> None:
    """A gateway that connects, subscribes and closes (found by
    bench/bench_churn.py): the heartbeat ack that ends the handshake often
    arrives with the subscribe's answer, so close() cancels the handshake
    just as that ack wakes it. On Python 3.11, ``asyncio.wait_for`` then
    returns the ack instead of raising the cancellation: the handshake went
    on into its heartbeat loop and close() waited for ``ack_timeout`` (30 s
    by default). Thirty rounds hit that moment (about one in three) with
    near certainty."""

    async def scenario() -> None:
        async with Service(tmp_path) as svc:
            for i in range(30):
                client = StreamerClient(svc.target, gateway_id=f"gw-{i}")
                client.start()
                await client.subscribe("messages", database="app", filters=chat("c1"))
                async with asyncio.timeout(5):
                    await client.close()

    run(scenario)


def test_close_ends_deliveries_and_pending_calls(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with Service(tmp_path) as svc:
            client = StreamerClient(svc.target, gateway_id="gw", **FAST)
            client.start()
            got: list[str] = []

            async def consume() -> None:
                async for delivery in client.deliveries():
                    got.append(delivery.event.event_id)

            consumer = asyncio.create_task(consume())
            await client.subscribe("messages", database="app", filters=chat("c"),
                                   subscription_id="s")
            await svc.puller.append(change(0, chat="c"))
            await until(lambda: got == ["e0"])
            await svc.stop()
            pending = asyncio.create_task(client.subscribe("messages", subscription_id="p"))
            await asyncio.sleep(0.05)
            await client.close()
            with pytest.raises(StreamClosed):
                await pending
            await asyncio.wait_for(consumer, 5)  # ended, without an error
            assert got == ["e0"]
            assert [d async for d in client.deliveries()] == []
            with pytest.raises(StreamClosed):
                await client.subscribe("messages")
            await client.close()

    run(scenario)


class DoubleServer:
    """A scripted ``StreamerService`` on loopback (a peer we cannot build
    from the real one): ``async with`` serves ``stream`` and gives its
    address."""

    def stream(
        self, requests: AsyncIterator[GatewayMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamerMessage]:
        raise NotImplementedError

    async def __aenter__(self) -> str:
        self._server = grpc.aio.server()
        handler = grpc.stream_stream_rpc_method_handler(
            self.stream, request_deserializer=GatewayMessage.FromString,
            response_serializer=StreamerMessage.SerializeToString,
        )
        self._server.add_generic_rpc_handlers((grpc.method_handlers_generic_handler(
            "syntrix.streamer.v1.StreamerService", {"Stream": handler}),))
        port = self._server.add_insecure_port("127.0.0.1:0")
        await self._server.start()
        return f"127.0.0.1:{port}"

    async def __aexit__(self, *exc: object) -> None:
        await self._server.stop(None)


class StuckStreamer(DoubleServer):
    """A Streamer that answers subscriptions but acknowledges only the first
    heartbeat of each stream (a stuck peer, which we cannot build from the
    real one). It records each stream's messages; on the first stream it
    also answers for an id nobody asked for, and on later ones it refuses
    every subscription as taken."""

    def __init__(self) -> None:
        self.streams: list[list[str]] = []

    async def stream(
        self, requests: AsyncIterator[GatewayMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamerMessage]:
        kinds: list[str] = []
        self.streams.append(kinds)
        first = len(self.streams) == 1
        async for message in requests:
            kind = message.WhichOneof("payload")
            if kind == "subscribe_batch":
                requests = list(message.subscribe_batch.requests)
            elif kind == "subscribe":
                requests = [message.subscribe]
            else:
                if kind == "heartbeat" and "heartbeat" not in kinds:
                    yield StreamerMessage(heartbeat_ack=HeartbeatAck(
                        timestamp=message.heartbeat.timestamp))
                kinds.append(str(kind))
                continue
            responses = []
            for request in requests:
                sub_id = request.subscription_id
                kinds.append(f"{kind} {sub_id}")
                if first:
                    yield StreamerMessage(subscribe_response=SubscribeResponse(
                        subscription_id="ghost", success=True))
                    responses.append(SubscribeResponse(subscription_id=sub_id, success=True))
                else:
                    responses.append(SubscribeResponse(
                        subscription_id=sub_id, success=False, code="already_exists",
                        error="taken"))
            if kind == "subscribe":
                yield StreamerMessage(subscribe_response=responses[0])
            else:
                yield StreamerMessage(subscribe_batch_response=SubscribeBatchResponse(
                    responses=responses))



def test_missing_acks_mean_a_dead_stream(caplog: pytest.LogCaptureFixture) -> None:
    async def scenario() -> None:
        peer = StuckStreamer()
        rejected: list[SubscriptionRejected] = []
        async with peer as target, StreamerClient(
            target, gateway_id="gw", heartbeat_interval=0.05, ack_timeout=0.2,
            backoff=(0.01, 0.05), on_rejected=rejected.append,
        ) as client:
            await until(lambda: client.connected)
            assert await client.subscribe("messages", subscription_id="s") == "s"
            await until(lambda: client.reconnects >= 2)  # the third stream got its ack
            first, second, third = peer.streams[:3]
            assert first[:3] == ["hello", "heartbeat", "subscribe s"]
            # Re-subscribed with the same id between Hello and
            # the heartbeat; refused, so dropped: the next stream no longer
            # asks for it.
            assert second[:3] == ["hello", "subscribe s", "heartbeat"]
            assert third[:2] == ["hello", "heartbeat"]
            assert not any(k.startswith("subscribe") for k in third)
            [refusal] = rejected
            assert (refusal.subscription_id, refusal.code, refusal.error) == (
                "s", "already_exists", "taken")
            assert client.live_subscriptions == []

    with caplog.at_level(logging.WARNING, logger="streamer.client"):
        run(scenario)
    messages = [r.getMessage() for r in caplog.records]
    assert "ignoring a response for unknown subscription 'ghost'" in messages
    assert any(m.startswith("stream to streamer") and "no heartbeat ack" in m for m in messages)


class ResumingStreamer(DoubleServer):
    """A Streamer that records each stream's subscribe requests with their
    ``resume_after``, answers them (``resync_required`` for the ids in
    ``resync``), acknowledges heartbeats, and sends what a test puts on the
    current stream; ``drop()`` ends that stream with ``UNAVAILABLE``. With a
    ``position`` (live ingest's marker) it answers as a Streamer does a
    gateway whose Hello says ``resumes``: ``live_after`` for what registers
    live (plain requests, per batch; resuming ones at the position), and
    ``caught_up()`` and ``progress()`` send what the catch-up sends (the
    group in ``groups`` is on a resuming subscription's answer). It stands for the server
    side of resuming, which we check here only from the client's side of
    the protocol."""

    def __init__(self) -> None:
        self.requests: list[dict[str, str]] = []  # per stream: id -> resume_after
        self.resync: set[str] = set()
        self.position = ""
        self.groups: dict[str, int] = {}  # resuming id -> the catch-up group it answers
        self._outbox: asyncio.Queue[StreamerMessage | None] | None = None

    def progress(self, group: int, marker: str, merged_into: int = 0) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(StreamerMessage(catchup_progress=CatchUpProgress(
            group=group, marker=marker, merged_into=merged_into)))

    def caught_up(self, *sub_ids: str, resync: bool = False) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(StreamerMessage(caught_up=CaughtUp(
            subscription_ids=sub_ids, resync_required=resync)))

    def deliver(self, progress: str, *sub_ids: str) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(StreamerMessage(delivery=EventDelivery(
            subscription_ids=sub_ids, event=StreamerEvent(event_id=progress, progress=progress))))

    def drop(self) -> None:
        assert self._outbox is not None
        self._outbox.put_nowait(None)

    async def stream(
        self, requests: AsyncIterator[GatewayMessage], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[StreamerMessage]:
        seen: dict[str, str] = {}
        self.requests.append(seen)
        outbox: asyncio.Queue[StreamerMessage | None] = asyncio.Queue()
        self._outbox = outbox

        async def read() -> None:
            async for message in requests:
                kind = message.WhichOneof("payload")
                if kind == "heartbeat":
                    outbox.put_nowait(StreamerMessage(heartbeat_ack=HeartbeatAck(
                        timestamp=message.heartbeat.timestamp)))
                elif kind in ("subscribe", "subscribe_batch"):
                    batch = (list(message.subscribe_batch.requests)
                             if kind == "subscribe_batch" else [message.subscribe])
                    responses = []
                    for request in batch:
                        seen[request.subscription_id] = request.resume_after
                        resync = request.subscription_id in self.resync
                        live = resync or request.resume_after in ("", self.position)
                        responses.append(SubscribeResponse(
                            subscription_id=request.subscription_id, success=True,
                            code="resync_required" if resync else "",
                            live_after=self.position if live and (
                                request.resume_after or kind == "subscribe") else "",
                            catchup_group=0 if live else self.groups.get(
                                request.subscription_id, 0)))
                    outbox.put_nowait(
                        StreamerMessage(subscribe_response=responses[0])
                        if kind == "subscribe" else StreamerMessage(
                            subscribe_batch_response=SubscribeBatchResponse(
                                responses=responses, live_after=self.position)))

        reader = asyncio.create_task(read())
        try:
            while (message := await outbox.get()) is not None:
                yield message
            await context.abort(grpc.StatusCode.UNAVAILABLE, "dropped by the test")
        finally:
            reader.cancel()



def test_reconnects_resume_each_subscription_after_its_last_delivery() -> None:
    async def scenario() -> None:
        peer = ResumingStreamer()
        resynced: list[str] = []
        async with peer as target, StreamerClient(
            target, gateway_id="gw", on_resync=resynced.append, **FAST
        ) as client:
            await until(lambda: client.connected)
            assert await client.subscribe_many([
                Subscription("m", subscription_id=i) for i in ("a", "b", "c")
            ]) == ["a", "b", "c"]
            # Saved from an earlier run of the gateway.
            assert await client.subscribe("m", subscription_id="saved",
                                          resume_after="p0") == "saved"
            peer.deliver("p1", "a")
            peer.deliver("p2", "b", "nobody")
            await until(lambda: client.marker("b") == "p2")
            assert (client.marker("a"), client.marker("c"), client.marker("nobody")) == (
                "p1", "", "")
            peer.deliver("p1b", "saved")  # a replayed event of the resuming one
            await until(lambda: client.marker("saved") == "p1b")
            # Answered after the last delivery: nothing says it was live then.
            assert await client.subscribe("m", subscription_id="late") == "late"
            peer.resync = {"a"}
            peer.drop()
            await until(lambda: len(peer.requests) == 2 and client.connected)
            # a, b and c, live since before p2, after the stream's last live
            # delivery, p2 (not after p1b, an older event replayed to the
            # resuming one): one marker for all of them; saved after its own
            # last delivery; late, answered after p2, from the live head.
            assert peer.requests[1] == {
                "a": "p2", "b": "p2", "c": "p2", "saved": "p1b", "late": ""}
            assert resynced == ["a"] and client.marker("a") == ""
            peer.resync = set()
            peer.deliver("p3", "late")
            await until(lambda: client.marker("late") == "p3")
            await client.unsubscribe("b")
            peer.drop()
            await until(lambda: len(peer.requests) == 3 and client.connected)
            # a restarted live at its resync and late was answered live: both
            # after p3. c, resumed on the second stream and silent there,
            # keeps p2; so does saved its p1b.
            assert peer.requests[2] == {"a": "p3", "c": "p2", "saved": "p1b", "late": "p3"}

    run(scenario)


def test_live_after_and_caught_up_give_every_subscription_a_resume_point() -> None:
    # A Streamer that says live_after and caught_up (Hello.resumes): a
    # subscription without a delivery resumes after its live_after, not from
    # the live head; resumed ones, once caught up, share the stream's marker.
    async def scenario() -> None:
        peer = ResumingStreamer()
        peer.position = "p5"
        resynced: list[str] = []
        async with peer as target, StreamerClient(
            target, gateway_id="gw", on_resync=resynced.append, **FAST
        ) as client:
            await until(lambda: client.connected)
            assert await client.subscribe_many([
                Subscription("m", subscription_id=i) for i in ("a", "b")]) == ["a", "b"]
            assert await client.subscribe("m", subscription_id="c") == "c"
            assert await client.subscribe("m", subscription_id="r", resume_after="p1") == "r"
            peer.drop()
            await until(lambda: len(peer.requests) == 2 and client.connected)
            assert peer.requests[1] == {"a": "p5", "b": "p5", "c": "p5", "r": "p1"}
            # a, b and c resumed at the position: live at once. r catches up.
            peer.deliver("p2", "r")
            peer.deliver("p6", "a")  # live, but r is not live yet
            peer.caught_up("r")
            peer.deliver("p7", "b")
            await until(lambda: client.marker("b") == "p7")
            peer.drop()
            await until(lambda: len(peer.requests) == 3 and client.connected)
            assert peer.requests[2] == {"a": "p7", "b": "p7", "c": "p7", "r": "p7"}
            # Without a live delivery after caught_up, r keeps its own marker.
            peer.deliver("p3", "r")
            peer.caught_up("r")
            peer.drop()
            await until(lambda: len(peer.requests) == 4 and client.connected)
            assert peer.requests[3]["r"] == "p3"
            # A late refusal: r is live from the head, and the gateway must resync it.
            peer.caught_up("r", resync=True)
            await until(lambda: resynced == ["r"])
            assert client.marker("r") == ""

    run(scenario)


def test_subscriptions_catching_up_resume_after_their_group_progress() -> None:
    # Two catch-up groups, the second merged into the first: after a broken
    # stream all their subscriptions resume after one marker, the newest
    # progress that covers them; one whose group sent none keeps its own.
    async def scenario() -> None:
        peer = ResumingStreamer()
        peer.position = "p9"
        peer.groups = {"r1": 1, "r2": 2, "r3": 3}
        async with peer as target, StreamerClient(target, gateway_id="gw", **FAST) as client:
            await until(lambda: client.connected)
            assert await client.subscribe_many([
                Subscription("m", subscription_id="r1", resume_after="p1"),
                Subscription("m", subscription_id="r2", resume_after="p0"),
                Subscription("m", subscription_id="r3", resume_after="p0"),
            ]) == ["r1", "r2", "r3"]
            peer.deliver("p2", "r1")
            peer.progress(1, "p3")
            peer.deliver("p1", "r2")
            peer.progress(2, "p3", merged_into=1)  # r2 joins group 1 at p3
            peer.deliver("p4", "r1", "r2")
            peer.progress(1, "p5")
            peer.deliver("p2", "r3")
            await until(lambda: client.marker("r3") == "p2")
            peer.drop()
            await until(lambda: len(peer.requests) == 2 and client.connected)
            assert peer.requests[1] == {"r1": "p5", "r2": "p5", "r3": "p2"}
            # Group numbers are the stream's: a new stream starts afresh.
            peer.drop()
            await until(lambda: len(peer.requests) == 3 and client.connected)
            assert peer.requests[2] == {"r1": "p5", "r2": "p5", "r3": "p2"}

    run(scenario)


# The README's client example, verbatim but for the address.
def _readme_example() -> str:
    """The gateway example of README.md, as a user would copy it."""
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", readme, flags=re.DOTALL)
    return next(b for b in blocks if "StreamerClient(" in b and "deliveries()" in b)


README_EXAMPLE = _readme_example()
# Runs a script as a terminal would: SIGINT raises KeyboardInterrupt even
# when the test runner itself was started with SIGINT ignored.
AS_FROM_A_TERMINAL = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "runpy.run_path(sys.argv[1], run_name='__main__')"
)


def test_the_readme_example_ends_cleanly_on_ctrl_c(tmp_path: Path) -> None:
    async def scenario() -> None:
        async with serving(tmp_path) as svc:
            await until(lambda: bool(svc.puller.subscriptions), 30)
            example = tmp_path / "example.py"
            example.write_text(README_EXAMPLE.replace("127.0.0.1:50052", svc.address))
            proc = subprocess.Popen(
                [sys.executable, "-c", AS_FROM_A_TERMINAL, str(example)],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                env={**os.environ, "PYTHONUNBUFFERED": "1"},
            )
            try:
                assert proc.stdout is not None

                async def line() -> str:
                    return await asyncio.wait_for(asyncio.to_thread(proc.stdout.readline), 30)

                assert (await line()).startswith("invalid_argument filter 1")
                await svc.puller.append(change(0, chat_id="c1", tags=["urgent"]))
                ids, doc_id = (await line()).rsplit(" ", 1)
                assert (len(orjson.loads(ids.replace("'", '"'))), doc_id) == (2, "m0\n")
                proc.send_signal(signal.SIGINT)
                out, err = await asyncio.to_thread(proc.communicate, timeout=30)
            finally:
                if proc.poll() is None:
                    proc.kill()
                    proc.wait(10)
            assert proc.returncode == 0, err
            assert err == "", err  # no traceback, nothing at all
            assert out == ""

    run(scenario)
