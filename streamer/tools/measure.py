"""Measuring a running Streamer from outside, for the tools and the tests:
its ``/metrics`` read back (``scrape``) and turned into latency quantiles,
the CPU time and RSS of a process, and a free loopback port to start a
service on. One copy of each, shared by the demo, the benchmarks and the
tests."""

from __future__ import annotations

import math
import os
import socket
import urllib.request
from collections.abc import Mapping, Sequence
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def free_port() -> int:
    """A TCP port free on loopback now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads (Linux
    ``/proc``; NaN where that cannot be read)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            fields = f.read().rsplit(")", 1)[1].split()
    except OSError:
        return math.nan
    return (int(fields[11]) + int(fields[12])) / _TICK


def rss_mib(pid: int) -> float:
    """Resident memory of a process in MiB (Linux ``/proc``; NaN where that
    cannot be read)."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return math.nan


Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(address: str, timeout: float = 10.0) -> Samples:
    """The samples of ``http://ADDRESS/metrics``: name → {label pairs: value}."""
    with urllib.request.urlopen(f"http://{address}/metrics", timeout=timeout) as response:
        text = response.read().decode()
    out: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out.setdefault(sample.name, {})[tuple(sorted(sample.labels.items()))] = sample.value
    return out


def latency_buckets(
    samples: Samples, name: str = "streamer_ingest_latency_seconds"
) -> list[tuple[float, float]]:
    """Cumulative (upper bound, count) pairs of a histogram without labels
    (by default the ingest latency)."""
    bucket = samples.get(f"{name}_bucket", {})
    return sorted((float(dict(labels)["le"]), count) for labels, count in bucket.items())


def longest_pause(after: Samples, before: Samples) -> float:
    """The longest event-loop lag between two scrapes, as the upper bound of
    the highest bucket of ``streamer_event_loop_lag_seconds`` that gained an
    observation (NaN without the metric)."""
    late, early = (dict(latency_buckets(s, "streamer_event_loop_lag_seconds"))
                   for s in (after, before))
    if not late:
        return math.nan
    below = 0.0
    longest = 0.0
    for le, count in sorted(late.items()):
        gained = count - early.get(le, 0.0)
        if gained > below:
            longest = le
        below = gained
    return longest


def gc_seconds(samples: Samples) -> float:
    """Seconds this process spent in garbage collection, all generations."""
    return sum(samples.get("streamer_gc_pause_seconds_sum", {}).values())


def histogram_quantile(
    q: float, after: Sequence[tuple[float, float]], before: Sequence[tuple[float, float]] = ()
) -> float:
    """The ``q`` quantile of the observations between two readings of
    cumulative buckets, interpolated inside its bucket as PromQL's
    ``histogram_quantile``; NaN without observations."""
    base = dict(before)
    cumulative = [(le, count - base.get(le, 0.0)) for le, count in after]
    if not cumulative or cumulative[-1][1] <= 0:
        return math.nan
    rank = q * cumulative[-1][1]
    lower, below = 0.0, 0.0
    for le, count in cumulative:
        if count >= rank:
            if math.isinf(le):
                return lower
            return lower + (le - lower) * (rank - below) / max(count - below, 1e-12)
        lower, below = le, count
    return lower


_Value = TypeVar("_Value", int, float)


def quantile(counts: Mapping[_Value, int], q: float) -> float:
    """The ``q`` quantile of observations given as value → count (NaN when
    there are none)."""
    total = sum(counts.values())
    if total == 0:
        return math.nan
    rank = q * total
    seen = 0
    for value in sorted(counts):
        seen += counts[value]
        if seen >= rank:
            return float(value)
    return float(max(counts))
