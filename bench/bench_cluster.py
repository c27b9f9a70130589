"""Cluster mode on one machine: 1, 2 and 3 ``streamer serve --cluster``
nodes holding N subscriptions in all (docs/scaling.md; docs/benchmarks.md,
Cluster mode).

Per node count, everything fresh: one etcd member (``tests/etcd_helpers``),
one ``streamer puller --workload chat --stamp-event-ids`` at a fixed
``RATE``, the nodes (``--lease-ttl TTL``, each reading the whole Puller
stream), and ``GATEWAYS`` cluster clients (``StreamerClient(cluster=...)``)
hosted ``PER_PROCESS`` per process by the end-to-end benchmark's gateway
processes (``python -m streamer.tools.benchmark gateway --cluster``), each
registering its share of ``Workload(N, seed=1, gateways=GATEWAYS)``: every
subscription goes to its shard's node. The gateways register one after
another (``ONE_AT_A_TIME``, default on; 0: all at once, as the end-to-end
benchmark does): with all eight registering at once, each turn of a node's
event loop ran a registration chunk of every stream, turns reached
0.3-1.1 s on this shared machine, the etcd keepalive (on the same loop)
went unanswered for TTL - max(1, TTL/3) and the node fenced itself, at a
TTL of 5 s and of 10 s (docs/scaling.md, Where it stops scaling). Then:

- per node: subscriptions (``streamer_subscriptions``) and RSS once every
  gateway has every answer (and again after the measured window);
- end-to-end latency, Puller emit stamp → gateway, of every 4th delivery,
  over a ``SECONDS`` window after ``WARMUP``, with the events reaching the
  gateways against those the Puller produced (a probe follows its head) and
  each node's CPU over the window;
- with 2 or more nodes: SIGKILL of the last node while events flow. Re-home
  time is from the kill until every subscription that was at the killed
  node is answered by a live node (re-subscribed there with
  ``resume_after`` = its marker) and until every one of them is live again
  (answered live, or caught up after its marker through the Puller's
  replay): the gateway processes follow each such subscription and are
  polled every ``POLL`` s, so the figures are that coarse. Also: when etcd
  showed the killed node's shards owned again, and the latency of
  everything delivered from the kill until ``AFTER`` s after the last
  subscription was live (a catch-up's deliveries carry their old emit
  stamps: the worst of them is the gap a moved subscription saw).

Placement on the 2 cores: every node on CPU 1, the Puller, the gateways
and this driver on CPU 0, etcd on either at a higher priority (nice -10: it
stands for a coordination service of its own). So the Streamer tier has one core
whatever the node count: with n nodes each has 1/n of it, where a real
deployment gives each node its own. What is a property of the design
(subscriptions and memory per node fall as 1/n; every node reads and
decodes the whole stream, so the tier's CPU for ingest grows with n) is
separated in the table from what is this machine (n processes on one core).

Sizes (``STREAMER_BENCH_CLUSTER_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 300000 (20000), ``NODES`` "1,2,3",
``RATE`` 1000 events/s, ``GATEWAYS`` 8 (4), ``PER_PROCESS`` 4 (2),
``SECONDS`` 15 (5), ``WARMUP`` 5 (2), ``TTL`` 5 (3) s, ``POLL`` 0.25 s,
``AFTER`` 2 s, ``ONE_AT_A_TIME`` 1. Figures: ``bench/results/cluster.json``. Figures are
recorded, never asserted; the run asserts that every subscription was
accepted, that the nodes together hold exactly N, and that every
subscription of a killed node is live again elsewhere.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import select
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from reliability import (
    BENCH_DIR,
    Children,
    Honest,
    count,
    counter,
    line_of,
    machine,
    puller_argv,
    record,
    serve_argv,
    size,
    table,
    wait_for,
    work_dir,
)

from streamer.cluster import shards
from streamer.cluster.etcd import EtcdClient
from streamer.errors import EtcdUnavailable
from streamer.tools.benchmark import (
    CYCLE,
    PROBE_HEARTBEAT,
    SUSTAINED_SHARE,
    _Probe,
    bucket_quantile,
    window_of,
)
from streamer.tools.measure import cpu_seconds, free_port, rss_mib, scrape

sys.path.insert(0, str(BENCH_DIR.parent / "tests"))
from cluster_helpers import cluster_keys
from etcd_helpers import ETCD_MISSING, etcd_cluster

N = count("STREAMER_BENCH_CLUSTER_N", 300_000, 20_000)
NODES = [int(x) for x in os.environ.get("STREAMER_BENCH_CLUSTER_NODES", "1,2,3").split(",") if x]
RATE = count("STREAMER_BENCH_CLUSTER_RATE", 1_000, 1_000)
GATEWAYS = count("STREAMER_BENCH_CLUSTER_GATEWAYS", 8, 4)
PER_PROCESS = count("STREAMER_BENCH_CLUSTER_PER_PROCESS", 4, 2)
SECONDS = size("STREAMER_BENCH_CLUSTER_SECONDS", 15, 5)
WARMUP = size("STREAMER_BENCH_CLUSTER_WARMUP", 5, 2)
TTL = count("STREAMER_BENCH_CLUSTER_TTL", 5, 3)
POLL = size("STREAMER_BENCH_CLUSTER_POLL", 0.25, 0.25)
AFTER = size("STREAMER_BENCH_CLUSTER_AFTER", 2, 2)
ONE_AT_A_TIME = os.environ.get("STREAMER_BENCH_CLUSTER_ONE_AT_A_TIME", "1") not in ("", "0")
ETCD_NICE = -10
SEED = 1
NODE_CPUS = {1}
OTHER_CPUS = {0}


def test_cluster(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    if ETCD_MISSING:
        import pytest

        pytest.skip(ETCD_MISSING)
    figures: dict[str, Any] = {"meta": machine(), "config": {
        "n": N, "nodes": NODES, "rate": RATE, "gateways": GATEWAYS, "per_process": PER_PROCESS,
        "seconds": SECONDS, "warmup": WARMUP, "lease_ttl": TTL, "poll": POLL,
        "one_at_a_time": ONE_AT_A_TIME,
        "placement": "every node on CPU 1; Puller, gateways and driver on CPU 0; etcd on "
                     f"both at nice {ETCD_NICE}",
    }, "runs": []}

    def run() -> None:
        for n in NODES:
            try:
                figures["runs"].append(_run(work_dir(tmp_path) / f"nodes-{n}", n))
            except RuntimeError as exc:  # a node fenced: recorded, asserted after
                figures["runs"].append({"nodes": n, "failure": str(exc)})

    benchmark.pedantic(run, rounds=1, iterations=1)
    lines = [
        f"N = {N:,} subscriptions over {GATEWAYS} cluster clients ({PER_PROCESS} per "
        f"process), {RATE:,} events/s offered, {SECONDS:g} s windows after {WARMUP:g} s, "
        f"lease TTL {TTL} s; nodes on CPU 1, Puller and gateways on CPU 0, etcd on either",
        *table(["nodes", "subs per node", "RSS MiB per node", "register s",
                "events/s (produced)", "sustained", "p50 / p99 / p99.9 ms",
                "CPU per node (sum)", "CPU ms per 1k events per node",
                "kill → owned / answered / live s", "after kill p99 / max ms"],
               [_cells(r) for r in figures["runs"] if "failure" not in r]),
        *(f"{r['nodes']} node(s): {r['failure']}" for r in figures["runs"] if "failure" in r),
    ]
    record("cluster", bench_report, figures, lines, benchmark)
    for r in figures["runs"]:
        assert "failure" not in r, r
        assert sum(r["subscriptions_per_node"].values()) == N, r
        if "rehome" in r:
            assert not r["rehome"]["failure"], r["rehome"]
            assert r["rehome"]["live_s"] is not None, r["rehome"]["states"]
            assert sum(r["rehome"]["subscriptions_per_node"].values()) == N, r


def _cells(r: dict[str, Any]) -> list[str]:
    subs = list(r["subscriptions_per_node"].values())
    rss = list(r["rss_mib_per_node"].values())
    cpu = list(r["cpu_per_node"].values())
    per_1k = list(r["cpu_ms_per_1000_events_per_node"].values())
    k = r.get("rehome")
    return [
        str(r["nodes"]),
        " / ".join(f"{x:,}" for x in subs),
        " / ".join(f"{x:.0f}" for x in rss),
        f"{r['register_s']:.1f}",
        f"{r['events_per_s']:,.0f} ({r['produced_per_s']:,.0f})",
        "yes" if r["sustained"] else "NO",
        f"{r['latency_p50_ms']:.1f} / {r['latency_p99_ms']:.1f} / {r['latency_p999_ms']:.1f}",
        " / ".join(f"{x:.0%}" for x in cpu) + f" ({sum(cpu):.0%})",
        " / ".join(f"{x:.0f}" for x in per_1k),
        "—" if k is None else " / ".join(
            "not done" if k[x] is None else f"{k[x]:.2f}"
            for x in ("reowned_s", "answered_s", "live_s")),
        "—" if k is None else f"{k['latency_p99_ms']:,.0f} / {k['latency_max_ms']:,.0f}",
    ]


def _keys(endpoints: list[str]) -> tuple[set[str], dict[int, str]]:
    """The live node ids and each owned shard's owner (group ``*``)."""

    async def read() -> tuple[set[str], dict[int, str]]:
        async with EtcdClient(endpoints) as etcd:
            return await cluster_keys(etcd)

    return asyncio.run(read())


def _settled(endpoints: list[str], live: set[str]) -> bool:
    """Whether exactly ``live`` are registered and own their shards (False
    while etcd does not answer: a loaded machine, asked again)."""
    try:
        nodes, owners = _keys(endpoints)
    except EtcdUnavailable:
        return False
    return nodes == live and owners == shards.placement(live)


def _subscriptions(metrics: int) -> int | None:
    try:
        return int(counter(scrape(f"127.0.0.1:{metrics}"), "streamer_subscriptions"))
    except OSError:
        return None


def _run(work: Path, n: int) -> dict[str, Any]:
    work.mkdir(parents=True, exist_ok=True)
    children = Children(work)
    probe: _Probe | None = None
    with etcd_cluster(work / "etcd", 1) as etcd:
        try:
            for member in etcd.members:
                # etcd stands for a coordination service of its own: on this
                # shared machine it gets both cores and priority, so that
                # what is measured is the nodes, not a starved etcd.
                assert member.proc is not None
                with contextlib.suppress(OSError):
                    os.setpriority(os.PRIO_PROCESS, member.proc.pid, ETCD_NICE)
            url = etcd.url
            puller = free_port()
            children.start("puller", puller_argv(
                puller, work / "puller-log", RATE, "--seed", str(SEED), "--stamp-event-ids",
                "--cycle", str(CYCLE), "--heartbeat-seconds", str(PROBE_HEARTBEAT)),
                cpus=OTHER_CPUS)
            share = -(-N // GATEWAYS)
            nodes: dict[str, dict[str, Any]] = {}
            for k in range(1, n + 1):
                port, metrics = free_port(), free_port()
                node_id = f"n{k}"
                proc = children.start(f"node-{k}", serve_argv(
                    port, puller, work / f"state-{k}", metrics,
                    "--cluster", url, "--node-id", node_id, "--advertise", f"127.0.0.1:{port}",
                    "--lease-ttl", str(TTL), "--resume-grace", "0",
                    "--gateway-queue", "1000000", "--session-ttl", "600",
                    "--max-subscriptions", str(2 * share),
                    "--max-gateway-bytes", str(max(64 << 20, 1024 * share)),
                    "--max-node-bytes", str(max(512 << 20, 1024 * N))), cpus=NODE_CPUS)
                nodes[node_id] = {"proc": proc, "metrics": metrics}
            procs = [v["proc"] for v in nodes.values()]
            wait_for("the nodes' shards", lambda: _settled(etcd.endpoints, set(nodes)), 60,
                     procs, every=0.2)
            probe = _Probe(f"127.0.0.1:{puller}")

            started = time.monotonic()
            gateway_procs = []
            for first in range(0, GATEWAYS, PER_PROCESS):
                # One gateway registering at a time (see the module docstring).
                indexes = range(first, min(first + PER_PROCESS, GATEWAYS))
                proc = children.start(
                    f"gateways-{first}",
                    ["-m", "streamer.tools.benchmark", "gateway", "--cluster", url,
                     "--index", ",".join(map(str, indexes)), "--gateways", str(GATEWAYS),
                     "--n", str(N), "--seed", str(SEED),
                     *(["--one-at-a-time"] if ONE_AT_A_TIME else [])],
                    pipes=True, cpus=OTHER_CPUS)
                gateway_procs.append(proc)
                if ONE_AT_A_TIME:
                    _ready(proc, procs)
            for proc in gateway_procs:
                if not ONE_AT_A_TIME:
                    _ready(proc, procs)
            register_s = time.monotonic() - started
            gateways = Honest(gateway_procs)
            subs = {node_id: _subscriptions(v["metrics"]) or 0 for node_id, v in nodes.items()}
            rss = {node_id: rss_mib(v["proc"].pid) for node_id, v in nodes.items()}

            time.sleep(WARMUP)
            window = _window(gateways, probe, nodes)
            result: dict[str, Any] = {
                "nodes": n, "register_s": register_s, "subscriptions_per_node": subs,
                "rss_mib_per_node": rss, **window,
                "rss_mib_per_node_after_window": {
                    node_id: rss_mib(v["proc"].pid) for node_id, v in nodes.items()},
            }
            print(f"\n{n} node(s), window: {json.dumps(result, default=str)}", file=sys.stderr)
            if n >= 2:
                result["rehome"] = _kill(f"n{n}", nodes, gateways, etcd.endpoints)
            print(f"\n{n} node(s): {json.dumps(result, default=str)}", file=sys.stderr)
            return result
        except Exception:
            for name in ["puller", *(f"node-{k}" for k in range(1, n + 1)), "gateways-0"]:
                print(f"--- {name}\n{children.log(name)}", file=sys.stderr)
            raise
        finally:
            if probe is not None:
                probe.close()
            children.close()


def _ready(proc: subprocess.Popen[str], nodes: list[subprocess.Popen[Any]]) -> None:
    _readable(proc, nodes, 300)
    if not line_of(proc).startswith("ready"):
        raise RuntimeError("a gateway process did not register its subscriptions")


def _readable(proc: subprocess.Popen[str], watch: list[subprocess.Popen[Any]],
              timeout: float) -> None:
    """Until ``proc`` has written a line; raises if a watched process (a
    node: fenced, crashed) exits first or ``timeout`` passes."""
    assert proc.stdout is not None
    deadline = time.monotonic() + timeout
    while not select.select([proc.stdout], [], [], 0.5)[0]:
        for other in watch:
            if other.poll() is not None:
                raise RuntimeError(f"process {other.pid} exited with {other.returncode} "
                                   "while the gateways registered")
        if time.monotonic() > deadline:
            raise RuntimeError(f"no answer from process {proc.pid} in {timeout:g} s")


def _window(gateways: Honest, probe: _Probe, nodes: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """The measured window: events reaching the gateways against those
    produced, latency, each node's CPU."""
    before = [json.loads(x) for x in gateways.ask("report")]
    gateways.ask("reset")
    cpu0 = {node_id: cpu_seconds(v["proc"].pid) for node_id, v in nodes.items()}
    t0, head0 = time.perf_counter(), probe.head
    time.sleep(SECONDS)
    after = [json.loads(x) for x in gateways.ask("report")]
    t1, head1 = time.perf_counter(), probe.head
    cpu1 = {node_id: cpu_seconds(v["proc"].pid) for node_id, v in nodes.items()}
    elapsed = t1 - t0
    seen0, seen1, hist = window_of(before, after)
    events, produced = seen1 - seen0, head1 - head0
    backlog = max(head1 - seen1, 0)
    cpu = {node_id: (cpu1[node_id] - cpu0[node_id]) / elapsed for node_id in nodes}
    events_per_s = events / elapsed
    return {
        "offered_per_s": RATE,
        "produced_per_s": produced / elapsed,
        "events_per_s": events_per_s,
        "sustained": events >= SUSTAINED_SHARE * produced and backlog <= max(0.25 * RATE, 500),
        "backlog_events": backlog,
        "deliveries_per_s": sum(r["deliveries"] for r in after) / elapsed,
        "latency_p50_ms": bucket_quantile(hist, 0.50) / 1e6,
        "latency_p99_ms": bucket_quantile(hist, 0.99) / 1e6,
        "latency_p999_ms": bucket_quantile(hist, 0.999) / 1e6,
        "latency_samples": sum(hist.values()),
        "cpu_per_node": cpu,
        "cpu_ms_per_1000_events_per_node": {
            node_id: c / max(events_per_s, 1e-9) * 1e6 for node_id, c in cpu.items()},
        "seconds": elapsed,
    }


def _kill(victim: str, nodes: dict[str, dict[str, Any]], gateways: Honest,
          endpoints: list[str]) -> dict[str, Any]:
    """SIGKILL ``victim``; until every subscription it held is live at
    another node."""
    gateways.ask("reset")
    affected = sum(json.loads(x)["affected"] for x in gateways.ask(f"kill {victim}"))
    killed = time.time()
    Children.kill(nodes[victim]["proc"])
    survivors = {node_id: v for node_id, v in nodes.items() if node_id != victim}
    reowned: float | None = None
    failure = ""
    deadline = killed + 120
    states: list[dict[str, Any]] = []
    while True:
        if reowned is None and _settled(endpoints, set(survivors)):
            reowned = time.time() - killed
        states = [json.loads(x) for x in gateways.ask("rehome")]
        if reowned is not None and all(s["not_live"] == 0 for s in states):
            break
        exited = [node_id for node_id, v in survivors.items() if v["proc"].poll() is not None]
        if exited:
            failure = f"node(s) {', '.join(exited)} exited (fenced?) while re-homing"
            break
        if time.time() > deadline:
            failure = "not done in 120 s"
            break  # recorded as not done (live_s None), asserted after the figures
        time.sleep(POLL)
    answered_at = [s["answered_at"] for s in states if s["affected"]]
    live_at = [s["live_at"] for s in states if s["affected"]]
    answered = None if None in answered_at else max(answered_at) - killed
    live = None if None in live_at else max(live_at) - killed
    time.sleep(AFTER)
    report = gateways.report()
    hist = report["hist"]
    with contextlib.suppress(RuntimeError):  # asserted after the figures
        if not failure:
            wait_for("the survivors holding every subscription", lambda: sum(
                _subscriptions(v["metrics"]) or 0 for v in survivors.values()) == N, 30,
                every=0.5)
    return {
        "failure": failure,
        "seconds_after_kill": time.time() - killed,
        "states": states,
        "victim": victim,
        "lease_ttl_s": TTL,
        "affected": affected,
        "reowned_s": reowned,
        "answered_s": answered,
        "live_s": live,
        "poll_s": POLL,
        "latency_p50_ms": bucket_quantile(hist, 0.50) / 1e6,
        "latency_p99_ms": bucket_quantile(hist, 0.99) / 1e6,
        "latency_max_ms": bucket_quantile(hist, 1.0) / 1e6,
        "deliveries": report["deliveries"],
        "subscriptions_per_node": {node_id: _subscriptions(v["metrics"]) or 0
                                   for node_id, v in survivors.items()
                                   if v["proc"].poll() is None},
        "rss_mib_per_node": {node_id: rss_mib(v["proc"].pid)
                             for node_id, v in survivors.items() if v["proc"].poll() is None},
    }
