"""The gateway-facing gRPC service: ``syntrix.streamer.v1.StreamerService``.

``Stream`` is a short adapter: protocol messages in, ``GatewayRegistry``
calls, protocol messages out through the stream's ``GatewayQueue`` (its only
writer). ``deliver`` is how the ingest hands a delivery to a gateway; a full
queue cuts that gateway off with ``RESOURCE_EXHAUSTED`` (docs/delivery.md,
Backpressure).

Outbound messages are already serialized (``streamer.delivery``), so the
service is registered with ``add_to_server``, whose response serializer
passes bytes through, not with the generated ``add_..._to_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from streamer.delivery import DEFAULT_CAPACITY, GatewayQueue
from streamer.gateways import GatewayRegistry, Session
from streamer.protocol import streamer_v1_pb2_grpc
from streamer.protocol.streamer_v1_pb2 import (
    GatewayMessage,
    HeartbeatAck,
    StreamerMessage,
)

log = logging.getLogger(__name__)
SERVICE_NAME = "syntrix.streamer.v1.StreamerService"


class _Stream:
    """One open gateway stream: its session, queue, and why it must end."""

    __slots__ = ("cut_off", "queue", "reason", "session")

    def __init__(self, session: Session, queue: GatewayQueue) -> None:
        self.session = session
        self.queue = queue
        self.cut_off = asyncio.Event()
        self.reason: tuple[grpc.StatusCode, str] = (grpc.StatusCode.OK, "")


class StreamerServicer(streamer_v1_pb2_grpc.StreamerServiceServicer):
    def __init__(
        self, registry: GatewayRegistry, *, queue_capacity: int = DEFAULT_CAPACITY
    ) -> None:
        self.registry = registry
        self.queue_capacity = queue_capacity
        self.streams: dict[int, _Stream] = {}
        self.lagging_cut_offs = 0

    def deliver(self, session: Session, messages: list[bytes]) -> bool:
        """Enqueue serialized deliveries (``streamer.delivery.delivery_message``)
        in order without waiting; a queue they do not fit in cuts the
        gateway off."""
        stream = self.streams.get(session.key)
        if stream is None:
            return False
        if stream.queue.offer_all(messages):
            return True
        self._cut_off(stream)
        return False

    def close(self, session: Session) -> None:
        """End the stream of an expired session."""
        ttl = self.registry.session_ttl
        self._end(session, grpc.StatusCode.DEADLINE_EXCEEDED, f"session silent for {ttl:g} s")

    def _end(self, session: Session, code: grpc.StatusCode, details: str) -> None:
        stream = self.streams.get(session.key)
        if stream is not None and not stream.cut_off.is_set():
            stream.reason = (code, details)
            stream.cut_off.set()

    def _cut_off(self, stream: _Stream) -> None:
        if not stream.cut_off.is_set():
            self.lagging_cut_offs += 1
            stream.reason = (
                grpc.StatusCode.RESOURCE_EXHAUSTED,
                f"gateway lagging: more than {self.queue_capacity} messages queued",
            )
            stream.cut_off.set()

    async def Stream(
        self,
        request_iterator: AsyncIterator[GatewayMessage],
        context: grpc.aio.ServicerContext,
    ) -> None:
        registry = self.registry
        session = registry.connect()
        stream = _Stream(session, GatewayQueue(context.write, capacity=self.queue_capacity))
        self.streams[session.key] = stream
        writer = asyncio.create_task(stream.queue.run())
        reader = asyncio.create_task(self._read(stream, request_iterator))
        cut = asyncio.create_task(stream.cut_off.wait())
        try:
            await asyncio.wait([reader, cut, writer], return_when=asyncio.FIRST_COMPLETED)
            if stream.cut_off.is_set():
                await context.abort(*stream.reason)
            if writer.done():
                writer.result()  # a write failed: the stream is gone
            reader.result()
            stream.queue.close()
            await writer
        finally:
            self.streams.pop(session.key, None)
            registry.disconnect(session)
            stream.queue.close()
            for task in (reader, cut, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _read(self, stream: _Stream, messages: AsyncIterator[GatewayMessage]) -> None:
        registry, session, queue = self.registry, stream.session, stream.queue
        async for message in messages:
            kind = message.WhichOneof("payload")
            if kind == "subscribe":
                registry.touch(session)
                response = registry.subscribe(session, message.subscribe)
                self._send(stream, StreamerMessage(subscribe_response=response))
            elif kind == "unsubscribe":
                registry.touch(session)
                registry.unsubscribe(session, message.unsubscribe.subscription_id)
            elif kind == "heartbeat":
                registry.heartbeat(session, message.heartbeat.gateway_id)
                ack = HeartbeatAck(timestamp=message.heartbeat.timestamp)
                self._send(stream, StreamerMessage(heartbeat_ack=ack))
            elif kind == "hello":
                for old in registry.hello(session, message.hello.gateway_id):
                    log.warning("gateway %s: a new stream supersedes an older one", old.gateway_id)
                    self._end(old, grpc.StatusCode.ABORTED, "superseded by a newer stream "
                              f"of gateway {old.gateway_id}")
                if message.hello.batch_delivery:
                    queue.enable_batches(message.hello.max_batch)
            else:
                registry.touch(session)
                log.warning("gateway %s sent an empty message", session.gateway_id or session.key)

    def _send(self, stream: _Stream, message: StreamerMessage) -> None:
        if not stream.queue.offer(message.SerializeToString()):
            self._cut_off(stream)



def add_to_server(servicer: StreamerServicer, server: grpc.aio.Server) -> None:
    """Register ``StreamerService`` on ``server``, sending pre-serialized bytes."""
    stream = grpc.stream_stream_rpc_method_handler(
        servicer.Stream,
        request_deserializer=GatewayMessage.FromString,
        response_serializer=None,  # the queue holds serialized StreamerMessages
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": stream}),)
    )

