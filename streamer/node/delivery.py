"""Delivery to one gateway: wire framing, a bounded queue and its single writer
(docs/delivery.md).

Everything a gateway stream sends is a serialized ``StreamerMessage``. The
ingest serializes each event once and frames it once per gateway
(``delivery_message``), so the bytes of an event are shared by every gateway
that gets it instead of being rebuilt and re-encoded per stream. The framing
is the protobuf wire format written by hand because a delivery message is
also, byte for byte, an element of ``DeliveryBatch.deliveries`` (both are
field 1, length-delimited): a batch is the concatenation of queued
deliveries behind one header, far cheaper than building the message objects.

Grouping the matched ids by gateway and framing each gateway's message is
per-match work, done in C (``streamer/_ext/_fanout.pyx``): ``fan_out``
matches a change and writes its deliveries straight from the index's match
buffer, ``frame_deliveries`` does the same for ids already in hand (the
enter/leave split). ``fan_out_reference`` and ``frame_deliveries_reference``
are their pure-Python twins, which the property tests hold them to.

The ingest loop ``offer``s messages without ever waiting; one writer task per
stream drains the queue in order and is the only code that writes to the
stream. A gateway that said ``Hello{batch_delivery}`` gets consecutive
deliveries packed into one ``batch`` message (up to its ``max_batch``,
whatever is ready, never waiting on a timer); others get one ``delivery`` per
message. A full queue means the gateway is lagging: ``offer`` returns False
and the caller cuts it off, so the others never wait.
"""

from __future__ import annotations

import asyncio
import time
from array import array
from collections import deque
from collections.abc import Awaitable, Callable

from streamer._ext._fanout import fan_out, frame_deliveries, frame_event
from streamer.matching.matcher import Matcher
from streamer.protocol.streamer_v1_pb2 import StreamerEvent
from streamer.wire import field, varint

__all__ = [
    "DEFAULT_CAPACITY",
    "DEFAULT_MAX_BATCH",
    "GatewayQueue",
    "delivery_message",
    "event_field",
    "fan_out",
    "fan_out_reference",
    "frame_deliveries",
    "frame_deliveries_reference",
    "frame_event",
    "subscription_field",
]

DEFAULT_CAPACITY = 10_000
DEFAULT_MAX_BATCH = 256
# Bytes one gateway's queue may hold before the gateway is cut off.
DEFAULT_MAX_BYTES = 64 << 20
# The largest message a gateway receives unless its Hello says otherwise:
# gRPC's default receive limit, which Syntrix gateways keep.
DEFAULT_MAX_MESSAGE = 4 << 20
# Room for StreamerMessage.batch's tag and length in front of the deliveries.
_BATCH_HEADER = 6

# Field tags (field number << 3 | wire type 2, length-delimited) of
# StreamerMessage.delivery and DeliveryBatch.deliveries (1, the same byte),
# EventDelivery.subscription_ids (1), EventDelivery.event (2) and
# StreamerMessage.batch (4). The field numbers are pinned by test_protocol.
_DELIVERY = 0x0A
_DELIVERY_TAG = b"\x0a"
_EVENT_TAG = b"\x12"
_BATCH_TAG = b"\x22"

Send = Callable[[bytes], Awaitable[None]]


def subscription_field(subscription_id: str) -> bytes:
    """One ``EventDelivery.subscription_ids`` entry, framed (once per subscription)."""
    return field(_DELIVERY_TAG, subscription_id.encode())


def event_field(event: StreamerEvent) -> bytes:
    """``EventDelivery.event``, serialized and framed once per event and
    operation (the reference for the compiled ``frame_event``)."""
    return field(_EVENT_TAG, event.SerializeToString())


def delivery_message(subscription_fields: list[bytes], event: bytes) -> bytes:
    """A serialized ``StreamerMessage{delivery}`` from pre-framed parts."""
    return field(_DELIVERY_TAG, b"".join(subscription_fields) + event)


def frame_deliveries_reference(
    subscription_ids: list[str], owners: bytes, event: bytes, pending: dict[int, list[bytes]]
) -> int:
    """What the compiled ``frame_deliveries`` does: append one serialized
    delivery per owner (``owners``: native ``uint32`` per id, as
    ``match_owned`` returns them) to ``pending[owner]``, owners in order of
    their first id; returns how many."""
    owner_of = array("I", owners)
    if len(owner_of) != len(subscription_ids):
        raise ValueError(
            f"{len(owners)} bytes of owners for {len(subscription_ids)} subscription ids"
        )
    groups: dict[int, list[bytes]] = {}
    for sub_id, owner in zip(subscription_ids, owner_of, strict=True):
        groups.setdefault(owner, []).append(subscription_field(sub_id))
    for owner, fields in groups.items():
        pending.setdefault(owner, []).append(delivery_message(fields, event))
    return len(groups)


def fan_out_reference(
    matcher: Matcher, database: str, collection: str, document_id: str,
    document: object, event: bytes, pending: dict[int, list[bytes]],
) -> tuple[int, int]:
    """What the compiled ``fan_out`` does, through ``match_owned`` (or
    ``match_id_owned`` when ``document`` is None): ``(matches, deliveries)``."""
    if document is None:
        ids, owners = matcher.match_id_owned(database, collection, document_id)
    else:
        ids, owners = matcher.match_owned(database, collection, document_id, document)
    return len(ids), frame_deliveries_reference(ids, owners, event, pending)


class QueueBudget:
    """Bytes queued for all gateways together, against a node-wide limit
    (every queue is bounded on its own too, but not how many there are)."""

    __slots__ = ("limit", "used")

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0

    @property
    def exceeded(self) -> bool:
        return self.used > self.limit


class GatewayQueue:
    """Outbound serialized messages of one gateway stream, in order.

    Bounded twice: ``capacity`` messages and ``max_bytes`` bytes (the high
    watermark); an offer past either is refused, which the service takes as
    a lagging gateway and cuts off. Crossing ``low_bytes`` on the way up
    starts a "behind" episode (``on_behind(True)``), which ends once the
    queue is back under half of it (``on_behind(False)``): a warning before
    the cut-off. ``sending_since`` is when the write in progress started
    (None between writes), so a watchdog can tell a gateway that stopped
    reading. No message sent is larger than ``max_message`` (the gateway's
    receive limit): batches stop short of it.
    """

    def __init__(
        self,
        send: Send,
        *,
        capacity: int = DEFAULT_CAPACITY,
        max_bytes: int = DEFAULT_MAX_BYTES,
        low_bytes: int | None = None,
        on_behind: Callable[[bool], None] | None = None,
        budget: QueueBudget | None = None,
    ) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be at least 1, got {capacity}")
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be at least 1, got {max_bytes}")
        self._send = send
        self.capacity = capacity
        self.max_bytes = max_bytes
        self.low_bytes = max_bytes // 8 if low_bytes is None else low_bytes
        self._on_behind = on_behind
        self._budget = budget if budget is not None else QueueBudget(1 << 62)
        self.behind = False
        self.bytes = 0
        self.max_message = DEFAULT_MAX_MESSAGE
        # None: plain deliveries; otherwise the largest batch to send.
        self.max_batch: int | None = None
        self.sending_since: float | None = None
        self._items: deque[bytes] = deque()
        self._ready = asyncio.Event()
        self._closed = False
        # Dropped by discard(): a write still in flight no longer counts.
        self._discarded = False
        self.sent_messages = 0
        self.sent_deliveries = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def delivery_limit(self) -> int:
        """The largest delivery this queue can send (room left for a batch
        header, so that a delivery fits however it is sent)."""
        return self.max_message - _BATCH_HEADER

    def enable_batches(self, max_batch: int) -> None:
        """Pack deliveries into batches of up to ``max_batch`` (0: the default)."""
        self.max_batch = max_batch if max_batch > 0 else DEFAULT_MAX_BATCH

    def offer(self, message: bytes) -> bool:
        """Enqueue a serialized ``StreamerMessage`` without waiting; False when
        the queue is full (lagging) or closed."""
        size = len(message)
        if (
            self._closed or len(self._items) >= self.capacity
            or self.bytes + size > self.max_bytes
        ):
            return False
        self._items.append(message)
        self._queued(size)
        return True

    def offer_all(self, messages: list[bytes]) -> bool:
        """Enqueue several serialized messages in order, all or none; False
        when they do not all fit (lagging) or the queue is closed."""
        size = sum(map(len, messages))
        if (
            self._closed or len(self._items) + len(messages) > self.capacity
            or self.bytes + size > self.max_bytes
        ):
            return False
        self._items.extend(messages)
        self._queued(size)
        return True

    def _queued(self, size: int) -> None:
        self.bytes += size
        self._budget.used += size
        if not self.behind and self.bytes > self.low_bytes:
            self.behind = True
            if self._on_behind is not None:
                self._on_behind(True)
        self._ready.set()

    @property
    def closed(self) -> bool:
        """No longer accepting: a refused offer is not a lagging gateway."""
        return self._closed

    def close(self) -> None:
        """Stop accepting; the writer ends once the queue is drained."""
        self._closed = True
        self._ready.set()

    def discard(self) -> int:
        """Close and drop everything queued at once (the gateway is cut off:
        its memory is freed now, not when a write blocked on it returns);
        how many messages were dropped."""
        dropped = len(self._items)
        self._items.clear()
        self._budget.used -= self.bytes
        self.bytes = 0
        self._discarded = True
        self.close()
        return dropped

    async def run(self) -> None:
        """The writer: drain the queue until closed and empty."""
        items, send, clock = self._items, self._send, time.monotonic
        while True:
            if not items:
                if self._closed:
                    return
                self._ready.clear()
                await self._ready.wait()
                continue
            message = items.popleft()
            size = len(message)
            # The first byte of a serialized StreamerMessage is the tag of
            # its one payload field, so it tells deliveries from control
            # messages (heartbeat acks, subscribe responses) for free.
            if message[0] != _DELIVERY or self.max_batch is None:
                self.sending_since = clock()
                await send(message)
                self.sending_since = None
                self.sent_messages += 1
                self.sent_deliveries += message[0] == _DELIVERY
                self._sent(size)
                continue
            batch = [message]
            room = self.max_message - _BATCH_HEADER
            while (
                items and len(batch) < self.max_batch and items[0][0] == _DELIVERY
                and size + len(items[0]) <= room
            ):
                message = items.popleft()
                batch.append(message)
                size += len(message)
            self.sending_since = clock()
            await send(b"".join((_BATCH_TAG, varint(size), *batch)))
            self.sending_since = None
            self.sent_deliveries += len(batch)
            self.sent_messages += 1
            self._sent(size)

    def _sent(self, size: int) -> None:
        if self._discarded:
            return
        self.bytes -= size
        self._budget.used -= size
        if self.behind and self.bytes < self.low_bytes // 2:
            self.behind = False
            if self._on_behind is not None:
                self._on_behind(False)
