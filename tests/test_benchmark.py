"""``streamer bench e2e`` and its aids in the Puller (no timing assertions)."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path

import grpc
import pytest
from service_helpers import until

from streamer.matching.matcher import Matcher
from streamer.node.ingest import Ingest
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol import puller_v1_pb2 as pb
from streamer.puller.log import ReplayLog
from streamer.puller.server import PullerServicer, add_to_server
from streamer.puller.sources import WorkloadSource
from streamer.tools import benchmark


def test_help() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "streamer", "bench", "e2e", "--help"],
        capture_output=True, text=True, check=True, timeout=60,
    ).stdout
    for option in ("--rates", "--plain-rates", "--seconds", "--quick", "--profile", "--out"):
        assert option in out


@pytest.mark.parametrize("value", [1, 15, 16, 17, 1000, 123_456, 2_000_000, 10**10])
def test_histogram_buckets_are_within_seven_percent(value: int) -> None:
    middle = benchmark.bucket_value(benchmark.bucket(value))
    assert abs(middle - value) <= 0.07 * value


def test_quantile() -> None:
    hist: dict[int, int] = {}
    for v in range(1, 1001):
        b = benchmark.bucket(v * 1000)
        hist[b] = hist.get(b, 0) + 1
    assert benchmark.bucket_quantile(hist, 0.5) == pytest.approx(500_000, rel=0.07)
    assert benchmark.bucket_quantile(hist, 0.99) == pytest.approx(990_000, rel=0.07)
    assert benchmark.quantile({}, 0.5) != benchmark.quantile({}, 0.5)  # NaN


def test_workload_source_stamps_ids_and_cycles() -> None:
    got: list[pb.ChangeEvent] = []

    async def emit(batch: Sequence[tuple[pb.ChangeEvent, bytes]]) -> None:
        got.extend(event for event, _ in batch)

    async def main() -> None:
        source = WorkloadSource(100_000.0, seed=1, n_subscriptions=2000,
                                stamp_event_ids=True, cycle=50)
        task = asyncio.create_task(source.run(emit, None))
        await until(lambda: len(got) >= 120)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    asyncio.run(main())
    for i, event in enumerate(got):
        prefix, index, stamp = event.event_id.split("-")
        assert (prefix, int(index)) == ("ev", i)
        assert int(stamp) // 1_000_000 == event.timestamp
    assert got[0].full_doc == got[50].full_doc == got[100].full_doc
    assert got[0].mgo_doc_id == got[50].mgo_doc_id


def test_no_subscribe_batch_makes_the_streamer_fall_back(tmp_path: Path) -> None:
    async def main() -> None:
        log = ReplayLog(tmp_path / "log")
        servicer = PullerServicer(log, subscribe_batch=False)
        server = grpc.aio.server()
        add_to_server(servicer, server)
        port = server.add_insecure_port("127.0.0.1:0")
        await server.start()
        registry = Sessions(SubscriptionSet(Matcher()))
        ingest = Ingest(f"127.0.0.1:{port}", registry, StreamerServicer(registry),
                        ProgressStore(tmp_path / "state"), backoff=(0.01, 0.05))
        task = asyncio.create_task(ingest.run())
        try:
            await until(lambda: servicer.consumers == 1)
            await servicer.append([(pb.ChangeEvent(
                event_id=f"ev-{n}", database="app", mgo_coll="messages", mgo_doc_id=f"m-{n}",
                op_type="insert", full_doc=b"{}"), b"") for n in range(5)])
            await until(lambda: ingest.events["unwatched"] == 5)  # no subscriptions: not decoded
            assert not ingest.batched
        finally:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
            await server.stop(0)
            log.close()

    asyncio.run(main())


def test_smoke_run(tmp_path: Path) -> None:
    """Every variant at one small rate; the JSON has every field."""
    out = tmp_path / "e2e.json"
    config = benchmark.Config(
        n=2000, gateways=2, rates=[1000], plain_rates=[1000], seconds=1.0, warmup=1.5,
        search_max=False, cycle=500, out=out, log=lambda line: None,
    )
    results = benchmark.run(config)
    assert json.loads(out.read_text())["variants"].keys() == {"relay", "batched", "plain"}
    for name in ("relay", "batched", "plain"):
        (run,) = results["variants"][name]["runs"]
        for key in ("offered_per_s", "produced_per_s", "events_per_s", "sustained",
                    "deliveries_per_s", "latency_p50_ms", "latency_p99_ms", "latency_p999_ms",
                    "cpu_s_per_1000_events", "rss_mib", "load_generator_utilisation"):
            assert key in run, (name, key)
        assert run["events_per_s"] > 0 and run["latency_samples"] > 0
    assert "cpu_ratio_to_relay" in results["variants"]["batched"]["runs"][0]
    lines = benchmark.render(results)
    assert any(line.startswith("| batched |") for line in lines)
