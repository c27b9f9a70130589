"""The ``streamer`` command: ``streamer serve`` runs the service (a
``StreamerNode``); ``puller`` (``streamer.puller.cli``), ``demo``
(``streamer.tools.demo``) and ``bench`` (``streamer.tools.benchmark``) are
dispatched to their own modules, imported only when asked for, so that
nothing but the node is on the service's import path.

Every option can also be set through an environment variable:
``STREAMER_<OPTION>`` for ``serve`` (``--session-ttl`` →
``STREAMER_SESSION_TTL``), ``STREAMER_PULLER_<OPTION>`` for ``puller``,
``STREAMER_DEMO_<OPTION>`` for ``demo``; a flag given on the command line
wins. Options are declared and checked in one place (``streamer.options``).
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.metadata
import logging
import signal
import sys
import textwrap
from collections.abc import Sequence
from pathlib import Path

import grpc

import streamer
from streamer import DISTRIBUTION
from streamer.errors import StreamerError
from streamer.logs import configure_logging
from streamer.matching.cel import MAX_EXPRESSION_LENGTH
from streamer.node.auth import (
    CredentialsError,
    channel_credentials,
    read_token,
    server_credentials,
)
from streamer.node.catchup import DEFAULT_CONFIRM_SECONDS, DEFAULT_MAX_READERS
from streamer.node.delivery import DEFAULT_CAPACITY, DEFAULT_MAX_BYTES
from streamer.node.events import LAYOUTS
from streamer.node.ingest import MARKER_POLICIES
from streamer.node.node import DEFAULT_LEASE_TTL, NodeConfig, StreamerNode
from streamer.node.server import DEFAULT_NODE_QUEUE_BYTES, DEFAULT_STALL_SECONDS
from streamer.node.subscriptions import Limits
from streamer.options import (
    ArgumentParser,
    Options,
    add_logging_options,
    address,
    etcd_url,
    existing_file,
    integer,
    key_name,
    names,
    nonempty,
    one_of,
    real,
    target,
)

log = logging.getLogger("streamer")
ENV = "STREAMER_"
# The commands other than serve: (module, its entry point, one-line help).
COMMANDS = {
    "puller": ("streamer.puller.cli", "main", "run the reference Puller",
               "STREAMER_PULLER_"),
    "demo": ("streamer.tools.demo", "cli_main",
             "run Puller, Streamer and gateways on loopback, then verify every delivery",
             "STREAMER_DEMO_"),
    "bench": ("streamer.tools.benchmark", "cli_main", "run a benchmark (bench e2e)", None),
}
SERVE_HELP = "run the Streamer service"


def _version() -> str:
    try:
        return importlib.metadata.version(DISTRIBUTION)
    except importlib.metadata.PackageNotFoundError:
        return streamer.__version__


def build_parser() -> ArgumentParser:
    """The top-level parser: ``--version``, ``--help`` and the command name;
    each command parses its own options."""
    lines = [f"  {'serve':<8} {SERVE_HELP}"] + [
        f"  {name:<8} {entry[2]}" for name, entry in COMMANDS.items()
    ]
    variables = [("serve", ENV)] + [
        (name, entry[3]) for name, entry in COMMANDS.items() if entry[3] is not None
    ]
    parser = ArgumentParser(
        prog="streamer",
        description="The fan-out and matching engine between a Puller and its gateways.\n\n"
        "commands (streamer COMMAND --help for each):\n" + "\n".join(lines),
        epilog=textwrap.fill("Options can also be set in the environment: " + "; ".join(
            f"{command} reads {prefix}<OPTION>" for command, prefix in variables
        ) + " (e.g. --session-ttl is STREAMER_SESSION_TTL); a flag given on the command "
        "line wins."),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--version", action="version", version=f"%(prog)s {_version()} ({DISTRIBUTION})"
    )
    parser.add_argument("command", metavar="COMMAND", choices=["serve", *COMMANDS],
                        help=argparse.SUPPRESS)
    parser.add_argument("args", nargs=argparse.REMAINDER, help=argparse.SUPPRESS)
    return parser


def build_serve_parser() -> ArgumentParser:
    serve = ArgumentParser(
        prog="streamer serve",
        description="Serve syntrix.streamer.v1 to gateways and consume a puller.v1 Puller.",
        epilog="Each option also reads STREAMER_<OPTION> from the environment, "
        "e.g. STREAMER_SESSION_TTL=30; a flag given here wins. A bad value in either, "
        "an address that cannot be served, or a state directory that is in use or "
        "cannot be written is an error at start (exit code 2). SIGTERM/SIGINT stop "
        "ingest, flush the progress marker, end each gateway stream once its queue "
        "is written (waiting at most --drain-seconds) and exit 0. A part of the node "
        "that fails (e.g. a refused marker with --on-marker-refused fail) turns health "
        "NOT_SERVING, stops the node the same way and exits 1.",
    )
    opts = Options(serve, ENV)
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
    opts.add("--gateway-queue-bytes", integer(1 << 20), default=DEFAULT_MAX_BYTES,
             metavar="BYTES",
             help="bytes queued per gateway before it is cut off as lagging; past an eighth "
             "of it the gateway is reported as falling behind")
    opts.add("--node-queue-bytes", integer(1 << 20), default=DEFAULT_NODE_QUEUE_BYTES,
             metavar="BYTES",
             help="bytes queued for all gateways together; past it, the gateway with the "
             "most queued is cut off (RESOURCE_EXHAUSTED)")
    opts.add("--stall-seconds", real(0, above=True), default=DEFAULT_STALL_SECONDS,
             metavar="SECONDS",
             help="a gateway whose current write has waited this long has stopped reading "
             "and is cut off (RESOURCE_EXHAUSTED)")
    opts.add("--resume-grace", real(0), default=3.0, metavar="SECONDS",
             help="after a restart with a saved marker, seconds to hold ingest so "
             "gateways can re-register first (0: do not wait); ends early once every "
             "gateway known before the restart has said Hello, re-subscribed and sent a "
             "Heartbeat")
    opts.add("--consumer-id", nonempty, metavar="ID",
             help="consumer id sent to the Puller (default: streamer, or streamer-NODE_ID "
             "with --cluster: each node is a consumer of its own)")
    opts.add("--collections", names, default=(), metavar="NAME[,NAME...]",
             help="serve only these collections (all when unset): the Puller is asked for "
             "their events only, and a subscription to another collection is refused with "
             "code not_owner; nodes serving different collections split the event volume")
    opts.add("--cluster", etcd_url, metavar="etcd://HOST:PORT[,HOST:PORT...]",
             help="join the cluster coordinated by this etcd (docs/scaling.md): the node "
             "registers under a lease, claims its share of the 256 shards among the nodes "
             "serving the same --collections, and refuses subscriptions of gateways that "
             "said Hello (cluster clients) whose shard it neither owns nor is taking over "
             "(not_owner); plain gateways are served whatever the shard. Unset: a single "
             "node, nothing of this")
    opts.add("--node-id", key_name, metavar="ID",
             help="this node's id in the cluster, unique among its live nodes (required "
             "with --cluster, refused without it)")
    opts.add("--advertise", target, metavar="HOST:PORT",
             help="where gateways reach this node, published in the cluster (required with "
             "--cluster, refused without it)")
    opts.add("--lease-ttl", integer(2, 3600), metavar="SECONDS",
             help=f"TTL of the node's etcd lease (with --cluster; default {DEFAULT_LEASE_TTL})."
             " The node is fenced (stops, "
             "exit 1) when no keepalive has succeeded for TTL - max(1, TTL/3) seconds, "
             "before etcd can expire the lease and give its shards to another node: a "
             "shorter TTL moves a dead node's shards sooner but stops a node on a shorter "
             "etcd outage")
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
    opts.add("--max-request-bytes", integer(64), default=limits.max_request_bytes,
             metavar="BYTES",
             help="size of one serialized subscribe request; larger ones are refused "
             "(resource_exhausted)")
    opts.add("--max-list-values", integer(1), default=limits.max_list_values, metavar="N",
             help="values in all the lists of one request's filters together (in, contains "
             "of lists); more are refused (resource_exhausted)")
    opts.add("--max-scan-clauses", integer(0), default=limits.max_scan_clauses, metavar="N",
             help="scan clauses (conditions with nothing the index can look up, verified on "
             "every event of their collection) one gateway stream may hold; a subscription "
             "that would go past it is refused (resource_exhausted)")
    opts.add("--max-node-scan-clauses", integer(0), default=limits.max_node_scan_clauses,
             metavar="N", help="scan clauses the whole node may hold (resource_exhausted)")
    opts.add("--max-gateway-bytes", integer(1), default=limits.max_gateway_bytes,
             metavar="BYTES",
             help="what the subscriptions of one gateway stream may weigh together "
             "(serialized requests; the index holds a few times that); a subscription past "
             "it is refused (resource_exhausted)")
    opts.add("--max-node-bytes", integer(1), default=limits.max_node_bytes, metavar="BYTES",
             help="what the subscriptions of the whole node may weigh together "
             "(resource_exhausted)")
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
    opts.add("--on-marker-refused", one_of(*MARKER_POLICIES), default="fail",
             help="when the Puller refuses the saved marker (too old, or from another log), "
             "the events after it cannot be replayed: fail stops the node (NOT_SERVING, "
             "exit 1) for an operator to decide; resume-from-head continues from the "
             "Puller's live head, logging and counting the loss")
    opts.add("--max-catchup-readers", integer(1), default=DEFAULT_MAX_READERS, metavar="N",
             help="subscriptions that resume after a marker (resume_after) catch up from the "
             "Puller's replay, one Puller stream per marker; at most N of them read at a "
             "time, the others wait their turn")
    opts.add("--catchup-confirm-seconds", real(0, above=True), default=DEFAULT_CONFIRM_SECONDS,
             metavar="SECONDS",
             help="a Puller that sends nothing until an event comes (a Syntrix Puller) is taken "
             "to accept a resume_after marker once it has not refused it for this long")
    add_logging_options(opts)
    serve.set_defaults(options=opts)
    return serve


def check_cluster_options(parser: ArgumentParser, args: argparse.Namespace) -> None:
    """--node-id and --advertise go with --cluster, both or neither, and
    --lease-ttl only with it (a usage error, one line, exit 2)."""
    for flag, value in (("--node-id", args.node_id), ("--advertise", args.advertise)):
        if args.cluster is not None and value is None:
            parser.error(f"{flag} is required with --cluster")
        if args.cluster is None and value is not None:
            parser.error(f"{flag} needs --cluster")
    if args.cluster is None and args.lease_ttl is not None:
        parser.error("--lease-ttl needs --cluster")


def serve_config(args: argparse.Namespace) -> NodeConfig:
    """The node's configuration from checked options; reads the token and
    TLS files (``TokenFileError``/``CredentialsError`` if they are unusable)."""
    server_tls, puller_tls = _credentials(args)
    return NodeConfig(
        puller=args.puller,
        listen=args.listen,
        state_dir=args.state_dir,
        session_ttl=args.session_ttl,
        document_layout=args.document_layout,
        gateway_queue=args.gateway_queue,
        gateway_queue_bytes=args.gateway_queue_bytes,
        stall_seconds=args.stall_seconds,
        resume_grace=args.resume_grace,
        consumer_id=args.consumer_id or (
            "streamer" if args.node_id is None else f"streamer-{args.node_id}"),
        drain_seconds=args.drain_seconds,
        limits=Limits(
            max_subscriptions=args.max_subscriptions, max_filters=args.max_filters,
            max_expression_length=args.max_expression_length,
            max_request_bytes=args.max_request_bytes, max_list_values=args.max_list_values,
            max_scan_clauses=args.max_scan_clauses,
            max_node_scan_clauses=args.max_node_scan_clauses,
            max_gateway_bytes=args.max_gateway_bytes, max_node_bytes=args.max_node_bytes,
        ),
        node_queue_bytes=args.node_queue_bytes,
        metrics=args.metrics,
        auth_token=None if args.auth_token_file is None else read_token(args.auth_token_file),
        server_credentials=server_tls,
        puller_credentials=puller_tls,
        on_marker_refused=args.on_marker_refused,
        max_catchup_readers=args.max_catchup_readers,
        catchup_confirm_seconds=args.catchup_confirm_seconds,
        collections=args.collections,
        cluster=args.cluster,
        node_id=args.node_id,
        advertise=args.advertise,
        lease_ttl=DEFAULT_LEASE_TTL if args.lease_ttl is None else args.lease_ttl,
    )


async def serve(args: argparse.Namespace) -> int:
    """``streamer serve``: 0 after a clean stop, 1 after a failure, 2 when it
    cannot start."""
    try:
        node = StreamerNode(serve_config(args))
        await node.start()
    except StreamerError as exc:
        log.error("%s", exc)
        return 2
    _log_transport(args)
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, node.request_stop)
    await node.wait()
    await node.stop()
    return 1 if node.failure is not None else 0


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


def main(argv: Sequence[str] | None = None) -> int:
    top = build_parser().parse_args(sys.argv[1:] if argv is None else argv)
    if top.command in COMMANDS:
        module, entry, _, _ = COMMANDS[top.command]
        run = getattr(importlib.import_module(module), entry)
        return int(run(top.args))
    parser = build_serve_parser()
    args = parser.parse_args(top.args)
    args.options.resolve(args)
    check_cluster_options(parser, args)
    configure_logging(args.log_level, args.log_format)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
