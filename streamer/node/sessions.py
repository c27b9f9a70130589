"""Gateway sessions: one per stream, who the gateway is, when it was last
heard from, and which gateways the node knows across a restart.

Every gateway stream is a session with a small *owner* number, which tags
its subscriptions in the index (``streamer.node.subscriptions``); numbers
are reused, but only once every subscription of the previous holder is out
of the index. Sessions are kept in last-seen order, so expiring the silent
ones looks only at those, never at subscriptions.

Identity. A gateway names itself with ``Hello{gateway_id, instance}``;
``instance`` is a random value its process draws once. Gateway ids are
chosen by the gateways, so the trust model is this:

- A new stream may replace a live one with the same gateway id only if it
  proves to be the same gateway: the same ``instance`` (the half-open
  connection of a process that reconnected) and, with mutual TLS, the same
  certificate identity. Anything else is refused (``IdentityTaken``) and
  the live stream carries on; once it ends, the id is free.
- ``Heartbeat.gateway_id`` never renames a session that said Hello.
- The restart window (below) counts a gateway as back only with the proof
  it gave before the restart, so a stranger cannot end it early.

Without Hello, a stream is a plain (Syntrix) gateway: it has no identity
to take or to lose; ``Heartbeat.gateway_id`` only names it in logs.

It also knows which gateways are connected (``KnownGateways``, persisted
next to the progress marker) and, after a restart, which of those have
re-registered (``RestartWindow``): a gateway that said ``Hello`` proves it
has re-sent its subscriptions with the first ``Heartbeat`` that follows,
because a stream's registrations are processed in order and the proof is
taken after those before it. A gateway whose Hello says ``resumes``
re-subscribes after its own markers and misses nothing when ingest runs
before it is back: it is not among the known gateways.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import itertools
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from streamer.errors import StreamerError
from streamer.node.subscriptions import SubscriptionSet


class IdentityTaken(StreamerError, PermissionError):
    """A Hello names a gateway id that a live stream of another gateway holds."""


@dataclass(frozen=True, slots=True)
class KnownGateways:
    """The connected gateways, as persisted with the progress marker.

    ``ids`` are the gateways that said ``Hello``; ``others`` counts the
    streams that did not (plain Syntrix gateways), whose re-registration
    cannot be observed; ``proofs`` holds, per gateway id that gave one, the
    digest of its Hello ``instance``."""

    ids: frozenset[str] = frozenset()
    others: int = 0
    proofs: frozenset[tuple[str, str]] = frozenset()


def proof_of(instance: str) -> str:
    """What is kept of a Hello's ``instance``: a digest, never the value."""
    return hashlib.sha256(instance.encode()).hexdigest() if instance else ""


# A plain gateway that has subscribed since the restart and not for this
# long has re-registered (Syntrix gateways re-send all their subscriptions
# at once after a reconnect).
PLAIN_QUIET_SECONDS = 1.0


class RestartWindow:
    """After a restart: waits until every gateway known before it has
    re-registered, so the replay after the saved marker is matched against
    their subscriptions.

    A gateway that said Hello proves it with its first heartbeat after its
    re-subscriptions. Plain gateways cannot: the window counts as many
    plain sessions as there were before the restart that have subscribed
    and then been quiet for ``quiet`` seconds (a plain gateway that never
    re-subscribes keeps the window open until the grace ends)."""

    def __init__(
        self,
        known: KnownGateways,
        *,
        quiet: float = PLAIN_QUIET_SECONDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.known = known
        self.pending = set(known.ids)
        self.quiet = quiet
        self.clock = clock
        self._proofs = dict(known.proofs)
        self._plain: dict[int, float] = {}  # plain session key -> its last subscribe
        self._complete = asyncio.Event()
        self._check()

    def subscribed(self, session: Session) -> None:
        if not session.hello:
            self._plain[session.key] = self.clock()

    def left(self, session: Session) -> None:
        self._plain.pop(session.key, None)

    @property
    def plain_back(self) -> int:
        """Plain sessions that re-subscribed and have been quiet since."""
        now = self.clock()
        return sum(1 for t in self._plain.values() if now - t >= self.quiet)

    def heartbeat(self, session: Session) -> None:
        if not session.hello or session.gateway_id not in self.pending:
            return
        expected = self._proofs.get(session.gateway_id)
        if expected is not None and expected != session.proof:
            return
        self.pending.discard(session.gateway_id)
        self._check()

    def _check(self) -> None:
        if not self.pending and self.plain_back >= self.known.others:
            self._complete.set()

    async def wait(self, grace: float) -> bool:
        """Wait up to ``grace`` seconds; True if every known gateway is back."""
        # Not asyncio.wait_for: on Python 3.11 it swallows a cancellation
        # that lands as the window closes, and the node would go on into
        # ingest instead of stopping.
        try:
            async with asyncio.timeout(grace):
                while not self._complete.is_set():
                    # Quiet is a matter of time passing: looked at in steps.
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(min(0.1, self.quiet)):
                            await self._complete.wait()
                    self._check()
        except TimeoutError:
            return False
        return True


@dataclass(eq=False, slots=True)
class Session:
    """One gateway stream."""

    key: int
    # The index's ``owner`` of this session's subscriptions: a small number,
    # reused after the session's subscriptions are gone, that
    # ``Sessions.by_owner`` maps back.
    owner: int = 0
    gateway_id: str = ""
    hello: bool = False  # said Hello: speaks the restart-window protocol
    # Its Hello says it resumes every subscription after its own marker
    # (``resume_after``): the restart window does not wait for it.
    resumes: bool = False
    proof: str = ""  # digest of the Hello instance
    principal: str = ""  # the client certificate's identity under mutual TLS
    last_seen: float = 0.0
    dropped: int = 0  # subscriptions it held when it ended


class Sessions:
    """The open gateway sessions over one subscription set."""

    def __init__(
        self,
        subscriptions: SubscriptionSet,
        *,
        session_ttl: float = 90.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.subscriptions = subscriptions
        self.session_ttl = session_ttl
        self.clock = clock
        # Session by owner number (None: free, or its subscriptions are
        # still being reclaimed); the list stays as long as the most
        # sessions ever open at once.
        self.by_owner: list[Session | None] = []
        self._free_owners: list[int] = []
        self._reserved: set[int] = set()  # owners whose subscriptions are being reclaimed
        self._sessions: OrderedDict[int, Session] = OrderedDict()
        self._keys = itertools.count(1)
        self.known = KnownGateways()
        # Called with the new ``known`` whenever it changes (persistence).
        self.on_known: Callable[[KnownGateways], None] | None = None
        self.window: RestartWindow | None = None
        self.expired_sessions = 0
        self.identity_refusals = 0

    def __len__(self) -> int:
        return len(self._sessions)

    def connect(self, principal: str = "") -> Session:
        if self._free_owners:
            owner = self._free_owners.pop()
        else:
            owner = len(self.by_owner)
            self.by_owner.append(None)
        session = Session(next(self._keys), owner, principal=principal, last_seen=self.clock())
        self.by_owner[owner] = session
        self._sessions[session.key] = session
        self._known_changed()
        return session

    def touch(self, session: Session) -> None:
        """Any message from the gateway refreshes its session."""
        session.last_seen = self.clock()
        if session.key in self._sessions:
            self._sessions.move_to_end(session.key)

    def hello(
        self, session: Session, gateway_id: str, instance: str, *, resumes: bool = False
    ) -> list[Session]:
        """Name the session; returns the older sessions of the same gateway
        that it replaces, now disconnected. Raises ``IdentityTaken`` when a
        live session of another gateway holds ``gateway_id``."""
        self.touch(session)
        proof = proof_of(instance)
        older = [
            s for s in self._sessions.values()
            if s.hello and s.gateway_id == gateway_id and s is not session
        ] if gateway_id else []
        for old in older:
            if not proof or old.proof != proof or old.principal != session.principal:
                self.identity_refusals += 1
                raise IdentityTaken(
                    f"gateway id {gateway_id!r} is held by a live stream of another gateway "
                    "process; it is free again once that stream ends"
                )
        for old in older:
            self.disconnect(old)
        session.gateway_id, session.proof, session.resumes = gateway_id, proof, resumes
        session.hello = True
        self._known_changed()
        return older

    def heartbeat(self, session: Session, gateway_id: str) -> None:
        self.touch(session)
        if not session.hello and gateway_id:
            session.gateway_id = gateway_id  # a plain gateway's name, for logs only
        if self.window is not None:
            self.window.heartbeat(session)

    def subscribed(self, session: Session) -> None:
        """``session`` sent a subscribe: it counts as active, and a plain
        gateway re-registering after a restart is seen doing it."""
        self.touch(session)
        if self.window is not None:
            self.window.subscribed(session)

    def disconnect(self, session: Session) -> int:
        """End a session; its subscriptions stop counting at once and leave
        the index in the background. Returns how many it held."""
        if self._sessions.pop(session.key, None) is None:
            return 0
        if self.window is not None:
            self.window.left(session)
        owner = session.owner
        self.by_owner[owner] = None
        self._reserved.add(owner)
        session.dropped = self.subscriptions.release(owner, lambda: self._free(owner))
        self._known_changed()
        return session.dropped

    def _free(self, owner: int) -> None:
        self._reserved.discard(owner)
        self._free_owners.append(owner)

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

    def _known_changed(self) -> None:
        # A resuming gateway misses nothing when ingest starts before it is
        # back: the restart window need not know it.
        sessions = [s for s in self._sessions.values() if not s.resumes]
        named = [s for s in sessions if s.hello]
        known = KnownGateways(
            frozenset(s.gateway_id for s in named),
            len(sessions) - len(named),
            frozenset((s.gateway_id, s.proof) for s in named if s.proof),
        )
        if known != self.known:
            self.known = known
            if self.on_known is not None:
                self.on_known(known)
