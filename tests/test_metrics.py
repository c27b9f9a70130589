"""Prometheus metrics: the collector over a real pipeline, and ``serve --metrics``
as a real process scraped over HTTP."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import grpc
import orjson
import pytest
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.registry import CollectorRegistry
from puller_double import PullerDouble
from test_ingest import change, deliveries, until

from streamer.matching.matcher import Matcher
from streamer.node.histogram import LATENCY_BUCKETS, LatencyHistogram
from streamer.node.ingest import Ingest
from streamer.node.metrics import MetricsError, MetricsServer, StreamerCollector
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer, add_to_server
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb
from streamer.protocol import streamer_v1_pb2_grpc as sgrpc
from streamer.protocol.streamer_v1_pb2 import Filter, GatewayMessage, SubscribeRequest, Value
from streamer.tools.measure import free_port

Samples = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def parse(text: str) -> Samples:
    """Every sample of a scrape, by (name, sorted labels)."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def scrape(registry: CollectorRegistry) -> Samples:
    return parse(generate_latest(registry).decode())


def subscribe(sub_id: str, *, chat: str = "", expression: str = "") -> GatewayMessage:
    filters = [Filter(field="chat", op="==", value=Value(string_value=chat))] if chat else []
    return GatewayMessage(subscribe=SubscribeRequest(
        subscription_id=sub_id, database="app", collection="messages",
        filters=filters, expression=expression))


# -- units -------------------------------------------------------------


def test_latency_histogram_buckets_are_prometheus_le() -> None:
    h = LatencyHistogram()
    for seconds in (0.0, 1e-6, 1.5e-6, 0.1, 0.2, 3.0):
        h.observe(seconds)
    buckets, total = h.cumulative()
    assert [le for le, _ in buckets] == [*map(repr, LATENCY_BUCKETS), "+Inf"]
    got = dict(buckets)
    # 0 and 1e-6 are <= 1e-6; 1.5e-6 <= 2.5e-6; 0.1 <= 0.1; 0.2 and 3 only in +Inf.
    assert (got["1e-06"], got["2.5e-06"], got["0.05"], got["0.1"], got["+Inf"]) == (2, 3, 3, 4, 6)
    assert h.count == 6
    assert total == pytest.approx(0.0 + 1e-6 + 1.5e-6 + 0.1 + 0.2 + 3.0)


def test_metrics_server_refuses_a_busy_port() -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        with pytest.raises(MetricsError, match=f"127.0.0.1:{port}: Address already in use"):
            MetricsServer("127.0.0.1", port)


def test_scan_subscriptions_are_counted_per_subscription() -> None:
    m = Matcher()
    m.add("indexed", "db", "c", expression="doc.a == 1 || doc.b == 2")
    m.add("mixed", "db", "c", expression="doc.a == 1 || doc.t.endsWith('x')")
    m.add("scan", "db", "c", expression="doc.t.endsWith('x') || doc.t.startsWith('y')")
    m.add("everything", "db", "c")  # no atoms: not verified, so not a scan
    stats = m.stats()
    assert (stats["subscriptions"], stats["scan_subscriptions"]) == (4, 2)
    assert (stats["clauses"], stats["scan_clauses"]) == (7, 3)
    assert m.remove("mixed") and not m.remove("mixed")
    assert m.stats()["scan_subscriptions"] == 1
    assert m.remove("indexed") and m.remove("scan")
    assert m.stats()["scan_subscriptions"] == 0


# -- the collector over a real pipeline ------------------------------------


def test_collector_reads_the_pipeline_counters(tmp_path: Path) -> None:
    now = [0.0]
    registry = Sessions(SubscriptionSet(Matcher()), session_ttl=50, clock=lambda: now[0])
    # A session from before the gateways below, silent long enough to expire.
    registry.connect()
    now[0] = 100.0

    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        servicer = StreamerServicer(registry, queue_capacity=4)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        progress = ProgressStore(tmp_path, interval=0.01)
        ingest = Ingest(target, registry, servicer, progress, backoff=(0.01, 0.05))
        metrics = CollectorRegistry(auto_describe=False)
        metrics.register(StreamerCollector(ingest, clock=lambda: progress.advanced_at + 5))
        tasks = [asyncio.create_task(ingest.run()), asyncio.create_task(progress.run())]
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                stub = sgrpc.StreamerServiceStub(channel)
                before = scrape(metrics)
                assert before[("streamer_events_total", (("op", "insert"),))] == 0
                assert before[("streamer_deliveries_total", (("operation", "delete"),))] == 0
                assert before[("streamer_ingest_latency_seconds_count", ())] == 0
                assert before[("streamer_progress_marker_age_seconds", ())] == 5

                one, two = stub.Stream(), stub.Stream()
                await one.write(subscribe("s1", chat="c1"))
                await two.write(subscribe("s2", expression="doc.text.endsWith('x')"))
                for call in (one, two):
                    assert (await call.read()).subscribe_response.success
                await until(lambda: len(puller.subscriptions) > 0)
                await puller.append(
                    change(0, full={"chat": "c1", "text": "ax"}),  # s1, s2: insert
                    change(1, full=b"{broken"),  # poison
                    # s1 stays (update), s2 leaves (delete)
                    change(2, "update", full={"chat": "c1", "text": "b"},
                           before={"chat": "c1", "text": "ax"}),
                    change(3, "delete", before={"chat": "c2"}),  # matches nothing
                )
                got_one, got_two = await deliveries(one, 2), await deliveries(two, 2)
                assert [d.event.operation for d in got_one] == [1, 2]
                assert [d.event.operation for d in got_two] == [1, 4]
                await until(lambda: progress.marker == "p3")
                await until(lambda: progress.writes > 0)
                assert [s.key for s in registry.expired()] == [1]

                # Synchronously, so that the writer tasks cannot drain the
                # queue in between: a heartbeat, then three deliveries to s1.
                ingest.process(pb.PullerEvent(progress="p3"))
                for i in range(4, 7):
                    event = change(i, full={"chat": "c1"})
                    # The last one happened at the source two seconds ago.
                    event.timestamp = int(time.time() * 1000) - 2000
                    ingest.process(pb.PullerEvent(change_event=event, progress=f"p{i}"))
                got = scrape(metrics)
                assert 2 <= got[("streamer_ingest_lag_seconds", ())] < 30
                assert got[("streamer_gateway_queued_messages", ())] == 3
                assert got[("streamer_gateway_queued_messages_max", ())] == 3
                assert got[("streamer_gateway_queue_capacity", ())] == 4
                assert got[("streamer_gateway_streams", ())] == 2
                assert got[("streamer_progress_writes_total", ())] == progress.writes
                assert got[("streamer_progress_write_errors_total", ())] == 0
                assert got[("streamer_progress_empty_markers_total", ())] == 0

                events = {
                    op: got[("streamer_events_total", (("op", op),))]
                    for op in ("insert", "update", "delete", "heartbeat")
                }
                assert events == {"insert": 4, "update": 1, "delete": 1, "heartbeat": 1}
                assert got[("streamer_poison_events_total", (("reason", "bad_json"),))] == 1
                assert got[("streamer_matches_total", ())] == 7
                assert {
                    op: got[("streamer_deliveries_total", (("operation", op),))]
                    for op in ("insert", "update", "delete")
                } == {"insert": 5, "update": 1, "delete": 1}
                # One latency observation per matched (non-poison) change event.
                assert got[("streamer_ingest_latency_seconds_count", ())] == 6
                assert got[(
                    "streamer_ingest_latency_seconds_bucket", (("le", "+Inf"),)
                )] == 6
                assert got[("streamer_ingest_latency_seconds_sum", ())] > 0
                assert got[("streamer_subscriptions", (("kind", "indexed"),))] == 1
                assert got[("streamer_subscriptions", (("kind", "scan"),))] == 1
                assert got[("streamer_clauses", (("kind", "indexed"),))] == 1
                assert got[("streamer_clauses", (("kind", "scan"),))] == 1
                assert got[("streamer_expired_sessions_total", ())] == 1
                assert got[("streamer_lagging_cutoffs_total", ())] == 0
                assert got[("streamer_puller_reconnects_total", ())] == 0
                assert got[("streamer_puller_markers_refused_total", ())] == 0
                assert got[("streamer_progress_marker_age_seconds", ())] == 5

                # Two more deliveries to s1: the fourth fits, the fifth cuts it off.
                for i in range(7, 9):
                    ingest.process(pb.PullerEvent(
                        change_event=change(i, full={"chat": "c1"}), progress=f"p{i}"))
                got = scrape(metrics)
                assert got[("streamer_lagging_cutoffs_total", ())] == 1
                assert got[("streamer_gateway_queued_messages_max", ())] == 4
                # Produced for s1 also when its queue could not take it.
                assert got[("streamer_deliveries_total", (("operation", "insert"),))] == 7
                assert got[("streamer_matches_total", ())] == 9
                with pytest.raises(grpc.aio.AioRpcError) as cut:
                    while True:
                        await one.read()
                assert cut.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                await until(lambda: scrape(metrics)[("streamer_gateway_streams", ())] == 1)
                two.cancel()
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            await server.stop(grace=0)
            await puller.stop()

    asyncio.run(main())


# -- streamer serve --metrics ----------------------------------------------


def fetch(url: str) -> Samples:
    """GET the metrics, retrying while the server is not up yet (bounded)."""
    for _ in range(300):
        try:
            with urllib.request.urlopen(url, timeout=10) as response:
                assert response.status == 200
                assert response.headers["Content-Type"].startswith("text/plain")
                return parse(response.read().decode())
        except (ConnectionError, urllib.error.URLError):
            time.sleep(0.1)
    raise AssertionError(f"no metrics at {url}")


def test_help_documents_metrics() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    assert "--metrics HOST:PORT" in out
    assert "Prometheus" in out


def test_serve_exposes_metrics_over_http(tmp_path: Path) -> None:
    async def main() -> None:
        puller = PullerDouble()
        target = await puller.start()
        port, metrics_port = free_port(), free_port()
        url = f"http://127.0.0.1:{metrics_port}/metrics"
        proc = subprocess.Popen(
            [sys.executable, "-m", "streamer", "serve", "--listen", f"127.0.0.1:{port}",
             "--puller", target, "--state-dir", str(tmp_path),
             "--metrics", f"127.0.0.1:{metrics_port}"],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
        )
        try:
            async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
                await asyncio.wait_for(channel.channel_ready(), 30)
                before = await asyncio.to_thread(fetch, url)
                assert before[("streamer_events_total", (("op", "insert"),))] == 0
                assert before[("streamer_gateway_streams", ())] == 0
                call = sgrpc.StreamerServiceStub(channel).Stream()
                await call.write(subscribe("s", chat="c"))
                assert (await call.read()).subscribe_response.success
                await until(lambda: len(puller.subscriptions) > 0)
                await puller.append(pb.ChangeEvent(
                    event_id="e0", database="app", mgo_coll="messages", mgo_doc_id="m0",
                    op_type="insert", full_doc=orjson.dumps({"chat": "c"})))
                await asyncio.wait_for(call.read(), 30)
                after = await asyncio.to_thread(fetch, url)
                assert after[("streamer_events_total", (("op", "insert"),))] == 1
                assert after[("streamer_deliveries_total", (("operation", "insert"),))] == 1
                assert after[("streamer_matches_total", ())] == 1
                assert after[("streamer_ingest_latency_seconds_count", ())] == 1
                assert after[("streamer_gateway_streams", ())] == 1
                assert after[("streamer_subscriptions", (("kind", "indexed"),))] == 1
                assert after[("streamer_subscriptions", (("kind", "scan"),))] == 0
                proc.send_signal(signal.SIGTERM)
                assert await asyncio.to_thread(proc.wait, 30) == 0
            assert proc.stdout is not None
            log = proc.stdout.read().decode()
            assert f"metrics on http://127.0.0.1:{metrics_port}/metrics" in log
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait(10)
            await puller.stop()

    asyncio.run(main())


def serve(
    tmp_path: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "streamer", "serve", "--listen", f"127.0.0.1:{free_port()}",
         "--puller", "127.0.0.1:1", "--state-dir", str(tmp_path), *args],
        capture_output=True, text=True, timeout=60, env={**os.environ, **(env or {})},
    )


@pytest.mark.parametrize("how", ["flag", "environment"])
def test_bad_metrics_value_is_a_clear_error(tmp_path: Path, how: str) -> None:
    if how == "flag":
        result = serve(tmp_path, "--metrics", "9100")
    else:
        result = serve(tmp_path, env={"STREAMER_METRICS": "9100"})
    assert result.returncode == 2
    named = "argument --metrics" if how == "flag" else "STREAMER_METRICS"
    assert f"{named}: not HOST:PORT: '9100'" in result.stderr


def test_busy_metrics_port_is_a_clear_error(tmp_path: Path) -> None:
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        result = serve(tmp_path, "--metrics", f"127.0.0.1:{port}")
    assert result.returncode == 2
    assert f"cannot serve metrics on 127.0.0.1:{port}: Address already in use" in result.stderr
