"""``streamer puller``: the reference Puller's command line.

Builds one source (MongoDB change stream, chat workload or replay file)
and the ``puller.v1`` server over the durable replay log, and runs them
until SIGTERM/SIGINT. Every option also reads ``STREAMER_PULLER_<OPTION>``
(its own prefix: ``serve`` and ``puller`` often share one environment and
must not read each other's ``--listen``).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import Sequence
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from streamer import DISTRIBUTION
from streamer.errors import ResumePointLost
from streamer.logs import configure_logging
from streamer.options import (
    MAX_RATE,
    ArgumentParser,
    Options,
    add_logging_options,
    address,
    existing_file,
    integer,
    join,
    nonempty,
    one_of,
    real,
)
from streamer.protocol.puller_v1_pb2 import ChangeEvent
from streamer.puller.log import LogError, ReplayLog
from streamer.puller.server import SERVICE_NAME, PullerServicer, add_to_server
from streamer.puller.sources import Recorder, ReplaySource, Source, WorkloadSource
from streamer.transport import SERVER_OPTIONS, ListenError, bind

log = logging.getLogger("streamer")
ENV = "STREAMER_PULLER_"


def build_parser() -> ArgumentParser:
    puller = ArgumentParser(
        prog="streamer puller",
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
    opts = Options(puller, ENV)
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
    add_logging_options(opts)
    puller.set_defaults(options=opts)
    return puller


def _source(args: argparse.Namespace) -> Source:
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


async def run(args: argparse.Namespace, source: Source) -> int:
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
    add_to_server(servicer, server)
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
    for name in ("", SERVICE_NAME):
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


def main(argv: Sequence[str]) -> int:
    """``streamer puller ARGV``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.options.resolve(args)
    source = _source(args)
    configure_logging(args.log_level, args.log_format)
    return asyncio.run(run(args, source))
