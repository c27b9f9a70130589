"""The gateway-facing gRPC service: ``syntrix.streamer.v1.StreamerService``.

``Stream`` is a short adapter: protocol messages in, ``GatewayRegistry``
calls, protocol messages out through the stream's ``GatewayQueue`` (its only
writer). ``deliver`` is how the ingest hands a delivery to a gateway; a full
queue cuts that gateway off with ``RESOURCE_EXHAUSTED`` (docs/delivery.md,
Backpressure).
``shutdown`` is the server going away: each stream's writer finishes its
queue, then the stream ends with ``UNAVAILABLE``, which gateways take as
"reconnect elsewhere or later"; only streams still writing hold the drain.

Every stream's opening and end are logged at INFO (WARNING when it ended
with messages still queued): the stream's number, the gateway id (once it
named itself) and its peer address, plain or batching, why it ended and
how many subscriptions went with it.

Outbound messages are already serialized (``streamer.node.delivery``), so the
service is registered with ``add_to_server``, whose response serializer
passes bytes through, not with the generated ``add_..._to_server``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

import grpc

from streamer.node.delivery import DEFAULT_CAPACITY, GatewayQueue
from streamer.node.gateways import GatewayRegistry, Session
from streamer.protocol import streamer_v1_pb2_grpc
from streamer.protocol.streamer_v1_pb2 import (
    GatewayMessage,
    HeartbeatAck,
    StreamerMessage,
)

log = logging.getLogger(__name__)
SERVICE_NAME = "syntrix.streamer.v1.StreamerService"


SHUTTING_DOWN = "the Streamer is shutting down"
# How long a handler whose call broke waits for gRPC to cancel it.
_CANCEL_WAIT = 1.0


class _Stream:
    """One open gateway stream: its session, queue, and why it must end."""

    __slots__ = ("cut_off", "peer", "queue", "reason", "session")

    def __init__(self, session: Session, queue: GatewayQueue, peer: str) -> None:
        self.session = session
        self.queue = queue
        self.peer = peer
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
        self.shutting_down = False
        self._idle = asyncio.Event()  # set while no stream handler runs
        self._idle.set()

    def deliver(self, session: Session, messages: list[bytes]) -> bool:
        """Enqueue serialized deliveries (``streamer.node.delivery.delivery_message``)
        in order without waiting; a queue they do not fit in cuts the
        gateway off."""
        stream = self.streams.get(session.key)
        if stream is None:
            return False
        if stream.queue.offer_all(messages):
            return True
        if not stream.queue.closed:
            self._cut_off(stream)
        return False

    def shutdown(self) -> None:
        """The server is going away (ingest has stopped): every stream ends
        with ``UNAVAILABLE`` once its writer has sent what is queued, and a
        stream opened from now on ends at once."""
        self.shutting_down = True
        for stream in self.streams.values():
            stream.queue.close()

    async def wait_closed(self, timeout: float) -> bool:
        """Wait up to ``timeout`` seconds for every stream handler to have
        finished; True if they have.

        gRPC's ``server.stop()`` returns once the calls are over, which can
        be before the handlers of cancelled calls have run: a handler still
        pending when the event loop closes is cancelled by ``asyncio.run``,
        and gRPC logs that as an error with a traceback.
        """
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            return False
        return True

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
        stream = _Stream(
            session, GatewayQueue(context.write, capacity=self.queue_capacity), context.peer())
        self.streams[session.key] = stream
        self._idle.clear()
        log.info("gateway stream %d opened by %s", session.key, stream.peer,
                 extra={"stream": session.key, "peer": stream.peer})
        if self.shutting_down:
            stream.queue.close()
        writer = asyncio.create_task(stream.queue.run())
        reader = asyncio.create_task(self._read(stream, request_iterator))
        cut = asyncio.create_task(stream.cut_off.wait())
        why = None  # what ended the stream, for its log line
        try:
            await asyncio.wait([reader, cut, writer], return_when=asyncio.FIRST_COMPLETED)
            if stream.cut_off.is_set():
                code, details = stream.reason
                why = f"{code.name}: {details}"
                await context.abort(code, details)
            if not writer.done() and reader.exception() is None:
                # The gateway closed its side: what is queued still goes out.
                why = "closed by the gateway"
                stream.queue.close()
                await asyncio.wait([writer])
            for half, doing in ((writer, "sending"), (reader, "reading")):
                failure = half.exception() if half.done() else None
                if failure is not None:
                    why = f"the call broke while {doing} ({type(failure).__name__})"
                    # A broken call is one gRPC is about to cancel (the
                    # gateway went away): that cancellation ends the handler
                    # quietly, where raising first is logged as an error.
                    await asyncio.sleep(_CANCEL_WAIT)
                    raise failure
            if why is None:
                # The writer ends on its own only once shutdown() closed
                # its queue, and only after sending all of it.
                why = f"UNAVAILABLE: {SHUTTING_DOWN}"
                await context.abort(grpc.StatusCode.UNAVAILABLE, SHUTTING_DOWN)
        except asyncio.CancelledError:
            # gRPC cancels the handler when the call ends under it (the
            # request stream may have looked closed by the gateway just
            # before, or a write failed).
            why = (
                "cancelled during the shutdown drain (the gateway went away or "
                "--drain-seconds ran out)" if self.shutting_down
                else "cancelled by the gateway, or its connection was lost"
            )
            raise
        finally:
            self.streams.pop(session.key, None)
            registry.disconnect(session)
            unsent = len(stream.queue)
            stream.queue.close()
            for task in (reader, cut, writer):
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            self._log_end(stream, why or "an unexpected error", unsent)
            if not self.streams:
                self._idle.set()

    @staticmethod
    def _log_end(stream: _Stream, why: str, unsent: int) -> None:
        session = stream.session
        mode = "plain" if stream.queue.max_batch is None else "batching"
        who = f"{session.gateway_id} at {stream.peer}" if session.gateway_id else stream.peer
        lost = f", {unsent} queued message(s) unsent" if unsent else ""
        log.log(
            logging.WARNING if unsent else logging.INFO,
            "gateway stream %d ended (%s, %s): %s; %d subscription(s) dropped%s",
            session.key, who, mode, why, session.dropped, lost,
            extra={"stream": session.key, "gateway": session.gateway_id, "peer": stream.peer,
                   "delivery": mode, "reason": why, "dropped": session.dropped,
                   "unsent": unsent},
        )

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
                mode = "plain" if queue.max_batch is None else f"batches of {queue.max_batch}"
                log.info("gateway stream %d is gateway %s (%s)", session.key,
                         session.gateway_id, mode,
                         extra={"stream": session.key, "gateway": session.gateway_id})
            else:
                registry.touch(session)
                log.warning("gateway %s sent an empty message", session.gateway_id or session.key)

    def _send(self, stream: _Stream, message: StreamerMessage) -> None:
        queue = stream.queue
        if not queue.offer(message.SerializeToString()) and not queue.closed:
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

