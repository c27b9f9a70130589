"""``StreamerNode``: the composition root of the service.

A node is built from a ``NodeConfig`` (no I/O), started with ``start``
(state directory taken, port bound, metrics endpoint up, health SERVING,
background tasks running), runs until ``request_stop`` or until a part
fails (``wait``), and shuts down in order with ``stop``. ``streamer
serve``, the tests and the demo all run the service through this object.

Supervision. The background tasks (ingest behind the restart window, the
progress writer, the session sweeper and stall watchdog, the reclaimer of
departed gateways' subscriptions, the catch-up mover of resuming
subscriptions, the pause log) run for the node's whole life. One
that ends early, with an error or without, is not restarted: the node logs
it (with its traceback unless it is one of the package's own, explained
errors), turns health NOT_SERVING at once, records it in ``failure`` and
shuts down as on SIGTERM; ``streamer serve`` then exits 1 and the process
supervisor (systemd, Kubernetes) starts a fresh process, which resumes
after the saved marker. Restarting a task in place would hide a bug behind
a loop and keep serving from state the failure may have left half-updated.

The catch-up readers of resuming subscriptions (``streamer.node.catchup``)
come and go with their groups; the catch-up supervises them: a reader that
fails is logged with its traceback and counted, and its subscriptions
continue from the live head (``resync_required`` if not answered yet); the
node keeps serving. Stopping the node stops every reader.

Cluster mode (``NodeConfig.cluster``, ``streamer serve --cluster``;
docs/scaling.md). At start, after the server is up, the node opens an
``EtcdClient``, starts a ``Membership`` (its lease, its ``nodes/`` key with
the advertised address and ``collections``) and an ``Ownership`` (claims
its shards); if etcd cannot be reached the start fails. Three supervised
tasks follow them: ``membership`` (the membership fenced for good: lease
lost, a watch or claim failed), ``fencing`` and ``handover``; each fails the
node like any other task. Subscriptions of a gateway that said Hello must
be on shards this node owns or is taking over (``Ownership.accepts``):
others are refused with not_owner naming the shard's owner; a request
without an id gets a generated one, placed here. Plain gateways are served
whatever the shard. ``handover`` releases a shard another live node should
own (a node joined) once no Hello gateway's subscription held here is on
it (cluster clients re-home them to the joined node first), or after
``HANDOVER_GRACE``.

Fencing is the simplest correct behaviour: the node stops. ``fencing``
sleeps until ``Membership.deliverable_until`` (last acknowledged keepalive
+ TTL - max(1, TTL/3)); if no keepalive has moved it by then, it cancels
ingest at once (nothing more is delivered) and fails, and ``stop`` then
treats the node as crashed (as after a SIGKILL): the gateway streams are
cut without draining what is queued, the marker is not flushed again (the
next start replays after the last one the progress writer saved, at most
100 ms old; events queued but not yet written to a gateway are lost for
it, as after a crash: a cluster client re-subscribes with its own
``resume_after``), and leaving gives up on revoking the lease after
``LEAVE_FENCED_SECONDS``. All of this happens before etcd can
expire the lease and another node claim the shards. A clean stop revokes
the lease after the streams are drained, freeing the shards at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamer.errors import StreamerError
from streamer.matching import Matcher
from streamer.node.auth import TokenAuth
from streamer.node.catchup import DEFAULT_CONFIRM_SECONDS, DEFAULT_MAX_READERS, CatchUp
from streamer.node.delivery import DEFAULT_CAPACITY, DEFAULT_MAX_BYTES
from streamer.node.events import Layout
from streamer.node.ingest import Ingest, MarkerPolicy
from streamer.node.metrics import (
    ClusterCollector,
    ClusterStats,
    MetricsServer,
    PauseCollector,
    StreamerCollector,
)
from streamer.node.pauses import PauseMonitor
from streamer.node.progress import ProgressStore, SavedProgress
from streamer.node.server import (
    DEFAULT_NODE_QUEUE_BYTES,
    DEFAULT_STALL_SECONDS,
    SERVICE_NAME,
    StreamerServicer,
    add_to_server,
)
from streamer.node.sessions import RestartWindow, Sessions
from streamer.node.subscriptions import Limits, SubscriptionSet
from streamer.options import join
from streamer.transport import SERVER_OPTIONS, bind

if TYPE_CHECKING:
    from prometheus_client.registry import Collector

    from streamer.cluster.etcd import EtcdClient
    from streamer.cluster.membership import Membership, Ownership

log = logging.getLogger("streamer")

# The lease TTL in cluster mode (streamer.cluster.membership.DEFAULT_TTL,
# which is not imported without --cluster).
DEFAULT_LEASE_TTL = 5
# The cluster's name, the etcd key prefix /streamer/<name>/ (membership.DEFAULT_CLUSTER,
# which cluster clients use too).
CLUSTER_NAME = "streamer"
# How often a cluster node looks for shards to hand over to a joined node.
HANDOVER_PERIOD = 0.25
# How long a shard to hand over waits for its gateways to re-home before
# it is released all the same (its subscriptions stay here until they move).
HANDOVER_GRACE = 30.0
# How long a fenced node tries to revoke its lease on the way out.
LEAVE_FENCED_SECONDS = 0.5

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


@dataclass(frozen=True, slots=True)
class NodeConfig:
    """What a node is built from; ``streamer serve``'s options, checked."""

    puller: str  # HOST:PORT of the Puller
    listen: tuple[str, int] = ("127.0.0.1", 50052)
    state_dir: Path = Path("streamer-state")
    session_ttl: float = 90.0
    document_layout: Layout = "plain"
    gateway_queue: int = DEFAULT_CAPACITY
    gateway_queue_bytes: int = DEFAULT_MAX_BYTES
    stall_seconds: float = DEFAULT_STALL_SECONDS
    node_queue_bytes: int = DEFAULT_NODE_QUEUE_BYTES
    resume_grace: float = 3.0
    consumer_id: str = "streamer"
    drain_seconds: float = 5.0
    limits: Limits = field(default_factory=Limits)
    metrics: tuple[str, int] | None = None
    auth_token: bytes | None = None
    server_credentials: grpc.ServerCredentials | None = None
    puller_credentials: grpc.ChannelCredentials | None = None
    on_marker_refused: MarkerPolicy = "fail"
    # First and longest wait between Puller reconnects (jittered, doubling).
    puller_backoff: tuple[float, float] = (0.1, 5.0)
    # Resuming subscriptions (streamer.node.catchup): groups read from the
    # Puller at once, and how long a silent Puller takes to accept a marker.
    max_catchup_readers: int = DEFAULT_MAX_READERS
    catchup_confirm_seconds: float = DEFAULT_CONFIRM_SECONDS
    # The collections this node serves (empty: all): asked of the Puller,
    # and subscriptions to others are refused with not_owner.
    collections: tuple[str, ...] = ()
    # Cluster mode (see "Cluster mode" above): the etcd endpoints
    # (None: a single node, nothing of it), this node's id and the address
    # gateways reach it at, and its lease's TTL.
    cluster: tuple[str, ...] | None = None
    node_id: str | None = None
    advertise: str | None = None
    lease_ttl: int = DEFAULT_LEASE_TTL


class StreamerNode:
    """One Streamer node; see the module docstring for its life cycle."""

    def __init__(self, config: NodeConfig) -> None:
        self.config = config
        self.matcher = Matcher()
        self.subscriptions = SubscriptionSet(
            self.matcher, config.limits, collections=frozenset(config.collections))
        self.sessions = Sessions(self.subscriptions, session_ttl=config.session_ttl)
        self.servicer = StreamerServicer(
            self.sessions, queue_capacity=config.gateway_queue,
            queue_bytes=config.gateway_queue_bytes, stall_seconds=config.stall_seconds,
            node_queue_bytes=config.node_queue_bytes,
        )
        self.progress = ProgressStore(config.state_dir)
        self.pauses = PauseMonitor()
        self.ingest = Ingest(
            config.puller, self.sessions, self.servicer, self.progress,
            consumer_id=config.consumer_id, layout=config.document_layout,
            credentials=config.puller_credentials, on_marker_refused=config.on_marker_refused,
            backoff=config.puller_backoff, collections=config.collections,
        )
        self.catchup = CatchUp(
            self.ingest, max_readers=config.max_catchup_readers,
            confirm_seconds=config.catchup_confirm_seconds,
        )
        self.ingest.catchup = self.servicer.catchup = self.catchup
        self.servicer.give_way = self.subscriptions.give_way = self.ingest.give_way
        interceptors = [TokenAuth(config.auth_token)] if config.auth_token is not None else []
        self._server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
        add_to_server(self.servicer, self._server)
        # The standard health service: SERVING overall and for
        # StreamerService while running; NOT_SERVING from the first sign of
        # shutdown or failure.
        self._health = health.aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(self._health, self._server)
        self.membership: Membership | None = None
        self.ownership: Ownership | None = None
        self._etcd: EtcdClient | None = None
        self.cluster_stats: ClusterStats | None = None
        if config.cluster is not None:
            self.cluster_stats = ClusterStats()
            self.subscriptions.placed = self._placed
            self.subscriptions.not_placed = self._not_placed
        self.port = 0
        self.serving = False
        # Why the node stopped on its own (a failed background task or a
        # marker that could not be saved); None while healthy.
        self.failure: str | None = None
        self._metrics: MetricsServer | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._health_updates: set[asyncio.Task[None]] = set()
        self._stop_requested = asyncio.Event()
        self._stopping = False
        self._stopped = False

    @property
    def address(self) -> str:
        return join(self.config.listen[0], self.port)

    async def start(self) -> None:
        """Take the state directory, bind, serve, start the background
        tasks. Raises a ``StreamerError`` saying what is wrong (state
        directory in use or unusable, progress file unreadable, address or
        metrics port unavailable), with nothing left running."""
        config = self.config
        saved = self.progress.open()
        try:
            self.port = bind(self._server, *config.listen, config.server_credentials)
            if config.metrics is not None:
                collectors: list[Collector] = [
                    StreamerCollector(self.ingest), PauseCollector(self.pauses)]
                if self.cluster_stats is not None:
                    collectors.append(ClusterCollector(self.cluster_stats))
                self._metrics = MetricsServer(*config.metrics, *collectors)
                log.info("metrics on http://%s/metrics", self._metrics.address)
            await self._server.start()
            if config.cluster is not None:
                await self._join()
        except BaseException:
            await self._leave()
            await self._server.stop(None)
            self.progress.close()
            raise
        for name in ("", SERVICE_NAME):
            await self._health.set(name, SERVING)
        # What exists now (modules, gRPC, protobuf descriptors: some 30 000
        # objects) lives as long as the process: out of the collector's
        # sight, a full collection no longer walks it on the event loop.
        gc.collect()
        gc.freeze()
        self.serving = True
        log.info(
            "serving on %s (port %d); puller %s; resuming after %r",
            join(*config.listen), self.port, config.puller, saved.marker,
        )
        self._spawn("ingest", self._ingest(saved))
        self._spawn("progress", self.progress.run())
        self._spawn("sweeper", self._sweep())
        self._spawn("reclaimer", self.subscriptions.reclaim())
        self._spawn("catch-up", self.catchup.run())
        self._spawn("pauses", self.pauses.run())
        if self.membership is not None:
            self._spawn("membership", self.membership.wait())
            self._spawn("fencing", self._fence())
            self._spawn("handover", self._hand_over())

    def request_stop(self) -> None:
        """Ask ``wait`` to return (safe from a signal handler)."""
        self._stop_requested.set()

    async def wait(self) -> None:
        """Until ``request_stop`` or a failure."""
        await self._stop_requested.wait()

    async def stop(self) -> None:
        """Stop in order: health NOT_SERVING, ingest and the other tasks,
        the final marker write, then each gateway stream once its queue is
        written (at most ``drain_seconds``), the metrics endpoint, the state
        directory. Idempotent."""
        if self._stopped or not self.serving:
            return
        self._stopping = True
        self._stop_requested.set()
        # Fenced (cluster mode): another node may own this one's shards
        # soon; stop as after a crash (see "Cluster mode" above).
        fenced = self.membership is not None and not self.membership.deliverable()
        log.info("stopping: ingest first, then the marker, then the gateway streams")
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        if fenced:
            log.error("fenced: the gateway streams are cut without draining and the "
                      "marker is not flushed again, as after a crash")
        else:
            try:
                await self.progress.flush()
            except OSError as exc:
                self._failed(f"the progress marker could not be saved ({exc}); the next "
                             "start replays from the marker saved before it")
        # Streams end as soon as their queues are written: only gateways
        # still being written to hold the drain, up to drain_seconds.
        self.servicer.shutdown()
        await self._server.stop(grace=0 if fenced else self.config.drain_seconds)
        # Leaving revokes the lease: this node's shards are free at once
        # (fenced, etcd is likely unreachable: not waited for long).
        await self._leave(LEAVE_FENCED_SECONDS if fenced else None)
        # A handler still running when the event loop closes gets
        # cancelled, which gRPC logs as an error with a traceback.
        await self.servicer.wait_closed(timeout=1.0)
        if self._metrics is not None:
            await asyncio.to_thread(self._metrics.close)
        self.progress.close()
        self._stopped = True
        self.serving = False
        log.info("stopped at marker %r", self.progress.marker)

    async def __aenter__(self) -> StreamerNode:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    # -- supervision -----------------------------------------------------

    def _spawn(self, name: str, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro, name=name)
        task.add_done_callback(self._task_done)
        self._tasks.append(task)

    def _task_done(self, task: asyncio.Task[None]) -> None:
        if self._stopping or task.cancelled():
            return
        exc = task.exception()
        name = task.get_name()
        if exc is None:
            log.error("background task %s ended while the node was running", name)
            self._failed(f"{name} ended")
        elif isinstance(exc, StreamerError):
            log.error("%s stopped: %s", name, exc)
            self._failed(f"{name}: {exc}")
        else:
            log.error("background task %s failed", name, exc_info=exc)
            self._failed(f"{name} failed: {exc!r}")

    def _failed(self, why: str) -> None:
        if self.failure is None:
            self.failure = why
        log.error("the node is NOT_SERVING and stops: %s", why)
        self._stop_requested.set()
        for name in ("", SERVICE_NAME):
            update = asyncio.get_running_loop().create_task(self._health.set(name, NOT_SERVING))
            self._health_updates.add(update)
            update.add_done_callback(self._health_updates.discard)

    # -- cluster mode ------------------------------------------------------

    async def _join(self) -> None:
        """Register in the cluster and start claiming shards (raises a
        ``ClusterError`` if etcd cannot be reached)."""
        from streamer.cluster.etcd import EtcdClient
        from streamer.cluster.membership import Membership, Ownership

        config = self.config
        assert config.cluster is not None and config.node_id and config.advertise
        self._etcd = EtcdClient(config.cluster)
        self.membership = Membership(
            self._etcd, CLUSTER_NAME, config.node_id, config.advertise,
            collections=config.collections, ttl=config.lease_ttl,
        )
        await self.membership.start()
        self.ownership = Ownership(self.membership)
        await self.ownership.start()
        membership = self.membership
        assert self.cluster_stats is not None
        self.cluster_stats.fence_after = membership.ttl - membership.margin
        self.cluster_stats.last_ok = lambda: membership.last_ok
        log.info("cluster: node %s (advertising %s) joined through etcd %s; lease TTL %d s",
                 config.node_id, config.advertise, ",".join(config.cluster), config.lease_ttl)

    async def _leave(self, timeout: float | None = None) -> None:
        """Stop claiming, revoke the lease (the node's keys and shards go at
        once; given up after ``timeout`` seconds), close the etcd client.
        Idempotent."""
        ownership, membership, client = self.ownership, self.membership, self._etcd
        self._etcd = None
        if ownership is not None:
            with contextlib.suppress(Exception):
                await ownership.stop()
        if membership is not None:
            try:
                await asyncio.wait_for(membership.stop(), timeout)
            except Exception as exc:
                log.warning("cluster: leaving failed (%r); the lease expires by itself", exc)
        if client is not None:
            await client.close()

    async def _fence(self) -> None:
        """Fail (the node stops) once no keepalive has succeeded for TTL -
        margin: before etcd can expire the lease and another node claim
        this one's shards. Ingest stops at once, before the failure is
        handled."""
        from streamer.errors import MembershipFailed

        membership = self.membership
        assert membership is not None
        while True:
            wait = membership.deliverable_until - time.monotonic()
            if wait <= 0:
                break
            await asyncio.sleep(wait)
        for task in self._tasks:
            if task.get_name() == "ingest":
                task.cancel()
        if membership.error is not None:
            raise membership.error
        raise MembershipFailed(
            f"fenced: no etcd keepalive acknowledged for {membership.ttl - membership.margin:g}"
            f" s (lease TTL {membership.ttl} s); stopping before the lease can expire")

    async def _hand_over(self) -> None:
        """Release the shards this node holds that another live node should
        own (a node joined) once no subscription of a gateway that said
        Hello is held here on them (cluster clients re-home them to the new
        owner first, which accepts them before it owns the shard), or once
        ``HANDOVER_GRACE`` has passed: a gateway that does not re-home must
        not keep a joined node without its shards."""
        from streamer.cluster.shards import shard_of
        from streamer.errors import ClusterError

        ownership, stats = self.ownership, self.cluster_stats
        assert ownership is not None and stats is not None
        since: dict[int, float] = {}  # handover → when it was first seen
        while True:
            await asyncio.sleep(HANDOVER_PERIOD)
            handovers = ownership.handovers()
            stats.nodes = len(ownership.membership.nodes)
            stats.shards_owned = len(ownership.owned())
            stats.handing_over = len(handovers)
            stats.not_owner = self.subscriptions.misplaced
            now = time.monotonic()
            since = {s: since.get(s, now) for s in handovers}
            if not handovers:
                continue
            held: set[int] = set()
            for session in self.sessions.by_owner:
                if session is not None and session.hello:
                    held.update(shard_of(s) for s in self.subscriptions.owned(session.owner))
            overdue = {s for s in held & handovers if now - since[s] >= HANDOVER_GRACE}
            for shard in sorted(handovers - held | overdue):
                try:
                    if await ownership.release(shard):
                        stats.released += 1
                        log.info("cluster: shard %d handed over to node %s", shard,
                                 ownership.desired().get(shard))
                except ClusterError as exc:
                    # etcd unreachable: fencing decides; tried again next round.
                    log.warning("cluster: releasing shard %d failed: %s", shard, exc)
                    break

    def _placed(self, owner: int) -> bool:
        """Whether ``owner``'s subscriptions must be on shards this node
        owns: those of gateways that said Hello (cluster clients); plain
        gateways are served whatever the shard."""
        by_owner = self.sessions.by_owner
        session = by_owner[owner] if owner < len(by_owner) else None
        return session is not None and session.hello

    def _not_placed(self, sub_id: str) -> str | None:
        """Why this node does not take ``sub_id`` (None: it owns its shard,
        or is taking it over)."""
        from streamer.cluster.shards import shard_of

        ownership = self.ownership
        shard = shard_of(sub_id)
        if ownership is not None and ownership.accepts(shard):
            return None
        if ownership is None:
            return f"shard {shard} of subscription {sub_id!r}: this node has not joined yet"
        owner = ownership.owner(shard)
        who = f"node {owner.node_id}" if owner is not None else "no node yet"
        return (f"shard {shard} of subscription {sub_id!r} is owned by {who}, not this node"
                f" (group {ownership.group})")

    # -- background tasks ------------------------------------------------

    async def _ingest(self, saved: SavedProgress) -> None:
        """Hold ingest until the gateways known before a restart are back
        (or the grace has passed), then run it."""
        sessions, progress, grace = self.sessions, self.progress, self.config.resume_grace
        if saved.marker and grace > 0:
            # Until the window closes the progress file keeps the gateways
            # of the previous run: a crash now must wait for all of them again.
            window = sessions.window = RestartWindow(saved.gateways)
            log.info(
                "restart window: holding ingest up to %g s for %d gateway(s) with Hello "
                "and %d without", grace, len(saved.gateways.ids), saved.gateways.others,
            )
            if await window.wait(grace):
                log.info("restart window: every known gateway re-registered")
            else:
                log.info(
                    "restart window: grace elapsed; not back: %s; gateways without Hello "
                    "re-subscribed and quiet: %d of %d",
                    ", ".join(sorted(window.pending)) or "none with Hello",
                    window.plain_back, saved.gateways.others,
                )
            sessions.window = None
        sessions.on_known = progress.set_gateways
        progress.set_gateways(sessions.known)
        await self.ingest.run()

    async def _sweep(self) -> None:
        """Expire silent gateway sessions (only the expired ones are looked
        at) and cut off gateways that stopped reading."""
        sessions, servicer = self.sessions, self.servicer
        period = min(sessions.session_ttl / 10, servicer.stall_seconds / 10, 1.0)
        while True:
            await asyncio.sleep(max(period, 0.05))
            for session in sessions.expired():
                servicer.close(session)
                log.info("session of gateway %s expired", session.gateway_id or session.key)
            servicer.watch()
