"""``streamer demo``: the whole pipeline on loopback, watched and verified.

This module owns the demo: it starts a reference Puller (``streamer puller
--workload chat``), the Streamer (``streamer serve``) and G simulated
gateways (this module's ``gateway`` entry point, ``python -m streamer.tools.demo
gateway``, each a ``StreamerClient`` in its own process), shows live
progress once a second, prints a summary table, and checks that every
gateway received exactly what its subscriptions should have, in order.

How the expected set is made exact. The Puller's replay log directory is
created here first, and the Streamer starts with a saved progress marker at
position 0 of that log, listing the G gateways as known: its restart window
(``streamer.node.gateways.RestartWindow``) then holds ingest until every gateway
has said Hello, registered all of its subscriptions and sent a Heartbeat
(each gateway queues all of its subscribe requests before it connects, so
they travel in its handshake, ahead of that Heartbeat). The Puller is
started only then, and the Streamer reads its log from the first event: so
every event in the log is matched against all N subscriptions. At the end
the Puller is stopped, its log read back (every event it emitted), each
event transformed (docs/semantics.md, Event transformation) and matched by a
``Matcher`` holding the same subscriptions (and, for a sample of events, by
the linear ``ReferenceMatcher``, which must agree); the per-subscription
sequence of (event id, operation) must equal what the gateway received, in
order.

Latency is ingest→gateway: receive time at the gateway minus the event's
``timestamp`` (milliseconds since the epoch, set by the Puller when its
source emits it), so its resolution is 1 ms.

The temporary work directory (``streamer-demo-*``, on ``/dev/shm`` when
there is one) holds a file naming the demo's pid. A demo killed by SIGKILL
cannot remove its directory, so each demo first removes those of its user
whose demo process is gone.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import json
import math
import os
import random
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from streamer import DISTRIBUTION
from streamer.logs import configure_logging
from streamer.options import MAX_RATE, ArgumentParser, Options, integer, real
from streamer.tools.measure import (
    cpu_seconds,
    free_port,
    histogram_quantile,
    latency_buckets,
    quantile,
    rss_mib,
    scrape,
)

DEFAULT_SUBSCRIPTIONS = 20_000
DEFAULT_GATEWAYS = 4
DEFAULT_RATE = 2000.0
DEFAULT_DURATION = 12.0
DEFAULT_SEED = 1
ENV = "STREAMER_DEMO_"
# Bounds that keep a typo from becoming a run that never ends.
MAX_SUBSCRIPTIONS = 10_000_000
MAX_SECONDS = 86_400.0
# Events matched by the linear reference matcher as well (evenly spaced).
REFERENCE_SAMPLE = 500
REFERENCE_SECONDS = 2.0
REFERENCE_SUBSCRIPTIONS = 2000
STARTUP_TIMEOUT = 30.0
# A gateway id the demo itself connects as once the Puller is serving: the
# Streamer's restart window (and so its ingest) waits for it too, so the
# Streamer reaches the Puller at once instead of after reconnect backoff.
START_GATE = "demo-start"
DRAIN_TIMEOUT = 30.0
# The temporary work directory: its name, and the file in it naming the
# demo process that owns it (so a later demo can tell an abandoned one).
WORK_DIR_PREFIX = "streamer-demo-"
OWNER_FILE = "demo.pid"


# --------------------------------------------------------------- the gateway


def _gateway_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m streamer.tools.demo gateway",
        description="One simulated gateway of `streamer demo` (internal).",
    )
    parser.add_argument("command", choices=["gateway"])
    parser.add_argument("--target", required=True)
    parser.add_argument("--index", type=int, required=True)
    parser.add_argument("--gateways", type=int, required=True)
    parser.add_argument("--subscriptions", type=int, required=True)
    parser.add_argument("--seed", type=int, required=True)
    parser.add_argument("--out", type=Path, required=True)
    return parser


def _report(**fields: Any) -> None:
    sys.stdout.write(json.dumps(fields, separators=(",", ":")) + "\n")
    sys.stdout.flush()


async def _gateway(args: argparse.Namespace) -> int:
    """Register this gateway's share of the workload's subscriptions, then
    record every delivery until SIGTERM.

    Reports JSON lines on stdout: ``{"ready": n, "seconds": s}`` once every
    subscription is confirmed, then each second ``{"total": deliveries so
    far, "lat": {latency ms: count}}`` for that second, and ``{"done":
    total}`` when stopped. Every delivery is written to ``--out`` as a line
    ``<event_id> <operation> <subscription id>,<subscription id>...``.
    """
    from streamer.client import StreamerClient
    from streamer.tools.workload import Workload

    name = f"gw-{args.index}"
    specs = [
        s for s in Workload(args.subscriptions, seed=args.seed, gateways=args.gateways)
        .subscriptions() if s.gateway == name
    ]
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    # The first heartbeat is acknowledged only after every subscription of
    # the handshake: allow for a slow registration (one gRPC message each way
    # per subscription, every gateway through the one Streamer).
    client = StreamerClient(
        args.target, gateway_id=name, batch=True,
        ack_timeout=max(30.0, args.subscriptions / 500),
    )
    started = time.perf_counter()
    # Queued before the client connects, so that all of them go out in the
    # handshake, ahead of the Heartbeat that closes the restart window.
    pending = [
        asyncio.create_task(client.subscribe(
            s.collection, filters=s.filters, expression=s.expression or "",
            database=s.database, subscription_id=s.id,
        ))
        for s in specs
    ]
    await asyncio.sleep(0)
    client.start()
    total = 0
    latencies: Counter[int] = Counter()
    out = open(args.out, "w", buffering=1 << 20)  # closed in finally

    async def receive() -> None:
        nonlocal total
        write = out.write
        async for delivery in client.deliveries():
            now = time.time_ns() // 1_000_000
            event = delivery.event
            latencies[now - event.timestamp] += 1
            total += 1
            write(f"{event.event_id} {event.operation} {','.join(delivery.subscription_ids)}\n")

    async def tick() -> None:
        while True:
            await asyncio.sleep(1.0)
            snapshot = dict(latencies)
            latencies.clear()
            _report(total=total, lat=snapshot)

    receiving = asyncio.create_task(receive())
    ticking: asyncio.Task[None] | None = None
    try:
        waiting = asyncio.ensure_future(asyncio.gather(*pending))
        stopping = asyncio.ensure_future(stop.wait())
        await asyncio.wait((waiting, stopping), return_when=asyncio.FIRST_COMPLETED)
        if not waiting.done():
            waiting.cancel()
            return 130
        waiting.result()
        stopping.cancel()
        _report(ready=len(specs), seconds=time.perf_counter() - started)
        ticking = asyncio.create_task(tick())
        await stop.wait()
        return 0
    finally:
        if ticking is not None:
            ticking.cancel()
        await client.close()
        with contextlib.suppress(asyncio.CancelledError):
            await receiving
        out.close()
        _report(done=total, lat=dict(latencies))


def gateway_main(argv: Sequence[str]) -> int:
    return asyncio.run(_gateway(_gateway_parser().parse_args(argv)))


# ------------------------------------------------------------------ the demo


def _scrape(port: int) -> dict[str, float]:
    """The Streamer's metrics the display needs, summed over their labels
    (Puller heartbeats left out of the events), and its latency buckets."""
    samples = scrape(f"127.0.0.1:{port}", timeout=5)
    out = {
        name: sum(value for labels, value in samples.get(name, {}).items()
                  if ("op", "heartbeat") not in labels)
        for name in ("streamer_events_total", "streamer_deliveries_total",
                     "streamer_subscriptions")
    }
    out.update((f"le {le}", count) for le, count in latency_buckets(samples))
    return out


def ingest_quantile(metrics: dict[str, float], q: float) -> float:
    """The ``q`` quantile of the Streamer's ingest→enqueue histogram (since
    it started), interpolated inside its bucket, in seconds."""
    return histogram_quantile(
        q, sorted((float(k[3:]), v) for k, v in metrics.items() if k.startswith("le "))
    )


def _child_env() -> dict[str, str]:
    # The children get their settings from flags only: a STREAMER_* variable
    # of the caller's (an auth token file, TLS) must not change the demo.
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}


@dataclass
class Gateway:
    index: int
    proc: asyncio.subprocess.Process
    out: Path
    total: int = 0
    ready: float | None = None  # registration seconds
    done: bool = False
    reader: asyncio.Task[None] | None = None


@dataclass
class Run:
    args: argparse.Namespace
    work: Path
    interactive: bool
    procs: list[asyncio.subprocess.Process] = field(default_factory=list)
    gateways: list[Gateway] = field(default_factory=list)
    streamer: asyncio.subprocess.Process | None = None
    puller: asyncio.subprocess.Process | None = None
    metrics_port: int = 0
    # Latencies (ms → count) by second of the run, and over the whole run.
    per_second: dict[int, Counter[int]] = field(default_factory=dict)
    latencies: Counter[int] = field(default_factory=Counter)
    run_start: float | None = None  # monotonic time the Puller was started
    run_end: float | None = None  # ... and stopped
    # Seconds from run_start to when ``events`` was counted: what its rate is
    # over when the run is cut short (the stopping afterwards is no flow).
    flow_seconds: float | None = None
    registration_s: float | None = None
    ingest_p50: float = math.nan  # seconds, the Streamer's own histogram
    ingest_p99: float = math.nan
    emit_seconds: float | None = None  # first to last event the Streamer processed
    cpu_start: float | None = None
    cpu_end: float | None = None
    rss_mib: float | None = None
    subscriptions: int = 0
    events: int = 0
    deliveries: int = 0
    verification: str = "not run"
    verified: bool | None = None
    stage: str = "starting"
    began: float = field(default_factory=time.monotonic)

    def say(self, text: str) -> None:
        if self.interactive:
            sys.stdout.write("\r\x1b[K")
        print(text, flush=True)

    def status(self, text: str) -> None:
        if self.interactive:
            sys.stdout.write("\r\x1b[K" + text)
            sys.stdout.flush()
        else:
            print(text, flush=True)

    def row_latencies(self, t: int) -> Counter[int]:
        """The latencies behind row ``t`` of the live table (printed ``t``
        seconds after the run started): the gateways' reports of the second
        before it."""
        return self.per_second.get(t - 1, Counter())

    def latency_in(self, latencies: dict[str, int], now: float) -> None:
        if self.run_start is None or not latencies:
            return
        second = int(now - self.run_start)
        bucket = self.per_second.setdefault(second, Counter())
        for ms, count in latencies.items():
            bucket[int(ms)] += count
            self.latencies[int(ms)] += count


def _die_with_parent() -> None:
    """In the child, before exec: on Linux, get SIGTERM when the demo dies,
    even by SIGKILL (which no ``finally`` survives)."""
    if sys.platform == "linux":
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG


async def _spawn(run: Run, name: str, *argv: str, stdout: int | None = None
                 ) -> asyncio.subprocess.Process:
    log = open(run.work / f"{name}.log", "wb")  # the child keeps its own copy
    try:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, *argv, stdout=stdout if stdout is not None else log, stderr=log,
            env=_child_env(), start_new_session=True,  # Ctrl-C reaches only the demo
            preexec_fn=_die_with_parent,
        )
    finally:
        log.close()
    run.procs.append(proc)
    return proc


async def _read_gateway(run: Run, gateway: Gateway) -> None:
    assert gateway.proc.stdout is not None
    loop = asyncio.get_running_loop()
    async for raw in gateway.proc.stdout:
        try:
            report = json.loads(raw)
        except ValueError:
            continue
        if "ready" in report:
            gateway.ready = float(report["seconds"])
        if "total" in report:
            gateway.total = int(report["total"])
        if "done" in report:
            gateway.total = int(report["done"])
            gateway.done = True
        run.latency_in(report.get("lat", {}), loop.time())


async def _stop(proc: asyncio.subprocess.Process, timeout: float = 10.0) -> None:
    if proc.returncode is not None:
        return
    with contextlib.suppress(ProcessLookupError):
        proc.terminate()
    try:
        await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        await proc.wait()


def _tail(path: Path, lines: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""


class DemoFailed(Exception):
    pass


async def _wait_for(
    what: str, check: Any, timeout: float, watch: Iterable[asyncio.subprocess.Process | None]
) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        for proc in watch:
            if proc is not None and proc.returncode is not None:
                raise DemoFailed(f"{what}: a child process exited with code {proc.returncode}")
        if time.monotonic() > deadline:
            raise DemoFailed(f"{what}: not done after {timeout:g} s")
        await asyncio.sleep(0.05)


async def _demo(run: Run) -> None:
    from streamer.puller.log import ReplayLog

    args = run.args
    n, g = args.subscriptions, args.gateways
    log_dir, state_dir = run.work / "puller-log", run.work / "streamer-state"
    replay_log = ReplayLog(log_dir)
    start_marker = replay_log.marker(0)
    log_id = replay_log.log_id
    replay_log.close()
    state_dir.mkdir(parents=True, exist_ok=True)
    (state_dir / "progress.json").write_text(json.dumps(
        {"marker": start_marker, "gateways": [f"gw-{k}" for k in range(g)] + [START_GATE],
         "others": 0}))
    puller_port, streamer_port = free_port(), free_port()
    run.metrics_port = free_port()
    target = f"127.0.0.1:{streamer_port}"
    registration_grace = max(120.0, n / 300)
    run.streamer = await _spawn(
        run, "streamer", "-m", "streamer", "serve", "--listen", target,
        "--puller", f"127.0.0.1:{puller_port}", "--state-dir", str(state_dir),
        "--metrics", f"127.0.0.1:{run.metrics_port}", "--resume-grace", str(registration_grace),
        "--gateway-queue", "100000", "--log-level", "WARNING",
    )
    metrics: dict[str, float] = {}

    def scraped() -> bool:
        nonlocal metrics
        try:
            metrics = _scrape(run.metrics_port)
        except OSError:
            return False
        return True

    await _wait_for("the Streamer's metrics endpoint", scraped, STARTUP_TIMEOUT, [run.streamer])
    for k in range(g):
        out = run.work / f"gw-{k}.deliveries"
        proc = await _spawn(
            run, f"gw-{k}", "-m", "streamer.tools.demo", "gateway", "--target", target,
            "--index", str(k), "--gateways", str(g), "--subscriptions", str(n),
            "--seed", str(args.seed), "--out", str(out), stdout=subprocess.PIPE,
        )
        gateway = Gateway(k, proc, out)
        gateway.reader = asyncio.create_task(_read_gateway(run, gateway))
        run.gateways.append(gateway)
    run.say(
        f"streamer demo: work dir {run.work}; Streamer pid {run.streamer.pid} on {target}, "
        f"gateway pids {' '.join(str(gw.proc.pid) for gw in run.gateways)}"
    )
    run.stage = "registering"
    started = time.monotonic()

    def registered() -> bool:
        if any(gw.proc.returncode is not None for gw in run.gateways):
            raise DemoFailed("a gateway exited during registration")
        return all(gw.ready is not None for gw in run.gateways)

    shown = 0.0
    while not registered():
        # Redrawn in a terminal; a line every 2 s otherwise.
        if (run.interactive or time.monotonic() - shown >= 2.0) and scraped():
            shown = time.monotonic()
            run.status(f"registering: {int(metrics.get('streamer_subscriptions', 0)):,}/{n:,} "
                       f"subscriptions ({time.monotonic() - started:.0f} s)")
        if time.monotonic() - started > registration_grace:
            raise DemoFailed(f"registration not done after {registration_grace:g} s")
        await asyncio.sleep(0.5)
    run.registration_s = time.monotonic() - started
    scraped()
    run.subscriptions = int(metrics.get("streamer_subscriptions", 0))
    run.say(f"registered {run.subscriptions:,} subscriptions on {g} gateways in "
            f"{run.registration_s:.1f} s ({n / run.registration_s:,.0f}/s)")

    run.stage = "running"
    run.puller = await _spawn(
        run, "puller", "-m", "streamer", "puller", "--workload", "chat",
        "--rate", str(args.rate), "--seed", str(args.seed), "--log-dir", str(log_dir),
        "--listen", f"127.0.0.1:{puller_port}", "--log-level", "WARNING",
    )
    loop = asyncio.get_running_loop()

    def puller_listening() -> bool:
        with socket.socket() as probe:
            return probe.connect_ex(("127.0.0.1", puller_port)) == 0

    await _wait_for("the Puller's port", puller_listening, STARTUP_TIMEOUT,
                    [run.streamer, run.puller])
    await _open_gate(target)
    run.run_start = loop.time()
    run.cpu_start = cpu_seconds(run.streamer.pid)
    run.say(f"Puller pid {run.puller.pid} on 127.0.0.1:{puller_port}: chat workload at "
            f"{args.rate:g} events/s for {args.duration:g} s")
    run.say(f"{'t':>4} | {'events/s':>9} | {'deliveries/s':>12} | {'p99 ms':>6} | "
            f"{'subscriptions':>13}")
    previous = dict(metrics)
    second = 0
    while second < math.ceil(args.duration):
        second += 1
        await asyncio.sleep(max(0.0, run.run_start + second - loop.time()))
        if run.puller.returncode is not None:
            raise DemoFailed(f"the Puller exited with code {run.puller.returncode}")
        if not scraped():
            continue
        sampled = loop.time()
        events = metrics["streamer_events_total"] - previous.get("streamer_events_total", 0)
        deliveries = (metrics["streamer_deliveries_total"]
                      - previous.get("streamer_deliveries_total", 0))
        previous = dict(metrics)
        # What a partial summary (Ctrl-C) shows.
        run.events = int(metrics["streamer_events_total"])
        run.flow_seconds = sampled - run.run_start
        run.deliveries = sum(gw.total for gw in run.gateways)
        run.cpu_end = cpu_seconds(run.streamer.pid)
        p99 = quantile(run.row_latencies(second), 0.99)
        p99_text = "-" if math.isnan(p99) else f"{p99:.0f}"
        line = (f"{second:>3}s | {events:>9,.0f} | {deliveries:>12,.0f} | {p99_text:>6} | "
                f"{int(metrics['streamer_subscriptions']):>13,}")
        print(line, flush=True)
    run.stage = "draining"
    await _stop(run.puller)
    run.run_end = loop.time()
    replay_log = ReplayLog(log_dir)
    last = replay_log.last_position
    replay_log.close()
    run.say(f"stopped the Puller after {run.run_end - run.run_start:.1f} s: "
            f"{last:,} events in its log")

    # The Streamer reaches the log's last event (its saved marker), then the
    # gateways have received every delivery it enqueued.
    def streamer_position() -> int:
        try:
            marker = json.loads((state_dir / "progress.json").read_text())["marker"]
        except (OSError, ValueError, KeyError):
            return -1
        prefix, _, position = str(marker).rpartition(":")
        return int(position) if prefix.endswith(log_id) and position.isdigit() else -1

    # The Puller is gone, so the marker stops moving once the Streamer has
    # processed all it was sent (it is saved within 100 ms).
    deadline = loop.time() + DRAIN_TIMEOUT
    processed, since = streamer_position(), loop.time()
    while processed < last and loop.time() < deadline and loop.time() - since < 1.0:
        await asyncio.sleep(0.05)
        position = streamer_position()
        if position != processed:
            processed, since = position, loop.time()
    with contextlib.suppress(DemoFailed):
        await _wait_for(
            "gateway deliveries",
            lambda: scraped() and sum(gw.total for gw in run.gateways)
            >= metrics["streamer_deliveries_total"],
            DRAIN_TIMEOUT, [run.streamer],
        )
        await asyncio.sleep(1.1)  # one more report from every gateway
    run.cpu_end = cpu_seconds(run.streamer.pid)
    run.rss_mib = rss_mib(run.streamer.pid)
    scraped()
    run.events = int(metrics.get("streamer_events_total", 0))
    run.flow_seconds = run.run_end - run.run_start
    run.ingest_p50 = ingest_quantile(metrics, 0.5)
    run.ingest_p99 = ingest_quantile(metrics, 0.99)
    # Every gateway writes out its records as it stops.
    await asyncio.gather(*(_stop(gw.proc) for gw in run.gateways))
    await asyncio.gather(*(gw.reader for gw in run.gateways if gw.reader is not None))
    run.deliveries = sum(gw.total for gw in run.gateways)
    run.stage = "verifying"
    run.say("verifying every gateway's deliveries against the Puller's log ...")
    verified_at = loop.time()
    ok, report, span = (await asyncio.gather(
        asyncio.to_thread(verify, log_dir, last, processed, run.gateways, n, g, args.seed),
        _stop(run.streamer),
    ))[0]
    report += f"\n  (verified in {loop.time() - verified_at:.1f} s)"
    run.verified, run.verification = ok, report
    if "last_appended" in span:
        run.emit_seconds = span["last_appended"] - span["first_appended"]
    run.stage = "done"


async def _open_gate(target: str) -> None:
    """Connect as START_GATE (Hello, Heartbeat): closes the restart window."""
    from streamer.client import StreamerClient

    async with StreamerClient(target, gateway_id=START_GATE) as client:
        deadline = time.monotonic() + STARTUP_TIMEOUT
        while not client.connected:
            if time.monotonic() > deadline:
                raise DemoFailed("could not open the Streamer's ingest (no heartbeat ack)")
            await asyncio.sleep(0.01)


def expected_ops(matcher: Any, change: Any) -> list[tuple[int, list[str]]]:
    """(delivered operation, subscription ids) pairs of one event, as the
    ingest computes them (enter/leave for an update with a pre-image)."""
    from streamer.node.events import Op

    if change.document is None:
        ids = matcher.match(change.database, change.collection, change.document_id, None)
    else:
        ids = matcher.match(change.database, change.collection, change.document_id,
                            change.document)
    if change.op is Op.UPDATE and change.before is not None:
        before = set(matcher.match(change.database, change.collection, change.document_id,
                                   change.before))
        after = set(ids)
        return [(int(Op.UPDATE), sorted(after & before)), (int(Op.INSERT), sorted(after - before)),
                (int(Op.DELETE), sorted(before - after))]
    return [(int(change.op), list(ids))]


def expected_deliveries(
    log_dir: Path, specs: Sequence[Any], first: int, last: int, prefix: str = "",
) -> tuple[dict[str, list[tuple[int, int]]], dict[str, int]]:
    """What each subscription of ``specs`` (``SubscriptionSpec``s) must
    receive from the Puller's log in ``log_dir``, positions (first, last]:
    its (position, operation) pairs in order, each event transformed and
    matched as the ingest does (``expected_ops``), by
    ``prefix`` + id; and each event id's position."""
    from streamer.matching.matcher import Matcher
    from streamer.node.events import PoisonEvent, normalize
    from streamer.puller.log import ReplayLog

    matcher = Matcher()
    for s in specs:
        matcher.add(s.id, s.database, s.collection, filters=s.filters, expression=s.expression)
    expected: dict[str, list[tuple[int, int]]] = {prefix + s.id: [] for s in specs}
    position_of: dict[str, int] = {}
    replay_log = ReplayLog(log_dir)
    try:
        position = first
        while position < last:
            records = replay_log.read(position, 1024)
            if not records:
                break
            for record in records:
                position = record.position
                if position > last:
                    break
                try:
                    change = normalize(record.event)
                except PoisonEvent:
                    continue
                position_of[change.event_id] = position
                for op, ids in expected_ops(matcher, change):
                    for sub_id in ids:
                        expected[prefix + sub_id].append((position, op))
    finally:
        replay_log.close()
    return expected, position_of


def verify(
    log_dir: Path, last: int, processed: int, gateways: Iterable[Gateway],
    n: int, g: int, seed: int,
) -> tuple[bool, str, dict[str, float]]:
    """Compare what each subscription received with what it should have."""
    from streamer.matching.matcher import Matcher
    from streamer.matching.reference import ReferenceMatcher
    from streamer.node.events import PoisonEvent, normalize
    from streamer.puller.log import ReplayLog
    from streamer.tools.workload import Workload

    problems: list[str] = []
    notes: list[str] = []
    if processed < 0:
        return False, "FAILED: the Streamer processed no event", {}
    if processed < last:
        # The Puller ends its streams when stopped: what it appended in its
        # last moment can miss the Streamer (it stays in the log).
        notes.append(f"the last {last - processed:,} event(s) of the Puller's log were "
                     "appended as it stopped and never sent to the Streamer; not counted")
    specs = list(Workload(n, seed=seed, gateways=g).subscriptions())
    matcher, reference = Matcher(), ReferenceMatcher()
    for s in specs:
        matcher.add(s.id, s.database, s.collection, filters=s.filters, expression=s.expression)
    # The reference holds a seeded sample of the subscriptions (its CEL parser
    # and its linear scan are slow); on those the index must agree with it.
    checked = random.Random(seed).sample(specs, min(len(specs), REFERENCE_SUBSCRIPTIONS))
    checked_ids = frozenset(s.id for s in checked)
    for s in checked:
        reference.add(s.id, s.database, s.collection, filters=s.filters,
                      expression=s.expression)
    replay_log = ReplayLog(log_dir)
    expected: dict[str, list[tuple[str, int]]] = {}
    count = 0
    changes = []
    span: dict[str, float] = {}
    try:
        position = 0
        while position < processed:
            records = replay_log.read(position, 1024)
            if not records:
                break
            for record in records:
                position = record.position
                if position > processed:
                    break
                span.setdefault("first_appended", record.appended)
                span["last_appended"] = record.appended
                try:
                    changes.append(normalize(record.event))
                except PoisonEvent:
                    continue
    finally:
        replay_log.close()
    for change in changes:
        count += 1
        for op, ids in expected_ops(matcher, change):
            for sid in ids:
                expected.setdefault(sid, []).append((change.event_id, op))
    # The linear reference is slow (it evaluates every subscription of the
    # collection in Python): it checks evenly spaced events, in random order,
    # for a bounded time.
    step = max(1, len(changes) // REFERENCE_SAMPLE)
    candidates = changes[::step]
    random.Random(seed).shuffle(candidates)
    sample = []
    disagreements = 0
    budget = time.monotonic() + REFERENCE_SECONDS
    for change in candidates:
        if time.monotonic() > budget:
            break
        sample.append(change)
        if {(op, tuple(sorted(ids))) for op, ids in expected_ops(reference, change)} != {
            (op, tuple(sorted(i for i in ids if i in checked_ids)))
            for op, ids in expected_ops(matcher, change)
        }:
            disagreements += 1
            if disagreements <= 3:
                problems.append(f"reference and index disagree on {change.event_id}")
    received: dict[str, list[tuple[str, int]]] = {}
    for gateway in gateways:
        with open(gateway.out) as f:
            for line in f:
                event_id, op_text, sids = line.split()
                for sid in sids.split(","):
                    received.setdefault(sid, []).append((event_id, int(op_text)))
    owner = {s.id: s.gateway for s in specs}
    mismatched = 0
    for sid in owner:
        want, got = expected.get(sid, []), received.get(sid, [])
        if want != got:
            mismatched += 1
            if mismatched <= 5:
                where = next((i for i, (a, b) in enumerate(zip(want, got, strict=False))
                              if a != b), min(len(want), len(got)))
                problems.append(
                    f"{sid} ({owner[sid]}): expected {len(want)} deliveries, got {len(got)}; "
                    f"first difference at #{where + 1}: expected "
                    f"{want[where] if where < len(want) else 'nothing'}, got "
                    f"{got[where] if where < len(got) else 'nothing'}"
                )
    unknown = set(received) - set(owner)
    if unknown:
        problems.append(f"deliveries to {len(unknown)} unknown subscription id(s)")
    pairs = sum(len(v) for v in expected.values())
    scope = (f"{count:,} events x {len(owner):,} subscriptions ({pairs:,} expected "
             f"(event, subscription) deliveries, compared in order per subscription; "
             f"index matches cross-checked by the linear reference matcher on "
             f"{len(sample):,} events x {len(checked):,} subscriptions)")
    if mismatched:
        problems.insert(0, f"{mismatched:,} subscription(s) differ")
    detail = "".join("\n  " + line for line in problems + notes)
    if problems:
        return False, "FAILED: " + scope + detail, span
    return True, "OK: " + scope + detail, span


def _fmt(value: float | None, spec: str, unit: str = "") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:{spec}}{unit}"


def summary(run: Run, interrupted: bool) -> str:
    # Rates are over the time the counted events took to arrive: from the
    # Puller's log when the run got that far, else up to the last count.
    elapsed = run.emit_seconds if run.emit_seconds is not None else run.flow_seconds
    per_s = (lambda x: x / elapsed) if elapsed else (lambda x: math.nan)
    cpu = None
    if run.cpu_start is not None and run.cpu_end is not None and run.events:
        cpu = (run.cpu_end - run.cpu_start) / run.events * 1000
    lat = run.latencies
    rows = [
        ("subscriptions", f"{run.subscriptions:,} on {len(run.gateways)} gateways"
         + (f" (registered in {run.registration_s:.1f} s)" if run.registration_s else "")),
        ("events", f"{run.events:,}"),
        ("events/s", _fmt(per_s(run.events), ",.0f")
         + (f" over {elapsed:.1f} s" if elapsed else "")),
        ("deliveries", f"{run.deliveries:,}"),
        ("deliveries/s", _fmt(per_s(run.deliveries), ",.0f")),
        ("latency p50 / p99 / max", " / ".join(
            _fmt(quantile(lat, q), ".0f") for q in (0.5, 0.99, 1.0)) + " ms"
         + " (Puller emit → gateway receive, 1 ms resolution)"),
        ("  of which in the Streamer", " / ".join(
            _fmt(v * 1000, ".2f") for v in (run.ingest_p50, run.ingest_p99))
         + " ms p50 / p99 (receipt from the Puller → queued for the gateways; its histogram)"),
        ("Streamer CPU per 1000 events", _fmt(cpu, ".3f", " s")),
        ("Streamer RSS", _fmt(run.rss_mib, ".0f", " MiB")),
        ("wall time", f"{time.monotonic() - run.began:.1f} s in all"),
        ("verification", run.verification if not interrupted else
         f"not run (interrupted while {run.stage})"),
    ]
    width = max(len(k) for k, _ in rows)
    lines = ["", "summary" + (" (partial: interrupted)" if interrupted else ""),
             "-" * (width + 40)]
    lines += [f"{k:<{width}} | {v}" for k, v in rows]
    return "\n".join(lines)


def latency_series(run: Run) -> list[tuple[int, float, float]]:
    """(t, p50, p99) of each row of the live table, as the plot draws them."""
    rows = sorted(s + 1 for s in run.per_second)
    return [(t, quantile(run.row_latencies(t), 0.5), quantile(run.row_latencies(t), 0.99))
            for t in rows]


def plot(run: Run, path: Path) -> None:
    try:
        import matplotlib
    except ImportError:
        raise DemoFailed("--plot needs matplotlib: pip install 'streamer-fanout[plot]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    series = latency_series(run)
    fig, ax = plt.subplots(figsize=(8, 4))
    for column, label in ((1, "p50"), (2, "p99")):
        ax.plot([row[0] for row in series], [row[column] for row in series], label=label)
    ax.set_xlabel("seconds since the Puller started (t of the live table)")
    ax.set_ylabel("latency, ms (Puller emit → gateway)")
    ax.set_title(f"streamer demo: {run.subscriptions:,} subscriptions, "
                 f"{len(run.gateways)} gateways, {run.args.rate:g} events/s")
    ax.legend()
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


async def _main(args: argparse.Namespace, work: Path) -> int:
    run = Run(args, work, interactive=sys.stdout.isatty())
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    assert task is not None
    signalled: list[int] = []

    def on_signal(sig: int) -> None:
        if not signalled:
            signalled.append(sig)
            task.cancel()

    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, on_signal, sig)
    code = 0
    try:
        try:
            await _demo(run)
        except asyncio.CancelledError:
            if not signalled:
                raise
            code = 130 if signalled[0] == signal.SIGINT else 143
        except DemoFailed as exc:
            run.say(f"streamer demo failed: {exc}")
            for name in ("streamer", "puller"):
                tail = _tail(work / f"{name}.log")
                if tail:
                    run.say(f"--- {name}.log (last lines) ---\n{tail}")
            code = 1
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        # Each by its pid, newest first: the Puller, the gateways, the Streamer.
        for proc in reversed(run.procs):
            await _stop(proc, 5.0)
        for gateway in run.gateways:
            if gateway.reader is not None:
                gateway.reader.cancel()
    if code == 130 or code == 143:
        run.say("interrupted: stopped the gateways, the Streamer and the Puller")
    print(summary(run, interrupted=code in (130, 143)), flush=True)
    if code == 0 and args.plot is not None:
        try:
            plot(run, args.plot)
            print(f"latency plot written to {args.plot}")
        except DemoFailed as exc:
            print(f"streamer demo: {exc}", file=sys.stderr)
            code = 1
    if code == 0 and not run.verified:
        code = 1
    return code


def remove_stale_work_dirs(parent: Path) -> list[Path]:
    """Remove the temporary work directories in ``parent`` that demos killed
    by SIGKILL (which no cleanup survives) left behind; returns them.

    Only directories named ``streamer-demo-*``, owned by this user, whose
    owner file (also this user's) names a process that no longer exists:
    anything else, including a directory without an owner file (an older
    demo's, or one being created right now), is left alone.
    """
    try:
        candidates = [p for p in parent.iterdir() if p.name.startswith(WORK_DIR_PREFIX)]
    except OSError:
        return []
    removed = []
    for path in candidates:
        if _abandoned(path):
            shutil.rmtree(path, ignore_errors=True)
            if not os.path.lexists(path):
                removed.append(path)
    return removed


def _abandoned(path: Path) -> bool:
    uid = os.getuid()
    owner_file = path / OWNER_FILE
    try:
        # lstat: a symlink is neither the directory nor the file we wrote.
        directory, owner = os.lstat(path), os.lstat(owner_file)
        if not (stat.S_ISDIR(directory.st_mode) and stat.S_ISREG(owner.st_mode)
                and directory.st_uid == uid and owner.st_uid == uid):
            return False
        pid = int(owner_file.read_text().strip())
    except (OSError, ValueError):
        return False
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except OSError:  # a process of another user's: alive
        return False
    return False


def cli_main(argv: Sequence[str]) -> int:
    """``streamer demo ARGV``."""
    parser = build_parser()
    args = parser.parse_args(argv)
    args.options.resolve(args)
    _check(args)
    configure_logging("WARNING", "text")
    return run(args)


def run(args: argparse.Namespace) -> int:
    """The demo with checked options."""
    if args.work_dir is not None:
        work = Path(args.work_dir)
        work.mkdir(parents=True, exist_ok=True)
        return asyncio.run(_main(args, work))
    # In memory when possible: the Puller fsyncs every batch, and a busy
    # disk's fsync latency would drown what the demo is about.
    shm = Path("/dev/shm")
    parent = shm if shm.is_dir() and os.access(shm, os.W_OK) else Path(tempfile.gettempdir())
    for stale in remove_stale_work_dirs(parent):
        print(f"streamer demo: removed {stale}, left behind by a demo that was killed",
              flush=True)
    work = Path(tempfile.mkdtemp(prefix=WORK_DIR_PREFIX, dir=parent))
    try:
        (work / OWNER_FILE).write_text(f"{os.getpid()}\n")
        return asyncio.run(_main(args, work))
    finally:
        shutil.rmtree(work, ignore_errors=True)


def build_parser() -> ArgumentParser:
    parser = ArgumentParser(
        prog="streamer demo",
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
    )
    opts = Options(parser, ENV)
    opts.add("--subscriptions", integer(1, MAX_SUBSCRIPTIONS),
             default=DEFAULT_SUBSCRIPTIONS, metavar="N",
             help="subscriptions of the chat workload, spread over the gateways")
    opts.add("--gateways", integer(1, 64), default=DEFAULT_GATEWAYS, metavar="G",
             help="simulated gateway processes")
    opts.add("--rate", real(0, MAX_RATE, above=True), default=DEFAULT_RATE,
             metavar="EVENTS", help="events per second the Puller emits")
    opts.add("--duration", real(0, MAX_SECONDS, above=True),
             default=DEFAULT_DURATION, metavar="SECONDS",
             help="seconds the Puller runs, after every subscription is registered")
    opts.add("--seed", integer(), default=DEFAULT_SEED, metavar="N",
             help="seed of the workload (subscriptions and events)")
    opts.add("--plot", Path, metavar="FILE",
             help="write a PNG of the latency (p50/p99 per second) to FILE; needs matplotlib "
             f"(pip install '{DISTRIBUTION}[plot]')")
    opts.add("--work-dir", Path, metavar="DIR",
             help="keep the Puller's log, the Streamer's state, every process's log and the "
             "gateways' delivery records in DIR (must be empty or new); unset, a temporary "
             "directory removed at the end (it holds demo.pid: a later demo removes such "
             "directories whose demo was killed)")
    parser.set_defaults(options=opts)
    return parser


def _check(args: argparse.Namespace) -> None:
    """What the demo needs beyond each option's own range, checked before
    anything starts (a run must not fail at its end for a bad option)."""
    parser: ArgumentParser = args.options.parser
    if args.plot is not None:
        if importlib.util.find_spec("matplotlib") is None:
            parser.error(f"--plot needs matplotlib: pip install '{DISTRIBUTION}[plot]'")
        if not args.plot.parent.is_dir():
            parser.error(f"--plot {args.plot}: no directory {args.plot.parent}")
    if args.work_dir is not None and args.work_dir.exists():
        if not args.work_dir.is_dir():
            parser.error(f"--work-dir {args.work_dir}: not a directory")
        if any(args.work_dir.iterdir()):
            parser.error(f"--work-dir {args.work_dir}: not empty")


if __name__ == "__main__":
    if sys.argv[1:2] == ["gateway"]:
        sys.exit(gateway_main(sys.argv[1:]))
    sys.exit("usage: python -m streamer.tools.demo gateway ... (internal; run `streamer demo`)")
