"""A scripted ``puller.v1`` server for tests: the outside world we cannot run.

It speaks the real protocol over real gRPC on loopback: it holds a list of
change events, gives event ``k`` the marker ``"p{k}"``, honours ``after``
(exclusive; empty means the live head, i.e. only events appended later),
filters by ``collections``, and serves ``Subscribe`` and (unless built with
``batch=False``, like a Syntrix Puller) ``SubscribeBatch``. A marker it does
not know gets ``INVALID_ARGUMENT``, as a Puller answers a marker too old to
resume from, and so does a marker before ``forgotten`` (the events after
it are past the retention). ``hold(consumer_id)`` stops sending to that
consumer's streams (a Streamer's live ingest held behind) until
``release(consumer_id)``. Built with ``credentials``, it serves TLS with them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import grpc

from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import puller_v1_pb2_grpc as pb_grpc


class PullerDouble(pb_grpc.PullerServiceServicer):
    def __init__(
        self,
        *,
        batch: bool = True,
        batch_size: int = 256,
        credentials: grpc.ServerCredentials | None = None,
    ) -> None:
        self.events: list[pb.ChangeEvent] = []
        self.batch = batch
        self.batch_size = batch_size
        self.credentials = credentials
        self.subscriptions: list[pb.SubscribeRequest] = []
        self.forgotten = 0  # events before this index are past the retention
        self._gates: dict[str, asyncio.Event] = {}
        self._appended = asyncio.Condition()
        self._server: grpc.aio.Server | None = None
        self.port = 0

    async def start(self) -> str:
        return await self.start_on(0)

    async def start_on(self, port: int) -> str:
        """Serve on a given loopback port (0: a free one), e.g. to restart."""
        self._server = grpc.aio.server()
        pb_grpc.add_PullerServiceServicer_to_server(self, self._server)
        address = f"127.0.0.1:{port}"
        self.port = (
            self._server.add_insecure_port(address) if self.credentials is None
            else self._server.add_secure_port(address, self.credentials)
        )
        await self._server.start()
        return f"127.0.0.1:{self.port}"

    async def stop(self) -> None:
        if self._server is not None:
            await self._server.stop(grace=0)

    async def append(self, *events: pb.ChangeEvent) -> None:
        async with self._appended:
            self.events.extend(events)
            self._appended.notify_all()

    def hold(self, consumer_id: str) -> None:
        """Send nothing more to ``consumer_id``'s streams until ``release``."""
        self._gates.setdefault(consumer_id, asyncio.Event()).clear()

    def release(self, consumer_id: str) -> None:
        self._gates.setdefault(consumer_id, asyncio.Event()).set()

    async def _stream(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[list[pb.PullerEvent]]:
        self.subscriptions.append(request)
        if not request.after:
            position = len(self.events)
        elif request.after.startswith("p") and request.after[1:].isdigit():
            position = int(request.after[1:]) + 1
            if position > len(self.events):
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"unknown marker {request.after!r}"
                )
            if position < self.forgotten:
                await context.abort(
                    grpc.StatusCode.INVALID_ARGUMENT, f"marker {request.after!r} is too old"
                )
        else:
            await context.abort(
                grpc.StatusCode.INVALID_ARGUMENT, f"unknown marker {request.after!r}"
            )
        wanted = set(request.collections)
        while True:
            async with self._appended:
                await self._appended.wait_for(lambda p=position: len(self.events) > p)
            gate = self._gates.get(request.consumer_id)
            if gate is not None:
                await gate.wait()
            ready = list(enumerate(self.events[position:], position))
            position += len(ready)
            yield [
                pb.PullerEvent(change_event=event, progress=f"p{k}")
                for k, event in ready
                if not wanted or event.mgo_coll in wanted
            ]

    async def Subscribe(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullerEvent]:
        async for ready in self._stream(request, context):
            for event in ready:
                yield event

    async def SubscribeBatch(
        self, request: pb.SubscribeRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.PullerEventBatch]:
        if not self.batch:
            await context.abort(grpc.StatusCode.UNIMPLEMENTED, "SubscribeBatch")
        async for ready in self._stream(request, context):
            for i in range(0, len(ready), self.batch_size):
                yield pb.PullerEventBatch(events=ready[i : i + self.batch_size])
