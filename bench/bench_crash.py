"""Crash: ``kill -9`` of the Streamer and of the Puller mid-flow, and a
check of every delivery against the Puller's replay log (docs/reliability.md,
Crash).

The pipeline of ``streamer demo``, as processes on loopback: ``streamer
puller --workload chat`` at ``RATE`` events/s, ``streamer serve``, and G of
the demo's gateway processes (``python -m streamer.tools.demo gateway``,
each a ``StreamerClient`` that records every delivery it receives). As the
demo does, the Puller's log is created first and the Streamer starts with a
saved marker at its position 0 and the gateways as known ones, so the first
event is matched against every subscription.

Then ``KILLS`` times each, alternating (the Streamer first), at a seeded
random moment ``DELAY`` seconds (uniform) after events flow again: ``kill
-9`` of the Streamer, restarted at once on the same port and state
directory (its saved marker is read first: the point its replay starts
from), or of the Puller, restarted on the same log. After each of the
first ``STALLS`` Puller restarts, one gateway process (seeded choice) is
stopped with SIGSTOP until the Streamer ends its stream (cut off for not
reading: ``--stall-seconds STALL_SECONDS``, or the connection lost to gRPC
keepalive, whichever comes first), then continued: its client reconnects
and resumes after its markers. At the end the Puller
is stopped, the Streamer catches up with its log, the Puller serves that
log again without producing until no subscription is catching up from it
(the gateways' clients resume after their last delivery, see
``StreamerClient``), and the gateways stop.

The check (the demo's verification, allowing what a crash may cost): every
event of the log is transformed and matched as the ingest does
(``streamer.tools.demo.expected_ops``) against the workload's
subscriptions, which gives each subscription its expected deliveries in
order. Each subscription's received deliveries must follow that order;
where they jump ahead, a Streamer restart must explain it: the replay after
a restart starts right after the marker saved at that kill, so the first
delivery after the jump must be the subscription's first expected event
after that marker. Jumping back (a rewind: a client that resumed after its
catch-up group's progress, older than its own last delivery) is followed
by duplicates (allowed, counted); jumping ahead skips events at or before
that marker, which the crash may have
lost (queued but not yet written when the process died: docs/delivery.md,
What a crash can lose; counted). Missing: an expected event after a saved
marker that never arrived, or a jump no restart explains; it must be 0, as
must deliveries of events or to subscriptions not expected.

Sizes (``STREAMER_BENCH_CRASH_*``; quick sizes with
``STREAMER_RELIABILITY_QUICK=1``): ``N`` 20000 (2000), ``GATEWAYS`` 4 (2),
``RATE`` 2000 (500), ``KILLS`` 10 (2) of each, ``DELAY`` 1-6 s (1-3),
``SEED`` 1, ``STALLS`` 3 (0), ``STALL_SECONDS`` 2 (1). Figures:
``bench/results/crash.json``.
"""

from __future__ import annotations

import bisect
import json
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from reliability import (
    Children,
    count,
    keep_logs,
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

from streamer.tools.demo import expected_deliveries
from streamer.tools.measure import free_port, scrape

N = count("STREAMER_BENCH_CRASH_N", 20_000, 2_000)
GATEWAYS = count("STREAMER_BENCH_CRASH_GATEWAYS", 4, 2)
RATE = size("STREAMER_BENCH_CRASH_RATE", 2000, 500)
KILLS = count("STREAMER_BENCH_CRASH_KILLS", 10, 2)
DELAY = (size("STREAMER_BENCH_CRASH_DELAY_MIN", 1, 1), size("STREAMER_BENCH_CRASH_DELAY_MAX", 6, 3))
SEED = count("STREAMER_BENCH_CRASH_SEED", 1, 1)
# At the quick sizes a stopped gateway takes minutes to fill its transport's
# buffers (megabytes) before any write blocks: no stalls there.
STALLS = count("STREAMER_BENCH_CRASH_STALLS", 3, 0)
STALL_SECONDS = size("STREAMER_BENCH_CRASH_STALL_SECONDS", 2, 1)  # the Streamer's --stall-seconds
# Long enough for every gateway to reconnect and re-subscribe its share
# (docs/delivery.md, Restart window: a few thousand per second).
GRACE = max(60.0, N / 300)
RECOVERY_TIMEOUT = GRACE + 60
START_GATE = "crash-start"  # connects once the Puller serves: opens the first window
CYCLE = 20_000  # the Puller repeats its first events: its restarts stay quick


@dataclass
class Gateway:
    """One of the demo's gateway processes; its JSON lines read in a thread."""

    proc: subprocess.Popen[str]
    ready: bool = False
    total: int = 0
    reader: threading.Thread = field(init=False)

    def __post_init__(self) -> None:
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            try:
                report = json.loads(line)
            except ValueError:
                continue
            self.ready = self.ready or "ready" in report
            self.total = int(report.get("total", report.get("done", self.total)))


class Pipeline:
    def __init__(self, work: Path) -> None:
        from streamer.puller.log import ReplayLog

        self.work = work
        self.children = Children(work)
        self.log_dir, self.state = work / "puller-log", work / "state"
        replay_log = ReplayLog(self.log_dir)
        self.log_id, start = replay_log.log_id, replay_log.marker(0)
        replay_log.close()
        self.state.mkdir()
        (self.state / "progress.json").write_text(json.dumps({
            "marker": start, "others": 0,
            "gateways": [f"gw-{k}" for k in range(GATEWAYS)] + [START_GATE]}))
        self.port, self.puller_port, self.metrics = free_port(), free_port(), free_port()
        self.streamer: subprocess.Popen[Any] | None = None
        self.puller: subprocess.Popen[Any] | None = None
        self.gateways: list[Gateway] = []
        self.runs = {"streamer": 0, "puller": 0}
        self.last_logged = 0

    @property
    def target(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start_streamer(self) -> None:
        self.streamer = self.children.start(
            f"streamer-{self.runs['streamer']}",
            serve_argv(self.port, self.puller_port, self.state, self.metrics,
                       "--resume-grace", f"{GRACE:g}", "--stall-seconds", f"{STALL_SECONDS:g}",
                       "--log-level", "INFO"))
        self.runs["streamer"] += 1

    def start_puller(self) -> None:
        self.puller = self.children.start(
            f"puller-{self.runs['puller']}",
            puller_argv(self.puller_port, self.log_dir, RATE, "--seed", str(SEED),
                        "--cycle", str(CYCLE)))
        self.runs["puller"] += 1

    def ends(self, gateway: int) -> list[str]:
        """Why each stream of gateway ``gw-<gateway>`` on the current
        Streamer ended so far, from its log."""
        log = self.work / f"streamer-{self.runs['streamer'] - 1}.log"
        text = log.read_text(errors="replace") if log.exists() else ""
        return re.findall(rf"gateway stream \d+ ended \(gw-{gateway} at [^)]*\): ([^;]*);", text)

    def stall(self, k: int) -> dict[str, Any]:
        """Stop gateway ``k``'s process (SIGSTOP) until the Streamer ends its
        stream (cut off for not reading, or its connection lost to gRPC
        keepalive, whichever comes first), continue it, and wait until it
        receives again."""
        assert self.streamer is not None
        gateway = self.gateways[k]
        before = len(self.ends(k))
        stopped = time.monotonic()
        os.kill(gateway.proc.pid, signal.SIGSTOP)
        try:
            wait_for("the stopped gateway's stream to end", lambda: len(self.ends(k)) > before,
                     RECOVERY_TIMEOUT, [self.streamer])
        finally:
            os.kill(gateway.proc.pid, signal.SIGCONT)
        continued = time.monotonic()
        total = gateway.total
        wait_for("the gateway receiving again", lambda: gateway.total > total,
                 RECOVERY_TIMEOUT, [self.streamer, gateway.proc])
        return {"gateway": k, "ended_after_s": continued - stopped,
                "why": self.ends(k)[before], "recovery_s": time.monotonic() - continued}

    def catching_up(self) -> bool:
        """Whether some subscription is still catching up (the Streamer's
        ``streamer_catchup_subscriptions``); True while it cannot be read."""
        try:
            samples = scrape(f"127.0.0.1:{self.metrics}", timeout=5)
        except OSError:
            return True
        return sum(samples.get("streamer_catchup_subscriptions", {}).values()) > 0

    def saved(self) -> int:
        """The position of the Streamer's saved marker (-1 while unreadable)."""
        try:
            marker = json.loads((self.state / "progress.json").read_text())["marker"]
        except (OSError, ValueError, KeyError):
            return -1
        prefix, _, position = str(marker).rpartition(":")
        return int(position) if prefix.endswith(self.log_id) and position.isdigit() else -1

    def start(self) -> None:
        self.start_streamer()
        for k in range(GATEWAYS):
            out = self.work / f"gw-{k}.deliveries"
            proc = self.children.start(
                f"gw-{k}", ["-m", "streamer.tools.demo", "gateway", "--target", self.target,
                            "--index", str(k), "--gateways", str(GATEWAYS), "--subscriptions",
                            str(N), "--seed", str(SEED), "--out", str(out)], pipes=True)
            self.gateways.append(Gateway(proc))
        assert self.streamer is not None
        wait_for("the gateways' registration", lambda: all(g.ready for g in self.gateways),
                 GRACE, [self.streamer, *(g.proc for g in self.gateways)])
        self.start_puller()

        def listening() -> bool:
            with socket.socket() as probe:
                return probe.connect_ex(("127.0.0.1", self.puller_port)) == 0

        assert self.puller is not None
        wait_for("the Puller's port", listening, 60, [self.puller])
        _open_gate(self.target)
        self.flowing(0)

    def flowing(self, beyond: int, since: float | None = None) -> float:
        """Until the saved marker passes ``beyond``: seconds it took (from
        ``since``, a ``time.monotonic()``, if given)."""
        started = time.monotonic() if since is None else since
        assert self.streamer is not None and self.puller is not None
        wait_for("events flowing again", lambda: self.saved() > beyond, RECOVERY_TIMEOUT,
                 [self.streamer, self.puller], every=0.02)
        return time.monotonic() - started

    def finish(self) -> int:
        """Stop the Puller, let the Streamer process what it was sent and
        the gateways receive it, stop them; the last position processed
        (as in the demo, the last events the Puller appended as it stopped
        may never have been sent: they stay out of the check)."""
        from streamer.puller.log import ReplayLog

        assert self.puller is not None and self.streamer is not None
        self.children.stop(self.puller)
        replay_log = ReplayLog(self.log_dir)
        self.last_logged = replay_log.last_position
        replay_log.close()
        # Subscriptions that resumed after a restart may still be catching
        # up from the Puller's replay: it serves its log again, producing
        # nothing (an empty replay file), until none is.
        empty = self.log_dir.parent / "empty.jsonl"
        empty.write_text("")
        self.puller = self.children.start("puller-final", [
            "-m", "streamer", "puller", "--replay", str(empty), "--log-dir", str(self.log_dir),
            "--listen", f"127.0.0.1:{self.puller_port}", "--log-level", "WARNING"])
        processed, since = self.saved(), time.monotonic()
        while processed < self.last_logged and time.monotonic() - since < 5.0:
            time.sleep(0.1)
            if self.saved() != processed:
                processed, since = self.saved(), time.monotonic()
        wait_for("the catch-ups", lambda: not self.catching_up(), 120, [self.streamer])
        totals, since = -1, time.monotonic()
        while time.monotonic() - since < 3.0:  # until the gateways receive nothing more
            time.sleep(0.5)
            now = sum(g.total for g in self.gateways)
            if now != totals:
                totals, since = now, time.monotonic()
        for gateway in self.gateways:
            self.children.stop(gateway.proc, timeout=60)
            gateway.reader.join(10)
        self.children.stop(self.streamer)
        self.children.stop(self.puller)  # it holds the log, which the check reads
        return processed


def _open_gate(target: str) -> None:
    """Connect as START_GATE (Hello, Heartbeat): closes the first restart
    window once the Puller serves, so ingest starts at once."""
    import asyncio

    from streamer.client import StreamerClient

    async def gate() -> None:
        async with StreamerClient(target, gateway_id=START_GATE) as client:
            async with asyncio.timeout(60):
                while not client.connected:
                    await asyncio.sleep(0.01)

    asyncio.run(gate())


# --------------------------------------------------------------------- check
@dataclass
class Outcome:
    deliveries: int = 0  # (event, operation, subscription) received
    expected: int = 0
    duplicates: int = 0
    lost_before_marker: int = 0  # what a crash may lose (docs/delivery.md)
    missing: int = 0
    unexplained_jumps: int = 0  # ahead, past events no restart's replay skips
    rewinds: int = 0  # back to an event already received (duplicates follow)
    unexpected: int = 0  # deliveries of events or to subscriptions not expected
    subscriptions_with_duplicates: int = 0
    examples: list[str] = field(default_factory=list)


def check_subscription(
    sub_id: str, expected: list[tuple[int, int]], received: list[tuple[int, int]],
    restarts: list[int], outcome: Outcome,
) -> None:
    """One subscription's received (position, operation) pairs against the
    expected ones, given the positions of the markers saved at each
    Streamer kill, in kill order (module docstring)."""
    index = {item: i for i, item in enumerate(expected)}
    positions = [p for p, _ in expected]
    seen: set[tuple[int, int]] = set()
    skipped: set[int] = set()  # indexes a restart's replay passed over
    following = 0  # the index the next delivery continues with
    usable = 0  # restarts before this one explained earlier jumps
    duplicates = 0
    for item in received:
        i = index.get(item)
        if i is None:
            outcome.unexpected += 1
            continue
        outcome.deliveries += 1
        if item in seen:
            duplicates += 1
        seen.add(item)
        if i == following:
            following += 1
            continue
        # A jump: the start of a replay, right after the marker saved at a
        # kill; or back to an event already received (a rewind: a client
        # that resumed after its catch-up group's progress, older than its
        # own last delivery), which duplicates follow, never a gap.
        k = next((k for k in range(usable, len(restarts))
                  if bisect.bisect_right(positions, restarts[k]) == i), None)
        if k is None and i < following:
            outcome.rewinds += 1
        elif k is None:
            outcome.unexplained_jumps += 1
            if len(outcome.examples) < 5:
                outcome.examples.append(
                    f"{sub_id}: after #{following} of {len(expected)} expected, received #{i} "
                    f"(position {item[0]}); no restart replays from there")
        else:
            usable = k + 1
            skipped.update(range(following, i))
        following = i + 1
    last_saved = restarts[-1] if restarts else 0
    for i, item in enumerate(expected):
        if item in seen:
            continue
        if i in skipped or (i >= following and item[0] <= last_saved):
            outcome.lost_before_marker += 1
        else:
            outcome.missing += 1
            if len(outcome.examples) < 5:
                outcome.examples.append(
                    f"{sub_id}: expected #{i} (position {item[0]}, operation {item[1]}) "
                    "never arrived")
    outcome.expected += len(expected)
    outcome.duplicates += duplicates
    outcome.subscriptions_with_duplicates += duplicates > 0


def verify(work: Path, log_dir: Path, last: int, restarts: list[int]) -> Outcome:
    """Every gateway's deliveries against the Puller's log (module docstring)."""
    from streamer.tools.workload import Workload

    specs = list(Workload(N, seed=SEED, gateways=GATEWAYS).subscriptions())
    expected, position_of = expected_deliveries(log_dir, specs, 0, last)
    received: dict[str, list[tuple[int, int]]] = {s.id: [] for s in specs}
    outcome = Outcome()
    for out in sorted(work.glob("gw-*.deliveries")):
        with open(out) as f:
            for line in f:
                event_id, op, ids = line.split()
                at = position_of.get(event_id)
                for sub_id in ids.split(","):
                    if at is None or sub_id not in received:
                        outcome.unexpected += 1
                    else:
                        received[sub_id].append((at, int(op)))
    for sub_id, items in expected.items():
        check_subscription(sub_id, items, received[sub_id], restarts, outcome)
    return outcome


# ---------------------------------------------------------------------- run
def run(tmp_path: Path) -> dict[str, Any]:
    figures: dict[str, Any] = {
        "meta": machine(),
        "config": {"n": N, "gateways": GATEWAYS, "rate": RATE, "kills_each": KILLS,
                   "delay_s": list(DELAY), "seed": SEED, "resume_grace": GRACE,
                   "stalls": STALLS, "stall_seconds": STALL_SECONDS},
        "kills": [],
        "stalls": [],
    }
    work = work_dir(tmp_path)
    pipeline = Pipeline(work)
    rng = random.Random(SEED)
    restarts: list[int] = []
    failed = True
    try:
        started = time.monotonic()
        pipeline.start()
        figures["start_s"] = time.monotonic() - started
        for k in range(2 * KILLS):
            victim = "streamer" if k % 2 == 0 else "puller"
            delay = rng.uniform(*DELAY)
            time.sleep(delay)
            proc = pipeline.streamer if victim == "streamer" else pipeline.puller
            assert proc is not None
            pipeline.children.kill(proc)
            killed = time.monotonic()
            kill: dict[str, Any] = {"victim": victim, "after_s": delay, "at_s": killed - started}
            if victim == "streamer":
                # The marker its replay starts from.
                restarts.append(pipeline.saved())
                pipeline.start_streamer()
            else:
                # What the Streamer had from the dead Puller: saved within
                # the progress writer's interval (0.1 s).
                time.sleep(0.3)
                pipeline.start_puller()
            kill["saved_position"] = reached = pipeline.saved()
            kill["recovery_s"] = pipeline.flowing(reached, since=killed)
            figures["kills"].append(kill)
            if victim == "puller" and len(figures["stalls"]) < STALLS:
                time.sleep(rng.uniform(*DELAY))
                figures["stalls"].append(pipeline.stall(rng.randrange(GATEWAYS)))
        last = pipeline.finish()
        figures["run_s"] = time.monotonic() - started
        figures["events"] = last
        figures["events_logged_not_sent"] = pipeline.last_logged - last
        figures["restart_markers"] = restarts
        figures["windows"] = _windows(pipeline)
        figures["streamer_log_errors"] = log_errors(*sorted(work.glob("streamer-*.log")))
        checking = time.monotonic()
        outcome = verify(work, pipeline.log_dir, last, restarts)
        figures["verify_s"] = time.monotonic() - checking
        figures["outcome"] = outcome.__dict__
        failed = bool(outcome.missing or outcome.unexpected or outcome.unexplained_jumps)
    finally:
        pipeline.children.close()
        if failed:
            figures["logs"] = str(keep_logs(work, "crash"))
        if work != tmp_path:
            shutil.rmtree(work, ignore_errors=True)
    return figures


def _windows(pipeline: Pipeline) -> Counter[str]:
    """How each restart window of the Streamer ended, from its logs."""
    out: Counter[str] = Counter()
    for run_ in range(1, pipeline.runs["streamer"]):
        text = (pipeline.work / f"streamer-{run_}.log").read_text(errors="replace")
        if "every known gateway re-registered" in text:
            out["every known gateway back"] += 1
        elif "grace elapsed" in text:
            out["grace elapsed"] += 1
        else:
            out["killed during the window"] += 1
    return out


def render(figures: dict[str, Any]) -> list[str]:
    c, o = figures["config"], figures["outcome"]
    kills = figures["kills"]

    def victims(name: str) -> Iterator[dict[str, Any]]:
        return (k for k in kills if k["victim"] == name)

    stalls = figures["stalls"]
    rows = [[
        f"{c['kills_each']} x Streamer, {c['kills_each']} x Puller, alternating, "
        f"{c['delay_s'][0]:g}-{c['delay_s'][1]:g} s after events flow again (seed {c['seed']}); "
        f"{len(stalls)} x a gateway stopped (SIGSTOP) until its stream ended "
        f"(--stall-seconds {c['stall_seconds']:g})",
        f"{figures['events']:,} events at {c['rate']:g}/s, {c['n']:,} subscriptions on "
        f"{c['gateways']} gateways, {figures['run_s']:.0f} s",
        f"{o['deliveries']:,} of {o['expected']:,} expected",
        f"{o['missing']:,}" + (" PASS" if not o["missing"] else " FAIL"),
        f"{o['duplicates']:,} (in {o['subscriptions_with_duplicates']:,} subscriptions, "
        f"after {o['rewinds']:,} rewinds)",
        f"{o['lost_before_marker']:,}",
        f"{o['unexplained_jumps']:,} / {o['unexpected']:,}",
    ]]
    recoveries = {name: [k["recovery_s"] for k in victims(name)] for name in ("streamer",
                                                                                "puller")}
    lines = [
        "",
        *table(["kills (kill -9)", "flow", "deliveries checked", "missing after a saved marker",
                "duplicates", "lost before a saved marker (queued, unsent at the kill)",
                "unexplained jumps / unexpected deliveries"], rows),
        "",
        "recovery (kill to the saved marker moving again), s: " + "; ".join(
            f"{name} min {min(v):.1f} / median {sorted(v)[len(v) // 2]:.1f} / max {max(v):.1f}"
            for name, v in recoveries.items() if v),
        *(f"gateway gw-{st['gateway']} stopped: its stream ended after "
          f"{st['ended_after_s']:.1f} s ({st['why']}); receiving again "
          f"{st['recovery_s']:.1f} s after SIGCONT" for st in stalls),
        f"restart windows: {dict(figures['windows'])}; verified in {figures['verify_s']:.0f} s",
        f"Streamer logs: {sum(figures['streamer_log_errors'].values())} ERROR line(s)"
        + "".join(f"\n  {n} x {message}" for message, n in figures["streamer_log_errors"].items()),
    ]
    if o["examples"]:
        lines += ["examples:", *(f"  {e}" for e in o["examples"])]
    return lines


@pytest.mark.timeout(7200)
def test_crash(benchmark: Any, bench_report: list[str], tmp_path: Path) -> None:
    benchmark.group = "reliability"
    figures = benchmark.pedantic(run, args=(tmp_path,), rounds=1, iterations=1)
    record("crash", bench_report, figures, render(figures), benchmark)
    outcome = figures["outcome"]
    assert len(figures["kills"]) == 2 * KILLS
    assert len(figures["stalls"]) == min(STALLS, KILLS)
    assert outcome["deliveries"] > 0
    assert outcome["missing"] == 0, outcome["examples"]
    assert outcome["unexplained_jumps"] == 0, outcome["examples"]
    assert outcome["unexpected"] == 0

