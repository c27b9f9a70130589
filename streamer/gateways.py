"""Gateway sessions: who owns which subscription, limits, and expiry.

Every gateway stream is a session. This module turns its ``SubscribeRequest``
and ``UnsubscribeRequest`` messages into matcher calls (SPEC section 3.1:
exactly one ``SubscribeResponse`` per request, precise errors with a code,
generated ids for empty ones, ids global across gateways, a gateway can only
remove its own subscriptions), enforces per-gateway limits, and expires
sessions that stay silent for the session TTL. Sessions are kept in
last-seen order, so the sweep looks only at the expired ones, never at
subscriptions.
"""

from __future__ import annotations

import itertools
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from streamer.errors import DuplicateSubscription, InvalidSubscription
from streamer.matcher import Filter, Matcher
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


@dataclass(eq=False, slots=True)
class Session:
    """One gateway stream."""

    key: int
    gateway_id: str = ""
    subscriptions: set[str] = field(default_factory=set)
    last_seen: float = 0.0


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
        self.owners: dict[str, Session] = {}
        self._sessions: OrderedDict[int, Session] = OrderedDict()
        self._keys = itertools.count(1)
        self.expired_sessions = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def connect(self) -> Session:
        session = Session(next(self._keys), last_seen=self.clock())
        self._sessions[session.key] = session
        return session

    def touch(self, session: Session, gateway_id: str = "") -> None:
        """Any message from the gateway refreshes its session."""
        session.last_seen = self.clock()
        if gateway_id:
            session.gateway_id = gateway_id
        if session.key in self._sessions:
            self._sessions.move_to_end(session.key)

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
        self.owners[sub_id] = session
        return SubscribeResponse(subscription_id=sub_id, success=True)

    def unsubscribe(self, session: Session, sub_id: str) -> bool:
        """Remove one of the session's own subscriptions; others are ignored."""
        if sub_id not in session.subscriptions:
            return False
        session.subscriptions.discard(sub_id)
        del self.owners[sub_id]
        self.matcher.remove(sub_id)
        return True

    def disconnect(self, session: Session) -> int:
        """End a session and remove exactly its subscriptions."""
        self._sessions.pop(session.key, None)
        removed = 0
        for sub_id in session.subscriptions:
            del self.owners[sub_id]
            removed += self.matcher.remove(sub_id)
        session.subscriptions.clear()
        return removed

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
