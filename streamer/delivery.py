"""Delivery to one gateway: a bounded queue and its single writer (SPEC section 6).

The ingest loop ``offer``s messages without ever waiting; one writer task per
gateway stream drains the queue in order and is the only code that writes to
the stream. A gateway that said ``Hello{batch_delivery}`` gets consecutive
deliveries packed into ``DeliveryBatch`` messages (up to its ``max_batch``,
whatever is ready, never waiting on a timer); others get one ``delivery`` per
message. A full queue means the gateway is lagging: ``offer`` returns False
and the caller cuts it off, so the others never wait.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Awaitable, Callable

from streamer.protocol.streamer_v1_pb2 import DeliveryBatch, EventDelivery, StreamerMessage

DEFAULT_CAPACITY = 10_000
DEFAULT_MAX_BATCH = 256

Send = Callable[[StreamerMessage], Awaitable[None]]


class GatewayQueue:
    """Outbound messages of one gateway stream, in order."""

    def __init__(self, send: Send, *, capacity: int = DEFAULT_CAPACITY) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        self._send = send
        self.capacity = capacity
        # None: plain deliveries; otherwise the largest batch to send.
        self.max_batch: int | None = None
        self._items: deque[StreamerMessage | EventDelivery] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        self.sent_messages = 0
        self.sent_deliveries = 0

    def __len__(self) -> int:
        return len(self._items)

    def enable_batches(self, max_batch: int) -> None:
        """Pack deliveries into batches of up to ``max_batch`` (0: the default)."""
        self.max_batch = max_batch if max_batch > 0 else DEFAULT_MAX_BATCH

    def offer(self, item: StreamerMessage | EventDelivery) -> bool:
        """Enqueue without waiting; False when the queue is full (lagging)."""
        if self._closed or len(self._items) >= self.capacity:
            return False
        self._items.append(item)
        self._ready.set()
        return True

    def close(self) -> None:
        """Stop accepting; the writer ends once the queue is drained."""
        self._closed = True
        self._ready.set()

    async def run(self) -> None:
        """The writer: drain the queue until closed and empty."""
        items = self._items
        while True:
            if not items:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            item = items.popleft()
            if isinstance(item, StreamerMessage):
                await self._send(item)
                self.sent_messages += 1
                continue
            if self.max_batch is None:
                await self._send(StreamerMessage(delivery=item))
                self.sent_deliveries += 1
                self.sent_messages += 1
                continue
            batch = [item]
            while items and len(batch) < self.max_batch and isinstance(items[0], EventDelivery):
                batch.append(items.popleft())  # type: ignore[arg-type]
            await self._send(StreamerMessage(batch=DeliveryBatch(deliveries=batch)))
            self.sent_deliveries += len(batch)
            self.sent_messages += 1
