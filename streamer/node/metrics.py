"""Prometheus metrics of ``streamer serve`` (``--metrics HOST:PORT``).

Nothing on the ingest path touches prometheus-client. The ingest, the
servicer, the sessions, the matcher and the progress store keep plain
counters (ints, ``Counter`` dicts, ``LatencyHistogram``) as they work;
``StreamerCollector`` reads them when Prometheus scrapes and turns them into
metric families. ``MetricsServer`` serves ``/metrics`` from a private
``CollectorRegistry`` (never the process-global default, so several servers
or tests in one process do not collide) with prometheus-client's HTTP server,
in a daemon thread.

Scrapes therefore run on that thread while the event loop keeps mutating the
counters. That is safe under the GIL because the collector only reads:
integers are read whole, and dicts are copied with ``dict(...)`` /
``list(d.values())``, which run in C without letting another thread in, so a
scrape never sees a dict change size under it. Values read in one scrape may
be a few events apart from each other (e.g. the matches and the deliveries of
the event being processed); each one is exact.

Gateway queue depths are exported as the total and the maximum over all
streams, not one series per gateway: gateway ids are chosen by the gateways
and streams come and go (every reconnect is a new stream), so a per-gateway
label would be unbounded cardinality for Prometheus and its series would stay
around long after the stream is gone.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector, CollectorRegistry

from streamer.errors import StreamerError
from streamer.node.pauses import PauseMonitor
from streamer.options import join

if TYPE_CHECKING:
    from streamer.node.ingest import Ingest

# Keys of Ingest.events / Ingest.delivered exported even before they first
# occur (lower-cased as label values), so that the series always exist.
EVENT_KEYS = ("INSERT", "UPDATE", "DELETE", "heartbeat", "unwatched")
DELIVERY_KEYS = ("INSERT", "UPDATE", "DELETE")


class MetricsError(StreamerError, OSError):
    """The metrics endpoint cannot be served at the address given."""


class StreamerCollector(Collector):
    """Reads the counters of one running streamer at scrape time.

    Everything is reached through the ``Ingest``: its sessions (and their
    subscriptions and index), servicer and progress store.
    """

    def __init__(self, ingest: Ingest, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.ingest = ingest
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        ingest = self.ingest
        servicer, sessions, progress = ingest.servicer, ingest.sessions, ingest.progress

        events = dict(ingest.events)
        family = CounterMetricFamily(
            "streamer_events",
            "Events received from the Puller and processed, by operation after the "
            "event transformation (docs/semantics.md), Puller heartbeats, and change "
            "events of collections no subscription is on (unwatched: not decoded). Poison "
            "events are counted in streamer_poison_events_total instead.",
            labels=["op"],
        )
        for key in EVENT_KEYS:
            family.add_metric([key.lower()], events.get(key, 0))
        yield family

        family = CounterMetricFamily(
            "streamer_poison_events",
            "Puller events skipped because they can never be processed, by reason "
            "(bad_json, too_large, not_object, bad_layout, unknown_op, missing_document). "
            "Their progress marker still advances.",
            labels=["reason"],
        )
        for reason, count in sorted(dict(ingest.poison).items()):
            family.add_metric([reason], count)
        yield family

        yield CounterMetricFamily(
            "streamer_matches",
            "Subscription matches: one per (event, subscription, delivered operation), "
            "including subscriptions whose gateway was gone by delivery time.",
            value=ingest.matches,
        )

        delivered = dict(ingest.delivered)
        family = CounterMetricFamily(
            "streamer_deliveries",
            "Deliveries produced for connected gateways (one per event, gateway and "
            "delivered operation; a delivery names every matching subscription of that "
            "gateway), by operation; those a gateway cut off as lagging could not take "
            "are included. Sum over operation for all deliveries.",
            labels=["operation"],
        )
        for key in DELIVERY_KEYS:
            family.add_metric([key.lower()], delivered.get(key, 0))
        yield family

        buckets, total = ingest.latency.cumulative()
        yield HistogramMetricFamily(
            "streamer_ingest_latency_seconds",
            "Seconds from the arrival of a Puller message to the deliveries of all its "
            "events being enqueued (transformation, matching and fan-out); each "
            "non-poison change event of the message is observed once with that time.",
            buckets=buckets, sum_value=total, unit="seconds",
        )

        yield GaugeMetricFamily(
            "streamer_ingest_lag_seconds",
            "Seconds from the last change event's own time (ChangeEvent.timestamp, "
            "the source's clock) to its processing by live ingest: how far the node "
            "lags the source, including time its messages waited to be read.",
            value=ingest.lag,
        )
        yield CounterMetricFamily(
            "streamer_puller_reconnects",
            "Times the stream to the Puller ended or failed and was opened again.",
            value=ingest.reconnects,
        )
        yield CounterMetricFamily(
            "streamer_puller_markers_refused",
            "Times the Puller refused the saved progress marker (too old, or from another "
            "log): with --on-marker-refused fail the node then stops; with "
            "resume-from-head ingest continued from the live head and the events in "
            "between were lost.",
            value=ingest.markers_refused,
        )

        streams = list(servicer.streams.values())
        depths = [len(stream.queue) for stream in streams]
        yield GaugeMetricFamily(
            "streamer_gateway_streams",
            "Connected gateway streams (each has its own outbound queue).",
            value=len(streams),
        )
        yield GaugeMetricFamily(
            "streamer_gateway_queued_messages",
            "Messages waiting in the outbound queues of all gateway streams together.",
            value=sum(depths),
        )
        yield GaugeMetricFamily(
            "streamer_gateway_queued_messages_max",
            "Messages waiting in the fullest gateway queue (0 without streams); a stream "
            "reaching streamer_gateway_queue_capacity is cut off as lagging.",
            value=max(depths, default=0),
        )
        yield GaugeMetricFamily(
            "streamer_gateway_queue_capacity",
            "Messages one gateway queue holds before the gateway is cut off (--gateway-queue).",
            value=servicer.queue_capacity,
        )
        yield GaugeMetricFamily(
            "streamer_gateway_queue_capacity_bytes",
            "Bytes one gateway queue holds before the gateway is cut off "
            "(--gateway-queue-bytes).",
            value=servicer.queue_bytes,
        )
        yield GaugeMetricFamily(
            "streamer_gateway_queued_bytes",
            "Bytes waiting in the outbound queues of all gateway streams together.",
            value=sum(stream.queue.bytes for stream in streams),
        )
        yield GaugeMetricFamily(
            "streamer_gateway_streams_behind",
            "Gateway streams whose queue is past its low watermark (an eighth of "
            "--gateway-queue-bytes) and has not yet drained to half of it.",
            value=servicer.behind,
        )
        yield CounterMetricFamily(
            "streamer_lagging_cutoffs",
            "Gateway streams ended with RESOURCE_EXHAUSTED: their queue was full (messages "
            "or bytes), or a write waited longer than --stall-seconds (the gateway stopped "
            "reading; also in streamer_stalled_cutoffs_total).",
            value=servicer.lagging_cut_offs,
        )
        yield CounterMetricFamily(
            "streamer_budget_cutoffs",
            "Gateway streams cut off because all queues together held more than "
            "--node-queue-bytes and theirs was the largest.",
            value=servicer.budget_cut_offs,
        )
        yield GaugeMetricFamily(
            "streamer_subscription_bytes",
            "What the registered subscriptions weigh (their serialized requests; see "
            "--max-gateway-bytes and --max-node-bytes).",
            value=sessions.subscriptions.bytes,
        )
        yield CounterMetricFamily(
            "streamer_stalled_cutoffs",
            "Gateway streams cut off because a write waited longer than --stall-seconds.",
            value=servicer.stalled_cut_offs,
        )
        yield CounterMetricFamily(
            "streamer_gateway_undecodable_messages",
            "Gateway streams ended with INVALID_ARGUMENT because a message did not decode.",
            value=servicer.undecodable,
        )
        yield CounterMetricFamily(
            "streamer_gateway_identity_refusals",
            "Hellos refused with ALREADY_EXISTS: the gateway id was held by a live stream "
            "of another gateway process.",
            value=sessions.identity_refusals,
        )
        yield CounterMetricFamily(
            "streamer_documents_omitted",
            "Deliveries sent without their document because they were larger than their "
            "gateway receives (document_omitted).",
            value=servicer.documents_omitted,
        )
        yield CounterMetricFamily(
            "streamer_deliveries_split",
            "Deliveries split by subscription ids because, even without the document, "
            "they were larger than their gateway receives.",
            value=servicer.deliveries_split,
        )
        yield CounterMetricFamily(
            "streamer_expired_sessions",
            "Gateway sessions expired after --session-ttl seconds of silence.",
            value=sessions.expired_sessions,
        )

        stats = sessions.subscriptions.matcher.stats()
        scan = stats["scan_subscriptions"]
        kinds = GaugeMetricFamily(
            "streamer_subscriptions",
            "Registered subscriptions, by kind: 'scan' if at least one of its clauses has "
            "no indexable atom (verified on every event of its collection), else 'indexed'.",
            labels=["kind"],
        )
        kinds.add_metric(["indexed"], stats["subscriptions"] - scan)
        kinds.add_metric(["scan"], scan)
        yield kinds
        kinds = GaugeMetricFamily(
            "streamer_clauses",
            "Clauses of the subscription index, by kind: 'scan' clauses have no indexable "
            "atom and are verified on every event of their collection.",
            labels=["kind"],
        )
        kinds.add_metric(["indexed"], stats["clauses"] - stats["scan_clauses"])
        kinds.add_metric(["scan"], stats["scan_clauses"])
        yield kinds

        catchup = ingest.catchup
        if catchup is not None:
            yield GaugeMetricFamily(
                "streamer_catchup_readers",
                "Catch-up readers (one Puller stream per group of subscriptions resuming "
                "after the same marker) open now, reading or waiting their turn.",
                value=catchup.readers,
            )
            yield GaugeMetricFamily(
                "streamer_catchup_readers_reading",
                "Catch-up readers delivering the Puller's replay now (at most "
                "--max-catchup-readers).",
                value=catchup.reading,
            )
            yield GaugeMetricFamily(
                "streamer_catchup_subscriptions",
                "Subscriptions resuming after a marker that are not in the live index yet "
                "(catching up, or handed over and waiting to be moved into it).",
                value=catchup.catching_up,
            )
            yield CounterMetricFamily(
                "streamer_catchup_events_replayed",
                "Change events the catch-up readers processed from the Puller's replay.",
                value=catchup.replayed,
            )
            yield CounterMetricFamily(
                "streamer_catchup_resyncs",
                "Resuming subscriptions that continue from the live head instead: answered "
                "resync_required (the Puller refused the marker), or refused later (logged "
                "at ERROR, also in streamer_catchup_late_refusals_total).",
                value=catchup.resyncs,
            )
            yield CounterMetricFamily(
                "streamer_catchup_late_refusals",
                "Catch-up groups whose marker the Puller refused after their subscriptions "
                "were answered (a silent Puller, or a replay past the Puller's retention), "
                "or whose reader failed: their subscriptions lost the events in between.",
                value=catchup.late_refusals,
            )
            yield CounterMetricFamily(
                "streamer_catchup_handoffs",
                "Catch-up groups handed over to live ingest without a gap.",
                value=catchup.handoffs,
            )
            yield CounterMetricFamily(
                "streamer_catchup_merges",
                "Catch-up groups taken over by another group's reader that passed their "
                "marker (their own reader stopped).",
                value=catchup.merges,
            )
            yield CounterMetricFamily(
                "streamer_catchup_paced",
                "Times a catch-up reader waited for a gateway's queue to drain below half "
                "before reading on (the replay is paced by its gateways).",
                value=catchup.paced,
            )
            yield CounterMetricFamily(
                "streamer_catchup_reader_failures",
                "Catch-up readers that failed with an unexpected error (logged with a "
                "traceback; their subscriptions continue from the live head).",
                value=catchup.reader_failures,
            )

        yield GaugeMetricFamily(
            "streamer_progress_marker_age_seconds",
            "Seconds since the Puller progress marker last advanced (since start if it "
            "has not yet); grows while no events or new markers arrive.",
            value=max(self.clock() - progress.advanced_at, 0.0), unit="seconds",
        )
        yield CounterMetricFamily(
            "streamer_progress_writes",
            "Progress marker writes to the state directory (each fsynced).",
            value=progress.writes,
        )
        yield CounterMetricFamily(
            "streamer_progress_write_errors",
            "Progress marker writes that failed (the marker stays pending and is retried; "
            "a restart replays from the last marker written).",
            value=progress.write_errors,
        )
        yield CounterMetricFamily(
            "streamer_progress_empty_markers",
            "Puller events or heartbeats whose progress marker was empty; they never "
            "replace the saved marker.",
            value=progress.empty_markers,
        )


@dataclass
class ClusterStats:
    """Cluster mode's figures, kept current by the node on its loop: a
    scrape runs on the metrics thread and never walks the etcd views."""

    nodes: int = 0  # live nodes in this node's view
    shards_owned: int = 0
    handing_over: int = 0  # shards held here that a joined node should own
    not_owner: int = 0  # subscriptions refused with not_owner
    released: int = 0  # shards handed over to another node
    fence_after: float = 0.0  # seconds without a keepalive before the node fences
    last_ok: Callable[[], float] | None = None  # the last acknowledged keepalive (monotonic)


class ClusterCollector(Collector):
    """``ClusterStats`` as metrics (``streamer serve --cluster`` only)."""

    def __init__(self, stats: ClusterStats, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.stats = stats
        self.clock = clock

    def collect(self) -> Iterator[Metric]:
        stats = self.stats
        yield GaugeMetricFamily(
            "streamer_cluster_nodes", "Live nodes of the cluster as this node sees them.",
            value=stats.nodes)
        yield GaugeMetricFamily(
            "streamer_cluster_shards_owned",
            "Shards this node owns among the nodes of its collection group.",
            value=stats.shards_owned)
        yield GaugeMetricFamily(
            "streamer_cluster_shards_handing_over",
            "Shards this node holds that a joined node should own, released once the "
            "cluster clients' subscriptions on them have moved.",
            value=stats.handing_over)
        yield CounterMetricFamily(
            "streamer_cluster_shards_released",
            "Shards this node handed over to another node.", value=stats.released)
        yield CounterMetricFamily(
            "streamer_cluster_not_owner_refusals",
            "Subscriptions of cluster clients refused with not_owner (a shard of another "
            "node).", value=stats.not_owner)
        last_ok = stats.last_ok
        age = self.clock() - last_ok() if last_ok is not None else float("nan")
        yield GaugeMetricFamily(
            "streamer_cluster_keepalive_age_seconds",
            "Seconds since the last acknowledged etcd keepalive; the node fences itself "
            "(stops) when it reaches streamer_cluster_fence_after_seconds.", value=age)
        yield GaugeMetricFamily(
            "streamer_cluster_fence_after_seconds",
            "Lease TTL minus the fencing margin.", value=stats.fence_after)


class PauseCollector(Collector):
    """The pause log's histograms (``streamer.node.pauses``), for the node
    and for any other process that runs a ``PauseMonitor``."""

    def __init__(self, monitor: PauseMonitor) -> None:
        self.monitor = monitor

    def collect(self) -> Iterator[Metric]:
        monitor = self.monitor
        buckets, total = monitor.lag.cumulative()
        yield HistogramMetricFamily(
            "streamer_event_loop_lag_seconds",
            "How late the event loop ran a task that asked to wake every 10 ms: the "
            "time everything on the loop was held up.",
            buckets=buckets, sum_value=total, unit="seconds",
        )
        yield GaugeMetricFamily(
            "streamer_event_loop_lag_max_seconds",
            "The longest event loop lag since start.",
            value=monitor.longest, unit="seconds",
        )
        family = HistogramMetricFamily(
            "streamer_gc_pause_seconds",
            "Garbage collections of this process, by generation, and how long each took.",
            labels=["generation"], unit="seconds",
        )
        for generation, histogram in monitor.gc_pauses.items():
            buckets, total = histogram.cumulative()
            family.add_metric([str(generation)], buckets, total)
        yield family


class MetricsServer:
    """``/metrics`` over HTTP (prometheus-client's server, in a daemon thread).

    Binds in the constructor (``MetricsError`` if it cannot) and serves the
    ``collectors`` from then on, from its own ``registry``; ``close`` stops it.
    """

    def __init__(self, host: str, port: int, *collectors: Collector) -> None:
        self.registry = CollectorRegistry(auto_describe=False)
        for collector in collectors:
            self.registry.register(collector)
        try:
            server, thread = start_http_server(port, addr=host, registry=self.registry)
        except OSError as exc:
            raise MetricsError(
                f"cannot serve metrics on {join(host, port)}: {exc.strerror or exc}"
            ) from None
        self._server: WSGIServer = server
        self._thread: threading.Thread = thread
        self.host = host
        self.port: int = server.server_port

    @property
    def address(self) -> str:
        return join(self.host, self.port)

    def close(self) -> None:
        """Stop serving and release the port (blocks for up to half a second)."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join()


# --------------------------------------------- reading a /metrics page back
# For the tools that drive a Streamer from outside (``streamer demo``,
# ``streamer bench e2e``, ``bench/bench_ingest.py``).
