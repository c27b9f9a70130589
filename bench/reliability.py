"""What the reliability benchmarks share (``bench_abuse``, ``bench_churn``,
``bench_crash``; ``make reliability``; docs/reliability.md).

- Sizes come from the environment: each benchmark's own variables, whose
  defaults are the full sizes, or the small ones of a quick run when
  ``STREAMER_RELIABILITY_QUICK=1`` (a variable set explicitly wins either way).
- ``machine()`` says where and when a run happened, and how loaded the
  machine was (``uptime`` before and after: it is shared).
- ``Children`` starts the processes of a run (``streamer serve``,
  ``streamer puller``, gateway processes) on loopback, each with its log
  file, and stops every one still running by its pid, whatever happened.
- ``Honest`` starts the honest gateways (the benchmark's gateway processes,
  ``python -m streamer.tools.benchmark gateway``, timing every 4th delivery
  from the Puller's emit stamp) and asks them for their latency histograms;
  ``events_total``, ``counter`` and ``cutoffs_logged`` read the Streamer's
  metrics and log.
- ``record`` puts a run's figures in pytest-benchmark's ``extra_info``, in
  the session's final summary and in ``bench/results/<name>.json``.

Figures are recorded, never asserted: the benchmarks assert correctness
(statuses, nothing lost, resources back to their baseline), and a missed
target is reported as a miss.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import platform
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import IO, Any

BENCH_DIR = Path(__file__).resolve().parent
RESULTS_DIR = BENCH_DIR / "results"
QUICK = os.environ.get("STREAMER_RELIABILITY_QUICK", "") not in ("", "0")


def size(name: str, full: float, quick: float) -> float:
    """``name`` from the environment, else the full or the quick default."""
    text = os.environ.get(name)
    return float(text) if text else quick if QUICK else full


def count(name: str, full: int, quick: int) -> int:
    return int(size(name, full, quick))


def uptime() -> str:
    """``uptime``'s line (the load averages of a shared machine)."""
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True, timeout=5,
                              check=False).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def machine() -> dict[str, Any]:
    """Date, host, CPUs, Python and commit of a run, and ``uptime`` now."""
    model = platform.processor()
    with contextlib.suppress(OSError), open("/proc/cpuinfo") as f:
        model = next((line.split(":", 1)[1].strip() for line in f
                      if line.startswith("model name")), model)
    commit = ""
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=BENCH_DIR,
                                capture_output=True, text=True, timeout=5,
                                check=False).stdout.strip()
    return {
        "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "host": platform.node(),
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "commit": commit,
        "quick": QUICK,
        "uptime_before": uptime(),
    }


def work_dir(tmp_path: Path) -> Path:
    """Where a run keeps its logs and data: tmpfs when there is one (the
    Puller fsyncs every batch; a busy disk would be measured instead)."""
    shm = Path("/dev/shm")
    if shm.is_dir() and os.access(shm, os.W_OK):
        return Path(tempfile.mkdtemp(prefix="streamer-reliability-", dir=shm))
    return tmp_path


def keep_logs(work: Path, name: str) -> Path:
    """Copy a run's logs to ``bench/results/<name>-logs/`` (its work
    directory is removed), to look into a problem it reported."""
    kept = RESULTS_DIR / f"{name}-logs"
    shutil.rmtree(kept, ignore_errors=True)
    kept.mkdir(parents=True)
    for log in work.glob("*.log"):
        shutil.copy(log, kept / log.name)
    return kept


def child_env() -> dict[str, str]:
    # The children take their settings from flags only: a STREAMER_*
    # variable meant for this run (sizes) must not configure them.
    return {k: v for k, v in os.environ.items() if not k.startswith("STREAMER_")}


def pin(pid: int, cpus: set[int]) -> None:
    with contextlib.suppress(AttributeError, OSError):
        os.sched_setaffinity(pid, cpus)


class Children:
    """The processes of one run; ``close`` stops those still running, each
    by its pid (SIGTERM, then SIGKILL), newest first."""

    def __init__(self, work: Path) -> None:
        self.work = work
        self.procs: list[subprocess.Popen[Any]] = []
        self.names: dict[int, str] = {}

    def start(
        self, name: str, argv: Sequence[str], *, pipes: bool = False,
        cpus: set[int] | None = None, nice: int = 0,
    ) -> subprocess.Popen[Any]:
        """Start ``python ARGV`` (at ``nice``, on ``cpus``); its stderr (and
        stdout unless ``pipes``: then stdin and stdout are text pipes) go to
        ``<work>/<name>.log``."""
        log: IO[bytes] = open(self.work / f"{name}.log", "ab")  # the child keeps its own copy
        try:
            proc: subprocess.Popen[Any] = subprocess.Popen(
                [sys.executable, *argv], env=child_env(), stderr=log,
                stdout=subprocess.PIPE if pipes else log,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                text=pipes, bufsize=1 if pipes else -1,
                start_new_session=True,  # Ctrl-C reaches only the driver
                preexec_fn=(lambda: os.nice(nice)) if nice else None,
            )
        finally:
            log.close()
        self.procs.append(proc)
        self.names[proc.pid] = name
        if cpus is not None:
            pin(proc.pid, cpus)
        return proc

    def log(self, name: str, lines: int = 20) -> str:
        with contextlib.suppress(OSError):
            text = (self.work / f"{name}.log").read_text(errors="replace")
            return "\n".join(text.splitlines()[-lines:])
        return ""

    @staticmethod
    def kill(proc: subprocess.Popen[Any]) -> None:
        """``kill -9`` and reap."""
        with contextlib.suppress(ProcessLookupError):
            os.kill(proc.pid, signal.SIGKILL)
        proc.wait(30)

    @staticmethod
    def stop(proc: subprocess.Popen[Any], timeout: float = 15.0) -> int:
        """SIGTERM, and SIGKILL after ``timeout``; the exit code."""
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                Children.kill(proc)
        return proc.wait()

    def close(self) -> None:
        for proc in reversed(self.procs):
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()
            self.stop(proc, timeout=10.0)


def serve_argv(listen: int, puller: int, state: Path, metrics: int, *extra: str) -> list[str]:
    return ["-m", "streamer", "serve", "--listen", f"127.0.0.1:{listen}",
            "--puller", f"127.0.0.1:{puller}", "--state-dir", str(state),
            "--metrics", f"127.0.0.1:{metrics}", "--log-level", "WARNING", *extra]


def puller_argv(listen: int, log_dir: Path, rate: float, *extra: str) -> list[str]:
    return ["-m", "streamer", "puller", "--workload", "chat", "--rate", f"{rate:g}",
            "--listen", f"127.0.0.1:{listen}", "--log-dir", str(log_dir),
            "--log-level", "WARNING", *extra]


def wait_for(
    what: str, check: Callable[[], bool], timeout: float,
    watch: Iterable[subprocess.Popen[Any]] = (), every: float = 0.05,
) -> None:
    """Until ``check()``; raises if ``timeout`` passes or a watched process exits."""
    deadline = time.monotonic() + timeout
    while not check():
        for proc in watch:
            if proc.poll() is not None:
                raise RuntimeError(f"{what}: process {proc.pid} exited with {proc.returncode}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not done after {timeout:g} s")
        time.sleep(every)


def log_errors(*paths: Path) -> dict[str, int]:
    """ERROR lines of ``streamer serve`` logs (text format), counted by
    logger and message (its first 100 characters)."""
    out: dict[str, int] = {}
    for path in paths:
        with contextlib.suppress(OSError), open(path, errors="replace") as f:
            for line in f:
                # "<date> <time> ERROR <logger>: <message>"
                parts = line.split(" ", 3)
                if len(parts) == 4 and parts[2] == "ERROR":
                    key = parts[3].strip()[:100]
                    out[key] = out.get(key, 0) + 1
    return out


def open_fds(pid: int) -> int:
    """File descriptors a process holds (Linux ``/proc``)."""
    return len(os.listdir(f"/proc/{pid}/fd"))


def cpu_busy() -> dict[str, tuple[float, float]]:
    """Per CPU, (busy, total) jiffies from ``/proc/stat``: the whole
    machine's use of each core, other users' included."""
    out: dict[str, tuple[float, float]] = {}
    with contextlib.suppress(OSError), open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if not name.startswith("cpu") or name == "cpu":
                continue
            values = [float(x) for x in fields[:8]]
            idle = values[3] + values[4]  # idle + iowait
            out[name] = (sum(values) - idle, sum(values))
    return out


def cpu_share(before: dict[str, tuple[float, float]],
              after: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Busy share of each CPU between two ``cpu_busy`` readings."""
    return {
        name: (after[name][0] - busy) / max(after[name][1] - total, 1e-9)
        for name, (busy, total) in before.items() if name in after
    }


def line_of(proc: subprocess.Popen[str]) -> str:
    """The next line a child with ``pipes`` writes; raises if it ended."""
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if not line:
        raise RuntimeError(f"process {proc.pid} ended ({proc.poll()})")
    return line


class Honest:
    """The honest gateways: benchmark gateway processes (``python -m
    streamer.tools.benchmark gateway``), asked over stdin."""

    def __init__(self, procs: list[subprocess.Popen[str]]) -> None:
        self.procs = procs

    @classmethod
    def start(
        cls, children: Children, target: str, n: int, gateways: int, seed: int, *,
        per_process: int = 2, cpus: set[int] | None = None,
    ) -> Honest:
        """The N subscriptions of ``Workload(n, seed, gateways)``,
        ``per_process`` gateways (``StreamerClient``s) per process, each
        registered (the processes said ``ready``)."""
        procs = []
        for first in range(0, gateways, per_process):
            indexes = range(first, min(first + per_process, gateways))
            procs.append(children.start(
                f"gateways-{first}",
                ["-m", "streamer.tools.benchmark", "gateway", "--target", target,
                 "--index", ",".join(map(str, indexes)), "--gateways", str(gateways),
                 "--n", str(n), "--seed", str(seed)],
                pipes=True, cpus=cpus,
            ))
        honest = cls(procs)
        for proc in procs:
            if not line_of(proc).startswith("ready"):
                raise RuntimeError("a gateway process did not register its subscriptions")
        return honest

    def ask(self, word: str) -> list[str]:
        for proc in self.procs:
            assert proc.stdin is not None
            proc.stdin.write(word + "\n")
            proc.stdin.flush()
        return [line_of(proc) for proc in self.procs]

    def report(self) -> dict[str, Any]:
        """Deliveries and the latency histogram (ns buckets of
        ``streamer.tools.benchmark.bucket``) since the last ``reset``."""
        hist: dict[int, int] = {}
        deliveries = 0
        for line in self.ask("report"):
            report = json.loads(line)
            deliveries += report["deliveries"]
            for bucket, n in report["hist"].items():
                hist[int(bucket)] = hist.get(int(bucket), 0) + n
        return {"deliveries": deliveries, "hist": hist}


def events_total(samples: dict[str, Any]) -> float:
    """The Streamer's ``streamer_events_total``, Puller heartbeats left out."""
    return sum(v for labels, v in samples.get("streamer_events_total", {}).items()
               if ("op", "heartbeat") not in labels)


def counter(samples: dict[str, Any], name: str) -> float:
    """A metric summed over its labels (0 when absent)."""
    return sum(samples.get(name, {}).values())


def cutoffs_logged(log: Path) -> list[dict[str, Any]]:
    """The Streamer's log lines of the streams it cut off: who, why, and
    how much was dropped with the queue."""
    pattern = re.compile(r"ended \((\S+) at .*?\): RESOURCE_EXHAUSTED: (.*?); (\d+) "
                         r"subscription\(s\) dropped(?:, (\d+) queued message\(s\) unsent)?")
    out = []
    with contextlib.suppress(OSError), open(log, errors="replace") as f:
        for line in f:
            found = pattern.search(line)
            if found:
                gateway, why, dropped, unsent = found.groups()
                out.append({"gateway": gateway, "why": why, "subscriptions": int(dropped),
                            "unsent_messages": int(unsent or 0)})
    return out


def table(headers: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    """A Markdown table."""
    return ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers),
            *("| " + " | ".join(row) + " |" for row in rows)]


def record(
    name: str, report: list[str], figures: dict[str, Any], lines: list[str],
    benchmark: Any = None,
) -> Path:
    """Keep a run's figures: in the final summary (``lines``), in
    ``bench/results/<name>.json`` and, given pytest-benchmark's fixture, in
    its ``extra_info``."""
    figures["meta"]["uptime_after"] = uptime()
    if benchmark is not None:
        benchmark.extra_info.update(figures)
    path = RESULTS_DIR / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(figures, indent=2, default=str) + "\n")
    meta = figures["meta"]
    report.extend([
        f"{name}: {meta['date']}, host {meta['host']}, {meta['cpus']} CPUs "
        f"({meta['cpu_model']}), {meta['python']}, commit {meta['commit'] or '?'}"
        + (" (quick sizes)" if meta["quick"] else ""),
        f"  before: {meta['uptime_before']}",
        f"  after:  {meta['uptime_after']}",
        *lines,
        f"figures written to {path}",
        "",
    ])
    return path
