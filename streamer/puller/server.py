"""The ``puller.v1`` gRPC service over a :class:`~streamer.puller.log.ReplayLog`.

Every consumer stream reads the log from its own position: records after
``after`` (or, with an empty ``after``, after the newest event when it
subscribed), then, once caught up, waits for the next append and reads
again. Catching up and following live are one loop over the log, so there is
no gap and no duplicate at the switch by construction. A consumer that reads
slowly only holds its own loop: it falls out of the log's memory cache and
reads from disk, and the others never wait for it.

``SubscribeBatch`` sends whatever has been read (up to 256 events) as one
message, never waiting on a timer; ``Subscribe`` sends the same events one
per message. ``collections`` filters on the server. While a stream has sent
nothing for ``heartbeat`` seconds it gets a heartbeat (a ``PullerEvent``
without ``change_event``) with the marker of its position, so a consumer
whose filter skips everything still advances. A marker the log cannot
resume after is ``INVALID_ARGUMENT`` with the log's explanation.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Sequence

import grpc

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc
from streamer.puller.log import MarkerError, Record, ReplayLog

SERVICE_NAME = "syntrix.puller.v1.PullerService"
BATCH_SIZE = 256


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

    async def append(self, batch: Sequence[tuple[pb.ChangeEvent, bytes]]) -> int:
        """Append durably (off the event loop), then wake the consumers; the
        last position. Cancelling the caller does not cancel the write."""
        position = await asyncio.shield(asyncio.to_thread(self.log.append, batch))
        woken, self._appended = self._appended, asyncio.Event()
        woken.set()
        return position

    async def _read(self, after: int) -> list[Record]:
        cached = self.log.read_cached(after, BATCH_SIZE)
        if cached is not None:
            return cached
        return await asyncio.to_thread(self.log.read, after, BATCH_SIZE)

    async def _stream(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[list[pb.PullerEvent]]:
        """The consumer's events, in messages' worth (at most BATCH_SIZE)."""
        loop = asyncio.get_running_loop()
        wanted = frozenset(request.collections)
        marker = self.log.marker
        self.consumers += 1
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
            while True:
                appended = self._appended
                try:
                    records = await self._read(position)
                except MarkerError as exc:  # a slow consumer fell behind retention
                    await context.abort(grpc.StatusCode.INVALID_ARGUMENT, str(exc))
                if records:
                    position = records[-1].position
                    events = [
                        pb.PullerEvent(change_event=r.event, progress=marker(r.position))
                        for r in records
                        if not wanted or r.event.mgo_coll in wanted
                    ]
                    if events:
                        yield events
                        sent_at = loop.time()
                        continue
                idle = sent_at + self.heartbeat - loop.time()
                if idle <= 0:
                    yield [pb.PullerEvent(progress=marker(position))]
                    sent_at = loop.time()
                elif not records:
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(appended.wait(), idle)
        finally:
            self.consumers -= 1

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullerEvent]:
        async for events in self._stream(request, context):
            for event in events:
                yield event

    async def SubscribeBatch(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullerEventBatch]:
        if not self.subscribe_batch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "SubscribeBatch is disabled")
        async for events in self._stream(request, context):
            yield pb.PullerEventBatch(events=events)
