"""Resuming subscriptions (``SubscribeRequest.resume_after``): catch-up from
the Puller's replay, then the handoff to live ingest.

What this module owns: every subscription that resumes after a progress
marker, from its request until it is in the live index; the *groups* they
are in, each group's *reader* (its own Puller stream), the handoff of a
group to live ingest without a gap or a duplicate, the moving of a handed-
over group's subscriptions into the live index, and when a resuming request
is answered. The subscription set (``streamer.node.subscriptions``) still
accounts every one of them (ids, owners, limits, unsubscribe, release) and
records which matcher each is in.

Groups. The subscriptions resuming after the same marker M form a group
with its own ``Matcher`` and its own ``Matching`` (the live ingest's
transformation and fan-out, over that matcher). A group is *joinable*
until its reader starts delivering; a request for M then joins it, else a
new group for M is made. The reader starts delivering only once no
request has joined for ``GATHER_SECONDS`` (at most ``GATHER_MAX`` after
the group was made), so that the many consecutive ``subscribe_batch``es of
a gateway re-registering after one marker make one group, one replay.

Answers. A request with ``resume_after`` M is answered once the Puller has
said whether it can replay after M: if M is the marker of the last change
event live ingest processed, at once (registered live). Otherwise the
group's reader opens a stream after M to ask; the first message from the Puller (the
reference Puller sends a heartbeat as soon as a stream opens) accepts the
marker, ``INVALID_ARGUMENT`` refuses it. A Puller that sends nothing until
an event comes (a Syntrix Puller) is taken to accept it when it has not
refused it within ``confirm_seconds``; a refusal after that, or in the
middle of a catch-up (the replay fell behind the Puller's retention), is
logged at ERROR, counted (``late_refusals``, ``resyncs``), and the group's
subscriptions continue from the live head, and the events in between are
lost for them: a gateway whose Hello says ``resumes`` is told so
(``CaughtUp.resync_required``), others are not. A refused marker before the
answer: the subscriptions are registered live and answered
``success=true, code="resync_required"``.

While a handler waits for the Puller, it *holds* the group: nothing is
delivered for the group until every handler that joined it has queued its
responses, so a subscription's first delivery follows its response. The
handler registers its requests only after the wait, all in one synchronous
step with the check "is M live ingest's last marker?", so that check
cannot go stale.

Handoff (everything on the one event loop; both checks are synchronous).
A group's position is the marker of the last change event it processed
(M to start with). Only change events' markers are compared: heartbeat
markers may differ from one Puller stream to another.

- Reader side, per Puller message: if the group's position is live's last
  change marker, the group attaches now and the message is dropped; if
  live's last marker is among the message's change events at index k,
  events[:k+1] are processed and the group attaches; else all are
  processed and the position advances.
- Live side (``on_live``, called by ``Ingest.process_batch`` after it
  matched a batch): if a group's position is among the batch's change
  events at index k (live just passed the reader, or live was behind the
  marker), the group processes events[k+1:] itself now and attaches; its
  reader is cancelled. Several such groups in one batch merge into the
  first as they are reached (``_hand_over``).
- Reader to reader: when a reader processes a message in which another
  group's position is (a group waiting its turn, or a reader behind), that
  group takes the rest of the message and its subscriptions join the
  reader's group (``_process``): readers that meet merge, so a gateway
  resuming after many markers does not replay the same events many times.
- Progress: after each Puller message a reader processed, and at each
  merge, the gateways of the group's subscriptions that said ``resumes``
  get a ``CatchUpProgress`` (the group's number is on each response), so
  that after another broken stream they resume the whole group after one
  marker instead of each subscription after its own: the markers a
  reconnect brings stay as few as the groups were.
- An attached group is matched against every live batch (its deliveries
  after the live ones, per gateway), and between batches its subscriptions
  move into the live index, ``MOVE_CHUNK`` at a time, until it is empty and
  dropped. A subscription is in exactly one matcher at a time, so its
  order holds.

Bounds. At most ``max_readers`` groups read at a time (each with a yield to
the loop every ``REPLAY_SLICE`` events, and a pause while a gateway it sent
to has its queue past half full: ``StreamerServicer.has_room``; live
deliveries never wait, and the replay is paced by its gateways instead of
getting them cut off as lagging); the others wait their turn without a
stream (the one that confirmed the marker is closed again; at most
``OPENING_LIMIT`` confirmations run at once, and one still waiting for a
free place when ``confirm_seconds`` have passed is taken as accepted, like
a silent Puller's), and live ingest or another reader may take them over
meanwhile. Every
reader's stream goes over one channel of the catch-up's own, on its own
connection: the replay never queues in front of live events on live
ingest's connection.

Failures. A reader whose Puller stream breaks reconnects with backoff
after the group's position (no gap); ``UNIMPLEMENTED`` for
``SubscribeBatch`` falls back to ``Subscribe``. A reader that fails with
an unexpected error (a bug) is logged with its traceback and counted
(``reader_failures``), and its group is treated as refused: its
subscriptions continue from the live head (answered ``resync_required`` if
not answered yet; logged at ERROR otherwise). It is not restarted: a
failure that repeats would repeat forever.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import random
from collections.abc import Iterable, Sequence
from typing import Any

import grpc

from streamer.matching import Matcher
from streamer.node.ingest import Ingest, Matching
from streamer.node.subscriptions import RECLAIM_CHUNK
from streamer.protocol import puller_v1_pb2 as puller_pb
from streamer.protocol import puller_v1_pb2_grpc as puller_grpc
from streamer.protocol.streamer_v1_pb2 import SubscribeRequest, SubscribeResponse

log = logging.getLogger(__name__)

RESYNC_REQUIRED = "resync_required"
DEFAULT_MAX_READERS = 8
DEFAULT_CONFIRM_SECONDS = 1.0
# Subscriptions moved from an attached group into the live index per step,
# between which the event loop runs everything else.
MOVE_CHUNK = 250
# Subscriptions a merge of two groups may move at once (the smaller side).
MERGE_BUDGET = RECLAIM_CHUNK
# How often a reader paced by a full gateway queue looks again.
PACE_SECONDS = 0.01
# Replayed events processed between two yields to the event loop (a Puller
# message holds up to 256): live ingest waits at most this many events'
# work of a reader.
REPLAY_SLICE = 32
# Streams open at once to have the Puller confirm markers (a group waiting
# its turn to read holds none).
OPENING_LIMIT = 64
# A group starts reading only once no handler has joined it for this long
# (at most GATHER_MAX after it was made): a gateway re-registering sends its
# subscriptions with one marker in many consecutive subscribe_batches, and
# each must join the one group instead of starting a replay of its own.
GATHER_SECONDS = 0.25
GATHER_MAX = 5.0

# Group states.
OPENING = "opening"  # the reader has not heard from the Puller yet
READY = "ready"  # the marker is accepted; the group waits to read (joinable)
READING = "reading"  # the reader delivers the replay
ATTACHED = "attached"  # handed over: matched with every live batch
CLOSED = "closed"


class Group:
    """The subscriptions resuming after one marker; see the module docstring."""

    def __init__(self, number: int, marker: str, matching: Matching) -> None:
        self.number = number
        self.marker = marker
        self.matching = matching
        self.matcher: Matcher = matching.matcher
        # The requests of its subscriptions, to move them into the live index.
        self.members: dict[str, SubscribeRequest] = {}
        self.last = marker  # marker of the last change event it processed
        self.state = OPENING
        self.accepted: asyncio.Future[bool] = asyncio.get_running_loop().create_future()
        self.refused = ""  # why the Puller refused the marker (or the reader failed)
        self.holds = 0  # handlers that have not answered yet
        self.released = asyncio.Event()
        self.released.set()
        loop = asyncio.get_running_loop()
        self.made = self.last_release = loop.time()
        self.reader: asyncio.Task[None] | None = None
        self.replayed = 0
        self.sent_to: set[int] = set()  # owners its reader delivered to since it last paced
        self.owners: set[int] = set()  # owners of its subscriptions (told of its progress)

    @property
    def joinable(self) -> bool:
        return self.state in (OPENING, READY) and not self.refused

    @property
    def handing_over(self) -> bool:
        """Live ingest may take it over: accepted, nothing held, not attached."""
        return self.state in (READY, READING) and not self.holds


class CatchUp:
    """The resuming subscriptions of one node; see the module docstring."""

    def __init__(
        self,
        ingest: Ingest,
        *,
        max_readers: int = DEFAULT_MAX_READERS,
        confirm_seconds: float = DEFAULT_CONFIRM_SECONDS,
    ) -> None:
        self.ingest = ingest
        self.subscriptions = ingest.sessions.subscriptions
        self.max_readers = max_readers
        self.confirm_seconds = confirm_seconds
        self.groups: list[Group] = []  # every group not closed, oldest first
        self._joinable: dict[str, Group] = {}
        self._slots = asyncio.Semaphore(max_readers)
        self._opening = asyncio.Semaphore(OPENING_LIMIT)
        self._attached = asyncio.Event()
        self._numbers = itertools.count(1)
        # One channel, on a connection of its own, for every reader (one
        # stream each): the replay never queues in front of live events on
        # live ingest's connection, and many readers are one connection.
        self._channel: grpc.aio.Channel | None = None
        self.reading = 0  # readers delivering now (at most max_readers)
        self.replayed = 0  # change events the readers processed
        self.resyncs = 0  # subscriptions that continue from the live head instead
        self.late_refusals = 0  # groups refused after their answer
        self.handoffs = 0  # groups handed over to live ingest
        self.merges = 0  # groups taken over by another group's reader
        self.paced = 0  # times a reader waited for a gateway's queue to drain
        self.reader_failures = 0

    @property
    def catching_up(self) -> int:
        """Subscriptions in a group's matcher (not yet in the live index)."""
        return self.subscriptions.elsewhere

    @property
    def readers(self) -> int:
        """Open readers (reading or waiting their turn)."""
        return sum(
            1 for group in list(self.groups)
            if group.reader is not None and not group.reader.done()
        )

    # -- answering requests ---------------------------------------------

    def hold(self, markers: Iterable[str]) -> dict[str, Group]:
        """The groups the requests resuming after ``markers`` will join,
        held until ``release``: one joinable group per marker, made (and
        its reader started) if there is none."""
        held: dict[str, Group] = {}
        for marker in markers:
            if marker in held:
                continue
            group = self._joinable.get(marker)
            if group is None or not group.joinable:
                group = self._new_group(marker)
            group.holds += 1
            group.released.clear()
            held[marker] = group
        return held

    async def confirmed(self, groups: Iterable[Group]) -> None:
        """Until the Puller accepted or refused each group's marker (or
        live ingest is at it)."""
        last = self.ingest.position
        waiting = [g.accepted for g in groups if not g.accepted.done() and g.marker != last]
        if waiting:
            # asyncio.wait, not gather: a cancelled handler must not cancel
            # the futures that other handlers wait on.
            await asyncio.wait(waiting)

    def subscribe(
        self, owner: int, request: SubscribeRequest, group: Group
    ) -> SubscribeResponse:
        """Register a request resuming after ``group.marker`` (held and
        confirmed): live if live ingest is at the marker, live with
        ``resync_required`` if the Puller refused it (both answered with
        ``live_after``), else into the group."""
        subscriptions = self.subscriptions
        position = self.ingest.position
        if request.resume_after == position:
            response = subscriptions.subscribe(owner, request)
            if response.success:
                response.live_after = position
            return response
        if group.refused or group.state in (ATTACHED, CLOSED):
            # ATTACHED/CLOSED without a refusal cannot happen while held;
            # registered live, the subscription misses nothing it is told of.
            response = subscriptions.subscribe(owner, request)
            if response.success:
                self.resyncs += 1
                response.code = RESYNC_REQUIRED
                response.live_after = position
            return response
        response = subscriptions.subscribe(owner, request, group.matcher)
        if response.success:
            response.catchup_group = group.number
            group.members[response.subscription_id] = request
            group.owners.add(owner)
            if group.reader is None:
                self._start_reader(group)
        return response

    def release(self, groups: Iterable[Group]) -> None:
        """The handler holding ``groups`` has queued its responses."""
        now = asyncio.get_running_loop().time()
        for group in groups:
            group.holds -= 1
            group.last_release = now
            if group.holds:
                continue
            group.released.set()
            if group.state != CLOSED and not group.members and not len(group.matcher):
                self._close(group)

    # -- groups and readers ---------------------------------------------

    def _new_group(self, marker: str) -> Group:
        ingest = self.ingest
        matching = _matching(ingest)
        group = Group(next(self._numbers), marker, matching)
        self.groups.append(group)
        self._joinable[marker] = group
        if marker == ingest.position:
            # Live ingest processed it: the Puller knows it. The reader
            # starts only if a subscription joins (live moved on meanwhile).
            self._accept(group)
        else:
            self._start_reader(group)
            loop = asyncio.get_running_loop()
            timer = loop.call_later(self.confirm_seconds, self._accept, group)
            group.accepted.add_done_callback(lambda _: timer.cancel())
        return group

    def _start_reader(self, group: Group) -> None:
        group.reader = asyncio.create_task(
            self._read(group), name=f"catch-up reader {group.number}")
        group.reader.add_done_callback(lambda task: self._reader_done(group, task))

    def _accept(self, group: Group) -> None:
        if not group.accepted.done():
            group.accepted.set_result(True)
        if group.state == OPENING:
            group.state = READY

    def _close(self, group: Group) -> None:
        group.state = CLOSED
        if not group.accepted.done():
            group.accepted.set_result(False)
        if self._joinable.get(group.marker) is group:
            del self._joinable[group.marker]
        if group in self.groups:
            self.groups.remove(group)
        reader = group.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()

    def _refuse(self, group: Group, why: str) -> None:
        """The marker cannot be replayed from (or the reader failed): the
        group's subscriptions continue from the live head."""
        group.refused = why
        members = list(group.members.items())
        self._close(group)
        moved = self._go_live(members, group.matcher, resync=True)
        if moved:
            self.late_refusals += 1
            self.resyncs += moved
            log.error(
                "catch-up after marker %r refused after it was accepted (%s): %d resuming "
                "subscription(s) continue from the live head; events in between are LOST "
                "for them (their gateways are told to resync them)", group.marker, why, moved,
            )
        else:
            log.warning(
                "the Puller cannot replay after marker %r (%s): its resuming subscriptions "
                "are registered from the live head (resync_required)", group.marker, why,
            )

    def _reader_done(self, group: Group, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            return
        exc = task.exception()
        if exc is None:
            return
        self.reader_failures += 1
        log.error("catch-up reader %d (marker %r) failed", group.number, group.marker,
                  exc_info=exc)
        if group.state != CLOSED:
            self._refuse(group, f"the catch-up reader failed: {exc!r}")

    async def _read(self, group: Group) -> None:
        """The group's reader: has the Puller confirm the marker (a stream
        opened and closed again), waits until nothing holds the group and a
        reading slot is free, then reads after the group's position until
        the group is handed over, merged, closed or refused."""
        batched = self.ingest.batched
        if not group.accepted.done():
            batched = await self._confirm(group, batched)
            if not group.accepted.result() or group.state == CLOSED:
                return
        await self._gathered(group)
        slot = False
        try:
            while not slot:
                # Nothing is delivered before every handler holding the
                # group has answered.
                while group.holds:
                    await group.released.wait()
                await self._slots.acquire()
                self.reading += 1
                slot = not group.holds
                if not slot:
                    self.reading -= 1
                    self._slots.release()
            if group.state != READY:
                return  # handed over, merged or closed while it waited
            group.state = READING
            if self._joinable.get(group.marker) is group:
                del self._joinable[group.marker]
            await self._replay(group, batched)
        finally:
            if slot:
                self.reading -= 1
                self._slots.release()

    @staticmethod
    async def _gathered(group: Group) -> None:
        """Until no handler has held the group for ``GATHER_SECONDS`` (at
        most ``GATHER_MAX`` after it was made)."""
        loop = asyncio.get_running_loop()
        while True:
            while group.holds:
                await group.released.wait()
            now = loop.time()
            wait = min(group.last_release + GATHER_SECONDS, group.made + GATHER_MAX) - now
            if wait <= 0:
                return
            await asyncio.sleep(wait)

    async def _confirm(self, group: Group, batched: bool) -> bool:
        """Open a stream after the group's marker until the Puller's first
        message (accepted), ``INVALID_ARGUMENT`` (refused) or the confirm
        timer (accepted); then close it: a group waiting its turn holds no
        stream. At most ``OPENING_LIMIT`` such streams are open at once.
        Returns whether ``SubscribeBatch`` is still to be used."""
        delay = self.ingest.backoff[0]
        async with self._opening:
            while not group.accepted.done():
                call = self._call(group, batched)
                read = asyncio.ensure_future(call.read())
                try:
                    await asyncio.wait((read, group.accepted),
                                       return_when=asyncio.FIRST_COMPLETED)
                    if not read.done():
                        break  # accepted by the timer, or closed
                    # A message (accepted), EOF, or the error raised here.
                    if read.result() is not grpc.aio.EOF:
                        self._accept(group)
                        break
                except grpc.aio.AioRpcError as exc:
                    outcome = self._failed(group, exc, batched)
                    if outcome == "unbatched":
                        batched = False
                        continue
                    if outcome == "refused":
                        break
                finally:
                    read.cancel()
                    call.cancel()
                await asyncio.sleep(delay * random.uniform(0.5, 1.5))
                delay = min(delay * 2, self.ingest.backoff[1])
        return batched

    async def _replay(self, group: Group, batched: bool) -> None:
        """Read and deliver after the group's position (reconnecting after
        it on a broken stream) until the group is done."""
        backoff = self.ingest.backoff
        delay = backoff[0]
        while True:
            call = self._call(group, batched)
            try:
                async for message in call:
                    events = message.events if batched else (message,)
                    for start in range(0, len(events), REPLAY_SLICE):
                        if self._reader_message(group, events[start:start + REPLAY_SLICE]):
                            return
                        await self._room(group)
                    delay = backoff[0]
            except grpc.aio.AioRpcError as exc:
                outcome = self._failed(group, exc, batched)
                if outcome == "unbatched":
                    batched = False
                    continue
                if outcome == "refused":
                    return
            finally:
                call.cancel()
            await asyncio.sleep(delay * random.uniform(0.5, 1.5))
            delay = min(delay * 2, backoff[1])

    def _failed(self, group: Group, exc: grpc.aio.AioRpcError, batched: bool) -> str:
        """What a reader does after its Puller stream failed: "unbatched"
        (a Syntrix Puller: ask again with ``Subscribe``), "refused" (the
        marker: the group goes live, see ``_refuse``), or "retry" (after a
        backoff)."""
        code = exc.code()
        if code == grpc.StatusCode.UNIMPLEMENTED and batched:
            return "unbatched"
        if code == grpc.StatusCode.INVALID_ARGUMENT:
            self._refuse(group, exc.details() or "INVALID_ARGUMENT")
            return "refused"
        log.warning("catch-up reader %d: puller stream failed (%s: %s)",
                    group.number, code, exc.details())
        return "retry"

    def _call(self, group: Group, batched: bool) -> Any:
        """A stream after the group's position, on the catch-up's channel."""
        if self._channel is None:
            self._channel = self.ingest.channel(own_connection=True)
        stub = puller_grpc.PullerServiceStub(self._channel)  # type: ignore[no-untyped-call]
        request = puller_pb.SubscribeRequest(
            consumer_id=f"{self.ingest.consumer_id}/catch-up-{group.number}", after=group.last,
            collections=self.ingest.collections)
        return stub.SubscribeBatch(request) if batched else stub.Subscribe(request)

    def _reader_message(self, group: Group, events: Sequence[puller_pb.PullerEvent]) -> bool:
        """One Puller message of a reading group; True once it is done
        (handed over, or closed because all its subscriptions left)."""
        if group.state != READING:
            return True
        if not len(group.matcher):
            self._close(group)
            return True
        live = self.ingest.position
        if group.last == live:
            self._attach(group)
            return True
        last = ""
        attach = False
        for k, event in enumerate(events):
            if not event.HasField("change_event"):
                continue
            if event.progress == live and live:
                events, last, attach = events[: k + 1], live, True
                break
            if event.progress:
                last = event.progress
        self._process(group, events)
        if last and last != group.last:
            group.last = last
            self.ingest.servicer.catchup_progress(group.owners, group.number, last)
        if attach:
            self._attach(group)
        return attach

    def _process(self, group: Group, events: Sequence[puller_pb.PullerEvent]) -> None:
        """Deliver ``events`` for ``group``, taking over on the way every
        other group whose position is among them (not held, and together at
        most ``MERGE_BUDGET`` subscriptions to move now, the smaller side of
        each merge moving): the events are
        delivered in segments, and a group taken over at event k has its
        subscriptions in ``group``'s matcher from event k + 1 on. Readers
        that meet merge, so a gateway resuming after many markers does not
        replay the same events many times, and each event is one delivery
        per gateway."""
        cuts: list[tuple[int, Group]] = []
        candidates = [g for g in self.groups if g is not group and g.handing_over]
        if candidates:
            index = {e.progress: k for k, e in enumerate(events) if e.HasField("change_event")}
            budget, size = MERGE_BUDGET, len(group.members)
            for other in candidates:
                k = index.get(other.last)
                # The smaller side moves: see below.
                moving = min(size, len(other.members))
                if k is not None and moving <= budget:
                    budget -= moving
                    size += len(other.members)
                    cuts.append((k, other))
            cuts.sort(key=lambda cut: cut[0])
        start = 0
        move = self.subscriptions.move
        for k, other in cuts:
            self._deliver(group, events[start:k + 1])
            start = k + 1
            if len(other.members) > len(group.members):
                # The reader's group takes over the other's index and moves
                # its own, fewer, subscriptions into it: the group's number
                # (what its gateways follow) stays the reader's.
                group.matching, other.matching = other.matching, group.matching
                group.matcher, other.matcher = other.matcher, group.matcher
                group.members, other.members = other.members, group.members
            for sub_id, request in other.members.items():
                if move(sub_id, request, other.matcher, group.matcher):
                    group.members[sub_id] = request
            other.members.clear()
            self.ingest.servicer.catchup_progress(
                other.owners, other.number, other.last, merged_into=group.number)
            group.owners |= other.owners
            self.merges += 1
            self._close(other)
        self._deliver(group, events[start:])

    def _deliver(self, group: Group, events: Sequence[puller_pb.PullerEvent]) -> None:
        pending, changes = group.matching.match_batch(events)
        group.replayed += changes
        self.replayed += changes
        by_owner, deliver = self.ingest.sessions.by_owner, self.ingest.servicer.deliver
        for owner, messages in pending.items():
            session = by_owner[owner]
            if session is not None:
                deliver(session, messages)
                group.sent_to.add(owner)

    async def _room(self, group: Group) -> None:
        """Between two Puller messages: yield to the loop, and wait while a
        gateway the group just sent to has a queue past half full (the
        replay is paced by its gateways, never cuts them off)."""
        await self.ingest.give_way()
        by_owner, has_room = self.ingest.sessions.by_owner, self.ingest.servicer.has_room
        while group.sent_to:
            owners = [
                o for o in group.sent_to
                if (session := by_owner[o]) is not None and not has_room(session)
            ]
            group.sent_to.clear()
            if not owners:
                return
            group.sent_to.update(owners)
            self.paced += 1
            await asyncio.sleep(PACE_SECONDS)

    def _attach(self, group: Group) -> None:
        """Hand the group over to live ingest (see the module docstring)."""
        group.state = ATTACHED
        if self._joinable.get(group.marker) is group:
            del self._joinable[group.marker]
        self.handoffs += 1
        reader = group.reader
        if reader is not None and reader is not asyncio.current_task():
            reader.cancel()
        log.info("catch-up after marker %r handed over to live ingest (%d subscription(s), "
                 "%d event(s) replayed)", group.marker, len(group.matcher), group.replayed)
        self._attached.set()

    # -- the live side ----------------------------------------------------

    def on_live(
        self, events: Sequence[puller_pb.PullerEvent], pending: dict[int, list[bytes]]
    ) -> None:
        """Live ingest matched ``events`` into ``pending``: add the
        deliveries of the attached groups, and hand over the groups whose
        position this batch passes (they process the rest of it)."""
        extras: list[dict[int, list[bytes]]] = []
        handing: list[tuple[int, Group]] = []
        index: dict[str, int] | None = None
        for group in self.groups:
            if group.state == ATTACHED:
                extras.append(group.matching.match_batch(events)[0])
            elif group.handing_over:
                if index is None:
                    index = {
                        e.progress: k for k, e in enumerate(events) if e.HasField("change_event")
                    }
                k = index.get(group.last)
                if k is not None:
                    handing.append((k, group))
        if handing:
            self._hand_over(events, sorted(handing, key=lambda cut: cut[0]), extras)
        for extra in extras:
            for owner, messages in extra.items():
                mine = pending.get(owner)
                if mine is None:
                    pending[owner] = messages
                else:
                    mine.extend(messages)

    def _hand_over(
        self, events: Sequence[puller_pb.PullerEvent], handing: list[tuple[int, Group]],
        extras: list[dict[int, list[bytes]]],
    ) -> None:
        """Groups whose positions live ingest just passed, in the batch's
        order: the first takes the rest of the batch and the others join it
        at their own position (as in ``_process``, up to ``MERGE_BUDGET``
        subscriptions moved now; a larger one goes on its own), so that
        many groups handed over at once still make one delivery per event
        and gateway."""
        first_k, target = handing[0]
        start, budget = first_k + 1, MERGE_BUDGET
        move = self.subscriptions.move
        for k, other in handing[1:]:
            if len(other.members) > budget:
                extras.append(other.matching.match_batch(events[k + 1:])[0])
                self._attach(other)
                continue
            budget -= len(other.members)
            extras.append(target.matching.match_batch(events[start:k + 1])[0])
            start = k + 1
            for sub_id, request in other.members.items():
                if move(sub_id, request, other.matcher, target.matcher):
                    target.members[sub_id] = request
            other.members.clear()
            self.merges += 1
            self._close(other)
        extras.append(target.matching.match_batch(events[start:])[0])
        self._attach(target)

    async def run(self) -> None:
        """Move attached groups' subscriptions into the live index, a chunk
        at a time, until cancelled (a node background task); on the way out,
        stop every reader."""
        try:
            while True:
                await self._attached.wait()
                self._attached.clear()
                while True:
                    # One chunk per step, whatever the number of groups.
                    group = next((g for g in self.groups if g.state == ATTACHED), None)
                    if group is None:
                        break
                    self._move_chunk(group)
                    await self.ingest.give_way()
        finally:
            readers = [g.reader for g in self.groups if g.reader is not None]
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
            if self._channel is not None:
                await self._channel.close()
                self._channel = None

    def _move_chunk(self, group: Group) -> None:
        members = group.members
        self._go_live(
            [members.popitem() for _ in range(min(MOVE_CHUNK, len(members)))], group.matcher)
        if not members:
            self._close(group)

    def _go_live(
        self, members: list[tuple[str, SubscribeRequest]], source: Matcher, *,
        resync: bool = False,
    ) -> int:
        """Move ``members`` from ``source`` into the live index and tell
        their gateways (``CaughtUp``, after every delivery from ``source``):
        from here on their deliveries are live ones; ``resync``: and the
        events in between are lost for them. Returns how many moved."""
        move, owner_of = self.subscriptions.move, self.subscriptions.owner_of
        live: dict[int, list[str]] = {}
        moved = 0
        for sub_id, request in members:
            if move(sub_id, request, source):
                moved += 1
                owner = owner_of(sub_id)
                if owner is not None:
                    live.setdefault(owner, []).append(sub_id)
        if live:
            self.ingest.servicer.caught_up(live, resync=resync)
        return moved


def _matching(ingest: Ingest) -> Matching:
    return Matching(
        Matcher(), layout=ingest.layout, soft_delete_field=ingest.soft_delete_field,
        compiled=ingest.compiled,
    )

