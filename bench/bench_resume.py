"""Resume: live latency of the gateways that are not resuming while one
gateway's subscriptions catch up from the Puller's replay (issue 11's
target: their p99 stays within 2x of its quiet value while 100 000
subscriptions catch up; docs/benchmarks.md, Live latency while
subscriptions catch up).

Processes on loopback, as ``bench_abuse`` runs them: ``streamer puller
--workload chat --stamp-event-ids`` at ``RATE`` events/s, ``streamer serve
--stall-seconds STALL`` (pinned to CPU 1; everything else on CPU 0 when
there are two), and

- the honest gateways: the benchmark's gateway processes (``python -m
  streamer.tools.benchmark gateway``, two ``StreamerClient``s each) holding
  the ``N`` subscriptions of ``Workload(N, seed=1, gateways=GATEWAYS)`` and
  timing every 4th delivery from the Puller's emit stamp. They never
  disconnect: they are the gateways that are not resuming.
- the resumer: one process of this file (``python bench/bench_resume.py
  resumer``, at nice 10 on the load generator's core, so that reading the
  replay does not take that core from the honest gateways; in production it
  is another machine), one ``StreamerClient`` (``resume=True``, batching)
  holding the ``RESUMING`` subscriptions of ``Workload(RESUMING, seed=1)``,
  registered with ``subscribe_many``. The Puller's chat workload is
  generated for 100 000 subscriptions: at the full size these are exactly
  the subscriptions its events are made for (a realistic share of them
  matches: the resumer receives deliveries, so every subscription has a
  marker). It writes every delivery it receives (the position of its
  marker, the operation, the subscription ids) to a file.

Phases:

1. warm-up (``2 x WARMUP`` seconds of events);
2. quiet: ``SECONDS`` seconds, the resumer connected and live: the honest
   p99 baseline;
3. stopped: ``SIGSTOP`` of the resumer. It no longer reads, so the
   Streamer's writes to it stall and the ``--stall-seconds`` watchdog (or
   the queue bound) cuts it off with ``RESOURCE_EXHAUSTED`` (the Streamer's
   log line of the stream's end says so, and
   ``streamer_lagging_cutoffs_total`` counts it). The resumer's channel
   does not probe the bandwidth-delay product (``grpc.http2.bdp_probe``
   0): its HTTP/2 receive window stays at 64 KiB, so the writes stall at
   once (with the default, at the quick sizes' rate, no write had stalled
   for 2 s ten seconds after ``SIGSTOP``, when the connection was dropped
   as lost instead: "cancelled by the gateway, or its connection was
   lost", 461 messages queued). It stays stopped ``STOPPED``
   seconds: ``RATE x STOPPED`` events to replay against its subscriptions;
4. catch-up: ``SIGCONT``. The resumer reads what its socket still held,
   gets the status, reconnects and re-subscribes every subscription with
   ``resume_after`` (batched); the Streamer replays from the Puller and
   hands over to live ingest. The window runs from ``SIGCONT`` until the
   resumer has been answered (its client is connected again) and the
   Streamer's ``streamer_catchup_subscriptions`` gauge is back to 0
   (bounded by ``CATCHUP_TIMEOUT``); the honest latency is measured over
   exactly that window, and reported again over the window ``AFTER`` (1)
   second longer (the same histogram, read again: live events the
   catch-up delayed may reach the honest gateways just after it);
5. quiet again: ``SETTLE`` seconds, then ``SECONDS`` measured.

During every window the driver scrapes the Streamer's metrics every
``POLL`` seconds (the catch-up window needs it; the quiet ones do the same,
so that the scrapes cost each window alike).

Per window: honest p50/p99/p99.9 and deliveries/s, events/s, the
Streamer's ingest→enqueue p99, longest event-loop pause and GC time (its
``/metrics``), the CPU of the Streamer, the Puller, the resumer and the
honest gateways, each core's busy share (the machine is shared: ``uptime``
before and after too). The stopped window is split at the cut-off, and
the catch-up window, besides whole, at the moment the resumer's client was
connected again (every re-subscription answered); the catch-up is also
shown as a time series (rows of at least a second: honest p50/p99, the
Streamer's longest pause and ingest→enqueue p99, subscriptions still
catching up), with the Streamer's logged handoffs and event-loop pauses
timed from ``SIGCONT``. For the catch-up: its duration, the time to
re-subscribe, events replayed, handoffs, merges, paced waits, resyncs and
late refusals, and what the resumer received on its new stream. Target:
the catch-up p99 within 2x the quiet p99 before it; a miss is reported,
not asserted.

Asserted (correctness): the resumer was cut off and reconnected, the
catch-up finished within the bound, no resync or late refusal, no ERROR
line in the Streamer's log, and no gap: each of the resumer's
subscriptions received, in order and once, every event that matches it
(``streamer.tools.demo.expected_ops`` over the Puller's log) from the
quiet window's start to the last event the resumer had received a moment
before it was stopped at the end; across the cut-off included.

Sizes (``STREAMER_BENCH_RESUME_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 20000 (2000), ``GATEWAYS`` 4 (2),
``RESUMING`` 100000 (10000), ``RATE`` 2000 (500), ``SECONDS`` 20 (6),
``WARMUP`` 3 (1), ``SETTLE`` 5 (2), ``STOPPED`` 10 (5), ``STALL``
(``--stall-seconds``) 2 (2), ``CATCHUP_TIMEOUT`` 300 (120), ``POLL`` 0.1.
Figures: ``bench/results/resume.json``, the processes' logs in
``bench/results/resume-logs/``.
"""

from __future__ import annotations

import argparse
import asyncio
import datetime as dt
import itertools
import json
import logging
import math
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability import (
    Children,
    Honest,
    count,
    counter,
    cpu_busy,
    cpu_share,
    cutoffs_logged,
    events_total,
    keep_logs,
    line_of,
    log_errors,
    machine,
    puller_argv,
    record,
    serve_argv,
    size,
    table,
    wait_for,
    work_dir,
)

from streamer.tools.benchmark import bucket_quantile
from streamer.tools.demo import expected_deliveries
from streamer.tools.measure import (
    cpu_seconds,
    free_port,
    gc_seconds,
    histogram_quantile,
    latency_buckets,
    longest_pause,
    rss_mib,
    scrape,
)

N = count("STREAMER_BENCH_RESUME_N", 20_000, 2_000)
GATEWAYS = count("STREAMER_BENCH_RESUME_GATEWAYS", 4, 2)
RESUMING = count("STREAMER_BENCH_RESUME_RESUMING", 100_000, 10_000)
RATE = size("STREAMER_BENCH_RESUME_RATE", 2000, 500)
SECONDS = size("STREAMER_BENCH_RESUME_SECONDS", 20, 6)
WARMUP = size("STREAMER_BENCH_RESUME_WARMUP", 3, 1)
SETTLE = size("STREAMER_BENCH_RESUME_SETTLE", 5, 2)
STOPPED = size("STREAMER_BENCH_RESUME_STOPPED", 10, 5)
STALL = size("STREAMER_BENCH_RESUME_STALL", 2, 2)
CATCHUP_TIMEOUT = size("STREAMER_BENCH_RESUME_CATCHUP_TIMEOUT", 300, 120)
POLL = size("STREAMER_BENCH_RESUME_POLL", 0.1, 0.1)
SERIES = 1.0  # seconds between two rows of the time series
SEED = 1
CLIENTS_PER_PROCESS = 2
CYCLE = 20_000  # the Puller repeats its first events (bench_abuse.CYCLE)
RESUMER_ID = "resumer"
# Subscription ids are the node's (one namespace for all gateways): the
# resumer's must not be the honest gateways' workload ids.
PREFIX = "r-"
RESUMER_NICE = 10
TARGET_RATIO = 2.0
# The catch-up window is also reported this much longer (the same
# histogram, read again): live events it delayed may arrive just after it.
AFTER = 1.0
# After the resumer's last report, before it is stopped: what it had
# received by then has certainly come, and what followed it too.
TAIL = 2.0


# ------------------------------------------------------------------ resumer
async def _resumer(args: argparse.Namespace) -> None:
    """Register ``--n`` subscriptions with ``subscribe_many``, print
    ``{"ready": ...}``, then record every delivery until SIGTERM (or the
    end of stdin); answer ``report`` on stdin with one JSON line."""
    from streamer.client import StreamerClient, Subscription, SubscriptionRejected
    from streamer.tools.workload import Workload

    state: dict[str, Any] = {"resyncs": 0, "rejected": 0, "connected_at": []}

    class Resumer(StreamerClient):
        """Counts, per stream, the deliveries its reader received (the
        client's own hook, where they arrive)."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self.stream = 0
            self.per_stream: dict[int, int] = {}
            self.first_position: dict[int, int] = {}

        async def _connect(self, deadline: float | None) -> tuple[bool, str | None]:
            self.stream += 1
            return await super()._connect(deadline)

        def _delivered(self, deliveries: Any) -> None:
            super()._delivered(deliveries)
            if deliveries:
                self.per_stream[self.stream] = self.per_stream.get(self.stream, 0) + len(
                    deliveries)
                self.first_position.setdefault(self.stream, _position(
                    deliveries[0].event.progress))

    specs = list(Workload(args.n, seed=args.seed, gateways=1).subscriptions())
    client = Resumer(
        args.target, gateway_id=RESUMER_ID, batch=True, resume=True,
        # Every re-subscription is answered before the first heartbeat:
        # allow for the registration of all of them.
        ack_timeout=max(30.0, args.n / 500), connect_timeout=60.0,
        # Without BDP probing, gRPC's receive window stays at its initial
        # 64 KiB: a stopped resumer stalls the Streamer's writes within a
        # fraction of a second instead of after the megabytes a grown
        # window (and the kernel's buffers) take, so the --stall-seconds
        # watchdog cuts it off before the transport's keepalive does.
        channel_options=[("grpc.http2.bdp_probe", 0)],
        on_resync=lambda _: state.__setitem__("resyncs", state["resyncs"] + 1),
        on_rejected=lambda _: state.__setitem__("rejected", state["rejected"] + 1),
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    client.start()
    started = time.perf_counter()
    results = await client.subscribe_many(
        Subscription(s.collection, filters=s.filters, expression=s.expression or "",
                     database=s.database, subscription_id=PREFIX + s.id) for s in specs)
    refused = [r for r in results if isinstance(r, SubscriptionRejected)]
    print(json.dumps({"ready": len(results) - len(refused), "refused": len(refused),
                      "refusals": sorted({f"{r.code}: {r}" for r in refused})[:5],
                      "seconds": time.perf_counter() - started}), flush=True)
    total = 0
    last = -1
    out = open(args.out, "w", buffering=1 << 20)  # closed in finally

    async def receive() -> None:
        nonlocal total, last
        write = out.write
        async for delivery in client.deliveries():
            total += 1
            last = _position(delivery.event.progress)
            write(f"{last} {delivery.event.operation} {','.join(delivery.subscription_ids)}\n")

    def report() -> dict[str, Any]:
        return {"total": total, "last_position": last, "reconnects": client.reconnects,
                "connected": client.connected, "connected_at": state["connected_at"],
                "per_stream": client.per_stream, "first_position": client.first_position,
                "resyncs": state["resyncs"], "rejected": state["rejected"],
                "live": len(client.live_subscriptions)}

    async def watch() -> None:
        """When each stream got through its handshake (wall clock)."""
        seen = client.reconnects
        while True:
            await asyncio.sleep(0.01)
            if client.reconnects != seen:
                seen = client.reconnects
                state["connected_at"].append(time.time())

    def command(line: str) -> None:
        if line.strip() == "report":
            out.flush()
            print(json.dumps(report()), flush=True)

    def stdin_reader() -> None:
        for line in sys.stdin:
            loop.call_soon_threadsafe(command, line)
        loop.call_soon_threadsafe(stop.set)

    receiving = asyncio.create_task(receive())
    watching = asyncio.create_task(watch())
    threading.Thread(target=stdin_reader, daemon=True).start()
    try:
        await stop.wait()
    finally:
        watching.cancel()
        await client.close()
        await asyncio.gather(receiving, return_exceptions=True)
        out.close()
        print(json.dumps({"done": True, **report()}), flush=True)


def _position(progress: str) -> int:
    """The log position of a reference Puller's marker (``v1:<log>:<n>``)."""
    return int(progress.rpartition(":")[2] or -1)


def resumer_main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser(prog="bench_resume.py resumer")
    parser.add_argument("--target", required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--seed", type=int, default=SEED)
    parser.add_argument("--out", type=Path, required=True)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(name)s: "
                        "%(message)s")
    asyncio.run(_resumer(parser.parse_args(argv)))


# ------------------------------------------------------------------- driver
def _minus(hist: dict[int, int], base: dict[int, int]) -> dict[int, int]:
    """A cumulative histogram less an earlier reading of it."""
    out = {b: n - base.get(b, 0) for b, n in hist.items()}
    return {b: n for b, n in out.items() if n}


@dataclass
class Snapshot:
    """The Streamer's metrics and CPU, the cores' and the honest gateways'
    counts at one moment: a window runs from one to another."""

    at: float
    metrics: dict[str, Any]
    cpu: dict[str, float]  # CPU seconds of each kind of process
    busy: dict[str, tuple[float, float]]
    honest: dict[str, Any]


class Run:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.children = Children(work)
        self.streamer_port, self.puller_port = free_port(), free_port()
        self.metrics = f"127.0.0.1:{free_port()}"
        self.streamer: subprocess.Popen[Any] | None = None
        self.puller: subprocess.Popen[Any] | None = None
        self.resumer: subprocess.Popen[str] | None = None
        self.honest: Honest | None = None
        self.polls: list[dict[str, Any]] = []  # every scrape of a window
        # Every SERIES seconds of a window: its latency and pauses (_sample).
        self.series: list[dict[str, Any]] = []
        self._last: Snapshot
        self.problems: list[str] = []
        self.pinned = (os.cpu_count() or 1) >= 2
        self.load_cpus = {0} if self.pinned else None

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.streamer_port}"

    def scrape(self) -> dict[str, Any]:
        return scrape(self.metrics, timeout=5)

    def _scrapes(self) -> bool:
        try:
            self.scrape()
        except OSError:
            return False
        return True

    def resumer_ends(self) -> list[str]:
        """The Streamer's log lines of the resumer's streams that ended."""
        with open(self.work / "streamer.log", errors="replace") as f:
            return [line.split(": ", 1)[-1].strip() for line in f
                    if f"ended ({RESUMER_ID} at" in line]

    def ask_resumer(self) -> dict[str, Any]:
        assert self.resumer is not None and self.resumer.stdin is not None
        self.resumer.stdin.write("report\n")
        self.resumer.stdin.flush()
        report: dict[str, Any] = json.loads(line_of(self.resumer))
        return report

    def start(self) -> dict[str, float]:
        """Streamer, honest gateways, resumer (each registered), Puller;
        events flowing, warmed up. Returns the registration times."""
        children = self.children
        self.streamer = children.start(
            "streamer",
            [*serve_argv(self.streamer_port, self.puller_port, self.work / "state",
                         int(self.metrics.rsplit(":", 1)[1]), "--stall-seconds", f"{STALL:g}"),
             "--log-level", "INFO"],  # the catch-up's handoffs are logged at INFO
            cpus={1} if self.pinned else None,
        )
        wait_for("the Streamer's metrics", self._scrapes, 60, [self.streamer])
        started = time.monotonic()
        self.honest = Honest.start(children, self.target, N, GATEWAYS, SEED,
                                   per_process=CLIENTS_PER_PROCESS, cpus=self.load_cpus)
        honest_s = time.monotonic() - started
        started = time.monotonic()
        self.resumer = children.start(
            "resumer", [__file__, "resumer", "--target", self.target, "--n", str(RESUMING),
                        "--out", str(self.work / "resumer.deliveries")],
            pipes=True, cpus=self.load_cpus, nice=RESUMER_NICE)
        ready = json.loads(line_of(self.resumer))
        resumer_s = time.monotonic() - started
        if ready.get("refused"):
            self.problems.append(f"the resumer's registration: {ready['refused']} refused "
                                 f"({ready['refusals']})")
        self.puller = children.start("puller", puller_argv(
            self.puller_port, self.work / "puller-log", RATE, "--seed", str(SEED),
            "--stamp-event-ids", "--cycle", str(CYCLE)), cpus=self.load_cpus)
        self.honest.ask("reset")
        wait_for("events reaching the gateways",
                 lambda: self.honest is not None and self.honest.report()["deliveries"] > 0,
                 60, [self.streamer], every=0.2)
        wait_for("events reaching the resumer", lambda: self.ask_resumer()["total"] > 0,
                 60, [self.streamer, self.resumer], every=0.2)
        time.sleep(2 * WARMUP)
        return {"honest_register_s": honest_s, "resumer_register_s": resumer_s,
                "resumer_register_reported_s": ready["seconds"]}

    # -- windows -------------------------------------------------------------
    def snapshot(self, *, reset: bool = False) -> Snapshot:
        """Now; ``reset``: the honest gateways' counts start again from 0."""
        assert self.streamer is not None and self.honest is not None
        if reset:
            self.honest.ask("reset")
            honest: dict[str, Any] = {"deliveries": 0, "hist": {}}
        else:
            honest = self.honest.report()
        snapshot = Snapshot(time.monotonic(), self.scrape(), self.cpu(), cpu_busy(), honest)
        self._last = snapshot
        return snapshot

    def cpu(self) -> dict[str, float]:
        """CPU seconds so far of the Streamer, the Puller, the resumer and
        the honest gateways (together)."""
        assert self.streamer is not None and self.honest is not None
        out = {"streamer": cpu_seconds(self.streamer.pid),
               "honest": sum(cpu_seconds(p.pid) for p in self.honest.procs)}
        for name, proc in (("puller", self.puller), ("resumer", self.resumer)):
            out[name] = cpu_seconds(proc.pid) if proc is not None else math.nan
        return out

    def poll(self, since: Snapshot, until: Callable[[dict[str, Any]], bool],
             timeout: float) -> bool:
        """Scrape every POLL seconds until ``until(samples)`` or ``timeout``
        seconds after ``since``; whether ``until`` was met."""
        assert self.streamer is not None
        while time.monotonic() - since.at < timeout:
            samples = self.scrape()
            self.polls.append({
                "at": time.monotonic(),
                "catching_up": counter(samples, "streamer_catchup_subscriptions"),
                "readers": counter(samples, "streamer_catchup_readers"),
                "queued_max": counter(samples, "streamer_gateway_queued_messages_max"),
            })
            if time.monotonic() - self._last.at >= SERIES:
                self._sample(samples)
            if until(samples):
                return True
            if self.streamer.poll() is not None:
                raise RuntimeError(f"the Streamer exited with {self.streamer.returncode}")
            time.sleep(POLL)
        return False

    def _sample(self, samples: dict[str, Any]) -> None:
        """One row of the time series: the honest gateways' latency, the
        Streamer's longest pause and ingest→enqueue p99 since the last
        snapshot or row."""
        assert self.honest is not None
        last, now = self._last, time.monotonic()
        honest = self.honest.report()
        hist = _minus(honest["hist"], last.honest["hist"])
        self.series.append({
            "at": now,
            "seconds": now - last.at,
            "hist": hist,
            "ingest_enqueue_p99_ms": histogram_quantile(
                0.99, latency_buckets(samples), latency_buckets(last.metrics)) * 1e3,
            "longest_pause_ms": longest_pause(samples, last.metrics) * 1e3,
            "catching_up": counter(samples, "streamer_catchup_subscriptions"),
            "ingest_lag_ms": counter(samples, "streamer_ingest_lag_seconds") * 1e3,
        })
        self._last = Snapshot(now, samples, last.cpu, last.busy, honest)

    def window(self, name: str, start: Snapshot, end: Snapshot | None = None) -> dict[str, Any]:
        """The figures of the window from ``start`` to ``end`` (now)."""
        assert self.streamer is not None
        if end is None:
            end = self.snapshot()
        elapsed = end.at - start.at
        m0, m1 = start.metrics, end.metrics
        hist = _minus(end.honest["hist"], start.honest["hist"])
        deliveries = end.honest["deliveries"] - start.honest["deliveries"]
        if not deliveries:
            self.problems.append(f"{name}: the honest gateways received nothing")
        polls = [p for p in self.polls if start.at <= p["at"] <= end.at]

        def delta(metric: str) -> float:
            return counter(m1, metric) - counter(m0, metric)

        return {
            "phase": name,
            "seconds": elapsed,
            "honest_deliveries_per_s": deliveries / elapsed,
            "honest_latency_samples": sum(hist.values()),
            "honest_p50_ms": bucket_quantile(hist, 0.50) / 1e6,
            "honest_p99_ms": bucket_quantile(hist, 0.99) / 1e6,
            "honest_p999_ms": bucket_quantile(hist, 0.999) / 1e6,
            "honest_max_ms": bucket_quantile(hist, 1.0) / 1e6,
            "events_per_s": (events_total(m1) - events_total(m0)) / elapsed,
            "ingest_enqueue_p99_ms": histogram_quantile(
                0.99, latency_buckets(m1), latency_buckets(m0)) * 1e3,
            "longest_pause_ms": longest_pause(m1, m0) * 1e3,
            "gc_ms_per_s": (gc_seconds(m1) - gc_seconds(m0)) / elapsed * 1e3,
            "streamer_cpu": (end.cpu["streamer"] - start.cpu["streamer"]) / elapsed,
            "cpu": {k: (end.cpu[k] - start.cpu[k]) / elapsed for k in start.cpu},
            "streamer_rss_mib": rss_mib(self.streamer.pid),
            "cpu_busy": cpu_share(start.busy, end.busy),
            "cutoffs": delta("streamer_lagging_cutoffs_total"),
            "stalled_cutoffs": delta("streamer_stalled_cutoffs_total"),
            "catchup": {
                key: delta(f"streamer_catchup_{key}_total")
                for key in ("events_replayed", "handoffs", "merges", "paced", "resyncs",
                            "late_refusals", "reader_failures")
            },
            "catching_up_peak": max((p["catching_up"] for p in polls), default=0),
            "readers_peak": max((p["readers"] for p in polls), default=0),
            "queued_max_peak": max((p["queued_max"] for p in polls), default=0),
        }

    def quiet(self, name: str) -> dict[str, Any]:
        start = self.snapshot(reset=True)
        self.poll(start, lambda _: False, SECONDS)
        return self.window(name, start)

    def stop_and_catch_up(self) -> tuple[list[dict[str, Any]], dict[str, Any]]:
        """The windows from SIGSTOP to the cut-off, from there to SIGCONT,
        of the catch-up (SIGCONT until caught up: the target's), its two
        parts (until the resumer is answered, and the rest), and the
        catch-up AFTER seconds longer; and what happened around them."""
        assert self.resumer is not None
        info: dict[str, Any] = {}
        before = self.ask_resumer()
        info["resumer_before_stop"] = before
        ended0 = len(self.resumer_ends())
        start = self.snapshot(reset=True)
        os.kill(self.resumer.pid, signal.SIGSTOP)
        # Its stream ends: cut off (RESOURCE_EXHAUSTED), or, should the
        # transport's keepalive see it first, lost.
        cut = self.poll(start, lambda _: len(self.resumer_ends()) > ended0, STALL + 30)
        cut_at = self.snapshot()
        info["cut_off"] = cut
        info["cut_off_after_s"] = cut_at.at - start.at
        info["stream_end_logged"] = self.resumer_ends()[ended0:]
        if not cut:
            self.problems.append(f"the stopped resumer's stream did not end within "
                                 f"{STALL + 30:g} s")
        self.poll(start, lambda _: False, STOPPED)
        windows = [self.window("stopped, until the cut-off", start, cut_at),
                   self.window("stopped, after the cut-off", cut_at)]
        # The catch-up.
        start = self.snapshot(reset=True)
        os.kill(self.resumer.pid, signal.SIGCONT)
        wall = time.time()
        info["sigcont_wall"] = wall
        seen: dict[str, Any] = {"catching_up": False, "answered": None}

        def caught_up(samples: dict[str, Any]) -> bool:
            catching = counter(samples, "streamer_catchup_subscriptions")
            if catching:
                seen["catching_up"] = True
            if seen["answered"] is None:
                report = self.ask_resumer()
                if report["reconnects"] > before["reconnects"] and report["connected"]:
                    seen["answered"] = self.snapshot()
            return seen["answered"] is not None and not catching

        done = self.poll(start, caught_up, CATCHUP_TIMEOUT)
        end = self.snapshot()
        answered: Snapshot | None = seen["answered"]
        info["catchup_s"] = end.at - start.at
        info["catchup_done"] = done
        info["catchup_seen"] = seen["catching_up"]
        info["resubscribed_s"] = math.nan if answered is None else answered.at - start.at
        if not done:
            self.problems.append(f"the catch-up did not finish within {CATCHUP_TIMEOUT:g} s "
                                 f"(resumer answered: {answered is not None})")
        windows.append(self.window("catch-up", start, end))
        # The live events the catch-up delayed may reach the honest
        # gateways after it ended: the same window, a moment longer.
        time.sleep(AFTER)
        windows.append(self.window(f"catch-up + {AFTER:g} s", start))
        if answered is not None:
            windows += [self.window("catch-up: until re-subscribed", start, answered),
                        self.window("catch-up: the rest", answered, end)]
        after = self.ask_resumer()
        info["resumer_after_catchup"] = after
        info["resumer_connected_after_s"] = [t - wall for t in after["connected_at"]]
        info["polls"] = [{**p, "at": p["at"] - start.at} for p in self.polls
                         if p["at"] >= start.at]
        info["series"] = [{**r, "at": r["at"] - start.at} for r in self.series
                          if r["at"] > start.at and r["at"] <= end.at + AFTER + 0.5]
        if after["reconnects"] <= before["reconnects"]:
            self.problems.append("the resumer did not reconnect")
        return windows, info

    def finish(self) -> dict[str, Any]:
        """The resumer's last position (then TAIL seconds more), the
        resumer, Puller and Streamer stopped; the resumer's final report."""
        assert self.resumer is not None and self.puller is not None
        assert self.streamer is not None
        last = self.ask_resumer()
        time.sleep(TAIL)
        os.kill(self.resumer.pid, signal.SIGTERM)
        try:
            out, _ = self.resumer.communicate(timeout=60)
        except subprocess.TimeoutExpired:
            Children.kill(self.resumer)
            out = ""
        done = [json.loads(line) for line in out.splitlines() if line.startswith('{"done"')]
        self.children.stop(self.puller)
        self.children.stop(self.streamer)
        return {"end_position": last["last_position"], "final": done[-1] if done else None}


# --------------------------------------------------------------------- check
@dataclass
class Outcome:
    subscriptions: int = 0
    expected: int = 0  # (position, operation, subscription) in the checked range
    received: int = 0
    missing: int = 0
    duplicates: int = 0
    out_of_order: int = 0
    unexpected: int = 0
    first: int = 0  # the checked range of positions: (first, last]
    last: int = 0
    examples: list[str] = field(default_factory=list)


def verify(work: Path, first: int, last: int) -> Outcome:
    """Every delivery the resumer received in positions (first, last]
    against the Puller's log matched against its subscriptions."""
    from streamer.tools.workload import Workload

    specs = list(Workload(RESUMING, seed=SEED, gateways=1).subscriptions())
    expected, _ = expected_deliveries(work / "puller-log", specs, first, last, PREFIX)
    received: dict[str, list[tuple[int, int]]] = {sub_id: [] for sub_id in expected}
    outcome = Outcome(subscriptions=len(specs), first=first, last=last)
    with open(work / "resumer.deliveries") as f:
        for line in f:
            at, op, ids = line.split()
            position = int(at)
            if not first < position <= last:
                continue
            for sub_id in ids.split(","):
                items = received.get(sub_id)
                if items is None:
                    outcome.unexpected += 1
                else:
                    items.append((position, int(op)))
    for sub_id, want in expected.items():
        got = received[sub_id]
        outcome.expected += len(want)
        outcome.received += len(got)
        if got == want:
            continue
        seen = set(got)
        outcome.duplicates += len(got) - len(seen)
        missing = [item for item in want if item not in seen]
        outcome.missing += len(missing)
        wanted = set(want)
        outcome.unexpected += sum(item not in wanted for item in seen)
        in_order = [item for item in got if item in wanted]
        outcome.out_of_order += sum(a >= b for a, b in itertools.pairwise(in_order))
        if len(outcome.examples) < 5:
            outcome.examples.append(
                f"{sub_id}: expected {len(want)}, received {len(got)}; missing "
                f"{missing[:3]}{'...' if len(missing) > 3 else ''}")
    return outcome


# ---------------------------------------------------------------------- run
def run(tmp_path: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "meta": machine(),
        "config": {"n": N, "gateways": GATEWAYS, "resuming": RESUMING, "rate": RATE,
                   "seconds": SECONDS, "warmup": WARMUP, "settle": SETTLE, "stopped": STOPPED,
                   "stall_seconds": STALL, "catchup_timeout": CATCHUP_TIMEOUT, "poll": POLL},
        "phases": [],
    }
    work = work_dir(tmp_path)
    run_ = Run(work)
    own = os.sched_getaffinity(0)
    if run_.pinned:
        os.sched_setaffinity(0, {0})
    try:
        figures.update(run_.start())
        quiet = run_.quiet("quiet")
        first = run_.ask_resumer()["last_position"]
        windows, info = run_.stop_and_catch_up()
        figures["catchup"] = info
        time.sleep(SETTLE)
        figures["phases"] = [quiet, *windows, run_.quiet("quiet after")]
        end = run_.finish()
        figures["resumer_final"] = end["final"]
        figures["streamer_log_errors"] = log_errors(work / "streamer.log")
        figures["cutoffs_logged"] = cutoffs_logged(work / "streamer.log")
        since = info["sigcont_wall"]
        figures["handoffs_logged"] = _logged(work / "streamer.log", "handed over", since)
        figures["pauses_logged"] = _logged(work / "streamer.log", "event loop was held", since)
        checking = time.monotonic()
        outcome = verify(work, first, end["end_position"])
        figures["verify_s"] = time.monotonic() - checking
        figures["outcome"] = outcome.__dict__
        run_.problems += _problems(figures)
    except BaseException:
        run_.problems.append("the run failed")
        raise
    finally:
        run_.children.close()
        os.sched_setaffinity(0, own)
        figures["pinned"] = run_.pinned
        figures["problems"] = run_.problems
        figures["logs"] = str(keep_logs(work, "resume"))
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def _problems(figures: dict[str, Any]) -> list[str]:
    """What must hold whatever the timing."""
    out = []
    catchup = phase(figures, "catch-up")["catchup"]
    if catchup["resyncs"] or catchup["late_refusals"] or catchup["reader_failures"]:
        out.append(f"catch-up: {catchup['resyncs']:.0f} resync(s), {catchup['late_refusals']:.0f} "
                   f"late refusal(s), {catchup['reader_failures']:.0f} reader failure(s)")
    final = figures["resumer_final"] or {}
    if final.get("resyncs") or final.get("rejected"):
        out.append(f"the resumer: {final.get('resyncs')} resync(s), "
                   f"{final.get('rejected')} rejected re-subscription(s)")
    if not any(c["gateway"] == RESUMER_ID for c in figures["cutoffs_logged"]):
        out.append("no cut-off of the resumer in the Streamer's log")
    if figures["streamer_log_errors"]:
        out.append(f"ERROR lines in the Streamer's log: {figures['streamer_log_errors']}")
    o = figures["outcome"]
    if o["missing"] or o["duplicates"] or o["out_of_order"] or o["unexpected"]:
        out.append(f"the resumer's deliveries: {o['missing']} missing, {o['duplicates']} "
                   f"duplicate(s), {o['out_of_order']} out of order, {o['unexpected']} "
                   f"unexpected: {o['examples']}")
    if not o["expected"]:
        out.append("nothing to check: no delivery expected for the resumer")
    return out


def _logged(log: Path, text: str, since: float) -> list[str]:
    """The Streamer's log lines holding ``text``, each with its time in
    seconds after ``since`` (wall clock; the log's time is local)."""
    out = []
    with open(log, errors="replace") as f:
        for line in f:
            if text not in line:
                continue
            try:
                at = dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()
            except ValueError:
                at = math.nan
            out.append(f"{at - since:+.1f} s: {line.split(': ', 1)[-1].strip()}")
    return out


def _ms(value: float) -> str:
    return "—" if math.isnan(value) else f"{value:.2f}"


def series_table(info: dict[str, Any], rows: int = 24) -> list[str]:
    """The catch-up as a time series (about ``rows`` rows from SIGCONT):
    the honest gateways' latency, the Streamer's longest pause,
    ingest→enqueue p99 and how far live ingest lags the Puller
    (``streamer_ingest_lag_seconds``, sampled), and the subscriptions still
    catching up."""
    series = info.get("series", [])
    if not series:
        return []
    width = max(1.0, math.ceil(info["catchup_s"] / rows))
    bins: dict[int, list[dict[str, Any]]] = {}
    for row in series:
        bins.setdefault(int(max(row["at"] - 1e-6, 0) // width), []).append(row)
    out = []
    for k, group in sorted(bins.items()):
        hist: dict[int, int] = {}
        for row in group:
            for b, n in row["hist"].items():
                hist[int(b)] = hist.get(int(b), 0) + n
        out.append([
            f"+{k * width:g}-{(k + 1) * width:g}", _ms(bucket_quantile(hist, 0.5) / 1e6),
            _ms(bucket_quantile(hist, 0.99) / 1e6),
            _ms(max(row["longest_pause_ms"] for row in group)),
            _ms(max(row["ingest_enqueue_p99_ms"] for row in group)),
            _ms(max(row["ingest_lag_ms"] for row in group)),
            f"{group[-1]['catching_up']:,.0f}",
        ])
    return ["after SIGCONT:", *table(
        ["s", "honest p50 ms", "honest p99 ms", "longest pause ms",
         "ingest→enqueue p99 ms (max)", "ingest lag ms (max)", "catching up (at the end)"],
        out)]


def phase(figures: dict[str, Any], name: str) -> dict[str, Any]:
    found: dict[str, Any] = next(p for p in figures["phases"] if p["phase"] == name)
    return found


def verdict(figures: dict[str, Any], name: str = "catch-up") -> tuple[float, bool]:
    """The p99 of the catch-up window (or another, by ``name``) over the
    quiet p99 before it, and whether that is within the target."""
    quiet, catchup = figures["phases"][0], phase(figures, name)
    ratio = catchup["honest_p99_ms"] / quiet["honest_p99_ms"]
    return ratio, ratio <= TARGET_RATIO


def render(figures: dict[str, Any]) -> list[str]:
    if not figures["phases"]:
        return ["no figures: the run failed", *figures["problems"]]
    phases = figures["phases"]
    quiet_p99 = phases[0]["honest_p99_ms"]
    rows = []
    for p in phases:
        busy = p["cpu_busy"]
        rows.append([
            p["phase"], f"{p['seconds']:.1f}", f"{p['events_per_s']:,.0f}",
            f"{p['honest_deliveries_per_s']:,.0f}", _ms(p["honest_p50_ms"]),
            _ms(p["honest_p99_ms"]), f"{p['honest_p99_ms'] / quiet_p99:.2f}x",
            _ms(p["honest_p999_ms"]), _ms(p["honest_max_ms"]), _ms(p["ingest_enqueue_p99_ms"]),
            _ms(p["longest_pause_ms"]), f"{p['gc_ms_per_s']:.1f}",
            " / ".join(f"{p['cpu'][k]:.0%}" for k in ("streamer", "puller", "resumer", "honest")),
            " / ".join(f"{busy.get(c, math.nan):.0%}" for c in ("cpu0", "cpu1")),
        ])
    c, info = figures["config"], figures["catchup"]
    whole = phase(figures, "catch-up")
    cu = whole["catchup"]
    ratio, ok = verdict(figures)
    longer = verdict(figures, f"catch-up + {AFTER:g} s")[0]
    after = info["resumer_after_catchup"]
    before = info["resumer_before_stop"]
    new_stream = {int(k): v for k, v in after["per_stream"].items()}
    firsts = {int(k): v for k, v in after["first_position"].items()}
    last_stream = max(new_stream, default=0)
    o = figures["outcome"]
    lines = [
        f"N={c['n']:,} honest subscriptions on {c['gateways']} gateways, resumer "
        f"{c['resuming']:,} subscriptions, {c['rate']:g} events/s, quiet windows "
        f"{c['seconds']:g} s, resumer stopped {c['stopped']:g} s (--stall-seconds "
        f"{c['stall_seconds']:g}); "
        + ("Streamer on CPU 1, everything else on CPU 0" if figures["pinned"] else "not pinned"),
        f"registration: honest {figures['honest_register_s']:.1f} s, resumer "
        f"{figures['resumer_register_s']:.1f} s",
        "",
        *table(["window", "s", "events/s", "honest deliveries/s", "honest p50 ms",
                "honest p99 ms", "p99 / quiet p99", "honest p99.9 ms", "honest max ms",
                "Streamer ingest→enqueue p99 ms", "longest pause ms", "GC ms/s",
                "CPU: Streamer / Puller / resumer / honest gateways",
                "CPU 0 / CPU 1 busy"], rows),
        "",
        f"target: catch-up p99 {whole['honest_p99_ms']:.2f} ms / quiet p99 "
        f"{quiet_p99:.2f} ms = {ratio:.2f}x (≤ {TARGET_RATIO:g}x): {'PASS' if ok else 'MISS'} "
        f"({longer:.2f}x over the window {AFTER:g} s longer)",
        f"the resumer's stream ended {info['cut_off_after_s']:.1f} s after SIGSTOP: "
        + ("; ".join(info["stream_end_logged"]) or "not logged"),
        f"catch-up "
        f"{info['catchup_s']:.1f} s after SIGCONT (re-subscribed and answered after "
        f"{info['resubscribed_s']:.1f} s; finished: {info['catchup_done']})",
        f"catch-up: {cu['events_replayed']:,.0f} events replayed, {cu['handoffs']:.0f} "
        f"handoff(s), {cu['merges']:.0f} merge(s), {cu['paced']:,.0f} paced wait(s), "
        f"{cu['resyncs']:.0f} resync(s), {cu['late_refusals']:.0f} late refusal(s), "
        f"{cu['reader_failures']:.0f} reader failure(s); peak "
        f"{whole['catching_up_peak']:,.0f} subscriptions catching up, "
        f"{whole['readers_peak']:.0f} reader(s), fullest gateway queue "
        f"{whole['queued_max_peak']:,.0f} messages",
        f"resumer: {after['total'] - before['total']:,} deliveries from SIGSTOP to the end of the "
        f"catch-up, {new_stream.get(last_stream, 0):,} of them on its new stream (the first at "
        f"position {firsts.get(last_stream, -1):,}; the last before the stop "
        f"{before['last_position']:,}); {after['reconnects']} reconnect(s)",
        f"resumer's deliveries checked against the Puller's log, positions "
        f"({o['first']:,}, {o['last']:,}]: {o['received']:,} of {o['expected']:,} expected over "
        f"{o['subscriptions']:,} subscriptions; missing {o['missing']}, duplicates "
        f"{o['duplicates']}, out of order {o['out_of_order']}, unexpected {o['unexpected']}",
    ]
    lines += ["", *series_table(info), ""]
    cutoffs = figures.get("cutoffs_logged", [])
    lines += [f"cut-offs in the Streamer's log: {len(cutoffs)}"
              + "".join(f"\n  {c['gateway']}: {c['why']}; {c['subscriptions']:,} subscriptions, "
                        f"{c['unsent_messages']:,} queued message(s) dropped" for c in cutoffs)]
    lines += [f"handoffs logged (time after SIGCONT): {len(figures['handoffs_logged'])}"
              + "".join(f"\n  {h}" for h in figures["handoffs_logged"][:8])]
    pauses = [p for p in figures["pauses_logged"] if p[0] == "+"]
    lines += [f"event-loop pauses logged (of {len(figures['pauses_logged'])} in the run) after "
              f"SIGCONT: {len(pauses)}" + "".join(f"\n  {p}" for p in pauses[:12])]
    errors = figures.get("streamer_log_errors", {})
    lines += [f"Streamer log: {sum(errors.values())} ERROR line(s)"
              + "".join(f"\n  {n} x {message}" for message, n in errors.items())]
    if figures["problems"]:
        lines += ["", "PROBLEMS:", *(f"  {p}" for p in figures["problems"])]
    return lines


@pytest.mark.timeout(3600)
def test_resume(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    benchmark.group = "reliability"
    figures = benchmark.pedantic(run, args=(tmp_path,), rounds=1, iterations=1)
    record("resume", bench_report, figures, render(figures), benchmark)
    info = figures["catchup"]
    assert info["cut_off"], "the stopped resumer was not cut off"
    assert info["resumer_after_catchup"]["reconnects"] > 0, "the resumer did not reconnect"
    assert info["catchup_done"], "the catch-up did not finish"
    assert not figures["problems"], figures["problems"]


if __name__ == "__main__":
    if sys.argv[1:2] == ["resumer"]:
        resumer_main(sys.argv[2:])
    else:
        sys.exit("usage: python bench/bench_resume.py resumer --target HOST:PORT --n N --out FILE "
                 "(run the benchmark with pytest bench/bench_resume.py)")
