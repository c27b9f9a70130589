"""The gateway-facing gRPC service: ``syntrix.streamer.v1.StreamerService``.

``Stream`` is a short adapter: protocol messages in, calls on the sessions
(``streamer.node.sessions``) and the subscription set
(``streamer.node.subscriptions``), protocol messages out through the
stream's ``GatewayQueue`` (its only writer). ``deliver`` is how the ingest
hands deliveries to a gateway. A stream's registrations (subscribes,
unsubscribes) are handled in order by its registrar, apart from its
heartbeats, which are acknowledged as they come. A subscribe with
``resume_after`` (single or in a batch) is answered once the catch-up
(``streamer.node.catchup``) has the Puller's word on its marker; the
stream's later registrations wait for it, so answers stay one per request
and in order. A gateway whose Hello says ``resumes`` also learns, with each
answer, the marker its live subscriptions have every event after
(``live_after``), how far its catching-up subscriptions are
(``catchup_progress``) and when they become live (``caught_up``): what it
needs to resume each after a marker, with few distinct markers.

How a stream ends, and with which status (docs/protocol.md):

- the gateway closes it, cancels it or goes away: what is queued still
  goes out, then the stream ends;
- a queue that would go past its message or byte bound, or a write that
  has not completed for ``stall_seconds`` (a gateway that stopped
  reading): ``RESOURCE_EXHAUSTED``. The queue is dropped at once and the
  handler returns without waiting for the blocked write, so the memory
  and the stream are freed now;
- a message that does not decode: ``INVALID_ARGUMENT``, logged once;
- a Hello naming a gateway id that a live stream of another gateway holds:
  ``ALREADY_EXISTS``; a newer stream of the same gateway replaces an older
  one: ``ABORTED`` for the older;
- session silent for the TTL: ``DEADLINE_EXCEEDED``;
- ``shutdown``: each stream's writer finishes its queue, then the stream
  ends with ``UNAVAILABLE``, which gateways take as "reconnect elsewhere or
  later"; only streams still writing hold the drain.

A delivery larger than its gateway receives (``Hello.max_message_bytes``,
else gRPC's default 4 MiB, which Syntrix gateways keep) is sent without its
document (``document_omitted``), split by subscription ids if it is still
too large: never dropped, never a killed stream; counted.

Every stream's opening and end are logged at INFO (WARNING when it ended
with messages still queued): the stream's number, the gateway id (once it
named itself) and its peer address, plain or batching, why it ended and
how many subscriptions went with it.

Outbound messages are already serialized (``streamer.node.delivery``), so
the service is registered with ``add_to_server``, whose serializers pass
bytes through (inbound ones are decoded here, to answer junk with a status).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import TYPE_CHECKING

import grpc
from google.protobuf.message import DecodeError

from streamer._ext._subscribe import batch_requests, batch_response, response_entry
from streamer.node.delivery import (
    DEFAULT_CAPACITY,
    DEFAULT_MAX_BYTES,
    GatewayQueue,
    QueueBudget,
)
from streamer.node.sessions import IdentityTaken, Session, Sessions
from streamer.node.subscriptions import one_turn
from streamer.protocol import streamer_v1_pb2_grpc
from streamer.protocol.streamer_v1_pb2 import (
    CatchUpProgress,
    CaughtUp,
    EventDelivery,
    GatewayMessage,
    HeartbeatAck,
    StreamerEvent,
    StreamerMessage,
    SubscribeRequest,
)
from streamer.wire import field

if TYPE_CHECKING:
    from streamer.node.catchup import CatchUp, Group

log = logging.getLogger(__name__)
SERVICE_NAME = "syntrix.streamer.v1.StreamerService"

SHUTTING_DOWN = "the Streamer is shutting down"
# How long a handler whose call broke waits for gRPC to cancel it.
_CANCEL_WAIT = 1.0
DEFAULT_STALL_SECONDS = 30.0
DEFAULT_NODE_QUEUE_BYTES = 1 << 30
# Requests of a subscribe_batch registered between two yields to the loop
# (a few milliseconds: live ingest handles one Puller message per turn of
# the loop, so a long turn makes the live stream queue up behind it).
BATCH_CHUNK = 250
# SubscribeBatchResponse.live_after: field 2, length-delimited (test_protocol
# pins the number).
_LIVE_AFTER_TAG = b"\x12"
# Registration messages (subscribe, subscribe_batch, unsubscribe, heartbeat)
# read ahead of a stream's registrar, by count and by their bytes on the
# wire (one message is always admitted); a gateway that sends more waits
# (gRPC flow control), as it did when they were handled as read.
REGISTRATION_BACKLOG = 64
REGISTRATION_BACKLOG_BYTES = 4 << 20


class _End(Exception):
    """Ends a stream's reading with a status."""

    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self.code = code
        self.details = details


class _Stream:
    """One open gateway stream: its session, queue, and why it must end."""

    __slots__ = ("cut_off", "peer", "queue", "reason", "session")

    def __init__(self, session: Session, queue: GatewayQueue, peer: str) -> None:
        self.session = session
        self.queue = queue
        self.peer = peer
        self.cut_off = asyncio.Event()
        self.reason: tuple[grpc.StatusCode, str] = (grpc.StatusCode.OK, "")


class _Backlog:
    """A stream's registration messages waiting for its registrar, in order,
    each with the bytes it came in (None: the gateway closed its side),
    bounded by count and bytes."""

    def __init__(self) -> None:
        self._items: deque[tuple[GatewayMessage | None, bytes]] = deque()
        self.bytes = 0
        self._ready = asyncio.Event()
        self._room = asyncio.Event()

    async def put(self, message: GatewayMessage | None, raw: bytes) -> None:
        while self._items and (len(self._items) >= REGISTRATION_BACKLOG
                               or self.bytes + len(raw) > REGISTRATION_BACKLOG_BYTES):
            self._room.clear()
            await self._room.wait()
        self._items.append((message, raw))
        self.bytes += len(raw)
        self._ready.set()

    async def get(self) -> tuple[GatewayMessage | None, bytes]:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        message, raw = self._items.popleft()
        self.bytes -= len(raw)
        self._room.set()
        return message, raw


class StreamerServicer(streamer_v1_pb2_grpc.StreamerServiceServicer):
    def __init__(
        self,
        sessions: Sessions,
        *,
        queue_capacity: int = DEFAULT_CAPACITY,
        queue_bytes: int = DEFAULT_MAX_BYTES,
        stall_seconds: float = DEFAULT_STALL_SECONDS,
        node_queue_bytes: int = DEFAULT_NODE_QUEUE_BYTES,
    ) -> None:
        self.sessions = sessions
        self.subscriptions = sessions.subscriptions
        self.queue_capacity = queue_capacity
        self.queue_bytes = queue_bytes
        self.stall_seconds = stall_seconds
        self.queue_budget = QueueBudget(node_queue_bytes)
        self.budget_cut_offs = 0
        self.streams: dict[int, _Stream] = {}
        self.lagging_cut_offs = 0
        self.stalled_cut_offs = 0
        self.behind = 0  # streams whose queue is past its low watermark now
        self.behind_episodes = 0
        self.undecodable = 0
        self.batch_subscribes = 0  # requests that came in subscribe_batch messages
        self.documents_omitted = 0
        self.deliveries_split = 0
        self.shutting_down = False
        # How registration yields to the event loop between chunks (the node
        # makes it Ingest.give_way: live ingest first).
        self.give_way: Callable[[], Awaitable[None]] = one_turn
        # Acts on SubscribeRequest.resume_after (streamer.node.catchup);
        # None: resume_after is ignored and every subscription starts live.
        self.catchup: CatchUp | None = None
        self._idle = asyncio.Event()  # set while no stream handler runs
        self._idle.set()

    def deliver(self, session: Session, messages: list[bytes]) -> bool:
        """Enqueue serialized deliveries (``streamer.node.delivery.delivery_message``)
        in order without waiting; a queue they do not fit in cuts the
        gateway off."""
        stream = self.streams.get(session.key)
        if stream is None:
            return False
        queue = stream.queue
        if max(map(len, messages)) > queue.delivery_limit:
            messages = [part for m in messages for part in self._fit(stream, m)]
        if queue.offer_all(messages):
            if self.queue_budget.exceeded:
                self._shed()
            return True
        if not queue.closed:
            self._cut_off(stream, f"more than {self.queue_capacity} messages or "
                          f"{self.queue_bytes} bytes queued")
        return False

    def has_room(self, session: Session) -> bool:
        """Whether a catch-up (``streamer.node.catchup``) may queue more for
        this gateway now: its queue is under half its message bound and
        under its low watermark of bytes, or the stream is gone. Live
        deliveries never wait; replayed ones do, rather than cut a gateway
        off for a burst the Streamer chose to send."""
        stream = self.streams.get(session.key)
        if stream is None:
            return True
        queue = stream.queue
        return queue.closed or (
            len(queue) <= queue.capacity // 2 and queue.bytes <= queue.low_bytes)

    def _shed(self) -> None:
        """All queues together hold more than the node's budget: cut off the
        gateway with the most queued, whose memory is then freed at once."""
        largest = max(self.streams.values(), key=lambda s: s.queue.bytes)
        if not largest.cut_off.is_set():
            self.budget_cut_offs += 1
            self._cut_off(largest, f"the node's queues hold more than "
                          f"{self.queue_budget.limit} bytes and this one is the largest")

    def _fit(self, stream: _Stream, message: bytes) -> list[bytes]:
        """One delivery as messages this gateway can receive: itself, or
        without its document, or that split by subscription ids."""
        limit = stream.queue.delivery_limit
        if len(message) <= limit:
            return [message]
        delivery = StreamerMessage.FromString(message).delivery
        event = delivery.event
        event.document_data = b""
        event.document_omitted = True
        self.documents_omitted += 1
        log.warning(
            "event %s is %d bytes for gateway %s, which receives at most %d: delivered "
            "without its document (document_omitted)", event.event_id, len(message),
            stream.session.gateway_id or stream.peer, stream.queue.max_message,
        )
        whole = StreamerMessage(delivery=delivery).SerializeToString()
        if len(whole) <= limit:
            return [whole]
        self.deliveries_split += 1
        parts: list[bytes] = []
        ids: list[str] = []
        base = len(whole) - sum(len(i) + 3 for i in delivery.subscription_ids)
        size = base
        for sub_id in delivery.subscription_ids:
            cost = len(sub_id) + 3  # tag, length (short ids), bytes
            if ids and size + cost > limit:
                parts.append(_delivery(ids, event))
                ids, size = [], base
            ids.append(sub_id)
            size += cost
        parts.append(_delivery(ids, event))
        return parts

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
        ttl = self.sessions.session_ttl
        self._end(session, grpc.StatusCode.DEADLINE_EXCEEDED, f"session silent for {ttl:g} s")

    def watch(self) -> None:
        """Cut off the gateways whose current write has not completed for
        ``stall_seconds``: they stopped reading (the node calls this
        periodically)."""
        deadline = time.monotonic() - self.stall_seconds
        for stream in list(self.streams.values()):
            since = stream.queue.sending_since
            if since is not None and since < deadline and not stream.cut_off.is_set():
                self.stalled_cut_offs += 1
                self._cut_off(stream, f"not reading: a write has waited more than "
                              f"{self.stall_seconds:g} s")

    def _end(self, session: Session, code: grpc.StatusCode, details: str) -> None:
        stream = self.streams.get(session.key)
        if stream is not None and not stream.cut_off.is_set():
            stream.reason = (code, details)
            stream.cut_off.set()

    def _cut_off(self, stream: _Stream, why: str) -> None:
        if not stream.cut_off.is_set():
            self.lagging_cut_offs += 1
            stream.reason = (grpc.StatusCode.RESOURCE_EXHAUSTED, f"gateway lagging: {why}")
            stream.cut_off.set()

    def _behind(self, stream: _Stream, behind: bool) -> None:
        self.behind += 1 if behind else -1
        if behind:
            self.behind_episodes += 1
            log.warning(
                "gateway stream %d (%s) is falling behind: more than %d bytes queued; it is "
                "cut off at %d", stream.session.key, stream.session.gateway_id or stream.peer,
                stream.queue.low_bytes, stream.queue.max_bytes,
                extra={"stream": stream.session.key, "gateway": stream.session.gateway_id},
            )

    async def Stream(
        self,
        request_iterator: AsyncIterator[bytes],
        context: grpc.aio.ServicerContext,
    ) -> None:
        sessions = self.sessions
        principal = b",".join(sorted(context.peer_identities() or ())).decode(errors="replace")
        session = sessions.connect(principal)
        queue = GatewayQueue(
            context.write, capacity=self.queue_capacity, max_bytes=self.queue_bytes,
            on_behind=lambda behind: self._behind(stream, behind), budget=self.queue_budget,
        )
        stream = _Stream(session, queue, context.peer())
        self.streams[session.key] = stream
        self._idle.clear()
        log.info("gateway stream %d opened by %s", session.key, stream.peer,
                 extra={"stream": session.key, "peer": stream.peer})
        if self.shutting_down:
            queue.close()
        writer = asyncio.create_task(queue.run())
        reader = asyncio.create_task(self._read(stream, request_iterator))
        cut = asyncio.create_task(stream.cut_off.wait())
        why = None  # what ended the stream, for its log line
        unsent = 0
        try:
            await asyncio.wait([reader, cut, writer], return_when=asyncio.FIRST_COMPLETED)
            if not stream.cut_off.is_set() and reader.done() and isinstance(
                reader.exception(), _End
            ):
                failure = reader.exception()
                assert isinstance(failure, _End)
                stream.reason = (failure.code, failure.details)
                stream.cut_off.set()
            if not stream.cut_off.is_set() and not writer.done() and (
                reader.exception() is None
            ):
                # The gateway closed its side: what is queued still goes out
                # (a gateway that also stopped reading is cut off by watch()).
                why = "closed by the gateway"
                queue.close()
                await asyncio.wait([writer, cut], return_when=asyncio.FIRST_COMPLETED)
            if stream.cut_off.is_set():
                # Return with the status set instead of aborting: an abort
                # waits behind a write blocked by a gateway that does not
                # read, and the queue would stay in memory meanwhile.
                code, details = stream.reason
                why = f"{code.name}: {details}"
                writer.cancel()
                unsent = queue.discard()
                context.set_code(code)
                context.set_details(details)
                return
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
            sessions.disconnect(session)
            unsent = unsent or len(queue)
            queue.discard()
            if queue.behind:
                self.behind -= 1
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

    async def _read(self, stream: _Stream, messages: AsyncIterator[bytes]) -> None:
        """Read the gateway's messages: heartbeats are acknowledged and Hello
        applied at once; registrations (subscribes, unsubscribes, and the
        restart window's proof a heartbeat gives) go to the stream's
        registrar in order, up to ``REGISTRATION_BACKLOG`` messages or
        ``REGISTRATION_BACKLOG_BYTES`` ahead of it. A resuming subscribe
        waiting for the Puller's word on its marker then holds later
        registrations, never the acks."""
        sessions, session = self.sessions, stream.session
        work = _Backlog()
        registrar = asyncio.create_task(self._register(stream, work))
        registrar.add_done_callback(lambda task: self._registrar_done(stream, task))
        number = 0
        try:
            async for raw in messages:
                number += 1
                try:
                    message = GatewayMessage.FromString(raw)
                except DecodeError as exc:
                    self.undecodable += 1
                    log.warning("gateway stream %d (%s): message %d does not decode (%s)",
                                session.key, session.gateway_id or stream.peer, number, exc)
                    raise _End(grpc.StatusCode.INVALID_ARGUMENT,
                               f"message {number} is not a GatewayMessage ({exc})") from None
                kind = message.WhichOneof("payload")
                if kind in ("subscribe", "subscribe_batch"):
                    sessions.subscribed(session)
                elif kind == "hello":
                    self._hello(stream, message)
                    continue
                else:
                    sessions.touch(session)
                    if kind == "heartbeat":
                        ack = HeartbeatAck(timestamp=message.heartbeat.timestamp)
                        self._send(stream, StreamerMessage(heartbeat_ack=ack))
                    elif kind != "unsubscribe":
                        log.warning("gateway %s sent an empty message",
                                    session.gateway_id or session.key)
                        continue
                await work.put(message, raw)
            # The gateway closed its side: what it sent before is answered.
            await work.put(None, b"")
            await registrar
        finally:
            registrar.cancel()

    async def _register(self, stream: _Stream, work: _Backlog) -> None:
        """The stream's registrar: its subscribes, unsubscribes and restart-
        window proofs, one at a time in the order they came."""
        sessions, subscriptions, session = self.sessions, self.subscriptions, stream.session
        while True:
            message, raw = await work.get()
            if message is None:
                return
            kind = message.WhichOneof("payload")
            if kind == "subscribe":
                request = message.subscribe
                if request.resume_after and self.catchup is not None:
                    await self._subscribe_resuming(stream, request)
                else:
                    response = subscriptions.subscribe(session.owner, request)
                    if response.success and session.resumes and self.catchup is not None:
                        response.live_after = self.catchup.ingest.position
                    self._send(stream, StreamerMessage(subscribe_response=response))
            elif kind == "subscribe_batch":
                await self._subscribe_batch(stream, message.subscribe_batch.requests, raw)
            elif kind == "unsubscribe":
                subscriptions.unsubscribe(session.owner, message.unsubscribe.subscription_id)
            else:
                # After every registration sent before it (the restart window).
                sessions.heartbeat(session, message.heartbeat.gateway_id)

    def _registrar_done(self, stream: _Stream, task: asyncio.Task[None]) -> None:
        if task.cancelled() or task.exception() is None:
            return
        log.error("gateway stream %d (%s): registering its subscriptions failed",
                  stream.session.key, stream.session.gateway_id or stream.peer,
                  exc_info=task.exception())
        self._end(stream.session, grpc.StatusCode.INTERNAL,
                  "the Streamer failed to register a subscription (a bug; see its log)")

    async def _subscribe_resuming(self, stream: _Stream, request: SubscribeRequest) -> None:
        """A subscribe with ``resume_after``: answered once the Puller has
        accepted or refused the marker (``streamer.node.catchup``)."""
        catchup = self.catchup
        assert catchup is not None
        owner = stream.session.owner
        groups = catchup.hold((request.resume_after,))
        try:
            await catchup.confirmed(groups.values())
            response = catchup.subscribe(owner, request, groups[request.resume_after])
            self._send(stream, StreamerMessage(subscribe_response=response))
        finally:
            catchup.release(groups.values())

    def _resuming(self, owner: int) -> _Stream | None:
        """The open stream of ``owner`` if its Hello says ``resumes`` (the
        gateways told of catch-up progress and of ``caught_up``)."""
        session = self.sessions.by_owner[owner]
        stream = None if session is None else self.streams.get(session.key)
        return stream if stream is not None and stream.session.resumes else None

    def catchup_progress(
        self, owners: set[int], group: int, marker: str, *, merged_into: int = 0
    ) -> None:
        """Tell the resuming gateways among ``owners`` how far catch-up
        ``group`` is (or that it merged into another), after the deliveries
        that progress covers."""
        message = b""
        for owner in owners:
            stream = self._resuming(owner)
            if stream is None:
                continue
            if not message:
                message = StreamerMessage(catchup_progress=CatchUpProgress(
                    group=group, marker=marker, merged_into=merged_into)).SerializeToString()
            self._send_bytes(stream, message)

    def caught_up(self, live: dict[int, list[str]], *, resync: bool = False) -> None:
        """Tell each resuming gateway which of its subscriptions just moved
        from catch-up into the live index (``CaughtUp``, in as many messages
        as its receive limit needs); ``resync``: after a late refusal, the
        events in between are lost for them."""
        for owner, ids in live.items():
            stream = self._resuming(owner)
            if stream is None:
                continue
            limit = stream.queue.delivery_limit - 16
            part: list[str] = []
            size = 0
            for sub_id in ids:
                cost = len(sub_id.encode()) + 4  # its tag and length in the message
                if part and size + cost > limit:
                    self._send_bytes(stream, _caught_up(part, resync))
                    part, size = [], 0
                part.append(sub_id)
                size += cost
            self._send_bytes(stream, _caught_up(part, resync))

    async def _subscribe_batch(
        self, stream: _Stream, requests: Sequence[SubscribeRequest], raw: bytes = b""
    ) -> None:
        """Each request handled as a single subscribe, answered in order by
        one ``subscribe_batch_response`` (several in a row, in order, when
        one would be larger than the gateway receives).

        Requests with ``resume_after`` first wait for the Puller to accept or
        refuse their markers (all of the batch's markers at once); then the
        batch is registered in order. Registered in chunks with a yield to
        the event loop between them: a batch can hold a hundred thousand
        requests, and ingest and the other streams' writers must not wait
        for all of them.
        """
        catchup = self.catchup
        groups = (
            catchup.hold({r.resume_after for r in requests if r.resume_after})
            if catchup is not None else {}
        )
        try:
            if groups:
                assert catchup is not None
                await catchup.confirmed(groups.values())
                if stream.cut_off.is_set():
                    return
            await self._register_batch(stream, requests, groups, raw)
        finally:
            if groups:
                assert catchup is not None
                catchup.release(groups.values())

    async def _register_batch(
        self, stream: _Stream, requests: Sequence[SubscribeRequest], groups: dict[str, Group],
        raw: bytes,
    ) -> None:
        """``raw``: the message the requests were parsed from, whose bytes
        the compiled registration reads where it can (b"": none)."""
        subscriptions, owner = self.subscriptions, stream.session.owner
        catchup = self.catchup
        # Taken before the first registration: it holds for all of them.
        live_after = (
            catchup.ingest.position if catchup is not None and stream.session.resumes else "")
        encoded = batch_requests(raw) if raw and not groups else None
        entries: list[bytes] = []
        for start in range(0, len(requests), BATCH_CHUNK):
            # Also before the first chunk: the registrar takes the stream's
            # next batch at once when it is already read.
            await self.give_way()
            if stream.cut_off.is_set():
                return
            chunk = requests[start:start + BATCH_CHUNK]
            if not groups:
                entries += subscriptions.subscribe_batch(
                    owner, chunk, encoded and encoded[start:start + BATCH_CHUNK])
                continue
            assert catchup is not None
            for r in chunk:
                entries += (
                    [response_entry(catchup.subscribe(owner, r, groups[r.resume_after])
                                    .SerializeToString())] if r.resume_after
                    else subscriptions.subscribe_batch(owner, (r,))
                )
        self.batch_subscribes += len(requests)
        limit = stream.queue.delivery_limit
        message = _batch_response(entries, live_after)
        if len(message) <= limit:
            self._send_bytes(stream, message)
            return
        # Rare (the ids or errors are long): answer in parts that fit, each
        # entry with the message's own tag and length (at most 16 bytes).
        part: list[bytes] = []
        size = 0
        for entry in entries:
            if part and size + len(entry) > limit - 16:
                self._send_bytes(stream, _batch_response(part, live_after))
                part, size = [], 0
            part.append(entry)
            size += len(entry)
        self._send_bytes(stream, _batch_response(part, live_after))

    def _hello(self, stream: _Stream, message: GatewayMessage) -> None:
        hello, session, queue = message.hello, stream.session, stream.queue
        try:
            replaced = self.sessions.hello(
                session, hello.gateway_id, hello.instance, resumes=hello.resumes)
        except IdentityTaken as exc:
            log.warning("gateway stream %d (%s) refused: %s", session.key, stream.peer, exc)
            raise _End(grpc.StatusCode.ALREADY_EXISTS, str(exc)) from None
        for old in replaced:
            log.warning("gateway %s: a new stream replaces an older one", old.gateway_id)
            self._end(old, grpc.StatusCode.ABORTED,
                      f"superseded by a newer stream of gateway {old.gateway_id}")
        if hello.batch_delivery:
            queue.enable_batches(hello.max_batch)
        if hello.max_message_bytes:
            queue.max_message = hello.max_message_bytes
        mode = "plain" if queue.max_batch is None else f"batches of {queue.max_batch}"
        log.info("gateway stream %d is gateway %s (%s)", session.key, session.gateway_id, mode,
                 extra={"stream": session.key, "gateway": session.gateway_id})

    def _send(self, stream: _Stream, message: StreamerMessage) -> None:
        self._send_bytes(stream, message.SerializeToString())

    def _send_bytes(self, stream: _Stream, message: bytes) -> None:
        queue = stream.queue
        if not queue.offer(message) and not queue.closed:
            self._cut_off(stream, f"more than {self.queue_capacity} messages or "
                          f"{self.queue_bytes} bytes queued")


def _batch_response(entries: list[bytes], live_after: str) -> bytes:
    """``batch_response`` with ``SubscribeBatchResponse.live_after`` (field 2)
    when there is one: protobuf reads a message's fields in any order."""
    if live_after:
        entries = [*entries, field(_LIVE_AFTER_TAG, live_after.encode())]
    return batch_response(entries)


def _caught_up(ids: list[str], resync: bool) -> bytes:
    return StreamerMessage(
        caught_up=CaughtUp(subscription_ids=ids, resync_required=resync)).SerializeToString()


def _delivery(ids: list[str], event: StreamerEvent) -> bytes:
    return StreamerMessage(
        delivery=EventDelivery(subscription_ids=ids, event=event)
    ).SerializeToString()


def add_to_server(servicer: StreamerServicer, server: grpc.aio.Server) -> None:
    """Register ``StreamerService`` on ``server``: requests arrive as bytes
    (decoded by the handler), responses leave as the queue's bytes."""
    stream = grpc.stream_stream_rpc_method_handler(
        servicer.Stream, request_deserializer=None, response_serializer=None,
    )
    server.add_generic_rpc_handlers(
        (grpc.method_handlers_generic_handler(SERVICE_NAME, {"Stream": stream}),)
    )
