"""The gateway-side library: ``StreamerClient`` (protocol: docs/protocol.md).

It owns one bidirectional ``StreamerService.Stream`` per client and
everything a gateway needs around it: subscribe/unsubscribe with awaited
responses, heartbeats, dead-stream detection (read errors and missing
heartbeat acks), reconnection with jittered exponential backoff (forever
until closed, once a stream has opened), re-subscription of every live
subscription under the same id after each reconnect, and async iteration
over the deliveries::

    async with StreamerClient("127.0.0.1:50052", gateway_id="gw-1") as client:
        sid = await client.subscribe("messages", filters=[("chat_id", "==", "c1")])
        async for delivery in client.deliveries():
            ...

After a reconnect every subscription resumes after the marker of the last
event it received (``resume_after``; docs/protocol.md), or, without one,
after the marker the server answered it with (``live_after``): the server
replays what it missed, strictly after that marker, then continues live,
so nothing is lost that the Puller still has and nothing is delivered
twice by the resume itself. Wrong credentials (``UNAUTHENTICATED``,
``PERMISSION_DENIED``) are not retried: the client fails with
``AccessDenied``, raised by ``subscribe()`` and at the end of
``deliveries()``. Neither is an address that never answers: when no stream
has opened within ``connect_timeout`` of ``start()``, the client fails the
same way with ``CannotConnect`` (the address and the last attempt's
failure). Once a stream has opened, the client never gives up on the
server again: a lost stream is retried forever.

A re-subscription the server refuses after a reconnect is logged, dropped
from ``live_subscriptions`` and handed to ``on_rejected`` (if given) as a
``SubscriptionRejected``; the other subscriptions and the stream carry on.

Only grpcio, protobuf and the standard library are needed.
"""

from __future__ import annotations

import asyncio
import logging
import random
import secrets
import time
import uuid
from collections.abc import AsyncIterator, Callable, Container, Iterable, Sequence
from dataclasses import dataclass
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc

from streamer.errors import (
    AccessDenied,
    CannotConnect,
    StreamClosed,
    StreamerError,
    SubscriptionRejected,
)
from streamer.protocol import streamer_v1_pb2_grpc
from streamer.protocol.streamer_v1_pb2 import (
    EventDelivery,
    Filter,
    GatewayMessage,
    Heartbeat,
    Hello,
    StreamerMessage,
    SubscribeRequest,
    SubscribeResponse,
    UnsubscribeRequest,
    Value,
)
from streamer.transport import KEEPALIVE_OPTIONS
from streamer.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from streamer.matching import matcher

__all__ = [
    "AccessDenied", "CannotConnect", "StreamClosed", "StreamerClient", "Subscription",
    "SubscriptionRejected",
]

log = logging.getLogger(__name__)

# Well below the server's 90 s session TTL, so one lost heartbeat never
# expires the session.
DEFAULT_HEARTBEAT_INTERVAL = 10.0
# Long enough for a server that is still starting, short enough that a
# wrong address is reported while someone is still watching.
DEFAULT_CONNECT_TIMEOUT = 10.0
# What one subscribe_batch carries at most: well under the server's 4 MiB
# receive limit, and small enough that the server answers it in a few ms.
# Requests are tens of bytes each: BATCH_REQUESTS of them stay one message.
BATCH_REQUESTS = 1000
BATCH_BYTES = 256 << 10
RESYNC_REQUIRED = "resync_required"
_FATAL = frozenset({grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED})
_INT64 = (-(2**63), 2**63 - 1)


class _Answers:
    """The answers to requests sent together, in their order; the future
    is done when the last one is in."""

    __slots__ = ("future", "left", "responses")

    def __init__(self, loop: asyncio.AbstractEventLoop, n: int) -> None:
        self.future: asyncio.Future[list[SubscribeResponse]] = loop.create_future()
        self.responses: list[SubscribeResponse | None] = [None] * n
        self.left = n

    def answer(self, i: int, response: SubscribeResponse) -> None:
        self.responses[i] = response
        self.left -= 1
        if not self.left and not self.future.done():
            self.future.set_result(self.responses)  # type: ignore[arg-type]


@dataclass(frozen=True)
class Subscription:
    """One subscription for ``StreamerClient.subscribe_many``: the arguments
    of ``subscribe()``."""

    collection: str
    filters: Sequence[matcher.Filter | tuple[str, str, Any]] = ()
    expression: str = ""
    database: str = ""
    subscription_id: str | None = None
    resume_after: str = ""


class StreamerClient:
    """One gateway's connection to a Streamer; see the module docstring.

    ``batch`` sends ``Hello{batch_delivery}`` so the server may pack
    deliveries (``max_batch`` per message, 0: the server's default); with
    ``batch=False`` no Hello is sent, as a plain Syntrix gateway does.
    ``resume`` re-subscribes after a reconnect with ``resume_after`` (see
    the module docstring; with ``batch``, the Hello says so, and the server
    then neither holds its restart window for this gateway nor leaves a
    subscription without a marker); ``resume=False`` re-subscribes from
    the live head, as a Syntrix gateway does.
    ``ack_timeout`` (default three heartbeat intervals) is how long the
    stream may go without a heartbeat ack (or, right after connecting,
    without the answers to the re-subscriptions) before it is declared dead.
    ``backoff`` is the (initial, maximum) reconnect delay in seconds, each
    delay jittered by a factor in [0.5, 1.5]. ``connect_timeout`` is how long
    the first stream may take to open (the server's first answer on it)
    before the client fails with ``CannotConnect``; None retries forever.
    ``tls`` is the channel's
    credentials (None: plaintext), ``token`` is sent as ``authorization:
    Bearer <token>`` on the stream, ``channel_options`` go to the channel
    (e.g. ``grpc.ssl_target_name_override``) after the keepalive settings of
    ``streamer.transport``, which they may override.

    ``cluster="etcd://HOST:PORT[,HOST:PORT...]"`` instead of a target makes
    it a client of a Streamer cluster (``streamer.cluster.client``): the
    same API over one stream per node it needs, each subscription at its
    shard's owner, re-homed with ``resume_after`` when ownership moves.
    """

    def __new__(cls, *args: Any, cluster: str | None = None, **options: Any) -> StreamerClient:
        # StreamerClient(cluster=...) is the cluster client, with the same API.
        if cluster is not None and cls is StreamerClient:
            from streamer.cluster.client import ClusterClient

            return object.__new__(ClusterClient)
        return object.__new__(cls)

    def __init__(
        self,
        target: str | None = None,
        *,
        cluster: str | None = None,
        gateway_id: str,
        token: str | None = None,
        tls: grpc.ChannelCredentials | None = None,
        batch: bool = True,
        resume: bool = True,
        max_batch: int = 0,
        heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL,
        ack_timeout: float | None = None,
        backoff: tuple[float, float] = (0.1, 5.0),
        connect_timeout: float | None = DEFAULT_CONNECT_TIMEOUT,
        on_rejected: Callable[[SubscriptionRejected], object] | None = None,
        on_resync: Callable[[str], object] | None = None,
        channel_options: Sequence[tuple[str, Any]] = (),
    ) -> None:
        if not target:
            raise ValueError("give the Streamer's HOST:PORT, or cluster='etcd://HOST:PORT'")
        if not gateway_id:
            raise ValueError("gateway_id must not be empty")
        if not 0 <= max_batch < 2**32:
            raise ValueError(f"max_batch must be a uint32, got {max_batch}")
        if heartbeat_interval <= 0:
            raise ValueError(f"heartbeat_interval must be positive, got {heartbeat_interval}")
        if not 0 < backoff[0] <= backoff[1]:
            raise ValueError(f"backoff must be (initial, maximum) with 0 < initial <= maximum, "
                             f"got {backoff}")
        if connect_timeout is not None and not connect_timeout > 0:
            raise ValueError(f"connect_timeout must be positive or None, got {connect_timeout}")
        self.target = target
        self.gateway_id = gateway_id
        self.batch = batch
        self.resume = resume
        self.max_batch = max_batch
        self.heartbeat_interval = heartbeat_interval
        self.ack_timeout = 3 * heartbeat_interval if ack_timeout is None else ack_timeout
        self.backoff = backoff
        self.connect_timeout = connect_timeout
        self.on_rejected = on_rejected
        self.on_resync = on_resync
        self._tls = tls
        # Deliveries of large documents may exceed gRPC's default 4 MiB; the
        # Hello tells the server how much this client receives.
        self._channel_options = [
            *KEEPALIVE_OPTIONS, ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
            *channel_options,
        ]
        # Drawn once: proves to the server that a new stream comes from this
        # client, so it may replace an older stream the server still holds.
        self._instance = secrets.token_hex(16)
        self._metadata = (("authorization", f"Bearer {token}"),) if token is not None else ()
        # Every subscription the client wants, confirmed or not, in subscribe
        # order: what a reconnect re-sends.
        self._requests: dict[str, SubscribeRequest] = {}
        # Requests whose answer is awaited (sent, or to send once connected).
        # One _Answers per group of requests sent together (one future for
        # all: a future per request doubled the client's cost of a bulk
        # registration), and each request's place in it.
        self._waiters: dict[str, tuple[_Answers, int]] = {}
        # Requests to send on the current stream, in order; a reconnect
        # starts again from every wanted request.
        self._unsent: list[SubscribeRequest] = []
        # Per stream: its outgoing messages and the ids subscribed on it.
        self._outbox: asyncio.Queue[GatewayMessage] | None = None
        self._sent: set[str] = set()
        # Unbounded on purpose: the reader never waits for the consumer, so
        # heartbeat acks are never stuck behind deliveries (a bounded queue
        # would make a slow consumer look like a dead stream). A consumer
        # slower than the delivery rate grows this queue instead; the
        # server's own bound (docs/delivery.md, Backpressure) does not see it.
        self._deliveries: asyncio.Queue[EventDelivery | None] = asyncio.Queue()
        # Resuming (docs/protocol.md, Resuming): per subscription, the marker
        # of the last event delivered for it; per stream, the marker of its
        # last delivery to a live subscription and how many such came; per
        # subscription answered as live on this stream, how many by then;
        # per subscription catching up on this stream, its catch-up group,
        # and per group its last progress (marker, and the message's number
        # on the stream) and the group it merged into.
        self._markers: dict[str, str] = {}
        # Subscriptions held whose deliveries on this stream are not theirs
        # (a cluster client's node stream: one placed again on the stream
        # it was released from, until its new registration is answered).
        self._muted: Container[str] = ()
        self._stream_marker = ""
        self._stream_deliveries = 0
        self._live_since: dict[str, int] = {}
        self._group_of: dict[str, int] = {}
        self._progress: dict[int, tuple[str, int]] = {}
        self._merged: dict[int, int] = {}
        self._progress_count = 0
        self._connected = asyncio.Event()
        self._last_ack = 0.0
        self._acked = asyncio.Event()
        self._connections = 0
        # Some stream has opened (the server answered on it): from then on
        # the client retries forever.
        self._opened = False
        self._failure: AccessDenied | CannotConnect | None = None
        self._closed = False
        self._task: asyncio.Task[None] | None = None

    async def __aenter__(self) -> StreamerClient:
        self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    @property
    def connected(self) -> bool:
        """True once the current stream has re-subscribed and its first
        heartbeat was acknowledged."""
        return self._connected.is_set()

    @property
    def reconnects(self) -> int:
        """Streams established after the first one."""
        return max(0, self._connections - 1)

    @property
    def live_subscriptions(self) -> list[str]:
        """Ids the server has confirmed, which every reconnect re-subscribes
        (while that happens, the ones not re-confirmed yet are left out)."""
        return [sid for sid in self._requests if sid not in self._waiters]

    def start(self) -> None:
        """Start connecting in the background (``async with`` does it)."""
        self._check_open()
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name=f"streamer-client {self.target}")

    async def close(self) -> None:
        """Stop; pending ``subscribe()`` calls raise ``StreamClosed`` and
        ``deliveries()`` ends after what was already received.

        Made for ``async with`` on a cancelled task (Ctrl-C): the client is
        closed all the same, a cancellation of the caller is never swallowed
        and nothing gets chained to one already under way.
        """
        if self._closed:
            return
        self._closed = True
        try:
            if self._task is not None:
                self._task.cancel()
                # Unlike awaiting the task, wait() never raises the task's
                # own CancelledError, so only the caller's can end it early.
                await asyncio.wait([self._task])
                if not self._task.cancelled():
                    self._task.result()  # a failure of the client itself
        finally:
            self._end(StreamClosed("the client is closed"))

    async def subscribe(
        self,
        collection: str,
        *,
        filters: Iterable[matcher.Filter | tuple[str, str, Any]] = (),
        expression: str = "",
        database: str = "",
        subscription_id: str | None = None,
        resume_after: str = "",
        timeout: float | None = None,
    ) -> str:
        """Register a subscription and return its id once the server accepted it.

        Without ``subscription_id`` the client generates a UUID4 (it must
        know the id to re-subscribe it after a reconnect). While disconnected
        this waits for the connection; ``timeout`` bounds the whole call
        (``TimeoutError``). Raises ``SubscriptionRejected`` when refused,
        ``AccessDenied`` or ``CannotConnect`` when the client has failed,
        ``TypeError`` for a filter value with no protocol ``Value``.
        ``database`` is sent as given: the server has no default database,
        so ``""`` matches only events whose database is ``""``.
        ``resume_after`` (a delivery's ``event.progress``, e.g. one the
        gateway saved from ``marker()`` before it restarted) asks for every
        matching event after it first; the client keeps track of it from
        then on. When the server can no longer replay from there the
        subscription starts live and ``on_resync`` is called with its id.
        """
        self._check_open()
        (request,) = self._requests_of([Subscription(
            collection, filters=tuple(filters), expression=expression, database=database,
            subscription_id=subscription_id, resume_after=resume_after)])
        answers = self._register([request])
        try:
            async with asyncio.timeout(timeout):
                (response,) = await answers.future
        except BaseException:
            self._withdraw([request], answers)
            raise
        if not response.success:
            raise SubscriptionRejected(request.subscription_id, response.code, response.error)
        return request.subscription_id

    async def subscribe_many(
        self, subscriptions: Iterable[Subscription], *, timeout: float | None = None
    ) -> list[str | SubscriptionRejected]:
        """Register many subscriptions at once, and return for each, in
        order, its id once the server accepted it or the
        ``SubscriptionRejected`` saying why it did not.

        With ``batch`` (the default) they travel in ``subscribe_batch``
        messages of up to ``BATCH_REQUESTS`` requests, which the server
        answers one message per batch: registration runs at the speed of
        the index, not of one round of messages per subscription. Each batch
        is sent as soon as it is built, so the server registers one while
        the next is built. Without ``batch`` each is a single ``subscribe``.
        ``timeout`` bounds the whole call (``TimeoutError``); a malformed
        subscription raises ``subscribe()``'s errors when its batch is
        built. Either way none of the subscriptions is kept: those already
        sent are withdrawn.
        """
        self._check_open()
        specs = list(subscriptions)
        if not specs:
            return []
        answers = _Answers(asyncio.get_running_loop(), len(specs))
        requests: list[SubscribeRequest] = []
        try:
            async with asyncio.timeout(timeout):
                start = 0
                while start < len(specs):
                    if start:
                        await asyncio.sleep(0)  # the writer sends the last batch meanwhile
                    # A lone last request would go as a plain subscribe: it
                    # joins this batch instead.
                    stop = start + BATCH_REQUESTS
                    stop += len(specs) - stop == 1
                    batch = self._requests_of(specs[start:stop])
                    requests += batch
                    self._register(batch, answers, start)
                    start = stop
                responses = await answers.future
        except BaseException:
            self._withdraw(requests, answers)
            raise
        return [
            r.subscription_id if response.success
            else SubscriptionRejected(r.subscription_id, response.code, response.error)
            for r, response in zip(requests, responses, strict=True)
        ]

    def _requests_of(self, subscriptions: Iterable[Subscription]) -> list[SubscribeRequest]:
        """The protocol requests, each with its id (drawn when not given:
        the client must know it to re-subscribe after a reconnect); raises
        before anything is registered."""
        requests: list[SubscribeRequest] = []
        ids: set[str] = set()
        wanted = self._requests
        for spec in subscriptions:
            sub_id = spec.subscription_id or str(uuid.uuid4())
            if sub_id in wanted or sub_id in ids:
                raise SubscriptionRejected(
                    sub_id, "already_exists", "already subscribed by this client")
            ids.add(sub_id)
            request = SubscribeRequest(
                subscription_id=sub_id, collection=spec.collection, database=spec.database,
                expression=spec.expression, resume_after=spec.resume_after,
            )
            if spec.filters:
                add = request.filters.add
                for position, flt in enumerate(spec.filters, 1):
                    _put_filter(add, position, flt)
            requests.append(request)
        return requests

    def _register(
        self, requests: list[SubscribeRequest], answers: _Answers | None = None, first: int = 0
    ) -> _Answers:
        """Make the requests wanted and awaited (``answers``' places from
        ``first`` on; default: answers of their own), and send them now if a
        stream is up (else its handshake sends them)."""
        if answers is None:
            answers = _Answers(asyncio.get_running_loop(), len(requests))
        wanted, waiters = self._requests, self._waiters
        for i, request in enumerate(requests, first):
            sub_id = request.subscription_id
            wanted[sub_id] = request
            waiters[sub_id] = (answers, i)
        self._unsent.extend(requests)
        if self._connected.is_set():
            self._send_unsent()
        return answers

    def _withdraw(self, requests: list[SubscribeRequest], answers: _Answers) -> None:
        """Forget requests whose caller gave up (timeout, cancellation)."""
        answers.future.cancel()  # wakes unsubscribe() calls waiting for the answers
        for request in requests:
            sub_id = request.subscription_id
            entry = self._waiters.get(sub_id)
            if entry is not None and entry[0] is answers:
                del self._waiters[sub_id]
            if self._requests.get(sub_id) is request:
                del self._requests[sub_id]
                if sub_id in self._sent:
                    # The server may have registered it: nobody would own it.
                    self._unsubscribe_sent(sub_id)

    async def unsubscribe(self, subscription_id: str) -> None:
        """Remove a subscription (unknown ids are ignored, as the server does).

        An id whose ``subscribe()`` is still waiting is removed once answered.
        """
        self._check_open()
        entry = self._waiters.get(subscription_id)
        if entry is not None:
            await asyncio.wait([entry[0].future])  # never cancels it, never raises its error
        self._forget(subscription_id)
        if self._requests.pop(subscription_id, None) is not None and subscription_id in self._sent:
            self._unsubscribe_sent(subscription_id)

    def _unsubscribe_sent(self, subscription_id: str) -> None:
        self._sent.discard(subscription_id)
        self._send(GatewayMessage(unsubscribe=UnsubscribeRequest(
            subscription_id=subscription_id)))

    def marker(self, subscription_id: str) -> str:
        """The marker a subscription has received every matching event up
        to: the ``progress`` of its last delivery, or a later one the server
        vouched for (its answer's ``live_after``; after a broken stream, the
        stream's last live delivery or its catch-up group's progress); ""
        while it has none. What it resumes after when the stream breaks,
        and what a gateway that restarts can pass to ``subscribe(...,
        resume_after=...)``."""
        return self._markers.get(subscription_id, "")

    def _forget(self, subscription_id: str) -> None:
        self._markers.pop(subscription_id, None)
        self._live_since.pop(subscription_id, None)

    async def deliveries(self) -> AsyncIterator[EventDelivery]:
        """Every delivery, batches flattened, in the order received.

        Ends when the client is closed; raises ``AccessDenied`` (the server
        refused the credentials) or ``CannotConnect`` (no stream opened
        within ``connect_timeout``) after the last delivery. Meant for one
        consumer at a time.
        """
        queue = self._deliveries
        while True:
            delivery = await queue.get()
            if delivery is None:
                queue.put_nowait(None)  # so every iterator ends, also later ones
                if self._failure is not None:
                    raise self._failure
                return
            yield delivery

    def _check_open(self) -> None:
        if self._failure is not None:
            raise self._failure
        if self._closed:
            raise StreamClosed("the client is closed")

    def _end(self, error: StreamerError) -> None:
        self._fail_waiters(error)
        self._deliveries.put_nowait(None)

    def _fail_waiters(self, error: StreamerError) -> None:
        for answers in {id(a): a for a, _ in self._waiters.values()}.values():
            if not answers.future.done():
                answers.future.set_exception(error)
        self._waiters.clear()

    def _send(self, message: GatewayMessage) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(message)

    async def _run(self) -> None:
        loop = asyncio.get_running_loop()
        timeout = self.connect_timeout
        started = loop.time()
        delay = self.backoff[0]
        last_failure = ""
        while True:
            deadline = None if self._opened or timeout is None else started + timeout
            try:
                established, failure = await self._connect(deadline)
            except AccessDenied as exc:
                log.error("streamer %s refused gateway %s: %s", self.target, self.gateway_id, exc)
                self._fail(exc)
                return
            if established:
                delay = self.backoff[0]
            pause = delay * random.uniform(0.5, 1.5)
            delay = min(delay * 2, self.backoff[1])
            if not self._opened and timeout is not None:
                # An attempt cut short by the deadline knows less than the
                # one that failed before it.
                last_failure = failure or last_failure
                remaining = started + timeout - loop.time()
                if remaining <= 0:
                    error = CannotConnect(
                        self.target, timeout, last_failure or "no answer from the server")
                    log.error("giving up: %s", error)
                    self._fail(error)
                    return
                pause = min(pause, remaining)
            await asyncio.sleep(pause)

    def _fail(self, error: AccessDenied | CannotConnect) -> None:
        self._failure = error
        self._end(error)

    async def _connect(self, deadline: float | None) -> tuple[bool, str | None]:
        """One stream, until it fails, or until ``deadline`` (loop time) if
        it has not opened by then: whether it got through the handshake,
        and why it ended (None: the deadline)."""
        if self._tls is None:
            channel = grpc.aio.insecure_channel(self.target, options=self._channel_options)
        else:
            channel = grpc.aio.secure_channel(self.target, self._tls, options=self._channel_options)
        outbox: asyncio.Queue[GatewayMessage] = asyncio.Queue()
        self._outbox, self._sent = outbox, set()
        opened = asyncio.Event()
        try:
            stub = streamer_v1_pb2_grpc.StreamerServiceStub(channel)  # type: ignore[no-untyped-call]
            call = stub.Stream(metadata=self._metadata)
            tasks = [
                asyncio.create_task(self._read(call, opened)),
                asyncio.create_task(self._write(call, outbox)),
                asyncio.create_task(self._pulse()),
            ]
            try:
                # Each task runs until the stream is unusable.
                done: set[asyncio.Task[None]] = set()
                if deadline is not None:
                    done, _ = await asyncio.wait(
                        tasks, timeout=max(0.0, deadline - asyncio.get_running_loop().time()),
                        return_when=asyncio.FIRST_COMPLETED,
                    )
                    if not done and not opened.is_set():
                        return False, None
                if not done:
                    done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                established = self._connected.is_set()
                # A write racing the server's refusal turns the call's status
                # into INTERNAL (grpc.aio marks the call failed itself): that
                # attempt is retried, and the next one sees the real code.
                if call.done():
                    code = await call.code()
                    if code in _FATAL:
                        raise AccessDenied(code.name, await call.details())
                error = next(iter(done)).exception()
                if isinstance(error, grpc.aio.AioRpcError):
                    reason = f"{error.code().name}: {error.details()}"
                else:
                    reason = str(error)
                if opened.is_set():
                    log.warning("stream to streamer %s lost: %s", self.target, reason)
                else:
                    log.warning("cannot connect to streamer %s: %s", self.target, reason)
                return established, reason
            finally:
                self._opened = self._opened or opened.is_set()
                self._connected.clear()
                self._stream_ended()
                self._outbox = None
                call.cancel()
                for task in tasks:
                    task.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
        finally:
            await channel.close()

    async def _read(self, call: grpc.aio.StreamStreamCall, opened: asyncio.Event) -> None:
        async for message in call:
            opened.set()  # an answer proves a Streamer is at the address
            kind = message.WhichOneof("payload")
            if kind == "delivery":
                self._delivered((message.delivery,))
                if message.delivery.subscription_ids:
                    self._deliveries.put_nowait(message.delivery)
            elif kind == "batch":
                self._delivered(message.batch.deliveries)
                for delivery in message.batch.deliveries:
                    if delivery.subscription_ids:
                        self._deliveries.put_nowait(delivery)
            else:
                self._control(message, kind)
        raise ConnectionError("the server ended the stream")

    def _delivered(self, deliveries: Sequence[EventDelivery]) -> None:
        """Each named subscription's marker moves to its delivery's; one
        that names a live subscription is the stream's newest live marker
        (a catch-up delivery, of an older event, names only resuming ones:
        the server never mixes the two in one delivery).

        Subscriptions this client no longer has (unsubscribed, or moved to
        another node by a cluster client) or whose deliveries are ``_muted``
        are cut from the deliveries that name them, so nothing is delivered
        for one after ``unsubscribe()`` and its marker stays where it was
        (one left naming none is not passed on)."""
        markers, requests, live, muted = (
            self._markers, self._requests, self._live_since, self._muted)
        for delivery in deliveries:
            progress = delivery.event.progress
            ids = delivery.subscription_ids
            stray = False
            for sub_id in ids:
                if sub_id in requests and sub_id not in muted:
                    if progress:
                        markers[sub_id] = progress
                else:
                    stray = True
            if stray:
                known = [sub_id for sub_id in ids if sub_id in requests and sub_id not in muted]
                del ids[:]
                ids.extend(known)
            if progress and live and any(sub_id in live for sub_id in ids):
                self._stream_marker = progress
                self._stream_deliveries += 1

    def _stream_ended(self) -> None:
        """Set what each subscription resumes after on the next stream.

        One live on the stream that ended (answered as live, or named by
        ``caught_up``), with a live delivery after that: the stream's last
        live delivery (it was live, so every event before that one that
        matched it came to it, in order). All of those share that one
        marker, which the server replays once. One still catching up: its
        group's last ``catchup_progress``, shared by the whole group (its
        deliveries after that progress, at most one Puller message's, may
        come again). Else ``marker(id)``: its own last delivery or its
        ``live_after`` ("" from a server that sends no ``live_after``: then
        what it last asked for). The choice becomes ``marker(id)``.
        """
        stream_marker, count = self._stream_marker, self._stream_deliveries
        markers = self._markers
        for sub_id, request in self._requests.items() if self.resume else ():
            if self._live_since.get(sub_id, count) < count:
                marker = stream_marker
            else:
                group = self._group_of.get(sub_id)
                marker = (self._group_progress(group) if group is not None else "") or (
                    markers.get(sub_id, ""))
            if marker:
                request.resume_after = markers[sub_id] = marker
        self._live_since.clear()
        self._group_of.clear()
        self._progress.clear()
        self._merged.clear()
        self._progress_count = 0
        self._stream_marker = ""
        self._stream_deliveries = 0

    def _group_progress(self, group: int) -> str:
        """The newest progress of a catch-up group, following its merges
        (the group it merged into covers its subscriptions from the merge
        on); "" if none came."""
        marker, number = self._progress.get(group, ("", -1))
        while group in self._merged:
            group = self._merged[group]
            newer, later = self._progress.get(group, ("", -1))
            if later > number:
                marker, number = newer, later
        return marker

    def _control(self, message: StreamerMessage, kind: str | None) -> None:
        """A message that is not a delivery: acks and subscribe answers."""
        if kind == "heartbeat_ack":
            self._last_ack = time.monotonic()
            self._acked.set()
        elif kind == "subscribe_response":
            self._answer(message.subscribe_response)
        elif kind == "subscribe_batch_response":
            batch = message.subscribe_batch_response
            for response in batch.responses:
                self._answer(response, batch.live_after)
        elif kind == "catchup_progress":
            progress = message.catchup_progress
            self._progress_count += 1
            self._progress[progress.group] = (progress.marker, self._progress_count)
            if progress.merged_into:
                self._merged[progress.group] = progress.merged_into
        elif kind == "caught_up":
            caught_up = message.caught_up
            count, live = self._stream_deliveries, self._live_since
            for sub_id in caught_up.subscription_ids:
                request = self._requests.get(sub_id)
                if request is None:
                    continue
                if caught_up.resync_required:
                    self._resync(sub_id, request, "")
                else:
                    live[sub_id] = count
        else:
            log.warning("streamer %s sent a message of unknown kind %r", self.target, kind)

    def _answer(self, response: SubscribeResponse, batch_live_after: str = "") -> None:
        """A subscribe answered. One registered live (a plain request, or a
        resuming one answered with ``live_after``) counts as live on this
        stream from here, and resumes after ``live_after`` until it has a
        marker of its own."""
        sub_id = response.subscription_id
        entry = self._waiters.pop(sub_id, None)
        if entry is None:
            log.warning("ignoring a response for unknown subscription %r", sub_id)
            return
        if not response.success:
            self._requests.pop(sub_id, None)
            self._forget(sub_id)
        else:
            request = self._requests.get(sub_id)
            if response.code == RESYNC_REQUIRED:
                self._resync(sub_id, request, response.live_after)
            elif request is not None:
                live_after = response.live_after or (
                    "" if request.resume_after else batch_live_after)
                if live_after or not request.resume_after:
                    self._live_since[sub_id] = self._stream_deliveries
                    if live_after and self.resume:
                        request.resume_after = self._markers[sub_id] = live_after
                elif response.catchup_group:
                    self._group_of[sub_id] = response.catchup_group
        entry[0].answer(entry[1], response)

    def _resync(self, sub_id: str, request: SubscribeRequest | None, live_after: str) -> None:
        """The server could not replay after the subscription's marker (when
        answering it, or later: ``CaughtUp.resync_required``): it is live
        from now, and whatever was missed is the gateway's to redo."""
        log.warning("subscription %s resumes from the live head: the Puller can no longer "
                    "replay after its marker (resync_required)", sub_id)
        self._forget(sub_id)
        if request is not None:
            request.resume_after = live_after if self.resume else ""
            self._live_since[sub_id] = self._stream_deliveries
        if self.on_resync is not None:
            try:
                self.on_resync(sub_id)
            except Exception:
                log.exception("on_resync callback failed")

    @staticmethod
    async def _write(
        call: grpc.aio.StreamStreamCall, outbox: asyncio.Queue[GatewayMessage]
    ) -> None:
        # The only writer of the call: grpc.aio allows one write at a time.
        while True:
            await call.write(await outbox.get())

    async def _pulse(self) -> None:
        """Handshake, then heartbeats until acks stop coming."""
        # The server takes a heartbeat that follows re-subscriptions as proof
        # that the gateway has re-registered everything (its restart window),
        # so the order is: Hello, every re-subscription answered, Heartbeat.
        if self.batch:
            self._send(GatewayMessage(hello=Hello(
                gateway_id=self.gateway_id, batch_delivery=True, max_batch=self.max_batch,
                instance=self._instance, max_message_bytes=MAX_MESSAGE_BYTES,
                resumes=self.resume)))
        # What the last stream left unanswered goes again, in subscribe order.
        self._unsent = list(self._requests.values())
        ids = [i for i in self._requests if i not in self._waiters]  # else a call awaits it
        resubscribed = _Answers(asyncio.get_running_loop(), len(ids))
        for i, sub_id in enumerate(ids):
            self._waiters[sub_id] = (resubscribed, i)
        try:
            self._send_unsent()
            if ids:
                done, _ = await asyncio.wait([resubscribed.future], timeout=self.ack_timeout)
                if not done:
                    raise TimeoutError(f"{resubscribed.left} re-subscriptions unanswered "
                                       f"after {self.ack_timeout:g} s")
        finally:
            # Also when the stream dies meanwhile: answers already in count.
            resubscribed.future.cancel()  # wakes unsubscribe(); the next stream asks again
            for i, sub_id in enumerate(ids):
                response = resubscribed.responses[i]
                if response is None:
                    if self._waiters.get(sub_id, (None,))[0] is resubscribed:
                        del self._waiters[sub_id]
                elif not response.success:
                    self._rejected(SubscriptionRejected(sub_id, response.code, response.error))
        self._acked.clear()
        self._heartbeat()
        # Connected means answered: until then a refused call looks fine.
        # Not asyncio.wait_for: on Python 3.11 it returns an ack that arrives
        # as the handshake is cancelled (close()), swallowing the cancellation.
        try:
            async with asyncio.timeout(self.ack_timeout):
                await self._acked.wait()
        except TimeoutError:
            raise TimeoutError(
                f"first heartbeat unacknowledged after {self.ack_timeout:g} s"
            ) from None
        self._send_unsent()  # subscribe() calls made during the handshake
        self._connections += 1
        self._connected.set()
        while True:
            await asyncio.sleep(self.heartbeat_interval)
            silent = time.monotonic() - self._last_ack
            if silent > self.ack_timeout:
                raise TimeoutError(f"no heartbeat ack for {silent:.1f} s")
            self._heartbeat()

    def _send_unsent(self) -> None:
        """Send the requests not sent on this stream yet: when batching and
        there are several, in ``subscribe_batch`` messages of up to
        ``BATCH_REQUESTS`` requests or ``BATCH_BYTES`` bytes; else one by one."""
        unsent = [r for r in self._unsent if self._requests.get(r.subscription_id) is r]
        self._unsent = []
        self._sent.update(r.subscription_id for r in unsent)
        if not self.batch or len(unsent) == 1:
            for request in unsent:
                self._send(GatewayMessage(subscribe=request))
            return
        for start in range(0, len(unsent), BATCH_REQUESTS):
            self._send_batch(unsent[start:start + BATCH_REQUESTS])

    def _send_batch(self, requests: list[SubscribeRequest]) -> None:
        """``requests`` in one ``subscribe_batch``, halved until each part is
        at most ``BATCH_BYTES`` or a single request. Measured as a whole:
        measuring each request cost about as much as building the batch."""
        message = GatewayMessage()
        message.subscribe_batch.requests.extend(requests)
        if len(requests) > 1 and message.ByteSize() > BATCH_BYTES:
            half = len(requests) // 2
            self._send_batch(requests[:half])
            self._send_batch(requests[half:])
        else:
            self._send(message)

    def _heartbeat(self) -> None:
        self._send(GatewayMessage(heartbeat=Heartbeat(
            gateway_id=self.gateway_id, timestamp=time.time_ns() // 1_000_000)))

    def _rejected(self, error: SubscriptionRejected) -> None:
        log.error("re-subscription refused, subscription dropped: %s", error)
        if self.on_rejected is not None:
            try:
                self.on_rejected(error)
            except Exception:
                log.exception("on_rejected callback failed")


def _put_filter(add: Callable[..., Filter], position: int,
                spec: matcher.Filter | tuple[str, str, Any]) -> None:
    """Append ``spec`` with ``add`` (a request's ``filters.add``)."""
    if not isinstance(spec, tuple) or len(spec) != 3:
        raise TypeError(
            f"filter {position}: expected a Filter or a (field, op, value) tuple, got {spec!r}"
        )
    field, op, value = spec
    if not isinstance(field, str) or not isinstance(op, str):
        raise TypeError(f"filter {position}: field and op must be str, got {field!r}, {op!r}")
    _put_value(add(field=field, op=op).value, value, position, field)


def _put_value(out: Value, value: object, position: int, field: str) -> None:
    """Set ``out`` to a Python value (bool is tested before int: it is one).
    Set in place: building a ``Value`` and copying it into its filter cost
    about as much again, at a million subscriptions."""
    if isinstance(value, str):
        out.string_value = value
    elif isinstance(value, bool):
        out.bool_value = value
    elif isinstance(value, int):
        if not _INT64[0] <= value <= _INT64[1]:
            raise ValueError(f"filter {position} ({field}): {value} does not fit in int64")
        out.int_value = value
    elif isinstance(value, float):
        out.double_value = value
    elif isinstance(value, list | tuple):
        values = out.list_value.values
        out.list_value.SetInParent()  # an empty list is a list all the same
        for v in value:
            if type(v) is str:
                values.add(string_value=v)  # the common case, without the call
            else:
                _put_value(values.add(), v, position, field)
    else:
        raise TypeError(
            f"filter {position} ({field}): cannot send a {type(value).__name__} value "
            "(str, int, float, bool or a list of them)"
        )
