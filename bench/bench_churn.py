"""Churn: subscriptions and gateways coming and going, and whether the
Streamer's memory and file descriptors come back (docs/reliability.md, Churn).

- ``test_churn_in_process``: ``PAIRS`` subscribe/unsubscribe pairs in waves
  of ``WAVE`` through the node's own parts (``Sessions``,
  ``SubscriptionSet``, ``Matcher``, ``Ingest.process_batch``), on top of
  ``BASE`` subscriptions that stay, with ``EVENTS`` workload events matched
  and framed between waves. Each wave is a gateway session subscribing
  workload-shaped requests (1 % of them on a collection and a field of
  their own, so that paths and per-collection indexes come and go too);
  even waves unsubscribe them one by one, odd waves end the session (its
  subscriptions released in chunks by the reclaimer). RSS after
  ``WARMUP_PAIRS`` and at the end (both after ``gc.collect()``): the end
  must be within 10 % of the first, and the index back to its base.
- ``test_churn_over_the_wire``: ``WIRE_PAIRS`` pairs through a real
  ``streamer serve`` from one ``StreamerClient`` (pipelined, in waves of
  ``WIRE_WAVE``), while ``streamer puller --workload chat`` sends
  ``WIRE_RATE`` events/s that the client receives; RSS of the serve process
  after ``WIRE_WARMUP`` pairs and at the end, within 10 %.
- ``test_churn_connects``: ``CONNECTS`` gateways, each a ``StreamerClient``
  that connects, says Hello, subscribes once and closes, ``CONCURRENCY`` at
  a time, against the same serve process: its open file descriptors must
  be back to their level after ``CONNECTS_WARMUP`` connects, its RSS
  within 10 %, and no gateway left in its progress file.

Sizes (``STREAMER_BENCH_CHURN_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``PAIRS`` 1000000 (50000), ``WAVE`` 10000
(5000), ``WARMUP_PAIRS`` 100000 (10000), ``BASE`` 20000 (2000), ``EVENTS``
2000 (500) per wave, ``WIRE_PAIRS`` 100000 (10000), ``WIRE_WAVE`` 5000
(2000), ``WIRE_WARMUP`` 10000 (2000), ``WIRE_RATE`` 1000 (200), ``CONNECTS``
10000 (500), ``CONNECTS_WARMUP`` 500 (100), ``CONCURRENCY`` 8. Figures:
``bench/results/churn.json``.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import json
import os
import shutil
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from reliability import (
    Children,
    count,
    keep_logs,
    machine,
    open_fds,
    puller_argv,
    record,
    serve_argv,
    table,
    wait_for,
    work_dir,
)

from streamer.client import StreamerClient
from streamer.matching import Filter, Matcher
from streamer.node.ingest import Ingest
from streamer.node.progress import ProgressStore
from streamer.node.server import StreamerServicer
from streamer.node.sessions import Sessions
from streamer.node.subscriptions import SubscriptionSet
from streamer.protocol.puller_v1_pb2 import PullerEvent
from streamer.protocol.streamer_v1_pb2 import Filter as ProtocolFilter
from streamer.protocol.streamer_v1_pb2 import ListValue, SubscribeRequest, Value
from streamer.tools.measure import free_port, rss_mib, scrape
from streamer.tools.workload import SubscriptionSpec, Workload, change_event

PAIRS = count("STREAMER_BENCH_CHURN_PAIRS", 1_000_000, 50_000)
WAVE = count("STREAMER_BENCH_CHURN_WAVE", 10_000, 5_000)
WARMUP_PAIRS = count("STREAMER_BENCH_CHURN_WARMUP_PAIRS", 100_000, 10_000)
BASE = count("STREAMER_BENCH_CHURN_BASE", 20_000, 2_000)
EVENTS = count("STREAMER_BENCH_CHURN_EVENTS", 2_000, 500)
WIRE_PAIRS = count("STREAMER_BENCH_CHURN_WIRE_PAIRS", 100_000, 10_000)
WIRE_WAVE = count("STREAMER_BENCH_CHURN_WIRE_WAVE", 5_000, 2_000)
WIRE_WARMUP = count("STREAMER_BENCH_CHURN_WIRE_WARMUP", 10_000, 2_000)
WIRE_RATE = count("STREAMER_BENCH_CHURN_WIRE_RATE", 1_000, 200)
CONNECTS = count("STREAMER_BENCH_CHURN_CONNECTS", 10_000, 500)
CONNECTS_WARMUP = count("STREAMER_BENCH_CHURN_CONNECTS_WARMUP", 500, 100)
CONCURRENCY = count("STREAMER_BENCH_CHURN_CONCURRENCY", 8, 8)
SEED = 1
BACK = 1.10  # RSS at the end over RSS after the warm-up
IN_FLIGHT = 256  # pipelined subscribe requests over the wire
OWN_SHARE = 100  # one in OWN_SHARE churned subscriptions has its own collection and field


@dataclass(frozen=True, slots=True)
class Spec:
    """One churned subscription."""

    id: str
    database: str
    collection: str
    filters: tuple[Filter, ...]
    expression: str

    def request(self) -> SubscribeRequest:
        return SubscribeRequest(
            subscription_id=self.id, database=self.database, collection=self.collection,
            filters=[ProtocolFilter(field=f.field, op=f.op, value=_value(f.value))
                     for f in self.filters],
            expression=self.expression)


def _value(value: Any) -> Value:
    if isinstance(value, bool):
        return Value(bool_value=value)
    if isinstance(value, int):
        return Value(int_value=value)
    if isinstance(value, float):
        return Value(double_value=value)
    if isinstance(value, list | tuple):
        return Value(list_value=ListValue(values=[_value(v) for v in value]))
    return Value(string_value=value)


def _specs(prefix: str, shapes: Iterator[SubscriptionSpec], n: int) -> list[Spec]:
    """``n`` subscriptions shaped like the workload's, ids ``prefix-<i>``;
    one in ``OWN_SHARE`` on a collection and a field of its own."""
    out = []
    for i, shape in zip(range(n), shapes, strict=False):
        sub_id = f"{prefix}-{i}"
        if i % OWN_SHARE == OWN_SHARE - 1:
            out.append(Spec(sub_id, "app", f"{prefix}-c{i}", (Filter(f"{prefix}_f{i}", "==", i),),
                            ""))
        else:
            out.append(Spec(sub_id, shape.database, shape.collection, shape.filters,
                            shape.expression or ""))
    return out


# ---------------------------------------------------------------- in process
async def _in_process(state: Path) -> dict[str, Any]:
    matcher = Matcher()
    subscriptions = SubscriptionSet(matcher)
    sessions = Sessions(subscriptions)
    ingest = Ingest("unused", sessions, StreamerServicer(sessions), ProgressStore(state))
    reclaimer = asyncio.create_task(subscriptions.reclaim())
    workload = Workload(max(BASE, WAVE), seed=SEED, gateways=1)
    base = sessions.connect()
    for spec in _specs("base", workload.subscriptions(), BASE):
        assert subscriptions.subscribe(base.owner, spec.request()).success
    base_stats = matcher.stats()
    pool = [PullerEvent(change_event=change_event(spec, i), progress=f"p{i}")
            for i, spec in enumerate(workload.events(20_000))]
    events = itertools.cycle(pool)
    shapes = itertools.cycle(list(workload.subscriptions()))
    pid = os.getpid()
    pairs = 0
    samples: list[tuple[int, float]] = []
    warm: dict[str, Any] = {}
    matches = 0
    started = time.perf_counter()
    wave = 0
    while pairs < PAIRS:
        size = min(WAVE, PAIRS - pairs)
        session = sessions.connect()
        requests = [spec.request() for spec in _specs(f"w{wave}", shapes, size)]
        for request in requests:
            response = subscriptions.subscribe(session.owner, request)
            assert response.success, response
        before = ingest.matches
        for first in range(0, EVENTS, 256):  # as the Puller batches them
            batch = [next(events) for _ in range(min(256, EVENTS - first))]
            ingest.process_batch(batch, time.perf_counter())
        matches += ingest.matches - before
        if wave % 2 == 0:
            for request in requests:
                assert subscriptions.unsubscribe(session.owner, request.subscription_id)
            sessions.disconnect(session)
        else:
            sessions.disconnect(session)
            while len(subscriptions) > BASE:  # the reclaimer's chunks
                await asyncio.sleep(0)
        pairs += size
        wave += 1
        if not warm and pairs >= WARMUP_PAIRS:
            gc.collect()
            warm = {"pairs": pairs, "rss_mib": rss_mib(pid), "stats": matcher.stats()}
        samples.append((pairs, rss_mib(pid)))
    elapsed = time.perf_counter() - started
    reclaimer.cancel()
    gc.collect()
    end = {"pairs": pairs, "rss_mib": rss_mib(pid), "stats": matcher.stats()}
    return {
        "pairs": pairs, "waves": wave, "wave": WAVE, "base": BASE, "events_per_wave": EVENTS,
        "seconds": elapsed, "pairs_per_s": pairs / elapsed, "churned_matches": matches,
        "base_stats": base_stats, "warm": warm, "end": end,
        "rss_ratio": end["rss_mib"] / warm["rss_mib"],
        "rss_samples": samples[:: max(1, len(samples) // 20)],
        "owner_numbers": len(sessions.by_owner),
    }


# --------------------------------------------------------------- over the wire
class Serve:
    """``streamer serve`` and ``streamer puller --workload chat`` as processes."""

    def __init__(self, work: Path, rate: float) -> None:
        self.children = Children(work)
        self.work = work
        self.port, puller = free_port(), free_port()
        self.metrics = free_port()
        self.proc = self.children.start(
            "streamer", serve_argv(self.port, puller, work / "state", self.metrics))
        self.children.start("puller", puller_argv(
            puller, work / "puller-log", rate, "--seed", str(SEED)))
        wait_for("the Streamer's metrics", self._scrapes, 60, [self.proc])

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _scrapes(self) -> bool:
        try:
            self.scrape()
        except OSError:
            return False
        return True

    def scrape(self) -> dict[str, float]:
        samples = scrape(f"127.0.0.1:{self.metrics}", timeout=5)
        return {name: sum(samples.get(name, {}).values()) for name in (
            "streamer_subscriptions", "streamer_gateway_streams", "streamer_deliveries_total")}

    def close(self) -> None:
        self.children.close()


async def _until(predicate: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not done after {timeout:g} s")
        await asyncio.sleep(0.1)


async def _over_the_wire(serve: Serve) -> dict[str, Any]:
    pid = serve.proc.pid
    workload = Workload(max(WIRE_WAVE, 1000), seed=SEED, gateways=1)
    shapes = itertools.cycle(list(workload.subscriptions()))
    received = 0

    async with StreamerClient(serve.target, gateway_id="churn", connect_timeout=60) as client:
        async def drain() -> None:
            nonlocal received
            async for _ in client.deliveries():
                received += 1

        reader = asyncio.create_task(drain())
        pairs = 0
        warm: dict[str, Any] = {}
        samples = []
        started = time.perf_counter()
        wave = 0
        while pairs < WIRE_PAIRS:
            size = min(WIRE_WAVE, WIRE_PAIRS - pairs)
            specs = _specs(f"w{wave}", shapes, size)
            for i in range(0, size, IN_FLIGHT):
                await asyncio.gather(*(
                    client.subscribe(s.collection, database=s.database, filters=s.filters,
                                     expression=s.expression, subscription_id=s.id)
                    for s in specs[i:i + IN_FLIGHT]
                ))
            for s in specs:
                await client.unsubscribe(s.id)
            # Unsubscribes have no answer: the metric says when they are in.
            await _until(lambda: serve.scrape()["streamer_subscriptions"] == 0, 60,
                         "unsubscribes applied")
            pairs += size
            wave += 1
            if not warm and pairs >= WIRE_WARMUP:
                warm = {"pairs": pairs, "rss_mib": rss_mib(pid)}
            samples.append((pairs, rss_mib(pid)))
        elapsed = time.perf_counter() - started
        await asyncio.sleep(1.0)
        end = {"pairs": pairs, "rss_mib": rss_mib(pid)}
        reader.cancel()
        reconnects = client.reconnects
    return {
        "pairs": pairs, "wave": WIRE_WAVE, "events_per_s": WIRE_RATE, "seconds": elapsed,
        "pairs_per_s": pairs / elapsed, "deliveries_received": received,
        "client_reconnects": reconnects, "warm": warm, "end": end,
        "rss_ratio": end["rss_mib"] / warm["rss_mib"],
        "rss_samples": samples[:: max(1, len(samples) // 20)],
    }


async def _connects(serve: Serve) -> dict[str, Any]:
    pid = serve.proc.pid
    refused: dict[str, int] = {}
    done = 0

    async def one(i: int) -> None:
        async with StreamerClient(serve.target, gateway_id=f"connect-{i}",
                                  connect_timeout=60) as client:
            await client.subscribe("messages", database="app",
                                   filters=[("chat_id", "==", f"c{i % 100}")],
                                   subscription_id=f"connect-{i}", timeout=60)

    async def run(first: int, last: int) -> None:
        nonlocal done
        numbers = iter(range(first, last))

        async def worker() -> None:
            nonlocal done
            for i in numbers:
                try:
                    await one(i)
                except Exception as exc:
                    refused[type(exc).__name__] = refused.get(type(exc).__name__, 0) + 1
                done += 1

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))

    def settled() -> bool:
        m = serve.scrape()
        return m["streamer_gateway_streams"] == 0 and m["streamer_subscriptions"] == 0

    await run(0, CONNECTS_WARMUP)
    await _until(settled, 60, "the warm-up's streams ended")
    await asyncio.sleep(1.0)
    base = {"connects": done, "fds": open_fds(pid), "rss_mib": rss_mib(pid)}
    started = time.perf_counter()
    await run(CONNECTS_WARMUP, CONNECTS)
    elapsed = time.perf_counter() - started
    await _until(settled, 60, "every stream ended")
    await asyncio.sleep(1.0)
    end = {"connects": done, "fds": open_fds(pid), "rss_mib": rss_mib(pid)}
    progress = json.loads((serve.work / "state" / "progress.json").read_text())
    return {
        "connects": done, "concurrency": CONCURRENCY, "seconds": elapsed,
        "connects_per_s": (CONNECTS - CONNECTS_WARMUP) / elapsed, "failed": refused,
        "base": base, "end": end, "rss_ratio": end["rss_mib"] / base["rss_mib"],
        "known_gateways_at_end": progress.get("gateways"),
    }


# -------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def figures(bench_report: list[str]) -> Iterator[dict[str, Any]]:
    out: dict[str, Any] = {"meta": machine()}
    yield out
    record("churn", bench_report, out, render(out))


@pytest.fixture(scope="module")
def serve(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Serve]:
    work = work_dir(tmp_path_factory.mktemp("churn"))
    serving = Serve(work, WIRE_RATE)
    failed = True
    try:
        yield serving
        failed = False
    finally:
        serving.close()
        if failed:
            keep_logs(work, "churn")
        shutil.rmtree(work, ignore_errors=True)


@pytest.mark.timeout(7200)
def test_churn_in_process(benchmark: Any, figures: dict[str, Any], tmp_path: Path) -> None:
    benchmark.group = "reliability"
    result = benchmark.pedantic(lambda: asyncio.run(_in_process(tmp_path)), rounds=1,
                                iterations=1)
    figures["in_process"] = result
    benchmark.extra_info.update(result)
    assert result["end"]["stats"] == result["base_stats"] == result["warm"]["stats"]
    assert result["churned_matches"] > 0
    assert result["rss_ratio"] <= BACK, result


@pytest.mark.timeout(3600)
def test_churn_over_the_wire(benchmark: Any, figures: dict[str, Any], serve: Serve) -> None:
    benchmark.group = "reliability"
    result = benchmark.pedantic(lambda: asyncio.run(_over_the_wire(serve)), rounds=1,
                                iterations=1)
    figures["over_the_wire"] = result
    benchmark.extra_info.update(result)
    assert result["client_reconnects"] == 0
    assert result["deliveries_received"] > 0
    assert result["rss_ratio"] <= BACK, result


@pytest.mark.timeout(3600)
def test_churn_connects(benchmark: Any, figures: dict[str, Any], serve: Serve) -> None:
    benchmark.group = "reliability"
    result = benchmark.pedantic(lambda: asyncio.run(_connects(serve)), rounds=1, iterations=1)
    figures["connects"] = result
    benchmark.extra_info.update(result)
    assert not result["failed"], result["failed"]
    assert result["end"]["fds"] <= result["base"]["fds"], result
    assert result["rss_ratio"] <= BACK, result
    assert result["known_gateways_at_end"] == [], result


def _verdict(ok: bool) -> str:
    return "PASS" if ok else "MISS"


def render(figures: dict[str, Any]) -> list[str]:
    rows = []
    if "in_process" in figures:
        f = figures["in_process"]
        rows.append([
            "in process (SubscriptionSet + Matcher + Ingest)",
            f"{f['pairs']:,} pairs in {f['waves']} waves of {f['wave']:,}, over {f['base']:,} "
            f"base subscriptions, {f['events_per_wave']:,} events per wave "
            f"({f['churned_matches']:,} matches of churned subscriptions)",
            f"{f['seconds']:.0f} s ({f['pairs_per_s']:,.0f} pairs/s)",
            f"RSS {f['warm']['rss_mib']:.1f} MiB after {f['warm']['pairs']:,} pairs → "
            f"{f['end']['rss_mib']:.1f} MiB ({f['rss_ratio']:.3f}x, "
            f"{_verdict(f['rss_ratio'] <= BACK)}); index back to its base: "
            f"{f['end']['stats'] == f['base_stats']}",
        ])
    if "over_the_wire" in figures:
        f = figures["over_the_wire"]
        rows.append([
            "over the wire (streamer serve, one StreamerClient)",
            f"{f['pairs']:,} pairs in waves of {f['wave']:,}, {f['events_per_s']:,} events/s "
            f"({f['deliveries_received']:,} deliveries received)",
            f"{f['seconds']:.0f} s ({f['pairs_per_s']:,.0f} pairs/s)",
            f"serve RSS {f['warm']['rss_mib']:.1f} MiB after {f['warm']['pairs']:,} pairs → "
            f"{f['end']['rss_mib']:.1f} MiB ({f['rss_ratio']:.3f}x, "
            f"{_verdict(f['rss_ratio'] <= BACK)})",
        ])
    if "connects" in figures:
        f = figures["connects"]
        rows.append([
            "gateway connects (StreamerClient: connect, Hello, subscribe, close)",
            f"{f['connects']:,} connects, {f['concurrency']} at a time"
            + (f"; failed: {f['failed']}" if f["failed"] else ""),
            f"{f['seconds']:.1f} s ({f['connects_per_s']:,.0f} connects/s)",
            f"serve fds {f['base']['fds']} after {f['base']['connects']:,} connects → "
            f"{f['end']['fds']} ({_verdict(f['end']['fds'] <= f['base']['fds'])}); RSS "
            f"{f['base']['rss_mib']:.1f} → {f['end']['rss_mib']:.1f} MiB ({f['rss_ratio']:.3f}x, "
            f"{_verdict(f['rss_ratio'] <= BACK)}); gateways left in progress.json: "
            f"{f['known_gateways_at_end']}",
        ])
    return ["", *table(["churn", "what, how much", "time", "what came back"], rows)]

