"""Puller ingest: consume ``puller.v1``, match each event once, fan out.

The ingest keeps one stream to the Puller. It asks for ``SubscribeBatch``
first and falls back to ``Subscribe`` when the Puller answers
``UNIMPLEMENTED`` (a Syntrix Puller); it reconnects with jittered
exponential backoff, resuming after the last marker it processed. When the
Puller refuses that marker (``INVALID_ARGUMENT``: too old, or from another
log), events after it can no longer be delivered: by default the ingest
stops with ``ResumePointLost`` (an operator decides); with
``on_marker_refused="resume-from-head"`` it says so loudly, counts it, and
continues from the live head. Either way the saved marker stays until an
event after it is processed: a marker never moves back to "the live head".

Each event is transformed (``streamer.node.events``), matched once (twice with a
pre-image, for enter/leave), grouped into one delivery per (gateway,
operation), handed to the gateways' queues without waiting, and only then
is its marker advanced (``streamer.node.progress``). Poison events are counted by
reason, logged with their id, and skipped; their marker still advances.

The ingest records the marker of the last change event it processed
(``last_change``; poison included, heartbeats not), and tells the catch-up
of resuming subscriptions (``streamer.node.catchup``) of every batch it
matched, so that catch-ups hand over to it without a gap and handed-over
ones get their deliveries after the live ones. The per-event work is
``Matching``, which a catch-up group also runs over its own matcher.

The common case of the plain layout (no pre-image, no update description,
well-formed) runs through the compiled step ``streamer._ext._ingest``; every
other event takes the Python path here, which is also the reference the
compiled step is tested against (``Ingest(compiled=False)``).
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from array import array
from collections import Counter
from collections.abc import AsyncIterator, Sequence
from typing import TYPE_CHECKING, Literal

import grpc

from streamer._ext._ingest import Step
from streamer.errors import ResumePointLost
from streamer.matching import Matcher
from streamer.node.delivery import fan_out, frame_deliveries, frame_event
from streamer.node.events import (
    DEFAULT_MAX_DOCUMENT_BYTES,
    Change,
    Layout,
    Op,
    PoisonEvent,
    normalize,
)
from streamer.node.histogram import LatencyHistogram
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Sessions
from streamer.protocol import puller_v1_pb2 as puller_pb
from streamer.protocol import puller_v1_pb2_grpc as puller_grpc
from streamer.transport import KEEPALIVE_OPTIONS
from streamer.wire import MAX_MESSAGE_BYTES

if TYPE_CHECKING:
    from streamer.node.catchup import CatchUp

log = logging.getLogger(__name__)
# gRPC's default receive limit (4 MiB) is below the largest event a Puller
# may send; one such message would fail the stream at the same marker forever.
CHANNEL_OPTIONS = (*KEEPALIVE_OPTIONS, ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES))
MarkerPolicy = Literal["fail", "resume-from-head"]
MARKER_POLICIES: tuple[MarkerPolicy, ...] = ("fail", "resume-from-head")
# Turns of the event loop background work gives live ingest at most, per
# yield, while ingest keeps finding a Puller message ready (``give_way``).
GIVE_WAY_TURNS = 64
# Enum attribute access is a descriptor call; these are plain lookups.
_NAME = {op: op.name for op in Op}
_WIRE = {op: op.value for op in Op}
# The order of the compiled step's per-operation tallies (``Step.take``).
_STEP_OPS = (Op.INSERT.name, Op.UPDATE.name, Op.DELETE.name)
# Ingest.events' key of change events of collections without subscriptions.
UNWATCHED = "unwatched"


class Matching:
    """The per-event work over one matcher: transform each event of a Puller
    message, match it, and frame its deliveries by gateway owner
    (``match_batch``), with the tallies of what it did.

    ``Ingest`` is the live one, over the live index; a catch-up group
    (``streamer.node.catchup``) has its own over its group's matcher, so
    replayed events get exactly the transformation and fan-out live ones get.
    """

    def __init__(
        self,
        matcher: Matcher,
        *,
        layout: Layout = "plain",
        soft_delete_field: str = "deleted",
        compiled: bool = True,
    ) -> None:
        self.matcher = matcher
        self.layout: Layout = layout
        self.soft_delete_field = soft_delete_field
        self.compiled = compiled
        self.events = Counter[str]()  # by delivered operation, or "heartbeat"
        self.poison = Counter[str]()  # by reason
        self.matches = 0
        self.delivered = Counter[str]()  # deliveries by operation
        # The compiled common case of the plain layout; None: every event
        # through the Python path (the Syntrix layout; the tests' reference).
        self._step = (
            Step(self.matcher.index, self._process_one, soft_delete_field,
                 DEFAULT_MAX_DOCUMENT_BYTES)
            if compiled and layout == "plain" else None
        )

    def match_batch(
        self, events: Sequence[puller_pb.PullerEvent]
    ) -> tuple[dict[int, list[bytes]], int]:
        """The deliveries of ``events`` by gateway owner, in order, and how
        many of them were changes (not heartbeats or poison)."""
        pending: dict[int, list[bytes]] = {}
        if self._step is None:
            changes = 0
            for event in events:
                if event.HasField("change_event"):
                    changes += self._process_one(event, pending)
                else:
                    self.events["heartbeat"] += 1
            return pending, changes
        changes = self._step.process(events, pending)
        heartbeats, unwatched, by_op, delivered, matches = self._step.take()
        for name, count in zip(("heartbeat", UNWATCHED, *_STEP_OPS),
                               (heartbeats, unwatched, *by_op), strict=True):
            if count:
                self.events[name] += count
        for name, count in zip(_STEP_OPS, delivered, strict=True):
            if count:
                self.delivered[name] += count
        self.matches += matches
        return pending, changes

    def _process_one(self, event: puller_pb.PullerEvent, pending: dict[int, list[bytes]]) -> bool:
        """One change event through ``streamer.node.events`` and the fan-out;
        False if it is poison (counted, logged and skipped). One of a
        collection without subscriptions is only counted: nothing to decode
        it for."""
        ce = event.change_event
        if not self.matcher.index.watches(ce.database, ce.mgo_coll):
            self.events[UNWATCHED] += 1
            return True
        try:
            change = normalize(
                event.change_event, layout=self.layout,
                soft_delete_field=self.soft_delete_field,
            )
        except PoisonEvent as exc:
            self.poison[exc.reason] += 1
            log.warning("skipping event %s: %s", event.change_event.event_id, exc)
            return False
        self._fan_out(change, event.progress, pending)
        return True

    def _fan_out(self, change: Change, progress: str, pending: dict[int, list[bytes]]) -> None:
        """Add the deliveries of one change to ``pending`` (by gateway owner)."""
        self.events[_NAME[change.op]] += 1
        if change.op is Op.UPDATE and change.before is not None:
            self._enter_and_leave(change, change.before, progress, pending)
            return
        # Serialized once; every gateway's delivery reuses these bytes.
        event = frame_event(
            change.event_id, change.database, change.collection, change.document_id,
            _WIRE[change.op], change.document_data, change.timestamp, progress,
        )
        matches, deliveries = fan_out(
            self.matcher.index, change.database, change.collection,
            change.document_id, change.document, event, pending,
        )
        self.matches += matches
        self.delivered[_NAME[change.op]] += deliveries

    def _enter_and_leave(
        self, change: Change, pre_image: object, progress: str,
        pending: dict[int, list[bytes]],
    ) -> None:
        """An update with a pre-image: subscriptions that matched before and
        after get UPDATE, only after INSERT (entered), only before DELETE (left)."""
        matcher = self.matcher
        ids, owners = matcher.match_owned(
            change.database, change.collection, change.document_id, change.document)
        before_ids, before_owners = matcher.match_owned(
            change.database, change.collection, change.document_id, pre_image)
        before = dict(zip(before_ids, array("I", before_owners), strict=True))
        split: dict[Op, tuple[list[str], array[int]]] = {}
        for sub_id, owner in zip(ids, array("I", owners), strict=True):
            op = Op.UPDATE if before.pop(sub_id, None) is not None else Op.INSERT
            group = split.setdefault(op, ([], array("I")))
            group[0].append(sub_id)
            group[1].append(owner)
        if before:
            left = sorted(before)
            split[Op.DELETE] = (left, array("I", [before[i] for i in left]))
        for op, (sub_ids, sub_owners) in split.items():
            self.matches += len(sub_ids)
            event = frame_event(
                change.event_id, change.database, change.collection, change.document_id,
                _WIRE[op], change.document_data, change.timestamp, progress,
            )
            self.delivered[_NAME[op]] += frame_deliveries(
                sub_ids, sub_owners.tobytes(), event, pending)


class Ingest(Matching):
    def __init__(
        self,
        target: str,
        sessions: Sessions,
        servicer: StreamerServicer,
        progress: ProgressStore,
        *,
        consumer_id: str = "streamer",
        layout: Layout = "plain",
        soft_delete_field: str = "deleted",
        backoff: tuple[float, float] = (0.1, 5.0),
        credentials: grpc.ChannelCredentials | None = None,
        compiled: bool = True,
        on_marker_refused: MarkerPolicy = "fail",
        collections: Sequence[str] = (),
    ) -> None:
        super().__init__(
            sessions.subscriptions.matcher, layout=layout,
            soft_delete_field=soft_delete_field, compiled=compiled,
        )
        self.target = target
        self.credentials = credentials
        self.sessions = sessions
        self.servicer = servicer
        self.progress = progress
        self.consumer_id = consumer_id
        # Asked of the Puller (its collections filter): the node's events.
        self.collections = collections
        self.backoff = backoff
        self.batched = True
        self.deliveries = 0
        self.reconnects = 0
        self.markers_refused = 0
        self.on_marker_refused = on_marker_refused
        # The marker the Puller refused, while it is still the saved one:
        # ask for the live head instead (resume-from-head).
        self._refused = ""
        self.latency = LatencyHistogram()  # seconds from receipt to enqueued
        # The marker of the last change event processed (poison included;
        # heartbeats not: only change events' markers are comparable across
        # two Puller streams). Catch-up readers hand over to live ingest there.
        self.last_change = ""
        # Seconds between the last change event's own time (its timestamp)
        # and its processing: how far live ingest lags the source, which
        # ``latency`` (from the message's arrival) does not show when
        # messages wait to be read.
        self.lag = 0.0
        self.messages = 0  # Puller messages live ingest processed
        # Resuming subscriptions (``streamer.node.catchup``), told of every
        # live batch; None: resume_after is not acted upon.
        self.catchup: CatchUp | None = None

    async def run(self) -> None:
        """Consume the Puller until cancelled, reconnecting as needed."""
        delay = self.backoff[0]
        while True:
            try:
                async with self.channel() as channel:
                    stub = puller_grpc.PullerServiceStub(channel)  # type: ignore[no-untyped-call]
                    async for events in self._messages(stub):
                        self.process_batch(events, time.perf_counter())
                        delay = self.backoff[0]
            except grpc.aio.AioRpcError as exc:
                code = exc.code()
                if code == grpc.StatusCode.UNIMPLEMENTED and self.batched:
                    log.info("puller has no SubscribeBatch; using Subscribe")
                    self.batched = False
                    continue
                marker = self._after()
                if code == grpc.StatusCode.INVALID_ARGUMENT and marker:
                    self.markers_refused += 1
                    if self.on_marker_refused == "fail":
                        raise ResumePointLost(
                            f"the Puller refused marker {marker!r} ({exc.details()}); the "
                            "events after it cannot be replayed. Restart with "
                            "--on-marker-refused resume-from-head to continue from the live "
                            "head, accepting the loss"
                        ) from None
                    log.error(
                        "puller refused marker %r (%s): resuming from the live head; "
                        "events in between are LOST",
                        marker, exc.details(),
                    )
                    self._refused = marker
                    continue
                log.warning("puller stream failed (%s: %s)", code, exc.details())
            self.reconnects += 1
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, self.backoff[1])

    def channel(self, *, own_connection: bool = False) -> grpc.aio.Channel:
        """A new channel to the Puller. ``own_connection``: on a connection
        of its own, not shared with live ingest's (a catch-up reader: its
        replay then never queues in front of live events on one TCP
        connection)."""
        options = CHANNEL_OPTIONS + (
            (("grpc.use_local_subchannel_pool", 1),) if own_connection else ())
        if self.credentials is None:
            return grpc.aio.insecure_channel(self.target, options=options)
        return grpc.aio.secure_channel(self.target, self.credentials, options=options)

    async def _messages(
        self, stub: puller_grpc.PullerServiceStub
    ) -> AsyncIterator[Sequence[puller_pb.PullerEvent]]:
        """The events of each message from the Puller (several when batched)."""
        request = puller_pb.SubscribeRequest(
            consumer_id=self.consumer_id, after=self._after(), collections=self.collections)
        if self.batched:
            async for batch in stub.SubscribeBatch(request):
                yield batch.events
        else:
            async for event in stub.Subscribe(request):
                yield (event,)

    @property
    def position(self) -> str:
        """A marker live ingest has matched every event after, against
        every subscription in the live index from now on: the marker of the
        last change event processed, or before the first one, the marker it
        resumes after ("" from the live head). A subscription registered
        live now misses nothing after it (``SubscribeResponse.live_after``),
        and one resuming after it is live at once."""
        return self.last_change or self._after()

    def _after(self) -> str:
        """The marker to resume after ("" once it was refused and no event
        has been processed since)."""
        marker = self.progress.marker
        return "" if marker == self._refused else marker

    async def give_way(self) -> None:
        """Background work's yield to the event loop (registration, catch-up,
        reclaiming): one turn, and more while live ingest processed a Puller
        message in the last one (up to ``GIVE_WAY_TURNS``). Live ingest
        reads one message per turn; a Puller sends many small ones, and
        with a chunk of other work in every turn the live stream would
        queue up unread (``streamer_ingest_lag_seconds``) behind work that
        can wait."""
        for _ in range(GIVE_WAY_TURNS):
            seen = self.messages
            await asyncio.sleep(0)
            if self.messages == seen:
                return

    def process(self, event: puller_pb.PullerEvent) -> None:
        """Match and enqueue one event, then advance the marker."""
        self.process_batch((event,), time.perf_counter())

    def process_batch(self, events: Sequence[puller_pb.PullerEvent], received: float) -> None:
        """Match the events of one Puller message, enqueue their deliveries,
        then advance the marker to the last one (never raises for bad input).

        Each gateway's deliveries of the whole message are appended to its
        queue at once, in order, so the per-delivery cost is a list append.
        ``received`` is the ``perf_counter`` time the message arrived: the
        ingest→enqueue latency of each event runs from there to that append.
        """
        self.messages += 1
        pending, changes = self.match_batch(events)
        if events:
            for event in reversed(events):
                if event.HasField("change_event"):
                    self.last_change = event.progress
                    stamp = event.change_event.timestamp
                    if stamp:
                        self.lag = max(0.0, time.time() - stamp / 1000)
                    break
            catchup = self.catchup
            if catchup is not None and catchup.groups:
                # Resuming subscriptions reached by this batch: their
                # deliveries follow the live ones, per gateway.
                catchup.on_live(events, pending)
        by_owner, deliver = self.sessions.by_owner, self.servicer.deliver
        for owner, messages in pending.items():
            session = by_owner[owner]
            if session is not None and deliver(session, messages):
                self.deliveries += len(messages)
        if changes:
            self.latency.observe(time.perf_counter() - received, changes)
        if events:
            self.progress.advance(events[-1].progress)
