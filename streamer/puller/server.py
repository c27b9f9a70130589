"""The ``puller.v1`` gRPC service over a :class:`~streamer.puller.log.ReplayLog`.

Every consumer stream reads the log from its own position: records after
``after`` (or, with an empty ``after``, after the newest event when it
subscribed), then, once caught up, waits for the next append and reads
again. Catching up and following live are one loop over the log, so there is
no gap and no duplicate at the switch by construction. A consumer that reads
slowly only holds its own loop: it falls out of the log's memory cache and
reads from disk, and the others never wait for it.

``SubscribeBatch`` sends whatever has been read (up to 256 events, and
about ``streamer.wire.BATCH_BYTES`` at most unless one event alone is
larger: reads stop there) as one message, never waiting on a timer;
``Subscribe`` sends the same events one per message. ``collections``
filters on the server. While a stream has sent nothing for ``heartbeat``
seconds it gets a heartbeat (a ``PullerEvent`` without ``change_event``)
with the marker of its position, so a consumer whose filter skips
everything still advances. A stream opened with a marker gets a heartbeat
with the marker of that position as soon as it opens, so the consumer
knows at once that the marker was accepted. A marker the log cannot resume
after is ``INVALID_ARGUMENT`` with the log's explanation.

Responses are framed by hand (``streamer.wire``) from the bytes the log
already holds: each record's ``PullerEvent`` is written once, when the first
consumer sends it, and every other consumer's batch reuses those bytes
instead of building and serializing message objects per stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
from collections.abc import AsyncIterator, Callable, Sequence

import grpc

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc
from streamer.puller.log import MarkerError, Record, ReplayLog
from streamer.wire import BATCH_BYTES, field, varint

SERVICE_NAME = "syntrix.puller.v1.PullerService"
BATCH_SIZE = 256  # events read at a time (reads also stop at BATCH_BYTES)
# Field tags (field number << 3 | 2) of PullerEvent.change_event (1),
# PullerEvent.progress (2) and PullerEventBatch.events (1); pinned by
# test_protocol.
_CHANGE_EVENT = b"\x0a"
_PROGRESS = b"\x12"
_EVENTS = b"\x0a"


def puller_event(record: Record, marker: str) -> bytes:
    """The serialized ``PullerEvent`` of a logged event at ``marker``."""
    return field(_CHANGE_EVENT, record.data) + heartbeat(marker)


def heartbeat(marker: str) -> bytes:
    """The serialized ``PullerEvent`` without a change event."""
    # proto3 leaves an empty string out.
    return field(_PROGRESS, marker.encode()) if marker else b""


def batch(events: list[bytes]) -> bytes:
    """The serialized ``PullerEventBatch`` of these serialized ``PullerEvent`` messages."""
    return b"".join([part for event in events for part in (_EVENTS, varint(len(event)), event)])


class PullerServicer(pb_grpc.PullerServiceServicer):
    def __init__(
        self, log: ReplayLog, *, heartbeat: float = 5.0, subscribe_batch: bool = True
    ) -> None:
        self.log = log
        self.heartbeat = heartbeat
        # False: SubscribeBatch answers UNIMPLEMENTED, as a Syntrix Puller
        # does (``--no-subscribe-batch``, for benchmarks of unbatched ingest).
        self.subscribe_batch = subscribe_batch
        self.consumers = 0  # open streams
        # Replaced at every append; a reader takes the current one before
        # reading, so an append after its read always wakes it.
        self._appended = asyncio.Event()
        # Position each open stream has sent up to (for a draining shutdown).
        self._sent: dict[int, int] = {}
        self._streams = itertools.count()
        self._writing: asyncio.Future[int] | None = None

    async def append(self, batch: Sequence[tuple[pb.ChangeEvent, bytes]]) -> int:
        """Append durably (off the event loop), then wake the consumers; the
        last position. Cancelling the caller does not cancel the write, and
        the consumers are woken when it completes either way."""
        write = asyncio.ensure_future(asyncio.to_thread(self.log.append, batch))
        write.add_done_callback(self._wake)
        self._writing = write
        return await asyncio.shield(write)

    def _wake(self, _: object) -> None:
        woken, self._appended = self._appended, asyncio.Event()
        woken.set()

    async def drain(self, timeout: float) -> bool:
        """After the source stopped: finish the append in flight, then wait
        (up to ``timeout`` s) until every open stream has sent everything
        in the log. True if they all caught up."""
        if self._writing is not None:
            with contextlib.suppress(Exception):
                await self._writing
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        last = self.log.last_position
        while any(sent < last for sent in self._sent.values()):
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.01)
        return True

    async def _read(self, after: int) -> list[Record]:
        cached = self.log.read_cached(after, BATCH_SIZE, BATCH_BYTES)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.log.read, after, BATCH_SIZE, BATCH_BYTES)

    async def _stream(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[list[bytes]]:
        """The consumer's events as serialized ``PullerEvent`` messages, in
        messages' worth (at most BATCH_SIZE)."""
        loop = asyncio.get_running_loop()
        wanted = frozenset(request.collections)
        marker = self.log.marker
        self.consumers += 1
        stream = next(self._streams)
        try:
            # The one place log errors become statuses: every MarkerError
            # (malformed, foreign, too old, beyond the end) is the client's.
            try:
                position = (
                    self.log.position(request.after) if request.after
                    else self.log.last_position
                )
            except MarkerError as exc:
                await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
            sent_at = loop.time()
            self._sent[stream] = position
            if request.after:
                # At once, so a consumer knows its marker was accepted
                # without waiting for an event (a Streamer's catch-up).
                yield [heartbeat(marker(position))]
            while True:
                appended = self._appended
                try:
                    records = await self._read(position)
                except MarkerError as exc:  # a slow consumer fell behind retention
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if records:
                    position = records[-1].position
                    events = [
                        r.wire or _frame(r, marker) for r in records
                        if not wanted or r.event.mgo_coll in wanted
                    ]
                    if events:
                        yield events
                        sent_at = loop.time()
                    self._sent[stream] = position
                    if events:
                        continue
                idle = sent_at + self.heartbeat - loop.time()
                if idle <= 0:
                    yield [heartbeat(marker(position))]
                    sent_at = loop.time()
                elif not records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(appended.wait(), idle)
        finally:
            self.consumers -= 1
            self._sent.pop(stream, None)

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        async for events in self._stream(request, context):
            for event in events:
                yield event

    async def SubscribeBatch(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[bytes]:
        if not self.subscribe_batch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "SubscribeBatch is disabled")
        async for events in self._stream(request, context):
            yield batch(events)


def _frame(record: Record, marker: Callable[[int], str]) -> bytes:
    wire = record.wire = puller_event(record, marker(record.position))
    return wire


def add_to_server(servicer: PullerServicer, server: grpc.aio.Server) -> None:
    """Register ``PullerService`` on ``server``; responses are pre-serialized."""
    handlers = {
        name: grpc.unary_stream_rpc_method_handler(
            method, request_deserializer=pb.SubscribeRequest.FromString,
            response_serializer=None,
        )
        for name, method in (
            ("Subscribe", servicer.Subscribe), ("SubscribeBatch", servicer.SubscribeBatch))
    }
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, handlers),))
