"""The ``streamer`` command line: ``streamer serve`` runs the service,
``streamer puller`` the reference Puller (``streamer.puller``), ``streamer
demo`` the three together on loopback (``streamer.demo``).

Every option can also be set through an environment variable named
``STREAMER_<OPTION>`` (``--session-ttl`` → ``STREAMER_SESSION_TTL``); a flag
given on the command line wins.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamer.auth import (
    CredentialsError,
    TokenAuth,
    TokenFileError,
    channel_credentials,
    read_token,
    server_credentials,
)
from streamer.delivery import DEFAULT_CAPACITY
from streamer.errors import ResumePointLost
from streamer.events import LAYOUTS
from streamer.gateways import GatewayRegistry, Limits, RestartWindow
from streamer.ingest import Ingest
from streamer.logs import configure_logging
from streamer.matcher import Matcher
from streamer.metrics import MetricsError, MetricsServer, StreamerCollector, metrics_address
from streamer.progress import ProgressFileError, ProgressStore, SavedProgress
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.puller.log import LogError, ReplayLog
from streamer.puller.server import SERVICE_NAME as PULLER_SERVICE_NAME
from streamer.puller.server import PullerServicer
from streamer.puller.server import add_to_server as add_puller_to_server
from streamer.puller.sources import Recorder, ReplaySource, Source, WorkloadSource
from streamer.server import SERVICE_NAME, StreamerServicer, add_to_server
from streamer.transport import SERVER_OPTIONS

log = logging.getLogger("streamer")


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(f"STREAMER_{name.upper().replace('-', '_')}", default)


def _puller_env(name: str, default: str | None = None) -> str | None:
    # Its own prefix: `serve` and `puller` often share one environment (the
    # demo, a test machine), and must not read each other's --listen.
    return _env(f"puller_{name}", default)


def _demo_env(name: str, default: str | None = None) -> str | None:
    return _env(f"demo_{name}", default)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except for options that are off unless given."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="streamer",
        description="The fan-out and matching engine between a Puller and its gateways.",
        epilog="Each option also reads STREAMER_<OPTION> from the environment.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    serve = commands.add_parser(
        "serve",
        help="run the Streamer service",
        description="Serve syntrix.streamer.v1 to gateways and consume a puller.v1 Puller.",
        epilog="Each option also reads STREAMER_<OPTION> from the environment, "
        "e.g. STREAMER_SESSION_TTL=30; a flag given here wins. "
        "SIGTERM/SIGINT stop ingest, flush the progress marker, drain the "
        "gateway queues for --drain-seconds and exit 0.",
        formatter_class=_HelpFormatter,
    )
    serve.add_argument(
        "--listen", default=_env("listen", "127.0.0.1:50052"), metavar="HOST:PORT",
        help="HOST:PORT the gateway-facing gRPC server binds",
    )
    serve.add_argument(
        "--puller", default=_env("puller"), required=_env("puller") is None, metavar="HOST:PORT",
        help="HOST:PORT of the Puller (puller.v1)",
    )
    serve.add_argument(
        "--state-dir", type=Path, default=_env("state_dir", "streamer-state"), metavar="DIR",
        help="directory of the durable progress marker",
    )
    serve.add_argument(
        "--session-ttl", type=float, default=_env("session_ttl", "90"), metavar="SECONDS",
        help="seconds of silence after which a gateway session expires",
    )
    serve.add_argument(
        "--document-layout", choices=LAYOUTS, default=_env("document_layout", "plain"),
        help="how Puller documents are laid out (SPEC section 4)",
    )
    serve.add_argument(
        "--gateway-queue", type=int, default=_env("gateway_queue", str(DEFAULT_CAPACITY)),
        metavar="MESSAGES",
        help="messages queued per gateway before it is cut off as lagging",
    )
    serve.add_argument(
        "--resume-grace", type=float, default=_env("resume_grace", "3"), metavar="SECONDS",
        help="after a restart with a saved marker, seconds to hold ingest so "
        "gateways can re-register first; ends early once every gateway known "
        "before the restart has said Hello, re-subscribed and sent a Heartbeat",
    )
    serve.add_argument(
        "--consumer-id", default=_env("consumer_id", "streamer"), metavar="ID",
        help="consumer id sent to the Puller",
    )
    serve.add_argument(
        "--drain-seconds", type=float, default=_env("drain_seconds", "5"), metavar="SECONDS",
        help="on SIGTERM/SIGINT, how long queued messages may still be sent",
    )
    serve.add_argument(
        "--auth-token-file", type=Path, default=_env("auth_token_file"), metavar="FILE",
        help="file holding the shared token gateways must send as "
        "'authorization: Bearer <token>'; unset, gateways are not authenticated",
    )
    limits = Limits()
    serve.add_argument(
        "--max-subscriptions", type=int, metavar="N",
        default=_env("max_subscriptions", str(limits.max_subscriptions)),
        help="subscriptions one gateway stream may hold; more are refused "
        "with code resource_exhausted",
    )
    serve.add_argument(
        "--max-filters", type=int, metavar="N",
        default=_env("max_filters", str(limits.max_filters)),
        help="filters in one subscribe request; more are refused (resource_exhausted)",
    )
    serve.add_argument(
        "--max-expression-length", type=int, metavar="CHARS",
        default=_env("max_expression_length", str(limits.max_expression_length)),
        help="characters of one CEL expression; longer ones are refused (resource_exhausted)",
    )
    serve.add_argument(
        "--metrics", type=metrics_address, default=_env("metrics"), metavar="HOST:PORT",
        help="serve Prometheus metrics over HTTP at http://HOST:PORT/metrics; "
        "unset, there is no metrics endpoint",
    )
    serve.add_argument(
        "--tls-cert", type=Path, default=_env("tls_cert"), metavar="FILE",
        help="PEM certificate chain of the gateway-facing server; with --tls-key "
        "gateways must connect with TLS; unset, they connect in plaintext",
    )
    serve.add_argument(
        "--tls-key", type=Path, default=_env("tls_key"), metavar="FILE",
        help="PEM private key (unencrypted) of --tls-cert",
    )
    serve.add_argument(
        "--tls-client-ca", type=Path, default=_env("tls_client_ca"), metavar="FILE",
        help="PEM CA certificate(s); enables mutual TLS: gateways must present a "
        "client certificate signed by one of them (needs --tls-cert and --tls-key)",
    )
    serve.add_argument(
        "--puller-tls-ca", type=Path, default=_env("puller_tls_ca"), metavar="FILE",
        help="PEM CA certificate(s) to verify the Puller by; connect to the Puller "
        "with TLS; unset, in plaintext",
    )
    serve.add_argument(
        "--log-level", default=_env("log_level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity",
    )
    serve.add_argument(
        "--log-format", default=_env("log_format", "text"), choices=["text", "json"],
        help="log lines on stderr: text, or json (one object per line)",
    )
    _add_puller(commands)
    _add_demo(commands)
    bench = commands.add_parser(
        "bench", help="run a benchmark",
        description="Benchmarks of the service as shipped (see the README).",
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
    from streamer import benchmark

    benchmark.add_arguments(e2e)
    return parser


def _add_demo(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    from streamer import demo

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
        formatter_class=_HelpFormatter,
    )
    parser.add_argument(
        "--subscriptions", type=int, metavar="N",
        default=_demo_env("subscriptions", str(demo.DEFAULT_SUBSCRIPTIONS)),
        help="subscriptions of the chat workload, spread over the gateways",
    )
    parser.add_argument(
        "--gateways", type=int, metavar="G",
        default=_demo_env("gateways", str(demo.DEFAULT_GATEWAYS)),
        help="simulated gateway processes",
    )
    parser.add_argument(
        "--rate", type=float, metavar="EVENTS",
        default=_demo_env("rate", str(demo.DEFAULT_RATE)),
        help="events per second the Puller emits",
    )
    parser.add_argument(
        "--duration", type=float, metavar="SECONDS",
        default=_demo_env("duration", str(demo.DEFAULT_DURATION)),
        help="seconds the Puller runs, after every subscription is registered",
    )
    parser.add_argument(
        "--seed", type=int, metavar="N", default=_demo_env("seed", str(demo.DEFAULT_SEED)),
        help="seed of the workload (subscriptions and events)",
    )
    parser.add_argument(
        "--plot", type=Path, metavar="FILE", default=_demo_env("plot"),
        help="write a PNG of the latency (p50/p99 per second) to FILE; needs matplotlib "
        "(pip install 'streamer[plot]')",
    )
    parser.add_argument(
        "--work-dir", type=Path, metavar="DIR", default=_demo_env("work_dir"),
        help="keep the Puller's log, the Streamer's state, every process's log and the "
        "gateways' delivery records in DIR (must be empty or new); unset, a temporary "
        "directory removed at the end",
    )
    parser.set_defaults(parser=parser)


def _check_demo(args: argparse.Namespace) -> None:
    parser: argparse.ArgumentParser = args.parser
    if args.subscriptions < 1:
        parser.error(f"--subscriptions must be at least 1, not {args.subscriptions}")
    if not 1 <= args.gateways <= 64:
        parser.error(f"--gateways must be between 1 and 64, not {args.gateways}")
    if not args.rate > 0:
        parser.error(f"--rate must be positive, not {args.rate:g}")
    if not args.duration > 0:
        parser.error(f"--duration must be positive, not {args.duration:g}")


def _add_puller(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    puller = commands.add_parser(
        "puller",
        help="run the reference Puller",
        description="Serve syntrix.puller.v1 from a durable replay log filled by one "
        "source: the chat workload or a replay file.",
        epilog="Each option also reads STREAMER_PULLER_<OPTION> from the environment, "
        "e.g. STREAMER_PULLER_LOG_DIR=/var/lib/puller; a flag given here wins. "
        "Markers are v1:<log id>:<position>, opaque to consumers; a marker older "
        "than the retention, or from another log, is refused with INVALID_ARGUMENT. "
        "SIGTERM/SIGINT stop the source, finish the append in flight, end the "
        "streams and exit 0.",
        formatter_class=_HelpFormatter,
    )
    puller.add_argument(
        "--listen", default=_puller_env("listen", "127.0.0.1:50051"), metavar="HOST:PORT",
        help="HOST:PORT the puller.v1 gRPC server binds",
    )
    puller.add_argument(
        "--log-dir", type=Path, default=_puller_env("log_dir", "puller-log"), metavar="DIR",
        help="directory of the replay log (kept across restarts)",
    )
    puller.add_argument(
        "--retention-bytes", type=int, default=_puller_env("retention_bytes", str(1 << 30)),
        metavar="BYTES", help="the log keeps about this many bytes (whole segments are dropped)",
    )
    puller.add_argument(
        "--retention-seconds", type=float, default=_puller_env("retention_seconds", "3600"),
        metavar="SECONDS", help="events older than this are dropped (whole segments)",
    )
    puller.add_argument(
        "--heartbeat-seconds", type=float, default=_puller_env("heartbeat_seconds", "5"),
        metavar="SECONDS",
        help="a stream that sent nothing for this long gets a heartbeat with its marker",
    )
    # Exactly one source (checked after parsing, so that STREAMER_* can name
    # it too).
    sources = puller.add_mutually_exclusive_group()
    sources.add_argument(
        "--mongodb", default=_puller_env("mongodb"), metavar="URI",
        help="source: the change stream of a MongoDB replica set (needs --db; "
        "the 'mongodb' extra: pip install 'streamer[mongodb]'); the resume token "
        "is kept in the log, so a restart continues where it stopped",
    )
    sources.add_argument(
        "--workload", choices=["chat"], default=_puller_env("workload"),
        help="source: the seeded reference workload (WORKLOAD.md) at --rate events/s",
    )
    sources.add_argument(
        "--replay", type=Path, default=_puller_env("replay"), metavar="FILE",
        help="source: the change events of a JSON-lines replay file (format in the README), "
        "at --rate events/s if given, else as fast as the log takes them",
    )
    puller.add_argument(
        "--db", default=_puller_env("db"), metavar="NAME",
        help="--mongodb: the database to watch",
    )
    puller.add_argument(
        "--collections", default=_puller_env("collections"), metavar="A,B",
        help="--mongodb: only these collections (comma-separated); unset, all",
    )
    puller.add_argument(
        "--rate", type=float, default=_puller_env("rate"), metavar="EVENTS",
        help="events per second of the source (--workload: default 1000)",
    )
    puller.add_argument(
        "--seed", type=int, default=_puller_env("seed", "1"), metavar="N",
        help="seed of --workload",
    )
    puller.add_argument(
        "--stamp-event-ids", action="store_true",
        default=_puller_env("stamp_event_ids", "") not in ("", "0", "false"),
        help="benchmarking aid for --workload: event ids become ev-<n>-<emit time in ns "
        "since the epoch>, so gateways can measure latency finer than the "
        "millisecond ChangeEvent.timestamp (ids are opaque to the Streamer)",
    )
    puller.add_argument(
        "--cycle", type=int, default=_puller_env("cycle", "0"), metavar="K",
        help="benchmarking aid for --workload: generate the first K events once and "
        "repeat them (new ids and timestamps), so the Puller can offer high rates; "
        "0: generate every event",
    )
    puller.add_argument(
        "--no-subscribe-batch", action="store_true",
        default=_puller_env("no_subscribe_batch", "") not in ("", "0", "false"),
        help="answer SubscribeBatch with UNIMPLEMENTED, as a Syntrix Puller does, so "
        "consumers fall back to one event per message (benchmarks of unbatched ingest)",
    )
    puller.add_argument(
        "--record", type=Path, default=_puller_env("record"), metavar="FILE",
        help="also append every event, once durable, to FILE in the replay format",
    )
    puller.add_argument(
        "--log-level", default=_puller_env("log_level", "INFO"),
        choices=["DEBUG", "INFO", "WARNING", "ERROR"], help="log verbosity",
    )
    puller.add_argument(
        "--log-format", default=_puller_env("log_format", "text"), choices=["text", "json"],
        help="log lines on stderr: text, or json (one object per line)",
    )
    puller.set_defaults(parser=puller)


def _puller_source(args: argparse.Namespace) -> Source:
    """The one source the flags name (a usage error otherwise)."""
    parser: argparse.ArgumentParser = args.parser
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
    if args.rate is not None and args.rate <= 0:
        parser.error(f"--rate must be positive, not {args.rate:g}")
    if args.retention_bytes <= 0 or args.retention_seconds <= 0 or args.heartbeat_seconds <= 0:
        parser.error("--retention-bytes, --retention-seconds and --heartbeat-seconds "
                     "must be positive")
    if args.replay is not None:
        if not args.replay.is_file():
            parser.error(f"--replay {args.replay}: no such file")
        return ReplaySource(args.replay, args.rate)
    if args.mongodb is not None:
        if not args.db:
            parser.error("--mongodb needs --db NAME")
        try:
            from streamer.puller.mongo import MongoSource
        except ImportError as exc:
            parser.error(f"--mongodb needs pymongo: pip install 'streamer[mongodb]' ({exc})")
        collections = [c for c in (args.collections or "").split(",") if c] or None
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
    port = server.add_insecure_port(args.listen)
    if port == 0:
        log.error("cannot listen on %s", args.listen)
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
        args.listen, port, args.log_dir, replay_log.first_position,
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
    progress = ProgressStore(args.state_dir)
    try:
        saved = progress.load()
    except ProgressFileError as exc:
        log.error("%s; move it away to start from the live head", exc)
        return 2
    matcher = Matcher()
    registry = GatewayRegistry(
        matcher,
        session_ttl=args.session_ttl,
        limits=Limits(args.max_subscriptions, args.max_filters, args.max_expression_length),
    )
    servicer = StreamerServicer(registry, queue_capacity=args.gateway_queue)
    interceptors = []
    if args.auth_token_file is not None:
        try:
            interceptors.append(TokenAuth(read_token(args.auth_token_file)))
        except TokenFileError as exc:
            log.error("%s", exc)
            return 2
    try:
        credentials, puller_credentials = _credentials(args)
    except CredentialsError as exc:
        log.error("%s", exc)
        return 2
    server = grpc.aio.server(interceptors=interceptors, options=SERVER_OPTIONS)
    add_to_server(servicer, server)
    # The standard health service: SERVING overall and for StreamerService
    # while running; NOT_SERVING as soon as shutdown begins.
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    port = (
        server.add_insecure_port(args.listen) if credentials is None
        else server.add_secure_port(args.listen, credentials)
    )
    if port == 0:
        log.error("cannot listen on %s", args.listen)
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
            return 2
        log.info("metrics on http://%s/metrics", metrics.address)
    await server.start()
    for name in ("", SERVICE_NAME):
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    log.info(
        "serving on %s (port %d); puller %s; resuming after %r",
        args.listen, port, args.puller, saved.marker,
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
        log.info("gateways connect in plaintext (no --tls-cert)")
    elif args.tls_key is None:
        raise CredentialsError("--tls-cert needs --tls-key (or STREAMER_TLS_KEY)")
    elif args.tls_cert is None:
        raise CredentialsError("--tls-key needs --tls-cert (or STREAMER_TLS_CERT)")
    else:
        server = server_credentials(args.tls_cert, args.tls_key, args.tls_client_ca)
        if args.tls_client_ca is None:
            log.info("gateways connect with TLS (certificate %s)", args.tls_cert)
        else:
            log.info(
                "gateways connect with mutual TLS (certificate %s; client certificates "
                "signed by %s required)", args.tls_cert, args.tls_client_ca,
            )
    if args.puller_tls_ca is None:
        return server, None
    puller = channel_credentials(args.puller_tls_ca)
    log.info("the Puller is reached with TLS (CA %s)", args.puller_tls_ca)
    return server, puller


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
        from streamer import benchmark

        return benchmark.bench_main(args)
    if args.command == "demo":
        from streamer import demo

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
