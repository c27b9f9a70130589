"""The ``streamer`` command line: ``streamer serve`` runs the service,
``streamer puller`` the reference Puller (``streamer.puller``), ``streamer
demo`` the three together on loopback (``streamer.tools.demo``).

Every option can also be set through an environment variable:
``STREAMER_<OPTION>`` for ``serve`` (``--session-ttl`` →
``STREAMER_SESSION_TTL``), ``STREAMER_PULLER_<OPTION>`` for ``puller``,
``STREAMER_DEMO_<OPTION>`` for ``demo``; a flag given on the command line
wins. Options are declared and checked in one place (``streamer.options``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import importlib.util
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

import streamer
from streamer import DISTRIBUTION
from streamer.errors import ResumePointLost
from streamer.logs import configure_logging
from streamer.matching.cel import MAX_EXPRESSION_LENGTH
from streamer.matching.matcher import Matcher
from streamer.node.auth import (
    CredentialsError,
    TokenAuth,
    TokenFileError,
    channel_credentials,
    read_token,
    server_credentials,
)
from streamer.node.delivery import DEFAULT_CAPACITY
from streamer.node.events import LAYOUTS
from streamer.node.gateways import GatewayRegistry, Limits, RestartWindow
from streamer.node.ingest import Ingest
from streamer.node.metrics import MetricsError, MetricsServer, StreamerCollector
from streamer.node.progress import ProgressFileError, ProgressStore, SavedProgress
from streamer.node.server import SERVICE_NAME, StreamerServicer, add_to_server
from streamer.options import (
    MAX_RATE,
    ArgumentParser,
    Options,
    address,
    commands_epilog,
    existing_file,
    integer,
    join,
    nonempty,
    one_of,
    real,
    target,
)
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.puller.log import LogError, ReplayLog
from streamer.puller.server import SERVICE_NAME as PULLER_SERVICE_NAME
from streamer.puller.server import PullerServicer
from streamer.puller.server import add_to_server as add_puller_to_server
from streamer.puller.sources import Recorder, ReplaySource, Source, WorkloadSource
from streamer.transport import SERVER_OPTIONS, ListenError, bind

log = logging.getLogger("streamer")

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
LOG_FORMATS = ("text", "json")
# Each command reads its own variables: `serve` and `puller` often share one
# environment (the demo, a test machine) and must not read each other's
# --listen.
SERVE_ENV, PULLER_ENV, DEMO_ENV = "STREAMER_", "STREAMER_PULLER_", "STREAMER_DEMO_"
# Bounds that keep a typo from becoming a run that never ends.
MAX_DEMO_SUBSCRIPTIONS = 10_000_000
MAX_DEMO_SECONDS = 86_400.0


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return streamer.__version__


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="streamer",
        description="The fan-out and matching engine between a Puller and its gateways.",
        epilog=commands_epilog(
            (("serve", SERVE_ENV), ("puller", PULLER_ENV), ("demo", DEMO_ENV))
        ),
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()} ({DISTRIBUTION})"
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    _add_serve(commands)
    _add_puller(commands)
    _add_demo(commands)
    bench = commands.add_parser(
        "bench", help="run a benchmark",
        description="Benchmarks of the service as shipped (see docs/benchmarks.md).",
    )
    benches = bench.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    e2e = benches.add_parser(
        "e2e", help="Puller, Streamer and gateways as processes on loopback",
        description="The end-to-end benchmark: per offered rate, events/s sustained, "
        "deliveries/s, Puller→gateway latency, Streamer CPU and RSS, against a "
        "pass-through relay; batching and plain gateways. Pins the Streamer to CPU 1 "
        "and everything else to CPU 0.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    from streamer.tools import benchmark

    benchmark.add_arguments(e2e)
    return parser


def _add_serve(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    serve = commands.add_parser(
        "serve",
        help="run the Streamer service",
        description="Serve syntrix.streamer.v1 to gateways and consume a puller.v1 Puller.",
        epilog="Each option also reads STREAMER_<OPTION> from the environment, "
        "e.g. STREAMER_SESSION_TTL=30; a flag given here wins. A bad value in either, "
        "an address that cannot be served, or a state directory that is in use or "
        "cannot be written is an error at start (exit code 2). SIGTERM/SIGINT stop "
        "ingest, flush the progress marker, end each gateway stream once its queue "
        "is written (waiting at most --drain-seconds) and exit 0.",
    )
    opts = Options(serve, SERVE_ENV)
    opts.add("--listen", address, default=("127.0.0.1", 50052), metavar="HOST:PORT",
             help="where the gateway-facing gRPC server listens; port 0 picks a free one")
    opts.add("--puller", target, required=True, metavar="HOST:PORT",
             help="the Puller (puller.v1)")
    opts.add("--state-dir", Path, default=Path("streamer-state"), metavar="DIR",
             help="directory of the durable progress marker, created if missing; one "
             "process per directory")
    opts.add("--session-ttl", real(0, above=True), default=90.0, metavar="SECONDS",
             help="seconds of silence after which a gateway session expires")
    opts.add("--document-layout", one_of(*LAYOUTS), default="plain",
             help="how Puller documents are laid out: plain (the change stream's document "
             "as is) or syntrix (Syntrix stored documents, matched on their data); see "
             "docs/semantics.md")
    opts.add("--gateway-queue", integer(1), default=DEFAULT_CAPACITY, metavar="MESSAGES",
             help="messages queued per gateway before it is cut off as lagging")
    opts.add("--resume-grace", real(0), default=3.0, metavar="SECONDS",
             help="after a restart with a saved marker, seconds to hold ingest so "
             "gateways can re-register first (0: do not wait); ends early once every "
             "gateway known before the restart has said Hello, re-subscribed and sent a "
             "Heartbeat")
    opts.add("--consumer-id", nonempty, default="streamer", metavar="ID",
             help="consumer id sent to the Puller")
    opts.add("--drain-seconds", real(0), default=5.0, metavar="SECONDS",
             help="on SIGTERM/SIGINT, the most time gateways still being sent their "
             "queued messages get; idle gateways' streams end at once")
    opts.add("--auth-token-file", existing_file, metavar="FILE",
             help="file holding the shared token gateways must send as "
             "'authorization: Bearer <token>'; unset, gateways are not authenticated")
    limits = Limits()
    opts.add("--max-subscriptions", integer(1), default=limits.max_subscriptions, metavar="N",
             help="subscriptions one gateway stream may hold; more are refused with code "
             "resource_exhausted")
    opts.add("--max-filters", integer(1), default=limits.max_filters, metavar="N",
             help="filters in one subscribe request; more are refused (resource_exhausted)")
    opts.add("--max-expression-length", integer(1, MAX_EXPRESSION_LENGTH),
             default=limits.max_expression_length, metavar="CHARS",
             help="characters of one CEL expression; longer ones are refused "
             f"(resource_exhausted); at most {MAX_EXPRESSION_LENGTH}, the CEL parser's own bound")
    opts.add("--metrics", address, metavar="HOST:PORT",
             help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics; unset, "
             "there is no metrics endpoint")
    opts.add("--tls-cert", existing_file, metavar="FILE",
             help="PEM certificate chain of the gateway-facing server; with --tls-key "
             "gateways must connect with TLS; unset, they connect in plaintext")
    opts.add("--tls-key", existing_file, metavar="FILE",
             help="PEM private key (unencrypted) of --tls-cert")
    opts.add("--tls-client-ca", existing_file, metavar="FILE",
             help="PEM CA certificate(s); enables mutual TLS: gateways must present a "
             "client certificate signed by one of them (needs --tls-cert and --tls-key)")
    opts.add("--puller-tls-ca", existing_file, metavar="FILE",
             help="PEM CA certificate(s) to verify the Puller by; connect to the Puller with "
             "TLS; unset, in plaintext")
    _add_logging(opts)
    serve.set_defaults(options=opts)


def _add_logging(opts: Options) -> None:
    opts.add("--log-level", one_of(*LOG_LEVELS, fold=str.upper), default="INFO",
             help="log verbosity")
    opts.add("--log-format", one_of(*LOG_FORMATS, fold=str.lower), default="text",
             help="log lines on stderr: text, or json (one object per line)")


def _add_demo(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    from streamer.tools import demo

    parser = commands.add_parser(
        "demo",
        help="run Puller, Streamer and gateways on loopback, then verify every delivery",
        description="Start, on loopback, the reference Puller with the chat workload, the "
        "Streamer and simulated gateways (separate processes) holding the workload's "
        "subscriptions; run for --duration seconds with a live display (events/s, "
        "deliveries/s, p99 latency, subscriptions), then print a summary and check that "
        "every gateway received exactly the events its subscriptions should have, in "
        "order (against the Puller's log, matched by the index and, for a sample, by the "
        "linear reference matcher).",
        epilog="Each option also reads STREAMER_DEMO_<OPTION> from the environment, e.g. "
        "STREAMER_DEMO_RATE=500; a flag given here wins. Exit code 0 when the verification "
        "passed, 1 when it failed or a process did not start, 2 for bad options, 130 after "
        "Ctrl-C (everything it started is stopped first).",
    )
    opts = Options(parser, DEMO_ENV)
    opts.add("--subscriptions", integer(1, MAX_DEMO_SUBSCRIPTIONS),
             default=demo.DEFAULT_SUBSCRIPTIONS, metavar="N",
             help="subscriptions of the chat workload, spread over the gateways")
    opts.add("--gateways", integer(1, 64), default=demo.DEFAULT_GATEWAYS, metavar="G",
             help="simulated gateway processes")
    opts.add("--rate", real(0, MAX_RATE, above=True), default=demo.DEFAULT_RATE,
             metavar="EVENTS", help="events per second the Puller emits")
    opts.add("--duration", real(0, MAX_DEMO_SECONDS, above=True),
             default=demo.DEFAULT_DURATION, metavar="SECONDS",
             help="seconds the Puller runs, after every subscription is registered")
    opts.add("--seed", integer(), default=demo.DEFAULT_SEED, metavar="N",
             help="seed of the workload (subscriptions and events)")
    opts.add("--plot", Path, metavar="FILE",
             help="write a PNG of the latency (p50/p99 per second) to FILE; needs matplotlib "
             f"(pip install '{DISTRIBUTION}[plot]')")
    opts.add("--work-dir", Path, metavar="DIR",
             help="keep the Puller's log, the Streamer's state, every process's log and the "
             "gateways' delivery records in DIR (must be empty or new); unset, a temporary "
             "directory removed at the end (it holds demo.pid: a later demo removes such "
             "directories whose demo was killed)")
    parser.set_defaults(options=opts)


def _check_demo(args: argparse.Namespace) -> None:
    """What the demo needs beyond each option's own range, checked before
    anything starts (a run must not fail at its end for a bad option)."""
    parser: ArgumentParser = args.options.parser
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error(f"--plot needs matplotlib: pip install '{DISTRIBUTION}[plot]'")
        if not args.plot.parent.is_dir():
            parser.error(f"--plot {args.plot}: no directory {args.plot.parent}")
    if args.work_dir is not None and args.work_dir.exists():
        if not args.work_dir.is_dir():
            parser.error(f"--work-dir {args.work_dir}: not a directory")
        if any(args.work_dir.iterdir()):
            parser.error(f"--work-dir {args.work_dir}: not empty")


def _add_puller(commands: argparse._SubParsersAction[ArgumentParser]) -> None:
    puller = commands.add_parser(
        "puller",
        help="run the reference Puller",
        description="Serve syntrix.puller.v1 from a durable replay log filled by one "
        "source: a MongoDB change stream, the chat workload or a replay file.",
        epilog="Each option also reads STREAMER_PULLER_<OPTION> from the environment, "
        "e.g. STREAMER_PULLER_LOG_DIR=/var/lib/puller; a flag given here wins. "
        "Markers are v1:<log id>:<position>, opaque to consumers; a marker older "
        "than the retention, or from another log, is refused with INVALID_ARGUMENT. "
        "A bad value, an address that cannot be served or a log directory in use by "
        "another process is an error at start (exit code 2). "
        "SIGTERM/SIGINT stop the source, finish the append in flight, end the "
        "streams and exit 0.",
    )
    opts = Options(puller, PULLER_ENV)
    opts.add("--listen", address, default=("127.0.0.1", 50051), metavar="HOST:PORT",
             help="where the puller.v1 gRPC server listens; port 0 picks a free one")
    opts.add("--log-dir", Path, default=Path("puller-log"), metavar="DIR",
             help="directory of the replay log (kept across restarts; one process per "
             "directory)")
    opts.add("--retention-bytes", integer(1), default=1 << 30, metavar="BYTES",
             help="the log keeps about this many bytes (whole segments are dropped)")
    opts.add("--retention-seconds", real(0, above=True), default=3600.0, metavar="SECONDS",
             help="events older than this are dropped (whole segments)")
    opts.add("--heartbeat-seconds", real(0, above=True), default=5.0, metavar="SECONDS",
             help="a stream that sent nothing for this long gets a heartbeat with its marker")
    # Exactly one source (checked after resolving, so that a variable can
    # name it too).
    sources = puller.add_mutually_exclusive_group()
    opts.add("--mongodb", nonempty, metavar="URI", group=sources,
             help="source: the change stream of a MongoDB replica set (needs --db; the "
             f"'mongodb' extra: pip install '{DISTRIBUTION}[mongodb]'); the resume token is "
             "kept in the log, so a restart continues where it stopped")
    opts.add("--workload", one_of("chat"), group=sources,
             help="source: the seeded reference workload (docs/workload.md) at --rate "
             "events/s")
    opts.add("--replay", existing_file, metavar="FILE", group=sources,
             help="source: the change events of a JSON-lines replay file (format in the "
             "README), at --rate events/s if given, else as fast as the log takes them")
    opts.add("--db", nonempty, metavar="NAME", help="--mongodb: the database to watch")
    opts.add("--collections", nonempty, metavar="A,B",
             help="--mongodb: only these collections (comma-separated); unset, all")
    opts.add("--rate", real(0, MAX_RATE, above=True), metavar="EVENTS",
             help="events per second of the source (--workload: default 1000)")
    opts.add("--seed", integer(), default=1, metavar="N", help="seed of --workload")
    opts.add("--stamp-event-ids", switch=True,
             help="benchmarking aid for --workload: event ids become ev-<n>-<emit time in "
             "ns since the epoch>, so gateways can measure latency finer than the "
             "millisecond ChangeEvent.timestamp (ids are opaque to the Streamer)")
    opts.add("--cycle", integer(0), default=0, metavar="K",
             help="benchmarking aid for --workload: generate the first K events once and "
             "repeat them (new ids and timestamps), so the Puller can offer high rates; "
             "0: generate every event")
    opts.add("--no-subscribe-batch", switch=True,
             help="answer SubscribeBatch with UNIMPLEMENTED, as a Syntrix Puller does, so "
             "consumers fall back to one event per message (benchmarks of unbatched ingest)")
    opts.add("--record", Path, metavar="FILE",
             help="also append every event, once durable, to FILE in the replay format")
    _add_logging(opts)
    puller.set_defaults(options=opts)


def _puller_source(args: argparse.Namespace) -> Source:
    """The one source the options name (a usage error otherwise)."""
    parser: ArgumentParser = args.options.parser
    named = [
        flag for flag, value in (
            ("--workload", args.workload), ("--replay", args.replay), ("--mongodb", args.mongodb)
        ) if value is not None
    ]
    if len(named) != 1:
        parser.error(
            "give exactly one source: --workload chat, --replay FILE or --mongodb URI"
            + (f" (got {' and '.join(named)})" if named else "")
        )
    if (args.db is not None or args.collections is not None) and args.mongodb is None:
        parser.error("--db and --collections go with --mongodb")
    if args.replay is not None:
        return ReplaySource(args.replay, args.rate)
    if args.mongodb is not None:
        if not args.db:
            parser.error("--mongodb needs --db NAME")
        try:
            from streamer.puller.mongo import MongoSource
        except ImportError as exc:
            parser.error(f"--mongodb needs pymongo: pip install '{DISTRIBUTION}[mongodb]' "
                         f"({exc})")
        collections = [c for c in args.collections.split(",") if c] if args.collections else None
        return MongoSource(args.mongodb, args.db, collections)
    return WorkloadSource(
        1000.0 if args.rate is None else args.rate, args.seed,
        stamp_event_ids=args.stamp_event_ids, cycle=args.cycle,
    )


async def puller(args: argparse.Namespace, source: Source) -> int:
    try:
        replay_log = ReplayLog(
            args.log_dir, max_bytes=args.retention_bytes, max_age=args.retention_seconds
        )
    except (LogError, OSError) as exc:
        log.error("cannot open the replay log: %s", exc)
        return 2
    servicer = PullerServicer(
        replay_log, heartbeat=args.heartbeat_seconds,
        subscribe_batch=not args.no_subscribe_batch,
    )
    server = grpc.aio.server(options=SERVER_OPTIONS)
    add_puller_to_server(servicer, server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = bind(server, *args.listen)
    except ListenError as exc:
        log.error("%s", exc)
        replay_log.close()
        return 2
    try:
        recorder = Recorder(args.record) if args.record is not None else None
    except OSError as exc:
        log.error("cannot write --record %s: %s", args.record, exc)
        replay_log.close()
        return 2

    async def emit(batch: Sequence[tuple[ChangeEvent, bytes]]) -> None:
        await servicer.append(batch)

    await server.start()
    for name in ("", PULLER_SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "puller serving on %s (port %d); log %s holds positions %d-%d (log id %s)",
        join(*args.listen), port, args.log_dir, replay_log.first_position,
        replay_log.last_position, replay_log.log_id,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    running = asyncio.create_task(
        source.run(recorder.wrap(emit) if recorder else emit, replay_log.last_source_state()),
        name="source",
    )
    stopping = asyncio.create_task(stop.wait())
    await asyncio.wait((running, stopping), return_when=asyncio.FIRST_COMPLETED)
    code = 0
    if running.done() and not stop.is_set():
        failure = running.exception()
        if isinstance(failure, ResumePointLost):
            log.error("%s; move the log directory away to start from the present", failure)
            code = 1
        elif failure is not None:
            log.error("the source failed: %r", failure)
            code = 1
        else:
            log.info("the source has ended; serving the log until SIGTERM")
            await stop.wait()
    log.info("stopping: the source, then the append in flight, then the streams")
    await health_servicer.enter_graceful_shutdown()
    running.cancel()
    with contextlib.suppress(asyncio.CancelledError, Exception):
        await running
    stopping.cancel()
    # Consumers get every event in the log before their streams end.
    if not await servicer.drain(timeout=2.0):
        log.warning("some consumers had not read the whole log when the streams ended")
    replay_log.close()
    if recorder is not None:
        recorder.close()
    await server.stop(grace=1)
    log.info("stopped at position %d", replay_log.last_position)
    return code


async def serve(args: argparse.Namespace) -> int:
    interceptors = []
    try:
        if args.auth_token_file is not None:
            interceptors.append(TokenAuth(read_token(args.auth_token_file)))
        credentials, puller_credentials = _credentials(args)
    except (TokenFileError, CredentialsError) as exc:
        log.error("%s", exc)
        return 2
    progress = ProgressStore(args.state_dir)
    try:
        saved = progress.open()
    except ProgressFileError as exc:
        log.error("%s; move it away to start from the live head", exc)
        return 2
    except OSError as exc:  # in use by another process, not writable, not a directory
        log.error("%s", exc)
        return 2
    matcher = Matcher()
    registry = GatewayRegistry(
        matcher,
        session_ttl=args.session_ttl,
        limits=Limits(args.max_subscriptions, args.max_filters, args.max_expression_length),
    )
    servicer = StreamerServicer(registry, queue_capacity=args.gateway_queue)
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    add_to_server(servicer, server)
    # The standard health service: SERVING overall and for StreamerService
    # while running; NOT_SERVING as soon as shutdown begins.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    try:
        port = bind(server, args.listen[0], args.listen[1], credentials)
    except ListenError as exc:
        log.error("%s", exc)
        progress.close()
        return 2
    ingest = Ingest(
        args.puller, registry, servicer, progress,
        consumer_id=args.consumer_id, layout=args.document_layout,
        credentials=puller_credentials,
    )
    metrics = None
    if args.metrics is not None:
        try:
            metrics = MetricsServer(*args.metrics, StreamerCollector(ingest))
        except MetricsError as exc:
            log.error("%s", exc)
            await server.stop(None)
            progress.close()
            return 2
        log.info("metrics on http://%s/metrics", metrics.address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    _log_transport(args)
    log.info(
        "serving on %s (port %d); puller %s; resuming after %r",
        join(*args.listen), port, args.puller, saved.marker,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tasks = [
        asyncio.create_task(
            _ingest_after_restart_window(ingest, registry, progress, saved, args.resume_grace),
            name="ingest",
        ),
        asyncio.create_task(progress.run(), name="progress"),
        asyncio.create_task(_sweep(registry, servicer), name="sweeper"),
    ]
    await stop.wait()
    log.info("stopping: ingest first, then the marker, then the gateway streams")
    await health_servicer.enter_graceful_shutdown()
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(asyncio.CancelledError):
            await task
    await progress.flush()
    # Streams end as soon as their queues are written: only gateways still
    # being written to hold the drain, up to --drain-seconds.
    servicer.shutdown()
    await server.stop(grace=args.drain_seconds)
    # A handler still running when the event loop closes gets cancelled,
    # which gRPC logs as an error with a traceback.
    await servicer.wait_closed(timeout=1.0)
    if metrics is not None:
        await asyncio.to_thread(metrics.close)
    log.info("stopped at marker %r", progress.marker)
    return 0


async def _ingest_after_restart_window(
    ingest: Ingest,
    registry: GatewayRegistry,
    progress: ProgressStore,
    saved: SavedProgress,
    grace: float,
) -> None:
    """Hold ingest until the gateways known before a restart are back (or
    ``grace`` has passed), then run it."""
    if saved.marker and grace > 0:
        # Until the window closes the progress file keeps the gateways of
        # the previous run: a crash now must wait for all of them again.
        window = registry.window = RestartWindow(saved.gateways)
        log.info(
            "restart window: holding ingest up to %g s for %d gateway(s) with Hello "
            "and %d without", grace, len(saved.gateways.ids), saved.gateways.others,
        )
        if await window.wait(grace):
            log.info("restart window: every known gateway re-registered")
        else:
            log.info(
                "restart window: grace elapsed; not back: %s",
                ", ".join(sorted(window.pending)) or "only gateways without Hello",
            )
        registry.window = None
    registry.on_known = progress.set_gateways
    progress.set_gateways(registry.known)
    await ingest.run()
def _credentials(
    args: argparse.Namespace,
) -> tuple[grpc.ServerCredentials | None, grpc.ChannelCredentials | None]:
    """The gateway-facing server's TLS credentials and the Puller channel's
    (None: plaintext), from the --tls-* and --puller-tls-ca files."""
    if args.tls_cert is None and args.tls_key is None:
        if args.tls_client_ca is not None:
            raise CredentialsError("--tls-client-ca needs --tls-cert and --tls-key")
        server = None
    elif args.tls_key is None:
        raise CredentialsError("--tls-cert needs --tls-key (or STREAMER_TLS_KEY)")
    elif args.tls_cert is None:
        raise CredentialsError("--tls-key needs --tls-cert (or STREAMER_TLS_CERT)")
    else:
        server = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
    puller = None if args.puller_tls_ca is None else channel_credentials(args.puller_tls_ca)
    return server, puller


def _log_transport(args: argparse.Namespace) -> None:
    """Say how gateways and the Puller are reached (once serving: a start
    that fails says only why)."""
    if args.tls_cert is None:
        log.info("gateways connect in plaintext (no --tls-cert)")
    elif args.tls_client_ca is None:
        log.info("gateways connect with TLS (certificate %s)", args.tls_cert)
    else:
        log.info(
            "gateways connect with mutual TLS (certificate %s; client certificates "
            "signed by %s required)", args.tls_cert, args.tls_client_ca,
        )
    if args.puller_tls_ca is not None:
        log.info("the Puller is reached with TLS (CA %s)", args.puller_tls_ca)


async def _sweep(registry: GatewayRegistry, servicer: StreamerServicer) -> None:
    """Expire silent gateway sessions (only the expired ones are looked at)."""
    while True:
        await asyncio.sleep(max(registry.session_ttl / 10, 0.05))
        for session in registry.expired():
            servicer.close(session)
            log.info("session of gateway %s expired", session.gateway_id or session.key)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "bench":
        from streamer.tools import benchmark

        return benchmark.bench_main(args)
    args.options.resolve(args)
    if args.command == "demo":
        from streamer.tools import demo

        _check_demo(args)
        configure_logging("WARNING", "text")
        return demo.main(args)
    if args.command == "puller":
        source = _puller_source(args)
        configure_logging(args.log_level, args.log_format)
        return asyncio.run(puller(args, source))
    configure_logging(args.log_level, args.log_format)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
