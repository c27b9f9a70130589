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
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
from collections.abc import Coroutine
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamer.errors import StreamerError
from streamer.matching import Matcher
from streamer.node.auth import TokenAuth
from streamer.node.catchup import DEFAULT_CONFIRM_SECONDS, DEFAULT_MAX_READERS, CatchUp
from streamer.node.delivery import DEFAULT_CAPACITY, DEFAULT_MAX_BYTES
from streamer.node.events import Layout
from streamer.node.ingest import Ingest, MarkerPolicy
from streamer.node.metrics import MetricsServer, PauseCollector, StreamerCollector
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

log = logging.getLogger("streamer")

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
                self._metrics = MetricsServer(
                    *config.metrics, StreamerCollector(self.ingest), PauseCollector(self.pauses)
                )
                log.info("metrics on http://%s/metrics", self._metrics.address)
            await self._server.start()
        except BaseException:
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
        log.info("stopping: ingest first, then the marker, then the gateway streams")
        await self._health.enter_graceful_shutdown()
        for task in self._tasks:
            task.cancel()
        for task in self._tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        try:
            await self.progress.flush()
        except OSError as exc:
            self._failed(f"the progress marker could not be saved ({exc}); the next start "
                         "replays from the marker saved before it")
        # Streams end as soon as their queues are written: only gateways
        # still being written to hold the drain, up to drain_seconds.
        self.servicer.shutdown()
        await self._server.stop(grace=self.config.drain_seconds)
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
