"""The subscription set: what the index holds, who holds each subscription,
and what each holder may add.

Every subscription belongs to an *owner*, the small number of the gateway
session that registered it (``streamer.node.sessions``); the index returns
it with every match, so the fan-out groups matches by gateway without a
lookup. This module turns ``SubscribeRequest`` and ``UnsubscribeRequest``
messages into index calls (docs/protocol.md: exactly one
``SubscribeResponse`` per request, precise errors with a code, generated
ids for empty ones, ids global across gateways, a gateway can only remove
its own subscriptions) and applies the limits (``Limits``): by count, and
by cost, since one cheap-looking request can make every event expensive
(scan clauses, verified on every event of their collection) or take a lot
of memory (long ``in`` lists, big requests).

Releasing a departed owner's subscriptions is incremental (``release``):
the owner is marked gone at once (its matches are no longer delivered, its
ids may be taken by anyone), and the index entries are removed in chunks by
``reclaim``, so a gateway with 100 000 subscriptions leaving never stalls
the event loop. The owner's number is handed back only when its last
subscription is gone.

A subscription lives in exactly one matcher: the live index (``matcher``)
or, while it catches up after a ``resume_after`` marker, the matcher of its
catch-up group (``streamer.node.catchup``). ``subscribe`` registers a
request into a given matcher and ``move`` takes one from its group's
matcher into the live one; ``_where`` (the subscriptions outside the live
index, and their matcher) is the one record of where each lives, so the
limits, unsubscribe and the release of a departed owner treat them all
alike wherever they are.

``subscribe_batch`` registers a ``subscribe_batch``'s requests into the live
index and answers them as protocol bytes. Its common case (a request that
will be accepted, with filters the index looks up by) runs in the compiled
``streamer._ext._subscribe``; every other request goes through
``subscribe``, which is also what the compiled path is tested against
(``SubscriptionSet(compiled=False)``).
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from streamer._ext._subscribe import Registrar, response_entry
from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matching import Filter, Matcher
from streamer.protocol.streamer_v1_pb2 import SubscribeRequest, SubscribeResponse, Value

INVALID_ARGUMENT = "invalid_argument"
ALREADY_EXISTS = "already_exists"
RESOURCE_EXHAUSTED = "resource_exhausted"
NOT_OWNER = "not_owner"

# Subscriptions removed per step of a release, between which the event loop
# runs everything else (ingest, other gateways).
RECLAIM_CHUNK = 1000
_OWNER = 0xFFFF_FFFF


@dataclass(frozen=True, slots=True)
class Limits:
    """What one gateway session, one request and the whole node may hold.
    Requests beyond them are refused (``resource_exhausted``), not queued."""

    max_subscriptions: int = 100_000  # per gateway session
    max_filters: int = 64  # per request
    max_expression_length: int = 4096  # characters per expression
    max_request_bytes: int = 64 * 1024  # one serialized SubscribeRequest
    max_list_values: int = 1024  # values in all the request's filter lists together
    # Scan clauses are verified on every event of their collection, so they
    # cost per event what indexed ones cost per match.
    max_scan_clauses: int = 100  # per gateway session
    max_node_scan_clauses: int = 1000  # the whole node
    # What the requests of all held subscriptions weigh, serialized: the
    # index holds a few times that, so these bound a gateway's and the
    # node's memory where the per-request limits alone would allow
    # max_subscriptions times the largest request.
    max_gateway_bytes: int = 64 << 20
    max_node_bytes: int = 512 << 20


class SubscriptionSet:
    """The index's subscriptions by owner; see the module docstring."""

    def __init__(
        self, matcher: Matcher, limits: Limits = Limits(), *, compiled: bool = True,
        collections: frozenset[str] = frozenset(),
    ) -> None:
        self.matcher = matcher
        self.limits = limits
        # The collections this node serves (``--collections``; empty: all):
        # a request for another is refused with not_owner, since the node
        # never receives its events.
        self.collections = collections
        # Per subscription, its owner and the bytes of its request in one
        # int (bytes << 32 | owner): one dict value per subscription, where
        # a dict per field would cost about 60 bytes more each.
        self._held: dict[str, int] = {}
        self._owned: dict[int, set[str]] = {}
        self._scan: dict[int, int] = {}  # scan clauses by owner
        self._scan_of: dict[str, int] = {}  # scan clauses of each scan subscription
        self._bytes: dict[int, int] = {}  # request bytes held, by owner
        self.bytes = 0  # request bytes held by the whole node
        self.scan_clauses = 0  # scan clauses held by the whole node, in every matcher
        # The subscriptions outside the live index, and the matcher each is
        # in (a catch-up group's); absent: the live index.
        self._where: dict[str, Matcher] = {}
        self._gone: dict[int, Callable[[], None]] = {}  # owner → called when reclaimed
        # How reclaiming yields between chunks (the node makes it
        # Ingest.give_way: live ingest first).
        self.give_way: Callable[[], Awaitable[None]] = one_turn
        self._pending = asyncio.Event()
        # The compiled common case of subscribe_batch; None: all in Python.
        # Its checks do not know about served collections: a node that
        # serves only some registers in Python.
        self._registrar = Registrar(self) if compiled and not collections else None
        # Cluster mode (the node sets it): ``placed(owner)`` says whether
        # the owner's subscriptions must be on shards this node owns (a
        # gateway that said Hello), and ``not_placed(sub_id)`` why one is
        # not (None: it is). A request without an id gets a generated one,
        # placed where it arrived. The compiled path does not know about
        # shards: a batch of such an owner goes there only when every
        # request in it is placed here (checked first), else in Python.
        self.placed: Callable[[int], bool] | None = None
        self.not_placed: Callable[[str], str | None] = _placed_anywhere
        self.misplaced = 0  # requests refused by not_placed

    def __len__(self) -> int:
        return len(self._held)

    def __contains__(self, sub_id: object) -> bool:
        return sub_id in self._held

    @property
    def elsewhere(self) -> int:
        """How many subscriptions are outside the live index (catching up)."""
        return len(self._where)

    def owned(self, owner: int) -> frozenset[str]:
        """The subscriptions ``owner`` holds (empty once it is released)."""
        return frozenset(() if owner in self._gone else self._owned.get(owner, ()))

    def owner_of(self, sub_id: str) -> int | None:
        """Who holds ``sub_id`` (None if nobody, or its owner is gone)."""
        held = self._held.get(sub_id)
        if held is None:
            return None
        owner = held & _OWNER
        return None if owner in self._gone else owner

    def ids(self) -> set[str]:
        """Every live subscription id (those of departed owners excluded)."""
        gone = self._gone
        return {s for s, held in self._held.items() if held & _OWNER not in gone}

    def matcher_of(self, sub_id: str) -> Matcher | None:
        """The matcher ``sub_id`` is in (None if it is not held)."""
        if sub_id not in self._held:
            return None
        return self._where.get(sub_id, self.matcher)

    def subscribe(
        self, owner: int, request: SubscribeRequest, matcher: Matcher | None = None
    ) -> SubscribeResponse:
        """Register one subscription for ``owner`` into ``matcher`` (default:
        the live index); always answers, never raises."""
        sub_id = request.subscription_id or str(uuid.uuid4())
        if self.collections and request.collection not in self.collections:
            return _refused(sub_id, NOT_OWNER, (
                f"collection {request.collection!r} is not served by this node, which "
                f"serves {', '.join(sorted(self.collections))} (--collections)"))
        if self.placed is not None and request.subscription_id and self.placed(owner):
            refusal = self.not_placed(sub_id)
            if refusal is not None:
                self.misplaced += 1
                return _refused(sub_id, NOT_OWNER, refusal)
        size = request.ByteSize()
        refusal = self._check_limits(owner, request, size)
        if refusal is not None:
            return _refused(sub_id, RESOURCE_EXHAUSTED, refusal)
        # Converted once, after the byte limits bound the work.
        filters = _filters(request)
        values = sum(_list_values(f.value) for f in filters if type(f.value) is list)
        if values > self.limits.max_list_values:
            return _refused(sub_id, RESOURCE_EXHAUSTED, (
                f"the filters' lists hold {values} values together; "
                f"the limit is {self.limits.max_list_values}"))
        previous = self._held.get(sub_id)
        if previous is not None and previous & _OWNER in self._gone:
            # Its owner left and the id is free: a reconnecting gateway takes
            # its ids back before the release reaches them.
            self._remove(sub_id)
            previous = None
        target = self.matcher if matcher is None else matcher
        if previous is not None:
            # Ids are global across matchers: adding it where it is raises
            # DuplicateSubscription, or InvalidSubscription first if the
            # request is also malformed, as for the live index alone.
            target = self._where.get(sub_id, self.matcher)
        index = target.index
        scan_before = index.scan_clauses
        try:
            target.add(
                sub_id, request.database, request.collection, filters=filters,
                expression=request.expression or None, owner=owner,
            )
        except DuplicateSubscription as exc:
            return _refused(sub_id, ALREADY_EXISTS, str(exc))
        except InvalidSubscription as exc:
            return _refused(sub_id, INVALID_ARGUMENT, str(exc))
        scan = index.scan_clauses - scan_before
        if scan:
            refusal = self._check_scan(owner, scan, self.scan_clauses + scan)
            if refusal is not None:
                target.remove(sub_id)
                return _refused(sub_id, RESOURCE_EXHAUSTED, refusal)
            self._scan[owner] = self._scan.get(owner, 0) + scan
            self._scan_of[sub_id] = scan
            self.scan_clauses += scan
        if target is not self.matcher:
            self._where[sub_id] = target
        self._held[sub_id] = size << 32 | owner
        self._owned.setdefault(owner, set()).add(sub_id)
        self._bytes[owner] = self._bytes.get(owner, 0) + size
        self.bytes += size
        return SubscribeResponse(subscription_id=sub_id, success=True)

    def subscribe_batch(
        self, owner: int, requests: Sequence[SubscribeRequest],
        encoded: list[bytes] | None = None,
    ) -> list[bytes]:
        """Register requests for ``owner`` into the live index, in order, as
        ``subscribe`` does each; returns each one's answer as a
        ``SubscribeBatchResponse.responses`` entry (``_subscribe.batch_response``
        frames them). ``encoded``: each request as the bytes it was parsed
        from (``_subscribe.batch_requests``), which the compiled path reads
        where it can."""
        entries: list[bytes] = []
        placed = self.placed is not None and self.placed(owner)
        not_placed = self.not_placed
        if self._registrar is not None and (not placed or all(
                not r.subscription_id or not_placed(r.subscription_id) is None
                for r in requests)):
            self._registrar.register(owner, requests, entries, encoded)
        else:
            for request in requests:
                entries.append(response_entry(self.subscribe(owner, request).SerializeToString()))
        return entries

    def move(
        self, sub_id: str, request: SubscribeRequest, source: Matcher,
        target: Matcher | None = None,
    ) -> bool:
        """Move ``sub_id`` (registered from ``request``) from ``source`` into
        ``target`` (default: the live index), for the same owner; False
        (nothing done) if it is not in ``source`` any more (removed, or
        registered again elsewhere)."""
        if self._where.get(sub_id) is not source:
            return False
        owner = self._held[sub_id] & _OWNER
        source.remove(sub_id)
        if target is None or target is self.matcher:
            target = self.matcher
            del self._where[sub_id]
        else:
            self._where[sub_id] = target
        # The same request compiled into the same clauses before: it cannot
        # be refused now, and its scan clauses are already counted.
        target.add(
            sub_id, request.database, request.collection, filters=_filters(request),
            expression=request.expression or None, owner=owner,
        )
        return True

    def unsubscribe(self, owner: int, sub_id: str) -> bool:
        """Remove one of ``owner``'s own subscriptions; others are ignored."""
        held = self._held.get(sub_id)
        if held is None or held & _OWNER != owner or owner in self._gone:
            return False
        self._remove(sub_id)
        return True

    def release(self, owner: int, done: Callable[[], None]) -> int:
        """``owner`` has left: from now on none of its subscriptions counts.
        Up to ``RECLAIM_CHUNK`` of them leave the index now, the rest in
        chunks by ``reclaim``; ``done`` is called once the last is gone.
        Returns how many it held."""
        owned = self._owned.get(owner, set())
        held = len(owned)
        self._gone[owner] = done
        self._reclaim_chunk(owner)
        if owner in self._gone:
            self._pending.set()
        return held

    async def reclaim(self) -> None:
        """Remove released owners' subscriptions from the index, a chunk at a
        time, until cancelled (a node's background task)."""
        while True:
            await self._pending.wait()
            self._pending.clear()
            while self._gone:
                self._reclaim_chunk(next(iter(self._gone)))
                await self.give_way()

    def _reclaim_chunk(self, owner: int) -> None:
        owned = self._owned.get(owner, set())
        for sub_id in [owned.pop() for _ in range(min(RECLAIM_CHUNK, len(owned)))]:
            self._remove(sub_id)
        if not owned:
            self._owned.pop(owner, None)
            self._gone.pop(owner)()

    def _remove(self, sub_id: str) -> None:
        held = self._held.pop(sub_id)
        owner, size = held & _OWNER, held >> 32
        owned = self._owned.get(owner)
        if owned is not None:
            owned.discard(sub_id)
        scan = self._scan_of.pop(sub_id, 0)
        if scan:
            self._scan[owner] -= scan
            self.scan_clauses -= scan
        self._bytes[owner] -= size
        self.bytes -= size
        self._where.pop(sub_id, self.matcher).remove(sub_id)

    def _check_limits(self, owner: int, request: SubscribeRequest, size: int) -> str | None:
        limits = self.limits
        if len(self._owned.get(owner, ())) >= limits.max_subscriptions:
            return f"this gateway already has {limits.max_subscriptions} subscriptions (the limit)"
        if len(request.filters) > limits.max_filters:
            return f"{len(request.filters)} filters; the limit is {limits.max_filters}"
        if len(request.expression) > limits.max_expression_length:
            return (
                f"expression is {len(request.expression)} characters long; "
                f"the limit is {limits.max_expression_length}"
            )
        if size > limits.max_request_bytes:
            return f"the request is {size} bytes; the limit is {limits.max_request_bytes}"
        held = self._bytes.get(owner, 0) + size
        if held > limits.max_gateway_bytes:
            return (
                f"this gateway's subscriptions would weigh {held} bytes (serialized requests); "
                f"the limit is {limits.max_gateway_bytes}"
            )
        if self.bytes + size > limits.max_node_bytes:
            return (
                f"the node's subscriptions would weigh {self.bytes + size} bytes (serialized "
                f"requests); the limit is {limits.max_node_bytes}"
            )
        return None

    def _check_scan(self, owner: int, scan: int, node_total: int) -> str | None:
        limits = self.limits
        mine = self._scan.get(owner, 0) + scan
        if mine > limits.max_scan_clauses:
            return (
                f"it would be verified on every event of its collection (no indexable "
                f"condition), and this gateway's scan clauses would be {mine}; the limit "
                f"is {limits.max_scan_clauses}"
            )
        if node_total > limits.max_node_scan_clauses:
            return (
                f"it would be verified on every event of its collection (no indexable "
                f"condition), and the node's scan clauses would be {node_total}; the limit "
                f"is {limits.max_node_scan_clauses}"
            )
        return None


def _placed_anywhere(sub_id: str) -> str | None:
    return None


async def one_turn() -> None:
    """A yield to the event loop: one turn (what background work does when
    no node says otherwise)."""
    await asyncio.sleep(0)


def _refused(sub_id: str, code: str, error: str) -> SubscribeResponse:
    return SubscribeResponse(subscription_id=sub_id, success=False, error=error, code=code)


def _filters(request: SubscribeRequest) -> list[Filter]:
    return [Filter(f.field, f.op, _value(f.value)) for f in request.filters]


def _list_values(values: list[Any]) -> int:
    """How many values a filter value's lists hold, nested ones included."""
    n = len(values)
    for v in values:
        if type(v) is list:
            n += _list_values(v)
    return n


def _value(value: Value) -> Any:
    """A protocol ``Value`` as a Python value (unset: None, which the matcher
    rejects as null, in its own order of checks). A list's scalars are read
    inline: lists hold up to a thousand values per request."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind != "list_value":
        return getattr(value, kind)
    out: list[Any] = []
    for v in value.list_value.values:
        k = v.WhichOneof("kind")
        out.append(getattr(v, k) if k is not None and k != "list_value" else _value(v))
    return out
