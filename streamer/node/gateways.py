"""Gateway sessions: who owns which subscription, limits, and expiry.

Every gateway stream is a session. This module turns its ``SubscribeRequest``
and ``UnsubscribeRequest`` messages into matcher calls (docs/protocol.md:
exactly one ``SubscribeResponse`` per request, precise errors with a code,
generated ids for empty ones, ids global across gateways, a gateway can only
remove its own subscriptions), enforces per-gateway limits, and expires
sessions that stay silent for the session TTL. Sessions are kept in
last-seen order, so the sweep looks only at the expired ones, never at
subscriptions.

It also knows which gateways are connected (``KnownGateways``, persisted
next to the progress marker) and, after a restart, which of those have
re-registered (``RestartWindow``): a gateway that said ``Hello`` proves it
has re-sent its subscriptions with the first ``Heartbeat`` that follows,
because messages on one stream are processed in order.
"""

from __future__ import annotations

import asyncio
import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matching.matcher import Filter, Matcher
from streamer.protocol.streamer_v1_pb2 import SubscribeRequest, SubscribeResponse, Value

INVALID_ARGUMENT = "invalid_argument"
ALREADY_EXISTS = "already_exists"
RESOURCE_EXHAUSTED = "resource_exhausted"


@dataclass(frozen=True, slots=True)
class Limits:
    """Per-gateway limits; requests beyond them are refused, not queued."""

    max_subscriptions: int = 100_000
    max_filters: int = 64
    max_expression_length: int = 4096


@dataclass(frozen=True, slots=True)
class KnownGateways:
    """The connected gateways, as persisted with the progress marker.

    ``ids`` are the gateways that said ``Hello``; ``others`` counts the
    streams that did not (plain Syntrix gateways), whose re-registration
    cannot be observed."""

    ids: frozenset[str] = frozenset()
    others: int = 0


class RestartWindow:
    """After a restart: waits until every gateway known before it has
    re-registered, so the replay after the saved marker is matched against
    their subscriptions."""

    def __init__(self, known: KnownGateways) -> None:
        self.known = known
        self.pending = set(known.ids)
        self._complete = asyncio.Event()
        self._check()

    def heartbeat(self, session: Session) -> None:
        if session.hello and session.gateway_id in self.pending:
            self.pending.discard(session.gateway_id)
            self._check()

    def _check(self) -> None:
        # Plain gateways never prove re-registration: only the grace ends
        # the window for them.
        if not self.pending and not self.known.others:
            self._complete.set()

    async def wait(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds; True if every known gateway is back."""
        if self._complete.is_set():
            return True
        try:
            await asyncio.wait_for(self._complete.wait(), grace)
        except TimeoutError:
            return False
        return True


@dataclass(eq=False, slots=True)
class Session:
    """One gateway stream."""

    key: int
    # The matcher's ``owner`` of this session's subscriptions: a small index,
    # reused after the session ends, that ``GatewayRegistry.by_owner`` maps back.
    owner: int = 0
    gateway_id: str = ""
    hello: bool = False  # said Hello: speaks the restart-window protocol
    subscriptions: set[str] = field(default_factory=set)
    last_seen: float = 0.0
    # Subscriptions removed when the session was disconnected (for the log
    # line of its stream's end, which may come later: superseded, expired).
    dropped: int = 0


class GatewayRegistry:
    """Sessions, their subscriptions, and the matcher they feed."""

    def __init__(
        self,
        matcher: Matcher,
        *,
        limits: Limits = Limits(),
        session_ttl: float = 90.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.matcher = matcher
        self.limits = limits
        self.session_ttl = session_ttl
        self.clock = clock
        # Session by matcher owner index (None: free); indexes are reused, so
        # the list stays as long as the most sessions ever open at once.
        self.by_owner: list[Session | None] = []
        self._free_owners: list[int] = []
        self._sessions: OrderedDict[int, Session] = OrderedDict()
        self._keys = itertools.count(1)
        self.known = KnownGateways()
        # Called with the new ``known`` whenever it changes (persistence).
        self.on_known: Callable[[KnownGateways], None] | None = None
        self.window: RestartWindow | None = None
        self.expired_sessions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def connect(self) -> Session:
        if self._free_owners:
            owner = self._free_owners.pop()
        else:
            owner = len(self.by_owner)
            self.by_owner.append(None)
        session = Session(next(self._keys), owner, last_seen=self.clock())
        self.by_owner[owner] = session
        self._sessions[session.key] = session
        self._known_changed()
        return session

    def touch(self, session: Session, gateway_id: str = "") -> None:
        """Any message from the gateway refreshes its session."""
        session.last_seen = self.clock()
        if gateway_id:
            session.gateway_id = gateway_id
        if session.key in self._sessions:
            self._sessions.move_to_end(session.key)

    def hello(self, session: Session, gateway_id: str) -> list[Session]:
        """Mark the session as a Hello gateway's; returns the older sessions
        of the same gateway, now disconnected.

        A gateway keeps one stream, so its new Hello means any older stream
        is dead even if the server has not noticed yet (a half-open
        connection): its subscriptions must not turn the re-subscription of
        the same ids into ``already_exists``.
        """
        self.touch(session, gateway_id)
        superseded = [
            s for s in self._sessions.values()
            if s.hello and s.gateway_id == gateway_id and s is not session
        ] if gateway_id else []
        for old in superseded:
            self.disconnect(old)
        if not session.hello:
            session.hello = True
            self._known_changed()
        return superseded

    def heartbeat(self, session: Session, gateway_id: str) -> None:
        self.touch(session, gateway_id)
        if self.window is not None:
            self.window.heartbeat(session)

    def _known_changed(self) -> None:
        sessions = self._sessions.values()
        known = KnownGateways(
            frozenset(s.gateway_id for s in sessions if s.hello),
            sum(not s.hello for s in sessions),
        )
        if known != self.known:
            self.known = known
            if self.on_known is not None:
                self.on_known(known)

    def subscribe(self, session: Session, request: SubscribeRequest) -> SubscribeResponse:
        """Register one subscription; always answers, never raises."""
        sub_id = request.subscription_id or str(uuid.uuid4())
        refusal = self._check_limits(session, request)
        if refusal is not None:
            return SubscribeResponse(
                subscription_id=sub_id, success=False, error=refusal, code=RESOURCE_EXHAUSTED
            )
        try:
            filters = [Filter(f.field, f.op, _value(f.value)) for f in request.filters]
            self.matcher.add(
                sub_id,
                request.database,
                request.collection,
                filters=filters,
                expression=request.expression or None,
                owner=session.owner,
            )
        except DuplicateSubscription as exc:
            return SubscribeResponse(
                subscription_id=sub_id, success=False, error=str(exc), code=ALREADY_EXISTS
            )
        except InvalidSubscription as exc:
            return SubscribeResponse(
                subscription_id=sub_id, success=False, error=str(exc), code=INVALID_ARGUMENT
            )
        session.subscriptions.add(sub_id)
        return SubscribeResponse(subscription_id=sub_id, success=True)

    def unsubscribe(self, session: Session, sub_id: str) -> bool:
        """Remove one of the session's own subscriptions; others are ignored."""
        if sub_id not in session.subscriptions:
            return False
        session.subscriptions.discard(sub_id)
        self.matcher.remove(sub_id)
        return True

    def disconnect(self, session: Session) -> int:
        """End a session and remove exactly its subscriptions."""
        removed = 0
        for sub_id in session.subscriptions:
            removed += self.matcher.remove(sub_id)
        session.subscriptions.clear()
        session.dropped += removed
        if self._sessions.pop(session.key, None) is not None:
            # Only now: no subscription of the index's owner is left.
            self.by_owner[session.owner] = None
            self._free_owners.append(session.owner)
            self._known_changed()
        return removed

    def owner(self, sub_id: str) -> Session | None:
        """The session holding a subscription (a scan over sessions: for
        tests and tools, not for the event path)."""
        return next((s for s in self._sessions.values() if sub_id in s.subscriptions), None)

    def subscription_ids(self) -> set[str]:
        """Every registered subscription id (a scan, like ``owner``)."""
        return {sub_id for s in self._sessions.values() for sub_id in s.subscriptions}

    def expired(self) -> list[Session]:
        """Sessions silent for longer than the TTL (oldest first), disconnected."""
        deadline = self.clock() - self.session_ttl
        out = []
        while self._sessions:
            session = next(iter(self._sessions.values()))
            if session.last_seen > deadline:
                break
            self.disconnect(session)
            out.append(session)
        self.expired_sessions += len(out)
        return out

    def _check_limits(self, session: Session, request: SubscribeRequest) -> str | None:
        limits = self.limits
        if len(session.subscriptions) >= limits.max_subscriptions:
            return f"this gateway already has {limits.max_subscriptions} subscriptions (the limit)"
        if len(request.filters) > limits.max_filters:
            return f"{len(request.filters)} filters; the limit is {limits.max_filters}"
        if len(request.expression) > limits.max_expression_length:
            return (
                f"expression is {len(request.expression)} characters long; "
                f"the limit is {limits.max_expression_length}"
            )
        return None


def _value(value: Value) -> Any:
    """A protocol ``Value`` as a Python value (unset: None, which the matcher
    rejects as null, in its own order of checks)."""
    kind = value.WhichOneof("kind")
    if kind is None:
        return None
    if kind == "list_value":
        return [_value(v) for v in value.list_value.values]
    return getattr(value, kind)
