"""Registration: how fast gateways register subscriptions over loopback,
in ``subscribe_batch``es against one ``subscribe`` each, measured in the
same run (docs/benchmarks.md, Registration).

``streamer serve`` (pinned to CPU 1; everything else on CPU 0 when there
are two) with a ``streamer puller`` at 1 event/s, and the gateways: ``PROCESSES``
processes of this file (``python bench/bench_registration.py gateway``)
hosting ``GATEWAYS`` ``StreamerClient``s in all, each registering its share
of ``Workload(N, seed=1, gateways=GATEWAYS)``. Every gateway builds its
requests, connects and says it is ready; then all start at once, and the
time runs until the last one has every answer.

- batched: ``subscribe_many`` on batching clients (``subscribe_batch``
  messages of up to 1,000 requests), ``N`` subscriptions;
- single: plain clients (``batch=False``), one ``subscribe`` message and
  one answer each, ``IN_FLIGHT`` outstanding per gateway, ``SINGLE_N``
  subscriptions (a million at their rate would take minutes).

Each mode gets its own Streamer, started with limits that admit its share
per gateway. Per mode: seconds, subscriptions per second, the Streamer's
RSS and CPU, and the CPU of the gateway processes (all their threads) from
the start to their last answer. The target (1,000,000 in at most 10 s, >= 100,000/s) is
reported, not asserted; every subscription must be accepted and counted
by the Streamer (``streamer_subscriptions``).

Sizes (``STREAMER_BENCH_REG_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 1000000 (40000), ``SINGLE_N``
100000 (8000), ``GATEWAYS`` 8 (4), ``PROCESSES`` 2, ``IN_FLIGHT`` 256.
Figures: ``bench/results/registration.json``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import sys
import time
from pathlib import Path
from typing import Any

from reliability import (
    Children,
    count,
    machine,
    pin,
    puller_argv,
    record,
    serve_argv,
    table,
    wait_for,
    work_dir,
)

from streamer.tools.measure import cpu_seconds, free_port, rss_mib, scrape

N = count("STREAMER_BENCH_REG_N", 1_000_000, 40_000)
SINGLE_N = count("STREAMER_BENCH_REG_SINGLE_N", 100_000, 8_000)
GATEWAYS = count("STREAMER_BENCH_REG_GATEWAYS", 8, 4)
PROCESSES = count("STREAMER_BENCH_REG_PROCESSES", 2, 2)
IN_FLIGHT = count("STREAMER_BENCH_REG_IN_FLIGHT", 256, 256)
SEED = 1
TARGET_PER_S = 100_000


def test_registration(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    figures: dict[str, Any] = {"meta": machine(), "runs": []}

    def run() -> None:
        for mode, n in (("single", SINGLE_N), ("batched", N)):
            figures["runs"].append(_register(work_dir(tmp_path) / mode, mode, n))

    benchmark.pedantic(run, rounds=1, iterations=1)
    runs = {r["mode"]: r for r in figures["runs"]}
    for r in runs.values():
        assert r["accepted"] == r["n"] and r["refused"] == 0, r
        assert r["streamer_subscriptions"] == r["n"], r
    batched, single = runs["batched"], runs["single"]
    figures["speedup"] = batched["per_s"] / single["per_s"]
    met = batched["n"] >= 1_000_000 and batched["per_s"] >= TARGET_PER_S
    lines = [
        f"{GATEWAYS} gateways in {PROCESSES} processes; Streamer on CPU 1, gateways on CPU 0",
        *table(["mode", "subscriptions", "seconds", "per second", "Streamer CPU s",
                "gateways' CPU s", "Streamer RSS MiB (before → after)"], [
            [r["mode"], f"{r['n']:,}", f"{r['seconds']:.2f}", f"{r['per_s']:,.0f}",
             f"{r['streamer_cpu_s']:.1f}", f"{r['gateway_cpu_s']:.1f}",
             f"{r['rss_before_mib']:.0f} → {r['rss_after_mib']:.0f}"]
            for r in figures["runs"]]),
        f"batched / single: {figures['speedup']:.1f}x",
        f"1,000,000 subscriptions at >= {TARGET_PER_S:,}/s: "
        + ("PASS" if met else f"MISS ({batched['n']:,} at {batched['per_s']:,.0f}/s)"),
    ]
    record("registration", bench_report, figures, lines, benchmark)


def _register(work: Path, mode: str, n: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    children = Children(work)
    try:
        port, puller, metrics = free_port(), free_port(), free_port()
        share = -(-n // GATEWAYS)
        # The defaults admit 100,000 subscriptions and 64 MiB per gateway;
        # this run's shares need more.
        serve = children.start("streamer", serve_argv(
            port, puller, work / "state", metrics,
            "--max-subscriptions", str(2 * share),
            "--max-gateway-bytes", str(max(64 << 20, 1024 * share)),
            "--max-node-bytes", str(max(512 << 20, 1024 * n))), cpus={1})
        children.start("puller", puller_argv(puller, work / "puller-log", 1), cpus={0})
        wait_for("the Streamer's metrics", lambda: _subscriptions(metrics) is not None, 60,
                 [serve])
        slots = [list(range(GATEWAYS))[i::PROCESSES] for i in range(PROCESSES)]
        gateways = [children.start(f"gateway-{i}", [
            __file__, "gateway", "--target", f"127.0.0.1:{port}", "--mode", mode,
            "--index", ",".join(map(str, mine)), "--gateways", str(GATEWAYS), "--n", str(n),
        ], pipes=True, cpus={0}) for i, mine in enumerate(slots)]
        for gateway in gateways:
            line = gateway.stdout.readline()
            if line.strip() != "ready":
                raise RuntimeError(f"a gateway did not get ready ({line!r}): "
                                   f"{children.log(f'gateway-{gateways.index(gateway)}')}")
        rss_before, cpu_before = rss_mib(serve.pid), cpu_seconds(serve.pid)
        start = time.perf_counter()
        for gateway in gateways:
            gateway.stdin.write("go\n")
            gateway.stdin.flush()
        reports = [json.loads(g.stdout.readline()) for g in gateways]
        seconds = time.perf_counter() - start
        cpu = cpu_seconds(serve.pid) - cpu_before
        counted = _subscriptions(metrics)
        return {
            "mode": mode, "n": n, "seconds": seconds, "per_s": n / seconds,
            "accepted": sum(r["accepted"] for r in reports),
            "refused": sum(r["refused"] for r in reports),
            "gateway_seconds": [r["seconds"] for r in reports],
            "gateway_cpu_s": sum(r["cpu_s"] for r in reports),
            "streamer_cpu_s": cpu, "streamer_subscriptions": counted,
            "rss_before_mib": rss_before, "rss_after_mib": rss_mib(serve.pid),
        }
    finally:
        children.close()


def _subscriptions(metrics: int) -> float | None:
    """The Streamer's ``streamer_subscriptions``; None while it is not up."""
    try:
        samples = scrape(f"127.0.0.1:{metrics}", timeout=5)
    except OSError:
        return None
    return sum(samples.get("streamer_subscriptions", {}).values())


# --------------------------------------------------------------- gateway role
async def _gateway(args: argparse.Namespace) -> None:
    from streamer.client import StreamerClient, Subscription, SubscriptionRejected
    from streamer.tools.workload import Workload

    indexes = [int(i) for i in args.index.split(",")]
    names = {f"gw-{i}" for i in indexes}
    specs: dict[str, list[Subscription]] = {name: [] for name in names}
    for s in Workload(args.n, seed=SEED, gateways=args.gateways).subscriptions():
        if s.gateway in names:
            specs[s.gateway].append(Subscription(
                s.collection, filters=s.filters, expression=s.expression or "",
                database=s.database, subscription_id=s.id))
    # The workload's specs live to the end: out of the collector's sight,
    # as a long-running gateway's own state would be.
    gc.collect()
    gc.freeze()
    batched = args.mode == "batched"
    clients = [StreamerClient(args.target, gateway_id=name, batch=batched,
                              connect_timeout=60, ack_timeout=120)
               for name in sorted(names)]
    for client in clients:
        await client.__aenter__()
    for client in clients:
        while not client.connected:
            await asyncio.sleep(0.01)
    loop = asyncio.get_running_loop()
    print("ready", flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)
    start, cpu = time.perf_counter(), time.process_time()

    async def register(client: StreamerClient, mine: list[Subscription]) -> list[Any]:
        if batched:
            return await client.subscribe_many(mine)
        results: list[Any] = []
        for i in range(0, len(mine), args.in_flight):
            results += await asyncio.gather(*(
                client.subscribe(s.collection, filters=s.filters, expression=s.expression,
                                 database=s.database, subscription_id=s.subscription_id)
                for s in mine[i:i + args.in_flight]), return_exceptions=True)
        return results

    results = await asyncio.gather(*(
        register(c, specs[c.gateway_id]) for c in clients))
    seconds, cpu = time.perf_counter() - start, time.process_time() - cpu
    flat = [r for rs in results for r in rs]
    refused = [r for r in flat if isinstance(r, SubscriptionRejected | BaseException)]
    print(json.dumps({"seconds": seconds, "cpu_s": cpu, "accepted": len(flat) - len(refused),
                      "refused": len(refused),
                      "first_refusal": str(refused[0]) if refused else None}), flush=True)
    await loop.run_in_executor(None, sys.stdin.readline)  # until the driver closes stdin
    for client in clients:
        await client.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="bench_registration.py")
    roles = parser.add_subparsers(dest="role", required=True)
    gateway = roles.add_parser("gateway")
    gateway.add_argument("--target", required=True)
    gateway.add_argument("--mode", choices=("batched", "single"), required=True)
    gateway.add_argument("--index", required=True)
    gateway.add_argument("--gateways", type=int, required=True)
    gateway.add_argument("--n", type=int, required=True)
    gateway.add_argument("--in-flight", type=int, default=IN_FLIGHT)
    args = parser.parse_args()
    pin(0, {0})
    asyncio.run(_gateway(args))


if __name__ == "__main__":
    main()
